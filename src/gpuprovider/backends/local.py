"""Local backend: each task a process on this machine, under the task runner.

`LocalProcesses` starts, watches and stops task processes on the machine it runs on;
the local backend is that plus this machine as its one node, and the Ray backend's
agent is that on each Ray node.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from gpuprovider.backends.base import Discovery, Exit, Handle, NoFreePort
from gpuprovider.backends.container import ContainerLimits
from gpuprovider.backends.launch import Launch, RentalLaunch, choose_ports, port_free, settle
from gpuprovider.backends.runner import LOG_NAME, read_output
from gpuprovider.backends.spawner import RUNNER, Spawner, SpawnerError
from gpuprovider.backends.workfiles import (
    UPLOAD_MARK,
    list_files,
    read_file,
    settle_volume,
    unpack,
)
from gpuprovider.config import SimulatedGpu
from gpuprovider.inventory.local import read_local_node
from gpuprovider.isolation import users
from gpuprovider.isolation.policy import Applied, Isolation, Settings, record_path, undo
from gpuprovider.rentals import disks
from gpuprovider.telemetry.node import NodeTelemetry, NodeWatcher

log = logging.getLogger(__name__)

# Process start times read twice may differ by clock-tick rounding.
START_TIME_TOLERANCE_S = 0.05
EXIT_RECORD_MAX_BYTES = 64 * 1024  # a runner writes a few hundred bytes


def read_exit(run_dir: str, attempt: int) -> Exit | None:
    """How an attempt ended, from the record its runner wrote; None while there is none.
    The record is never trusted to be well formed: one that is not reads as a lost
    attempt, with the reason."""
    path = Path(run_dir) / f"exit-{attempt}.json"
    try:
        data = json.loads(path.read_bytes()[:EXIT_RECORD_MAX_BYTES])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        return Exit(None, f"lost: unreadable exit record {path}: {exc}", lost=True)
    if not isinstance(data, dict):
        return Exit(None, f"lost: exit record {path} is not an object", lost=True)
    code = data.get("exit_code")
    limit = data.get("memory_limit_bytes")
    error = data.get("error")
    if (
        (code is not None and (type(code) is not int or not -64 <= code <= 255))
        or (limit is not None and type(limit) is not int)
        or (error is not None and not isinstance(error, str))
    ):
        return Exit(None, f"lost: exit record {path} is not what a runner writes", lost=True)
    if data.get("oom") is True:
        reason = (
            f"killed: out of memory (limit {(limit or 0) // 2**20} MiB, its reservation and "
            "the margins of [isolation]); reserve more memory"
        )
    elif isinstance(data.get("fenced"), str):
        return Exit(code, f"lost: fenced off its node: {data['fenced'][:300]}", lost=True)
    elif error:
        reason = error[:500]
    elif data.get("timed_out") is True:
        reason = "exceeded its max duration and was stopped"
    elif data.get("stopped") is True:
        reason = "stopped on request"
    elif code is not None and code < 0:
        try:
            reason = f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            reason = f"killed by signal {-code}"
    else:
        reason = f"exited with code {code}"
    return Exit(
        exit_code=code,
        reason=reason,
        stopped=data.get("stopped") is True,
        timed_out=data.get("timed_out") is True,
    )


def process_alive(pid: int, start_time: float) -> bool:
    """True only for the very process recorded: a recycled pid does not count."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - start_time) > START_TIME_TOLERANCE_S:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


