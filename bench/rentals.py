"""Rentals: request -> SSH ready, and the owner's preemptible work giving way.

    sudo .venv/bin/python bench/rentals.py   # --rentals 10

As root with podman, runc, dropbear-bin, busybox-static, e2fsprogs and openssh-client
(make test installs them). A provider on this machine (simulated GPUs, pool users,
podman with runc) and the rental image from `rentals/image.py`, already imported (a
cached image, as the issue's goal says). For each of --rentals rentals, from the client:
the request sent -> an SSH login answered (OpenSSH's client, host key checked), for the
first start and for a start after a stop; the provider's own `ready_s` (request -> the
container running). Then the same with the owner's preemptible job holding every GPU:
the request -> the rental running, the eviction included. Baseline in the same run: the
same image and SSH server started by `podman run` directly, to a login answered.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpuprovider.rentals import image
from gpuprovider.testing import Provider, free_port, kill_task_processes, make_home

IMAGE = "localhost/gpp-rental:bench"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": pct(values, 0.5), "p99_ms": pct(values, 0.99), "max_ms": pct(values, 1.0),
            "mean_ms": round(statistics.mean(values) * 1000, 1)}  # fmt: skip


def login(host: str, port: int, user: str, key: Path, known: Path, deadline_s: float) -> float:
    """Seconds until an SSH login answers (tried every 20 ms)."""
    argv = ["ssh", "-F", "none", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
            "-o", "ConnectTimeout=2", f"{user}@{host}", "true"]  # fmt: skip
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        if subprocess.run(argv, capture_output=True, timeout=10).returncode == 0:
            return time.monotonic()
        time.sleep(0.02)
    raise TimeoutError(f"no SSH login on {port} within {deadline_s} s")


def wait_state(p: Provider, name: str, state: str, timeout: float = 60) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        rental = p.api.get(f"/rentals/{name}").json()
        if rental["state"] == state:
            return rental
        time.sleep(0.02)
    raise TimeoutError(f"rental {name} not {state}: {rental}")


def baseline(folder: Path, key: Path, pub: str, count: int) -> list[float]:
    """`podman run` of the same image and SSH server, no provider: -> login answered."""
    times = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # as the provider passes it
    for i in range(count):
        home = folder / f"base-{i}"
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh/authorized_keys").write_text(pub + "\n")
        host_key = folder / f"base-{i}.key"
        made = subprocess.run(["dropbearkey", "-t", "ed25519", "-f", str(host_key)],
                              capture_output=True, text=True, check=True)  # fmt: skip
        public = next(x for x in made.stdout.splitlines() if x.startswith("ssh-ed25519"))
        port = free_port()
        known = folder / f"base-{i}.known"
        known.write_text(f"[127.0.0.1]:{port} {' '.join(public.split()[:2])}\n")
        subprocess.run(["chown", "-R", "65534:65534", str(host_key)], check=True)
        name = f"gpp-bench-base-{i}"
        start = time.monotonic()
        subprocess.run(
            ["podman", "run", "-d", "--rm", "--init", "--name", name, "--runtime", "runc",
             "--cap-drop", "ALL", "--read-only", "--user", "65534:65534", "--ulimit",
             f"nofile={soft}:{hard}", "--ulimit", "nproc=4096:4096",
             "--passwd-entry", "bench:x:65534:65534:b:/home/bench:/bin/sh",
             "--mount", f"type=bind,src={home},dst=/home/bench,ro",
             "--mount", f"type=bind,src={host_key},dst=/etc/hk,ro", "-p", f"{port}:{port}",
             "--", IMAGE, "/usr/sbin/dropbear", "-F", "-E", "-s", "-p", str(port), "-r",
             "/etc/hk", "-P", "/tmp/d.pid"],
            capture_output=True, check=True,
        )  # fmt: skip
        times.append(login("127.0.0.1", port, "bench", key, known, 60) - start)
        subprocess.run(["podman", "rm", "-f", name], capture_output=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rentals", type=int, default=10)
    args = parser.parse_args()
    for tool in ("podman", "runc", "ssh", "ssh-keygen", "dropbearkey", "mkfs.ext4"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    image.build("podman", IMAGE)
    folder = Path(tempfile.mkdtemp(prefix="gpp-bench-rentals-"))
    key = folder / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    pub = (folder / "key.pub").read_text().strip()
    port = free_port()
    home = make_home(folder / "home", port, container_engine="podman", task_users="pool")
    home.config.write_text(
        home.config.read_text().replace('container_runtime = ""', 'container_runtime = "runc"')
    )
    base = baseline(folder, key, pub, args.rentals)
    p = Provider(home, port)
    p.start()
    first, again, ready, again_ready, evicting, evicting_ready = [], [], [], [], [], []
    try:
        for i in range(args.rentals):
            name = f"b{i}"
            known = folder / f"{name}.known"
            start = time.monotonic()
            made = p.api.post("/rentals", json={"name": name, "image": IMAGE, "ssh_keys": [pub],
                                                "disk_gib": 0.05, "gpu": 1})  # fmt: skip
            assert made.status_code == 201, made.text
            rental = made.json()
            known.write_text(rental["ssh"]["known_hosts"] + "\n")
            first.append(login("127.0.0.1", rental["ssh"]["port"], name, key, known, 60) - start)
            ready.append(wait_state(p, name, "running")["ready_s"])
            p.api.post(f"/rentals/{name}/stop")
            wait_state(p, name, "stopped")
            start = time.monotonic()
            p.api.post(f"/rentals/{name}/start")
            again.append(login("127.0.0.1", rental["ssh"]["port"], name, key, known, 60) - start)
            again_ready.append(wait_state(p, name, "running")["ready_s"])
            p.api.post(f"/rentals/{name}/stop")
            wait_state(p, name, "stopped")
            p.api.delete(f"/rentals/{name}")
        for i in range(args.rentals):  # the owner's job holds all 3 GPUs, preemptible
            owner = p.submit(command=["/usr/bin/python3", "-c", "import time; time.sleep(600)"],
                             resources={"gpu": 3}, preemptible=True, priority=-10)  # fmt: skip
            p.wait_state(owner["id"], "running", timeout=60)
            name = f"e{i}"
            known = folder / f"{name}.known"
            start = time.monotonic()
            made = p.api.post("/rentals", json={"name": name, "image": IMAGE, "ssh_keys": [pub],
                                                "disk_gib": 0.05, "whole_node": True})  # fmt: skip
            rental = made.json()
            known.write_text(rental["ssh"]["known_hosts"] + "\n")
            evicting.append(login("127.0.0.1", rental["ssh"]["port"], name, key, known, 60) - start)
            evicting_ready.append(wait_state(p, name, "running")["ready_s"])
            p.api.post(f"/tasks/{owner['id']}/cancel")
            p.api.post(f"/rentals/{name}/stop")
            wait_state(p, name, "stopped")
            p.api.delete(f"/rentals/{name}")
    finally:
        p.cancel_all()
        p.stop()
        kill_task_processes(home)
    print(json.dumps({
        "rentals": args.rentals,
        "request_to_ssh_login": summary(first),
        "start_after_stop_to_ssh_login": summary(again),
        "request_to_running_provider_ready_s": summary(ready),
        "start_to_running_provider_ready_s": summary(again_ready),
        "owner_work_evicted_request_to_ssh_login": summary(evicting),
        "owner_work_evicted_request_to_running": summary(evicting_ready),
        "baseline_podman_run_to_ssh_login": summary(base),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
