"""Restart safety: kill -9 the daemon while tasks run, start it again."""

import signal
import socket
import sys
from pathlib import Path

import psutil
import pytest

from gpuprovider.backends.base import Handle
from gpuprovider.backends.launch import build_launch
from gpuprovider.backends.local import LocalProcesses
from gpuprovider.bootstrap import ADMIN
from gpuprovider.domain.spec import TaskSpec
from gpuprovider.domain.states import TaskState as S
from gpuprovider.isolation.policy import Settings
from gpuprovider.lifecycle import tasks as lifecycle
from gpuprovider.store.store import Store
from gpuprovider.testing import wait_for

PY = sys.executable


def gated_job(gate: Path, starts: Path, code: int) -> list[str]:
    """A job that records each start, waits for `gate` to exist, then exits `code`."""
    script = (
        "import os, pathlib, sys, time\n"
        "task = os.environ['GPUPROVIDER_TASK_ID']\n"
        f"with open({str(starts)!r}, 'a') as f: f.write(task + '\\n')\n"
        f"while not pathlib.Path({str(gate)!r}).exists(): time.sleep(0.02)\n"
        f"sys.exit({code})\n"
    )
    return [PY, "-c", script]


@pytest.mark.slow
def test_kill_9_then_restart_readopts_and_records_real_exit_codes(fresh_provider, tmp_path):
    p = fresh_provider
    p.start()
    starts = tmp_path / "starts.txt"
    h100 = {"gpu": "H100:1"}  # the home has two: a and b take both, c must wait
    finishes_while_down = p.submit(
        name="a", command=gated_job(tmp_path / "gate-a", starts, 7), resources=h100
    )
    keeps_running = p.submit(
        name="b", command=gated_job(tmp_path / "gate-b", starts, 0), resources=h100
    )
    p.submit(name="c", command=["true"], resources=h100)
    running_b = p.wait_state("b", "running")
    p.wait_state("a", "running")
    wait_for(lambda: starts.exists() and len(starts.read_text().split()) == 2)
    waiting = wait_for(lambda: "H100" in (t := p.task("c"))["reason"] and t, what="c to wait")
    assert waiting["state"] == "queued"

    p.stop(signal.SIGKILL)
    (tmp_path / "gate-a").touch()  # a finishes while no daemon watches
    run_dir = Path(p.task_dir(finishes_while_down["id"]))
    wait_for(lambda: (run_dir / "exit-1.json").exists(), what="a to finish")
    assert psutil.pid_exists(running_b["pid"])

    p.start()
    a = p.wait_state("a", "failed")
    assert a["exit_code"] == 7 and a["attempt"] == 1
    b = p.task("b")
    assert b["state"] == "running" and b["pid"] == running_b["pid"]  # adopted, not restarted
    (tmp_path / "gate-b").touch()
    assert p.wait_state("b", "succeeded")["exit_code"] == 0
    # the third got a GPU once a's end was recorded after the restart, not before
    c = p.wait_state("c", "succeeded")
    assert c["started_at"] >= a["finished_at"]
    # nobody ran twice
    assert sorted(starts.read_text().split()) == sorted(
        [finishes_while_down["id"], keeps_running["id"]]
    )


@pytest.mark.slow
def test_sigterm_stops_daemon_cleanly_and_tasks_keep_running(fresh_provider, tmp_path):
    p = fresh_provider
    p.start()
    starts = tmp_path / "starts.txt"
    task = p.submit(name="steady", command=gated_job(tmp_path / "gate", starts, 0))
    running = p.wait_state("steady", "running")
    assert p.stop(signal.SIGTERM) == 0
    assert "gpuprovider stopped" in p.log()
    assert psutil.pid_exists(running["pid"])
    p.start()
    (tmp_path / "gate").touch()
    assert p.wait_state("steady", "succeeded")["attempt"] == 1
    assert starts.read_text().split() == [task["id"]]


