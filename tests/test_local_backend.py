"""The local backend and its runner: real processes, groups, signals, exit records,
the runner server that forks runners, and ports chosen on the node."""

import shutil
import signal
import socket
import stat
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from gpuprovider.backends.base import Handle, Launch, NoFreePort
from gpuprovider.backends.local import LocalProcesses, process_alive, read_exit
from gpuprovider.isolation.policy import Settings
from gpuprovider.testing import kill_processes_mentioning, wait_for


@pytest.fixture
def data_dir(tmp_path):
    """Where runner servers live for a test; none is left running after it."""
    path = tmp_path / "data"
    yield path
    kill_processes_mentioning(path)


# Tasks here run the test's own Python, which task users may not be able to read (it
# can live in root's home): they run as the provider's user, in their cgroups still.
# tests/test_isolation.py runs tasks as pool users.
AS_PROVIDER = Settings(users="none")


@pytest.fixture
def processes(data_dir):
    return LocalProcesses(data_dir, isolation=AS_PROVIDER)


def launch(tmp_path: Path, code: str, attempt: int = 1, **kw) -> Launch:
    return Launch(
        task_id="t-test",
        attempt=attempt,
        argv=[sys.executable, "-c", code],
        env={"MARK": "x"},
        workdir=str(tmp_path / "work"),
        run_dir=str(tmp_path / "run"),
        **kw,
    )


def finish(backend, handle, timeout=15):
    return wait_for(lambda: backend.poll(handle), timeout, "the task to end")


def test_exit_code_output_and_workdir(tmp_path, processes):
    backend = processes
    handle = backend.start(
        launch(tmp_path, "import os,sys; print(os.getcwd(), os.environ['MARK']); sys.exit(3)")
    )
    ended = finish(backend, handle)
    assert ended.exit_code == 3 and ended.reason == "exited with code 3" and not ended.succeeded
    log = (tmp_path / "run" / "output.log").read_text()
    assert f"{tmp_path / 'work'} x" in log


def test_missing_program_is_a_clear_failure(tmp_path, processes):
    backend = processes
    spec = launch(tmp_path, "")
    spec.argv = ["no-such-program-xyz"]
    ended = finish(backend, backend.start(spec))
    assert ended.exit_code == 127 and "cannot start 'no-such-program-xyz'" in ended.reason


def test_stop_sends_sigterm_to_the_whole_group_then_sigkill(tmp_path, processes):
    backend = processes
    # A parent that ignores SIGTERM, with a child in the same group.
    code = (
        "import signal,subprocess,sys,time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "c = subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)'])\n"
        "print(c.pid, flush=True); time.sleep(60)\n"
    )
    handle = backend.start(launch(tmp_path, code, grace_s=0.5))
    log = tmp_path / "run" / "output.log"
    said = wait_for(lambda: log.exists() and log.read_text().strip(), what="the child pid")
    child_pid = int(said)
    started = time.monotonic()
    backend.stop(handle)
    ended = finish(backend, handle)
    assert ended.stopped and ended.exit_code == -signal.SIGKILL
    assert time.monotonic() - started >= 0.5  # the grace period was given
    wait_for(
        lambda: not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == "zombie",
        what="the grandchild to be gone",
    )


def test_sigterm_honoured_within_grace(tmp_path, processes):
    backend = processes
    handle = backend.start(launch(tmp_path, "import time; time.sleep(60)", grace_s=30))
    wait_for(lambda: (tmp_path / "run" / "runner-1.json").exists())
    backend.stop(handle)
    ended = finish(backend, handle, timeout=10)
    assert ended.stopped and ended.exit_code == -signal.SIGTERM


def test_max_duration_is_enforced_by_the_runner(tmp_path, processes):
    backend = processes
    handle = backend.start(
        launch(tmp_path, "import time; time.sleep(60)", max_duration_s=0.3, grace_s=0.2)
    )
    ended = finish(backend, handle)
    assert ended.timed_out and "max duration" in ended.reason


def test_recycled_pid_is_not_mistaken_for_the_task(tmp_path):
    me = psutil.Process()
    assert process_alive(me.pid, me.create_time())
    assert not process_alive(me.pid, me.create_time() - 100)  # same pid, other process


def test_runner_killed_without_record_is_lost(tmp_path, processes):
    backend = processes
    handle = backend.start(launch(tmp_path, "import time; time.sleep(60)"))
    wait_for(lambda: (tmp_path / "run" / "runner-1.json").exists())
    backend.kill(handle)
    ended = finish(backend, handle)
    assert ended.lost and "vanished" in ended.reason


