"""schemathesis against the daemon's own OpenAPI schema, as a tenant and as the admin:
how many requests it generated, and how many got a server error (there must be none),
counted from the HAR file of every exchange, not from schemathesis's own summary.

The daemon runs tasks as pool users when run as root (the generated specs are run:
random commands must not run as root). The logs path is left out (with `follow` it
streams until a task ends).

Usage: python bench/fuzz.py [--examples 400]
Prints a human summary, then JSON on the last line.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpuprovider.testing import Provider, free_port, make_home, running

ST = str(Path(sys.executable).parent / "st")


def fuzz(provider: Provider, token: str, examples: int, har: Path) -> dict:
    started = time.monotonic()
    done = subprocess.run(
        [
            ST,
            "run",
            f"{provider.url}/api/v1/openapi.json",
            "-H",
            f"Authorization: Bearer {token}",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            str(examples),
            "--exclude-path-regex",
            "logs",
            "--continue-on-failure",
            "--seed",
            "1",
            "--report",
            "har",
            "--report-har-path",
            str(har),
        ],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    entries = json.loads(har.read_text())["log"]["entries"]
    codes = collections.Counter(e["response"]["status"] for e in entries)
    errors = [
        f"{e['request']['method']} {e['request']['url']} -> {e['response']['status']}"
        for e in entries
        if e["response"]["status"] >= 500
    ]
    return {
        "requests": len(entries),
        "server_errors": len(errors),
        "first_errors": errors[:5],
        "statuses": {str(k): v for k, v in sorted(codes.items())},
        "schemathesis_exit": done.returncode,
        "seconds": round(time.monotonic() - started, 1),
        "tail": done.stdout[-1500:] if errors or done.returncode else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=400, help="per operation and phase")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    with tempfile.TemporaryDirectory(prefix="gpp-fuzz-") as tmp:
        root = Path(tmp)
        port = free_port()
        users = "pool" if os.geteuid() == 0 else "none"
        with running(make_home(root / "home", port, task_users=users), port) as provider:
            made = provider.api.post(
                "/tokens", json={"name": "fuzz-tenant", "scopes": ["read", "submit"]}
            ).json()
            results = {
                "tenant": fuzz(provider, made["token"], args.examples, root / "tenant.har"),
                "admin": fuzz(provider, provider.token, args.examples, root / "admin.har"),
            }
            crashed = "Traceback" in provider.log()
    total = sum(r["requests"] for r in results.values())
    errors = sum(r["server_errors"] for r in results.values())
    for who, r in results.items():
        print(
            f"{who:>6}: {r['requests']} requests in {r['seconds']} s, "
            f"{r['server_errors']} server errors; statuses {r['statuses']}"
        )
        for line in r["first_errors"]:
            print("        ", line)
    print(f"total: {total} requests, {errors} server errors, daemon traceback: {crashed}")
    print(json.dumps({"requests": total, "server_errors": errors, "traceback": crashed, **results}))


if __name__ == "__main__":
    main()
