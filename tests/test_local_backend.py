"""The local backend and its runner: real processes, groups, signals, exit records."""

import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from gpuprovider.backends.base import Handle, Launch
from gpuprovider.backends.local import LocalBackend, process_alive
from gpuprovider.testing import wait_for


def launch(tmp_path: Path, code: str, attempt: int = 1, **kw) -> Launch:
    return Launch(
        task_id="t-test",
        attempt=attempt,
        argv=[sys.executable, "-c", code],
        env={**os.environ, "MARK": "x"},
        workdir=str(tmp_path / "work"),
        run_dir=str(tmp_path / "run"),
        **kw,
    )


def finish(backend, handle, timeout=15):
    return wait_for(lambda: backend.poll(handle), timeout, "the task to end")


def test_exit_code_output_and_workdir(tmp_path):
    backend = LocalBackend()
    handle = backend.start(
        launch(tmp_path, "import os,sys; print(os.getcwd(), os.environ['MARK']); sys.exit(3)")
    )
    ended = finish(backend, handle)
    assert ended.exit_code == 3 and ended.reason == "exited with code 3" and not ended.succeeded
    log = (tmp_path / "run" / "output.log").read_text()
    assert f"{tmp_path / 'work'} x" in log


def test_missing_program_is_a_clear_failure(tmp_path):
    backend = LocalBackend()
    spec = launch(tmp_path, "")
    spec.argv = ["no-such-program-xyz"]
    ended = finish(backend, backend.start(spec))
    assert ended.exit_code == 127 and "cannot start 'no-such-program-xyz'" in ended.reason


def test_stop_sends_sigterm_to_the_whole_group_then_sigkill(tmp_path):
    backend = LocalBackend()
    # A parent that ignores SIGTERM, with a child in the same group.
    code = (
        "import signal,subprocess,sys,time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "c = subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)'])\n"
        "print(c.pid, flush=True); time.sleep(60)\n"
    )
    handle = backend.start(launch(tmp_path, code, grace_s=0.5))
    log = tmp_path / "run" / "output.log"
    child_pid = int(wait_for(lambda: log.read_text().strip(), what="the child pid"))
    started = time.monotonic()
    backend.stop(handle)
    ended = finish(backend, handle)
    assert ended.stopped and ended.exit_code == -signal.SIGKILL
    assert time.monotonic() - started >= 0.5  # the grace period was given
    wait_for(
        lambda: not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == "zombie",
        what="the grandchild to be gone",
    )


def test_sigterm_honoured_within_grace(tmp_path):
    backend = LocalBackend()
    handle = backend.start(launch(tmp_path, "import time; time.sleep(60)", grace_s=30))
    wait_for(lambda: (tmp_path / "run" / "runner-1.json").exists())
    backend.stop(handle)
    ended = finish(backend, handle, timeout=10)
    assert ended.stopped and ended.exit_code == -signal.SIGTERM


def test_max_duration_is_enforced_by_the_runner(tmp_path):
    backend = LocalBackend()
    handle = backend.start(
        launch(tmp_path, "import time; time.sleep(60)", max_duration_s=0.3, grace_s=0.2)
    )
    ended = finish(backend, handle)
    assert ended.timed_out and "max duration" in ended.reason


def test_recycled_pid_is_not_mistaken_for_the_task(tmp_path):
    me = psutil.Process()
    assert process_alive(me.pid, me.create_time())
    assert not process_alive(me.pid, me.create_time() - 100)  # same pid, other process


def test_runner_killed_without_record_is_lost(tmp_path):
    backend = LocalBackend()
    handle = backend.start(launch(tmp_path, "import time; time.sleep(60)"))
    wait_for(lambda: (tmp_path / "run" / "runner-1.json").exists())
    backend.kill(handle)
    ended = finish(backend, handle)
    assert ended.lost and "vanished" in ended.reason


def test_adopted_process_is_polled_by_pid_and_start_time(tmp_path):
    first = LocalBackend()
    handle = first.start(launch(tmp_path, "import time; time.sleep(0.5)"))
    # A new backend (as after a daemon restart) knows only the recorded handle.
    second = LocalBackend()
    adopted = Handle(handle.pid, handle.start_time, handle.run_dir, handle.attempt)
    assert second.poll(adopted) is None
    assert finish(second, adopted).exit_code == 0


@pytest.mark.parametrize("exists", [True, False])
def test_recover_finds_a_runner_started_but_not_recorded(tmp_path, exists):
    backend = LocalBackend()
    handle = backend.start(launch(tmp_path, "import time; time.sleep(30)"))
    wait_for(lambda: (tmp_path / "run" / "runner-1.json").exists())
    if exists:
        found = LocalBackend().recover(str(tmp_path / "run"), 1)
        assert found is not None and found.pid == handle.pid
    else:
        assert LocalBackend().recover(str(tmp_path / "run"), 2) is None
    backend.kill(handle)
