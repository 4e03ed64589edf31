"""`gpuprovider fleet add`, measured against a real sshd on 127.0.0.1 (Debian's
openssh-server): each "host" is this machine with a prefix of its own, so every host
gets a fresh venv and the whole install (84 wheels copied, then installed with no index).

  single:    one host alone (the baseline, in the same run)
  parallel:  N hosts at once (--parallel N): wall time, and each host's time
  again:     the same N hosts added again (what `fleet upgrade` does to a node that has
             every dependency: only gpuprovider's own wheel is copied and installed)

The wheels are repacked once before timing (the cache every later `fleet add` uses);
the time to make them is printed too. No Ray head runs: the units are written, verified
and enabled, not started, and no one waits for `ready`.

Usage: python bench/fleet.py [--hosts 3] [--wheelhouse /tmp/gpuprovider-test-wheels]
Prints a human summary, then JSON on the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gpuprovider.fleet import deploy, wheelhouse
from gpuprovider.fleet.inventory import from_targets
from gpuprovider.fleet.remote import KnownHosts
from gpuprovider.testing import Sshd, keygen


def quiet(host: str, step: str, status: str, detail: str) -> None:
    if status != "ok":
        print(f"  {host} {step} {status}: {detail}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--wheelhouse", type=Path, default=Path("/tmp/gpuprovider-test-wheels"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    key = root / "client_key"
    sshd = Sshd(root / "sshd", keygen(key))
    head = socket.socket()
    head.bind(("127.0.0.1", 0))
    head.listen(64)
    known = KnownHosts(root / "known_hosts", others=[])
    (root / "known_hosts").write_text(sshd.known_line())
    args.wheelhouse.mkdir(parents=True, exist_ok=True)
    try:
        started = time.monotonic()
        wheelhouse.wheels_for(sorted(set(wheelhouse.closure()) - {"gpuprovider"}), args.wheelhouse)
        wheels_s = time.monotonic() - started

        def hosts(names: list[str]) -> list:
            made = []
            for name in names:
                fields = {
                    "key": str(key),
                    "prefix": str(root / name / "opt"),
                    "unit_dir": str(root / name / "units"),
                    "simulate_gpus": ["h100-80gb-sxm:1"],
                }
                one = from_targets([f"root@127.0.0.1:{sshd.port}"], fields).hosts[0]
                made.append(dataclasses.replace(one, name=name))
            return made

        def run(names: list[str]) -> tuple[float, list[deploy.Outcome]]:
            plan = deploy.Plan(
                head=f"127.0.0.1:{head.getsockname()[1]}",
                known=known,
                accept_new=False,
                wheel_dir=args.wheelhouse,
            )
            began = time.monotonic()
            outcomes = asyncio.run(
                deploy.run_all(hosts(names), len(names), lambda h: deploy.add_host(h, plan, quiet))
            )
            failed = [o for o in outcomes if not o.ok]
            if failed:
                raise SystemExit(f"failed: {failed}")
            return time.monotonic() - began, outcomes

        single_s, _ = run(["single"])
        names = [f"host-{i}" for i in range(args.hosts)]
        parallel_s, outcomes = run(names)
        again_s, again = run(names)
    finally:
        sshd.stop()
        head.close()
        shutil.rmtree(root, ignore_errors=True)  # a venv per host: a GB or more
    per_host = [o.seconds for o in outcomes]
    figures = {
        "hosts": args.hosts,
        "wheels_made_s": round(wheels_s, 1),
        "single_host_s": round(single_s, 1),
        "parallel_wall_s": round(parallel_s, 1),
        "parallel_per_host_s": {"min": round(min(per_host), 1), "max": round(max(per_host), 1),
                                "median": round(statistics.median(per_host), 1)},
        "speedup_vs_one_at_a_time": round(args.hosts * single_s / parallel_s, 2),
        "again_wall_s": round(again_s, 1),
        "again_per_host_s": round(statistics.median(o.seconds for o in again), 1),
    }  # fmt: skip
    print(
        f"wheels made in {wheels_s:.0f}s; one host {single_s:.0f}s; {args.hosts} hosts "
        f"in parallel {parallel_s:.0f}s (each {min(per_host):.0f}-{max(per_host):.0f}s); "
        f"again {again_s:.0f}s"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