def test_adopted_process_is_polled_by_pid_and_start_time(tmp_path, data_dir):
    first = LocalProcesses(data_dir, isolation=AS_PROVIDER)
    handle = first.start(launch(tmp_path, "import time; time.sleep(0.5)"))
    # A new backend (as after a daemon restart) knows only the recorded handle.
    second = LocalProcesses(data_dir, isolation=AS_PROVIDER)
    adopted = Handle(handle.pid, handle.start_time, handle.run_dir, handle.attempt)
    assert second.poll(adopted) is None
    assert finish(second, adopted).exit_code == 0


@pytest.mark.parametrize("exists", [True, False])
def test_recover_finds_a_runner_started_but_not_recorded(tmp_path, data_dir, exists):
    backend = LocalProcesses(data_dir, isolation=AS_PROVIDER)
    handle = backend.start(launch(tmp_path, "import time; time.sleep(30)"))
    wait_for(lambda: (tmp_path / "run" / "runner-1.json").exists())
    restarted = LocalProcesses(data_dir, isolation=AS_PROVIDER)
    if exists:
        found = restarted.recover(str(tmp_path / "run"), 1)
        assert found is not None and found.pid == handle.pid
    else:
        assert restarted.recover(str(tmp_path / "run"), 2) is None
    backend.kill(handle)


def test_a_recycled_pid_is_not_recovered_as_the_runner(tmp_path, processes):
    handle = processes.start(launch(tmp_path, "import time; time.sleep(30)"))
    record = tmp_path / "run" / "runner-1.json"
    wait_for(record.exists)
    # the record says the runner started at another time than the pid's process
    record.write_text(record.read_text().replace('"proc_start": ', '"proc_start": 1'))
    assert processes.recover(str(tmp_path / "run"), 1) is None
    processes.kill(handle)


