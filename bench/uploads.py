"""Code in: how long `--upload` takes, and what a volume adds to a task's start.

1. A folder of 10,000 files, 100 MB in all (random bytes: the worst case for gzip), sent
   with the CLI's own code (`cli.task.send_folder`) to a real daemon: first time (pack,
   hash, PUT, check), then unchanged (goal: under 1 s). Baseline, same run: the same
   folder packed by the system's `tar czf` (what a person would do by hand, before
   sending a byte).
2. Task start with a 1 GB volume (1,000 files of 1 MiB) mounted, against the same task
   without one: the time from `starting` to `running` in the task's events (the node's
   work: folders, user, cgroup, the volume's size check and hand-over, the runner's
   fork), p50 over N tasks each (goal: under 50 ms more).

Usage: python bench/uploads.py [--starts 20]
Prints a human summary, then JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpuprovider.cli.client import Client
from gpuprovider.cli.task import send_folder
from gpuprovider.testing import Provider, free_port, kill_task_processes, make_home

FILES, TOTAL_BYTES = 10_000, 100 * 10**6
VOLUME_FILES, VOLUME_FILE_BYTES = 1_000, 1 << 20


def make_folder(root: Path) -> None:
    per = TOTAL_BYTES // FILES
    for i in range(FILES):
        sub = root / f"pkg{i // 500:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"mod{i:05d}.py").write_bytes(os.urandom(per))


def start_ms(provider: Provider, task_id: str) -> float:
    events = provider.task(task_id)["events"]
    at = {e["to"]: e["at"] for e in events}
    return (at["running"] - at["starting"]) * 1000


def starts(provider: Provider, n: int, volumes: list[dict]) -> list[float]:
    took = []
    for _ in range(n):
        task = provider.submit(command=["/bin/true"], volumes=volumes)
        provider.wait_state(task["id"], {"succeeded", "failed"}, timeout=60)
        took.append(start_ms(provider, task["id"]))
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--starts", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["XDG_CACHE_HOME"] = str(root / "cache")
        folder = root / "project"
        folder.mkdir()
        make_folder(folder)
        t = time.perf_counter()
        by_hand = ["tar", "czf", str(root / "by-hand.tar.gz"), "-C", str(folder), "."]
        subprocess.run(by_hand, check=True)
        tar_s = time.perf_counter() - t
        port = free_port()
        users = "pool" if os.geteuid() == 0 else "none"
        home = make_home(root / "home", port, task_users=users)
        text = home.config.read_text().replace("upload_quota_mib = 2048", "upload_quota_mib = 512")
        home.config.write_text(text)
        provider = Provider(home, port)
        provider.start()
        try:
            client = Client(provider.url, provider.token, timeout_s=600)
            t = time.perf_counter()
            ref = send_folder(client, folder)
            first_s = time.perf_counter() - t
            t = time.perf_counter()
            assert send_folder(client, folder) == ref
            second_s = time.perf_counter() - t
            t = time.perf_counter()
            cli = provider.cli("task", "run", "--upload", str(folder), "--", "/bin/true")
            cli_s = time.perf_counter() - t
            assert cli.returncode == 0, cli.stderr
            made = provider.api.post("/volumes", json={"name": "bench", "size_mib": 1100})
            assert made.status_code == 201, made.text
            data = home.root / "volumes"
            volume = next(data.glob("*/bench/data"))
            for i in range(VOLUME_FILES):
                (volume / f"shard{i:04d}.bin").write_bytes(os.urandom(VOLUME_FILE_BYTES))
            starts(provider, 3, [])  # warm: the runner server, the user pool
            plain = starts(provider, args.starts, [])
            mounted = starts(provider, args.starts, [{"name": "bench", "path": "data"}])
            plain2 = starts(provider, args.starts, [])
        finally:
            provider.cancel_all()
            provider.stop()
            kill_task_processes(provider.home)
    without = statistics.median(plain + plain2)
    with_volume = statistics.median(mounted)
    result = {
        "upload_files": FILES,
        "upload_bytes": TOTAL_BYTES,
        "upload_first_s": round(first_s, 3),
        "upload_unchanged_s": round(second_s, 3),
        "upload_unchanged_cli_s": round(cli_s, 3),
        "baseline_tar_czf_s": round(tar_s, 3),
        "task_users": users,
        "start_without_volume_p50_ms": round(without, 2),
        "start_with_1gb_volume_p50_ms": round(with_volume, 2),
        "start_volume_extra_ms": round(with_volume - without, 2),
        "starts_each": args.starts,
    }
    print(
        f"upload of {FILES} files, {TOTAL_BYTES / 1e6:.0f} MB: first {first_s:.2f} s, unchanged "
        f"{second_s:.3f} s (whole CLI command {cli_s:.2f} s); `tar czf` alone {tar_s:.2f} s",
        file=sys.stderr,
    )
    print(
        f"task start (starting -> running, p50): {without:.1f} ms without a volume, "
        f"{with_volume:.1f} ms with a 1 GB volume ({with_volume - without:+.1f} ms)",
        file=sys.stderr,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