@pytest.mark.slow
def test_runner_killed_while_daemon_down_is_lost_and_retried(fresh_provider, tmp_path):
    p = fresh_provider
    p.start()
    starts = tmp_path / "starts.txt"
    p.submit(
        name="fragile",
        command=gated_job(tmp_path / "gate", starts, 0),
        retry={"attempts": 2, "backoff_s": 0},
    )
    first = p.wait_state("fragile", "running")
    p.stop(signal.SIGKILL)
    # the runner and its command die with no exit record, e.g. the machine's OOM killer
    runner = psutil.Process(first["pid"])
    for proc in [*runner.children(recursive=True), runner]:
        proc.kill()
    p.start()
    (tmp_path / "gate").touch()
    done = p.wait_state("fragile", "succeeded")
    assert done["attempt"] == 2
    assert any("lost" in e["reason"] for e in done["events"])


def test_second_daemon_on_the_same_home_is_refused(fresh_provider):
    p = fresh_provider
    p.start()
    second = p.cli("up", timeout=30)
    assert second.returncode == 1 and "another gpuprovider daemon" in second.stderr


def test_a_taken_port_is_a_clear_error(fresh_provider):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", fresh_provider.port))
        squatter.listen(1)
        done = fresh_provider.cli("up", timeout=30)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{fresh_provider.port}" in done.stderr
    assert "Traceback" not in done.stderr


def crashed_while_starting(p, starts: Path, gate: Path, runner_started: bool) -> str:
    """Leave the store as a daemon killed in the middle of a start leaves it: a
    single-attempt job recorded `starting` with its attempt counted, and its runner
    started (`runner_started`) or not yet. The id of the job."""
    p.start()
    p.stop(signal.SIGKILL)  # the node is registered; no daemon now
    store = Store(p.home.store_url(""))
    try:
        with store.tx() as tx:  # what the API and the scheduler write, then the executor
            task = tx.tasks.insert(
                TaskSpec(command=gated_job(gate, starts, 0), retry={"attempts": 1}), ADMIN
            )
            lifecycle.submit(tx, task)
            node = tx.nodes.list()[0]
            tx.tasks.allocate(task, node.id, [], 0, 0, 0)
            lifecycle.transition(tx, task, S.SCHEDULED, "placed")
            run_dir = str(p.home.tasks / task.id)
            lifecycle.transition(tx, task, S.STARTING, "starting", run_dir=run_dir)
        if runner_started:
            with store.read() as r:
                task = r.tasks.get(task.id)
                [allocation] = r.tasks.active_allocations_of([task.id])
            launch = build_launch(task, allocation, [], run_dir, 1.0, (31000, 31999), [], None)
            [handle] = LocalProcesses(p.home.tasks, isolation=Settings(users="none")).start_many(
                [launch]
            )
            assert isinstance(handle, Handle)
            wait_for(lambda: starts.exists(), what="the runner's command to start")
    finally:
        store.close()
    assert task.attempt == 1  # counted, as the executor counts it before it spawns
    return task.id


@pytest.mark.slow
def test_a_start_cut_short_by_a_crash_costs_no_attempt(fresh_provider, tmp_path):
    p, starts, gate = fresh_provider, tmp_path / "starts.txt", tmp_path / "gate"
    task_id = crashed_while_starting(p, starts, gate, runner_started=False)
    gate.touch()
    p.start()
    done = p.wait_state(task_id, "succeeded")
    assert done["attempt"] == 1  # the start that never happened was given back
    assert any("daemon stopped while starting it; re-queued" in e["reason"] for e in done["events"])
    assert starts.read_text().split() == [task_id]  # and it ran once


@pytest.mark.slow
def test_a_start_that_happened_before_a_crash_is_readopted(fresh_provider, tmp_path):
    p, starts, gate = fresh_provider, tmp_path / "starts.txt", tmp_path / "gate"
    task_id = crashed_while_starting(p, starts, gate, runner_started=True)
    p.start()
    running = p.wait_state(task_id, "running")
    assert any("re-adopted pid" in e["reason"] for e in running["events"])
    gate.touch()
    done = p.wait_state(task_id, "succeeded")
    assert done["attempt"] == 1 and done["exit_code"] == 0
    assert starts.read_text().split() == [task_id]  # never started twice
