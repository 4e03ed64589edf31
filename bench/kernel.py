"""The lifecycle kernel's figures: the journal's write rate, how soon a lease hears its
task end, the daemon's idle cost with many closed leases, /health under load.

Each beside its baseline in the same run:
  - journal: task transitions written through the kernel (state, rules, journal row),
    against the same number of plain guarded UPDATEs of the task row (what a transition
    cost before anything was journalled), on one SQLite store;
  - a lease closing when its task ends: the kernel does it in the task's transaction
    (the delay is 0 by construction; measured as the gap between the two rows' times),
    against the keeper's poll before this step (up to its 0.2 s period plus a scan of
    every lease), given as that period;
  - a daemon's idle CPU with --closed closed leases in its store, against the same
    daemon with none;
  - /health p50/p99 while --tasks tasks run and --leases leases are live, against an
    idle daemon.

Usage: python bench/kernel.py [--transitions 20000] [--closed 10000] [--tasks 200]
                              [--leases 100] [--only journal|lease|idle|health]
Prints a human summary, then JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import bindparam, insert, update

from gpuprovider.domain.process import Exit
from gpuprovider.domain.states import TaskState
from gpuprovider.lifecycle import tasks as lifecycle
from gpuprovider.market.model import LeaseState
from gpuprovider.store import migrate
from gpuprovider.store import schema as t
from gpuprovider.store.store import Store
from gpuprovider.store.tasks import new_task_id
from gpuprovider.testing import MARKET_JOB, MarketWorld, StoreWorld, kill_task_processes

sys.path.insert(0, str(Path(__file__).parent))
from core import idle_figures, ms, start_provider

S = TaskState
CYCLE = [S.SCHEDULED, S.STARTING, S.RUNNING, S.PREEMPTED, S.QUEUED]


# The same loop of task transitions, run by another checkout's code (the one before
# the kernel) in a process of its own: `python -c LOOP <src> <store> <transitions>`.
LOOP = """
import sys, time
sys.path.insert(0, sys.argv[1])
from gpuprovider.domain.spec import TaskSpec
from gpuprovider.domain.states import TaskState as S
from gpuprovider.lifecycle import tasks as lifecycle
from gpuprovider.store import migrate
from gpuprovider.store.store import Store
store = Store("sqlite:///" + sys.argv[2]); migrate.upgrade(store)
spec = TaskSpec.model_validate({"command": ["true"]})
with store.tx() as tx:
    tasks = [tx.tasks.insert(spec, "b") for _ in range(200)]
    for task in tasks:
        lifecycle.submit(tx, task)
cycle = [S.SCHEDULED, S.STARTING, S.RUNNING, S.PREEMPTED, S.QUEUED]
done, wanted, started = 0, int(sys.argv[3]), time.perf_counter()
while done < wanted:
    with store.tx() as tx:
        for task in tasks:
            following = cycle.index(task.state) + 1 if task.state in cycle else 0
            lifecycle.transition(tx, task, cycle[following % len(cycle)], "bench")
            done += 1