class LocalProcesses:
    """Task processes on this machine, each isolated as `isolation` says (as far as the
    machine allows: `isolation.describe()`). `data_dir` holds the runner server's socket
    (`.runner/`); task users are leased from the machine's table (isolation/users.py),
    in the name of `data_dir`; `on_exit` is called, from a
    thread, whenever a runner ends."""

    def __init__(
        self,
        data_dir: Path,
        on_exit: Callable[[], None] | None = None,
        isolation: Settings | None = None,
        lease_file: str = "",
    ):
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        data_dir.chmod(0o700)  # task folders are reached through a task's own cwd only
        self.isolation = Isolation(isolation or Settings(), str(data_dir))
        if self.isolation.users:
            with contextlib.suppress(OSError):
                table = self.isolation.user_table
                users.adopt_legacy(str(data_dir / ".users"), str(data_dir), table)
                users.sweep(table)
        self.spawner = Spawner(data_dir / ".runner", on_exit)
        self.spawner.watch()
        # Runners started without the server (it could not start); polled so they
        # never linger as zombies.
        self._children: dict[int, subprocess.Popen] = {}
        # A node that holds a lease from a remote provider: its runners run only while
        # the lease holds and lists their attempt (runner.Fence); "" on the local node.
        self.lease_file = lease_file

    def lease(self, expires: float, attempts: list[str]) -> None:
        """Write the node's lease: until `expires` (epoch seconds), for `attempts`
        ("<run dir>#<attempt>"); written whole or not at all (runners read it)."""
        tmp = f"{self.lease_file}.tmp"
        with open(tmp, "w") as out:
            json.dump({"expires": expires, "attempts": sorted(attempts)}, out)
        os.replace(tmp, self.lease_file)

    def start(self, launch: Launch) -> Handle:
        started = self.start_many([launch])[0]
        if isinstance(started, OSError):
            raise started
        return started

    def start_many(self, launches: list[Launch]) -> list[Handle | OSError]:
        """Start each attempt; for each, its handle or why it could not start."""
        results: list[Handle | OSError | None] = [None] * len(launches)
        requests: list[tuple[int, dict, Applied, dict[str, int]]] = []
        claimed: set[int] = set()  # ports chosen for launches of this batch
        for i, launch in enumerate(launches):
            try:
                requests.append((i, *self._prepare(launch, claimed)))
            except OSError as exc:
                results[i] = exc
        try:
            pids: list[int | OSError] = list(
                self.spawner.start_many([request for _, request, _, _ in requests])
            )
        except SpawnerError as exc:
            log.warning("%s; starting runners as processes of their own", exc)
            pids = [self._start_process(request) for _, request, _, _ in requests]
        for (i, _, applied, ports), pid in zip(requests, pids, strict=True):
            if isinstance(pid, OSError):
                undo(applied)
                results[i] = pid
                continue
            try:
                start_time = psutil.Process(pid).create_time()
            except psutil.NoSuchProcess:
                start_time = 0.0  # already gone: poll reads its exit record
            launch = launches[i]
            results[i] = Handle(
                pid, start_time, launch.run_dir, launch.attempt, launch.node_id, ports
            )
        return results  # type: ignore[return-value]

    def _prepare(self, launch: Launch, claimed: set[int]) -> tuple[dict, Applied, dict[str, int]]:
        """On this node: folders, ports, the user and cgroup, the argv and environment;
        the runner's request."""
        Path(launch.run_dir).mkdir(parents=True, exist_ok=True)
        Path(launch.workdir).mkdir(parents=True, exist_ok=True)
        ports: dict[str, int] = {}
        if launch.rental is not None:  # its own ports, whatever the range
            ports = self._rental_ports(launch.rental, claimed)
            disks.mount(Path(launch.rental.disk_image), Path(launch.rental.mount_dir))
        elif launch.port_names:
            taken = claimed | set(launch.taken_ports)
            chosen = choose_ports(launch.port_names, taken, launch.port_range)
            if chosen is None:
                raise NoFreePort(f"no free port left in {list(launch.port_range)} on this node")
            ports = chosen
            claimed.update(ports.values())
        container = None
        if launch.container is not None:
            engine = shutil.which(launch.container.engine) or launch.container.engine
            container = [engine, launch.container.name]
        mounts = self._volumes(launch)
        applied = self.isolation.apply(
            launch.task_id,
            launch.attempt,
            launch.run_dir,
            launch.workdir,
            launch.own_workdir,
            launch.memory_mib,
            launch.cpu_milli,
            launch.gpu_minors,
            container,
            sorted(ports.values()),
            mounts,
        )
        try:
            self._bring_files(launch, applied, mounts)
        except OSError:
            undo(applied)
            raise
        if launch.rental is not None:
            try:
                self._hand_rental_over(launch, applied)
            except OSError:
                undo(applied)
                raise
        limits = ContainerLimits(
            user=f"{applied.uid}:{applied.gid}" if applied.uid is not None else None,
            memory_bytes=applied.memory_limit_bytes,
            cpu_milli=launch.cpu_milli,
            cpu_quota=self.isolation.settings.cpu_quota,
            pids_max=self.isolation.settings.pids_max,
        )
        base = self.isolation.environment(launch.workdir, applied)
        argv, env = settle(launch, ports, base, limits)
        log_path = Path(launch.run_dir) / LOG_NAME  # made by the runner; read as empty till then
        request = {
            "argv": argv,
            "env": env,
            "workdir": launch.workdir,
            "run_dir": launch.run_dir,
            "attempt": launch.attempt,
            "grace_s": launch.grace_s,
            "max_duration_s": launch.max_duration_s or 0,
            "log": str(log_path),
            "log_max_bytes": self.isolation.settings.log_max_bytes,
            "isolation": asdict(applied),
            "lease_file": self.lease_file,
        }
        return request, applied, ports

    @staticmethod
    def _volumes(launch: Launch) -> list[tuple[str, str]]:
        """Each volume's folder and where the task sees it (a path relative to the work
        folder made absolute); OSError (the task's fault) for one that is gone."""
        mounts = []
        for source, target, _ in launch.mounts:
            if not os.path.isdir(source):
                raise OSError(f"volume folder {source} is gone (the volume was deleted)")
            mounts.append((source, os.path.join(launch.workdir, target)))
        return mounts

    def _bring_files(self, launch: Launch, applied: Applied, mounts: list[tuple[str, str]]) -> None:
        """The upload unpacked (at the task's first start), the volumes handed to this
        attempt's user, and where no mount namespace can bind them, linked in place."""
        mark = Path(launch.run_dir) / UPLOAD_MARK
        if (launch.upload or launch.upload_data) and not mark.exists():
            archive = launch.upload
            if launch.upload_data is not None:  # sent along to a remote node
                archive = str(Path(launch.run_dir) / "upload.tar.gz")
                Path(archive).write_bytes(launch.upload_data)
            try:
                unpack(archive, launch.workdir, applied.uid, applied.gid)
            except (OSError, ValueError) as exc:  # tarfile's filter errors are ValueErrors
                raise OSError(f"upload could not be unpacked: {exc}") from None
            finally:
                if launch.upload_data is not None:
                    Path(archive).unlink(missing_ok=True)
            mark.touch()
        for (source, target), (_, shown, size) in zip(mounts, launch.mounts, strict=True):
            used = settle_volume(source, applied.uid, applied.gid)
            if used > size:
                raise OSError(
                    f"the volume mounted at {shown} holds {used >> 20} MiB, over its size of "
                    f"{size >> 20} MiB; delete files from it or use a larger volume"
                )
            if not applied.namespace:  # no namespace to bind it in: a link in its place
                if not target.startswith(launch.workdir.rstrip("/") + "/"):
                    raise OSError(
                        f"a volume at {target} needs a mount namespace (the daemon as root); "
                        "mount it at a path relative to the work folder"
                    )
                if not os.path.islink(target):
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    os.symlink(source, target)

    @staticmethod
    def _rental_ports(rental: RentalLaunch, claimed: set[int]) -> dict[str, int]:
        for name, port in rental.ports.items():
            if port in claimed or not port_free(port):
                raise NoFreePort(f"port {port} ({name}) of rental {rental.name} is held")
        claimed.update(rental.ports.values())
        return dict(rental.ports)

    @staticmethod
    def _hand_rental_over(launch: Launch, applied: Applied) -> None:
        """The disk and host key to the attempt's user; the container binds them in,
        with the home holding the accepted keys read-only and the login user."""
        rental, container = launch.rental, launch.container
        assert rental is not None
        if applied.uid is None or applied.gid is None or container is None:
            raise OSError(
                "a rental runs as a pool user in a container: set [isolation] "
                'task_users = "pool" (as root) and a container engine'
            )
        uid, gid = applied.uid, applied.gid
        os.chown(rental.mount_dir, uid, gid)  # a mount point: never a tenant's link
        os.chmod(rental.mount_dir, 0o700)
        users.hand_over(rental.mount_dir, uid, gid)
        os.chown(rental.host_key, uid, gid)
        home = f"{rental.home_target}/{rental.name}"
        container.mounts = [
            (rental.mount_dir, rental.disk_target, False),
            (rental.home_dir, home, True),
            (rental.host_key, rental.host_key_target, True),
        ]
        container.passwd_entry = f"{rental.name}:x:{uid}:{gid}:rental:{home}:/bin/sh"

    def _start_process(self, request: dict) -> int | OSError:
        """A runner as a process of its own (when no runner server can be had)."""
        try:
            path = Path(request["run_dir"]) / f"request-{request['attempt']}.json"
            path.write_text(json.dumps(request))
            path.chmod(0o600)
            proc = subprocess.Popen(
                [*RUNNER, "--request", str(path)],
                cwd=request["workdir"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            return exc
        self._children[proc.pid] = proc
        return proc.pid

    def poll_many(self, handles: list[Handle]) -> list[Exit | None]:
        return [self.poll(handle) for handle in handles]

    def poll(self, handle: Handle) -> Exit | None:
        ended = read_exit(handle.run_dir, handle.attempt)
        if ended is not None:
            self._reap(handle.pid)
            return ended
        child = self._children.get(handle.pid)
        alive = child.poll() is None if child else process_alive(handle.pid, handle.start_time)
        if alive:
            return None
        # The runner may have written its record between the two reads.
        ended = read_exit(handle.run_dir, handle.attempt)
        self._reap(handle.pid)
        if ended is not None:
            return ended
        # Nothing of the attempt may outlive its runner: its cgroup and user go too.
        applied = Applied.load(record_path(handle.run_dir, handle.attempt))
        if applied is not None:
            undo(applied)
        return Exit(None, "lost: its runner process vanished without an exit record", lost=True)

    def stop(self, handle: Handle) -> bool:
        # Until the runner has written its record it has no SIGTERM handler yet, and
        # a signal would kill it before it can stop the command cleanly: ask later.
        if not (Path(handle.run_dir) / f"runner-{handle.attempt}.json").exists():
            return False
        if process_alive(handle.pid, handle.start_time):
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGTERM)
        return True

    def kill(self, handle: Handle) -> None:
        record = Path(handle.run_dir) / f"runner-{handle.attempt}.json"
        try:
            child_pid = json.loads(record.read_text())["child_pid"]
            os.killpg(child_pid, signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass
        if process_alive(handle.pid, handle.start_time):
            os.kill(handle.pid, signal.SIGKILL)

    def recover(self, run_dir: str, attempt: int, node_id: str = "") -> Handle | None:
        record = Path(run_dir) / f"runner-{attempt}.json"
        try:
            started = json.loads(record.read_text())
            pid = started["pid"]
        except (OSError, ValueError, KeyError):
            return None
        if (Path(run_dir) / f"exit-{attempt}.json").exists():
            return Handle(pid, started.get("proc_start", 0.0), run_dir, attempt, node_id)
        try:
            proc = psutil.Process(pid)
            start_time = proc.create_time()
            cmdline = proc.cmdline()
        except psutil.Error:
            return None
        # The pid must still be that runner, not a process that reused the number: a
        # runner records when it started (0.1.0's runners carry their run folder on their
        # command line instead).
        if "proc_start" in started:
            if abs(start_time - started["proc_start"]) > START_TIME_TOLERANCE_S:
                return None
        elif not any(run_dir in part for part in cmdline):
            return None
        return Handle(pid, start_time, run_dir, attempt, node_id)

    def list_files(self, node_id: str, run_dir: str, path: str) -> list[dict]:
        return list_files(os.path.join(run_dir, "work"), path)

    def read_file(
        self, node_id: str, run_dir: str, path: str, offset: int, limit: int
    ) -> tuple[int, bytes]:
        return read_file(os.path.join(run_dir, "work"), path, offset, limit)

    def remove_work(self, node_id: str, run_dir: str) -> None:
        # rmtree never follows a link the task left (it walks by file descriptor)
        shutil.rmtree(os.path.join(run_dir, "work"), ignore_errors=True)

    def _reap(self, pid: int) -> None:
        child = self._children.pop(pid, None)
        if child is not None:
            child.poll()

    def close(self) -> None:
        self.spawner.close()


@dataclass(frozen=True)
class LocalNode:
    """This machine as a node: who it is and what it declares."""

    node_id: str
    name: str
    public_key: str
    home: Path
    simulated_gpus: tuple[SimulatedGpu, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    nvml: bool = True  # false: only declared GPUs, whatever the driver reports


class LocalBackend(LocalProcesses):
    name = "local"
    liveness_interval_s: float | None = None  # the machine is alive as long as the daemon is

    def __init__(
        self,
        node: LocalNode,
        data_dir: Path,
        on_exit: Callable[[], None] | None = None,
        isolation: Settings | None = None,
    ):
        super().__init__(data_dir, on_exit, isolation)
        self.node = node
        self.watcher: NodeWatcher | None = None

    def telemetry(self, poll_nvml: bool, kernel_log: str) -> list[NodeTelemetry]:
        if self.watcher is None:
            self.watcher = NodeWatcher(self.node.node_id, kernel_log, nvml=self.node.nvml)
        return [self.watcher.read(poll_nvml)]

    def discover(self, full: bool) -> Discovery:
        if not full:
            return Discovery()
        n = self.node
        found = read_local_node(
            n.node_id,
            n.name,
            n.public_key,
            n.home,
            list(n.simulated_gpus),
            dict(n.labels),
            use_nvml=n.nvml,
        )
        found.facts["isolation"] = self.isolation.describe()
        return Discovery(nodes=[found])

    def read_log(self, node_id: str, run_dir: str, offset: int, limit: int) -> tuple[int, bytes]:
        return read_output(run_dir, offset, limit)