def test_runners_are_forked_by_a_server_that_outlives_the_daemon(tmp_path, data_dir):
    exits = threading.Event()
    first = LocalProcesses(data_dir, on_exit=exits.set, isolation=AS_PROVIDER)
    handle = first.start(launch(tmp_path, "import time; time.sleep(0.3)"))
    server = psutil.Process(handle.pid).parent()
    assert "--serve" in server.cmdline()  # a fork of the server, not a Python of its own
    assert exits.wait(10)  # told of the exit at once, not at the next poll
    assert finish(first, handle).exit_code == 0
    longer = first.start(launch(tmp_path, "import time; time.sleep(3)", attempt=2))
    first.close()  # the daemon stops while a task runs
    # another daemon (a restart) uses the same server, which kept running
    second = LocalProcesses(data_dir, isolation=AS_PROVIDER)
    again = second.start(launch(tmp_path, "pass", attempt=3))
    assert psutil.Process(again.pid).ppid() == server.pid
    assert finish(second, again).exit_code == 0
    assert finish(second, longer).exit_code == 0
    # only the provider's user can reach it
    sockets = list((data_dir / ".runner").glob("runner-*.sock"))
    assert len(sockets) == 1 and stat.S_IMODE(sockets[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((data_dir / ".runner").stat().st_mode) == 0o700


def test_a_clean_stop_with_nothing_running_stops_the_runner_server(tmp_path, data_dir):
    """#28: after Ctrl-C of `up` with nothing running, the server and its spares stayed
    for ten minutes."""
    backend = LocalProcesses(data_dir, isolation=AS_PROVIDER)
    handle = backend.start(launch(tmp_path, "pass"))
    server = psutil.Process(handle.pid).parent()
    assert finish(backend, handle).exit_code == 0
    wait_for(lambda: len(server.children()) >= 1, what="a spare")
    spares = server.children()
    backend.close()
    gone = (psutil.NoSuchProcess, psutil.ZombieProcess)

    def ended(process: psutil.Process) -> bool:
        try:
            return process.status() == psutil.STATUS_ZOMBIE
        except gone:
            return True

    wait_for(lambda: all(ended(p) for p in [server, *spares]), 20, "the server to exit")


def test_without_a_server_runners_start_as_processes_of_their_own(tmp_path, data_dir):
    backend = LocalProcesses(data_dir, isolation=AS_PROVIDER)
    (data_dir / ".runner").rmdir() if (data_dir / ".runner").exists() else None
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / ".runner").write_text("not a directory")  # the server cannot live here
    handle = backend.start(launch(tmp_path, "print('fallback')"))
    assert "--serve" not in psutil.Process(handle.pid).cmdline()
    assert finish(backend, handle).exit_code == 0
    assert "fallback" in (tmp_path / "run" / "output.log").read_text()


def test_ports_are_chosen_on_the_node_and_given_to_the_task(tmp_path, processes):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        busy = squatter.getsockname()[1]
        code = "import os; print(os.environ['PORT'], os.environ['GPUPROVIDER_PORT_ADMIN'])"
        taken_by_other_work = busy + 1
        handle = processes.start(
            launch(
                tmp_path,
                code,
                port_names=["http", "admin"],
                taken_ports=[taken_by_other_work],
                port_range=(busy, busy + 10),
            )
        )
    assert finish(processes, handle).exit_code == 0
    http, admin = handle.ports["http"], handle.ports["admin"]
    assert busy not in (http, admin) and taken_by_other_work not in (http, admin)
    assert (tmp_path / "run" / "output.log").read_text().split() == [str(http), str(admin)]
    full = launch(tmp_path, "pass", attempt=2, port_names=["http"], port_range=(busy, busy))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", busy))
        with pytest.raises(NoFreePort, match="no free port"):
            processes.start(full)


def test_runner_server_hands_tasks_to_spares_and_leaves_with_its_home(tmp_path, data_dir):
    backend = LocalProcesses(data_dir, isolation=AS_PROVIDER)
    first = backend.start(launch(tmp_path, "pass"))
    server = psutil.Process(first.pid).parent()
    # runners forked ahead of need wait for their task beside it (all made a while ago)
    wait_for(
        lambda: (
            len(kids := server.children()) >= 2
            and time.time() - max(k.create_time() for k in kids) > 0.1
        ),
        what="spares",
    )
    asked = time.time()
    nxt = backend.start(launch(tmp_path, "import time; time.sleep(0.2)", attempt=2))
    # handed to a spare, not forked on demand (start times count in 10 ms ticks)
    assert psutil.Process(nxt.pid).create_time() < asked - 0.05
    assert finish(backend, nxt).exit_code == 0
    backend.close()
    shutil.rmtree(data_dir)  # the home is gone: no daemon can reach the server again
    wait_for(lambda: not server.is_running() or server.status() == "zombie", 20, "it to exit")


@pytest.mark.parametrize(
    "record",
    [
        "{not json",
        "[1, 2]",
        '{"exit_code": "0"}',
        '{"exit_code": 1e9}',
        '{"exit_code": -999}',
        '{"exit_code": true}',
        '{"exit_code": 0, "error": {"nested": 1}}',
        '{"exit_code": 0, "memory_limit_bytes": "lots"}',
        "[" * 100000 + "]" * 100000,
        '{"exit_code": 0, "node_down": "n-other"}',
    ],
)
def test_an_exit_record_that_is_not_what_a_runner_writes_is_a_lost_attempt(tmp_path, record):
    run = tmp_path / "run"
    run.mkdir()
    (run / "exit-1.json").write_text(record)
    ended = read_exit(str(run), 1)
    if record.startswith('{"exit_code": 0, "node_down"'):  # well formed: its extra is ignored
        assert ended.succeeded and ended.details == {}
    else:
        assert ended.lost and not ended.succeeded and "exit record" in ended.reason


def test_output_is_capped_keeping_the_latest_and_read_by_range(tmp_path, data_dir):
    """A task that writes far more than the cap: the latest output is kept, offsets
    count from the first byte it wrote, and a range read says where older output went."""
    from gpuprovider.backends.runner import read_output

    capped = LocalProcesses(data_dir, isolation=Settings(users="none", log_max_bytes=16384))
    lines = 20_000  # "line 00000\n" .. : 11 bytes each, 220,000 bytes in all
    code = f"import sys\nfor i in range({lines}): sys.stdout.write(f'line {{i:05d}}\\n')"
    ended = finish(capped, capped.start(launch(tmp_path, code)))
    assert ended.succeeded
    run = tmp_path / "run"
    kept = sum(p.stat().st_size for p in run.glob("output.log*"))
    assert 8192 <= kept <= 16384 + 11  # about the cap on disk, never the whole output

    start, data = read_output(str(run), 0, 1 << 20)
    assert start > 0 and start + len(data) == lines * 11  # offsets of the whole output
    assert data.endswith(b"line 19999\n")
    first = start // 11 + (1 if start % 11 else 0)
    assert data[(-start) % 11 :].startswith(f"line {first:05d}\n".encode())

    # Page by page from the first kept byte: contiguous, and the same bytes.
    pages, offset = [], start
    while True:
        at, page = read_output(str(run), offset, 1000)
        if not page:
            break
        assert at == offset
        pages.append(page)
        offset = at + len(page)
    assert b"".join(pages) == data
    assert read_output(str(run), lines * 11 + 5, 100) == (lines * 11 + 5, b"")