print(round(wanted / (time.perf_counter() - started)))
"""


def baseline_rate(src: Path, root: Path, transitions: int) -> int:
    """Task transitions/s of the code at `src` (a checkout's src/), same loop."""
    done = subprocess.run(
        [sys.executable, "-c", LOOP, str(src), str(root / "baseline.db"), str(transitions)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(src)},
    )
    return int(done.stdout.strip().splitlines()[-1])


def journal_rate(root: Path, transitions: int) -> dict:
    """Transitions/s through the kernel (each with its journal row and rules), and plain
    guarded updates/s of the same rows, on one store."""
    world = StoreWorld(root / "journal")
    tasks = [world.submit(resources={"gpu": "0"}) for _ in range(200)]
    done = 0
    started = time.perf_counter()
    while done < transitions:
        with world.store.tx() as tx:  # a batch per transaction, as the loops write
            for task in tasks:
                following = CYCLE.index(task.state) + 1 if task.state in CYCLE else 0
                lifecycle.transition(tx, task, CYCLE[following % len(CYCLE)], "bench")
                done += 1
    kernel_s = time.perf_counter() - started
    plain = Store(f"sqlite:///{root / 'plain.db'}")
    migrate.upgrade(plain)
    ids = [new_task_id() for _ in range(200)]
    now = time.time()
    with plain.tx() as tx:
        tx.conn.execute(
            insert(t.tasks),
            [
                {"id": i, "tenant": "b", "kind": "job", "state": "queued", "spec": {},
                 "priority": 0, "created_at": now, "updated_at": now, "version": 0}
                for i in ids
            ],
        )  # fmt: skip
    guarded = (
        update(t.tasks)
        .where(t.tasks.c.id == bindparam("b_id"), t.tasks.c.version == bindparam("b_version"))
        .values(state=bindparam("state"), version=bindparam("version"))
    )
    done = 0
    version = 0
    started = time.perf_counter()
    while done < transitions:
        with plain.tx() as tx:
            for task_id in ids:
                tx.conn.execute(
                    guarded,
                    {
                        "b_id": task_id,
                        "b_version": version,
                        "state": "running",
                        "version": version + 1,
                    },
                )
                done += 1
        version += 1
    plain_s = time.perf_counter() - started
    done = 0
    started = time.perf_counter()
    while done < transitions:  # the journal alone: one row per transition, batched
        with plain.tx() as tx:
            for task_id in ids:
                tx.journal.write("task", task_id, "b", "queued", "running", "bench")
                done += 1
    journal_s = time.perf_counter() - started
    with world.store.read() as r:
        rows = r.journal.last_id()
    world.store.close()
    plain.close()
    return {
        "kernel_transitions_per_s": round(transitions / kernel_s),
        "journal_appends_per_s": round(transitions / journal_s),
        "plain_guarded_updates_per_s": round(transitions / plain_s),
        "journal_rows": rows,
    }


def lease_delay(root: Path, leases: int) -> dict:
    """How long after its task ended a lease is closed: the gap between the task's end
    and the lease's close in the journal, over `leases` leases."""
    market = MarketWorld(root / "leases", Ed25519PrivateKey.generate())
    gaps = []
    for i in range(leases):
        lease_id = f"ord-{i}"
        market.won(lease_id, MARKET_JOB | {"resources": {"gpus": 0}})
        task = market.task_of(lease_id)
        market.run(task)
        market.end(market.get(task.id), Exit(0, "exited with code 0"))
        with market.store.read() as r:
            ended = [e.at for e in r.tasks.events(task.id) if e.to_state == "succeeded"][-1]
            closed = [e.at for e in r.market.history(lease_id) if e.to_state == "closed"][-1]
        gaps.append(closed - ended)
    market.store.close()
    return {
        "task_end_to_lease_closed": ms(gaps),
        "baseline_keeper_poll_s": 0.2,
        "leases": leases,
    }


def _order(duration_s: int) -> dict:
    return {
        "id": "x",
        "market": "hub",
        "kind": "job",
        "resources": {"gpus": 0},
        "max_price_per_hour": 1,
        "duration_s": duration_s,
        "payload": {"command": ["true"]},
    }


def fill_closed_leases(url: str, count: int) -> None:
    """`count` closed and reported leases, as a long-lived provider accumulates."""
    store = Store(url)
    now = time.time()
    order = _order(600)
    rows = [
        {"id": f"old-{i}", "market": "hub", "state": LeaseState.CLOSED.value,
         "order": order | {"id": f"old-{i}"}, "reported": "closed", "close_reason": "completed",
         "running_since": now - 100, "ended_at": now - 50, "created_at": now - count + i,
         "updated_at": now}
        for i in range(count)
    ]  # fmt: skip
    with store.engine.begin() as conn:
        conn.execute(insert(t.market_leases), rows)
    store.close()


def market_provider(root: Path) -> object:
    provider = start_provider(root)
    provider.stop()
    text = provider.home.config.read_text()
    hub = "http://127.0.0.1:9"  # a hub that is down: the daemon keeps trying, as it would
    provider.home.config.write_text(
        text + f'\n[market.hub]\nurl = "{hub}"\nverifier_key = "{"a" * 64}"\n'
    )
    return provider


def idle(root: Path, closed: int) -> dict:
    provider = market_provider(root)
    provider.start()
    try:
        empty = idle_figures(provider)
    finally:
        provider.stop()
    fill_closed_leases(provider.home.store_url(""), closed)
    provider.start()
    try:
        full = idle_figures(provider)
    finally:
        provider.stop()
    return {"no_leases": empty, f"with_{closed}_closed_leases": full}


def health(root: Path, tasks: int, leases: int) -> dict:
    provider = market_provider(root)
    provider.start()
    try:
        quiet = _health_times(provider, 300)
        for i in range(tasks):
            provider.submit(name=f"sleeper-{i}", command=["sleep", "600"], resources={"gpu": "0"})
        running = time.time()
        _live_leases(provider, leases)
        while sum(1 for x in provider.api.get("/tasks", params={"limit": 100000}).json()
                  if x["state"] == "running") < tasks and time.time() - running < 120:  # fmt: skip
            time.sleep(0.5)
        loaded = _health_times(provider, 300)
    finally:
        provider.cancel_all()
        provider.stop()
        kill_task_processes(provider.home)
    return {"idle": ms(quiet), f"{tasks}_tasks_{leases}_leases": ms(loaded)}


def _live_leases(provider: object, count: int) -> None:
    """`count` leases running at a hub that is down: each reported with backoff."""
    store = Store(provider.home.store_url(""))
    now = time.time()
    order = _order(86400)
    with store.tx() as tx:
        for i in range(count):
            lease_id = f"live-{i}"
            order["id"] = lease_id
            tx.market.add(
                lease_id, "hub", LeaseState.RUNNING, order, "bench", running_since=now,
                reported="running",
            )  # fmt: skip
    store.close()


def _health_times(provider: object, count: int) -> list[float]:
    times = []
    with httpx.Client(base_url=provider.url) as client:
        for _ in range(count):
            started = time.perf_counter()
            assert client.get("/api/v1/health").status_code == 200
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transitions", type=int, default=20000)
    parser.add_argument("--closed", type=int, default=10000)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--leases", type=int, default=100)
    parser.add_argument("--only", choices=["journal", "lease", "idle", "health"])
    parser.add_argument(
        "--baseline-src",
        type=Path,
        help="src/ of a checkout from before the kernel (git worktree add ... c284ddc): "
        "its task transitions/s are measured beside, in the same run",
    )
    args = parser.parse_args()
    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.only in (None, "journal"):
            figures["journal"] = journal_rate(root, args.transitions)
            if args.baseline_src:
                figures["journal"]["baseline_transitions_per_s"] = baseline_rate(
                    args.baseline_src, root, args.transitions
                )
            print("journal:", figures["journal"])
        if args.only in (None, "lease"):
            figures["lease_close"] = lease_delay(root, 50)
            print("lease close:", figures["lease_close"])
        if args.only in (None, "idle"):
            figures["idle"] = idle(root / "idle", args.closed)
            print("idle:", figures["idle"])
        if args.only in (None, "health"):
            figures["health"] = health(root / "health", args.tasks, args.leases)
            print("health:", figures["health"])
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
