"""`make up` on a fresh clone (#28): seconds from the command to an answering API
(the install included) and the virtual environment's size, beside the baseline of what
`make up` installed before (the test extra: torch, Ray, the Kubernetes client), in the
same run. Each clone gets its own `$HOME` (so its own provider home) and its own ports.

    .venv/bin/python bench/make_up.py [--skip-baseline]

Prints one line per measurement and JSON on the last line."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gpuprovider.testing import free_port  # noqa: E402


def folder_mib(path: Path) -> float:
    done = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[0]) / 1024


def make_up(work: Path, extra: str) -> dict:
    """Clone, then `make up` (with `extra` installed first for the baseline), timed until
    the API answers; then stop it."""
    clone = work / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    home = work / "home"
    home.mkdir()
    env = {
        "HOME": str(home),
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "LANG": "C.UTF-8",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        if key in os.environ:
            env[key] = os.environ[key]
    api, gateway = free_port(), free_port()
    started = time.monotonic()
    if extra:  # the baseline: what `make up` installed before
        subprocess.run(["make", ".venv/.core"], cwd=clone, env=env, check=True, capture_output=True)
        subprocess.run(
            [".venv/bin/python", "-m", "pip", "install", "-q", "-e", f".[{extra}]"],
            cwd=clone,
            env=env,
            check=True,
            capture_output=True,
        )
    # the ports are the only change from the defaults: two clones could not share them
    subprocess.run(["make", ".venv/.core"], cwd=clone, env=env, check=True, capture_output=True)
    subprocess.run(
        [".venv/bin/gpuprovider", "init"], cwd=clone, env=env, check=True, capture_output=True
    )
    config = home / ".gpuprovider" / "provider.toml"
    text = re.sub(r"(?m)^port = 8085$", f"port = {api}", config.read_text())
    config.write_text(re.sub(r"(?m)^port = 8086$", f"port = {gateway}", text))
    log = open(work / "up.log", "wb")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(
        ["make", "up"],
        cwd=clone,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(
                    f"make up exited {proc.returncode}: {(work / 'up.log').read_text()}"
                )
            try:
                if httpx.get(f"http://127.0.0.1:{api}/api/v1/health", timeout=1).is_success:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        ready_s = time.monotonic() - started
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
    shown = (work / "up.log").read_text()
    return {
        "ready_s": round(ready_s, 1),
        "venv_mib": round(folder_mib(clone / ".venv"), 1),
        "prints_both_urls": f":{api}/api/v1" in shown and f":{gateway}/s/" in shown,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpp-make-up-") as tmp:
        result["make_up"] = make_up(Path(tmp), "")
    print("make up (core):", result["make_up"], flush=True)
    if not args.skip_baseline:
        with tempfile.TemporaryDirectory(prefix="gpp-make-up-base-") as tmp:
            result["baseline_test_extra"] = make_up(Path(tmp), "test")
        print("baseline (core + test extra):", result["baseline_test_extra"], flush=True)
    result["load_average"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
