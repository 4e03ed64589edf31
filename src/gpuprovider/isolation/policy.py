"""What a node does to keep each attempt to itself, from the operator's settings and
what the machine allows: made ready once per node, applied per attempt.

When the daemon (or a Ray node's agent) does not run as root, tasks run as its own
user, with no cgroups: `describe()` says so, and the daemon says it loudly at start and
in `node list`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import asdict, dataclass

from gpuprovider.isolation import cgroups, devices, namespace, network, users
from gpuprovider.isolation.cgroups import Hierarchy, Limits

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONTAINER_RM_TIMEOUT_S = 60.0
NOT_ROOT = "the daemon does not run as root"


@dataclass(frozen=True)
class Settings:
    users: str = "auto"  # "auto" (a pool when root), "pool", "none"
    cgroups: str = "auto"  # "auto", "v1", "v2", "none"
    memory_margin_pct: int = 10
    memory_margin_mib: int = 64
    pids_max: int = 4096
    cpu_quota: bool = False
    # "auto" (the cgroup v1 device list where there is one, else a mount namespace),
    # "cgroup", "namespace", "none"
    devices: str = "auto"
    proc_devices: str = "/proc/devices"
    log_max_bytes: int = 64 << 20  # a task's output kept on disk (the latest of it)
    network: str = "isolated"  # "host", "isolated", "none" (isolation/network.py)
    # Hosts besides this one that may reach guarded ports: the provider's machine, on a
    # Ray node (its gateway reaches replicas there).
    network_peers: tuple[str, ...] = ()


@dataclass
class Applied:
    """What one attempt got, kept beside it (root's only) so that anyone cleaning up
    after it (its runner, or the daemon when the runner is gone) knows what to undo."""

    user: str = ""
    uid: int | None = None
    gid: int | None = None
    lease: str = ""
    lease_token: str = ""  # proves the lease is still this attempt's (isolation/users.py)
    cgroups: dict[str, str] | None = None
    memory_limit_bytes: int | None = None
    # False for a container: the engine's client runs as root; the container runs as the
    # user (its `--user`), and the engine enforces its limits and devices.
    drop_privileges: bool = True
    container: list[str] | None = None  # [engine, name]: removed once the attempt ends
    # A mount and IPC namespace of its own (isolation/namespace.py), and in it, the /dev
    # entries it keeps; None: the host's /dev (the cgroup's device list decides).
    namespace: bool = False
    dev_nodes: list[str] | None = None
    workdir: str = ""  # its working folder, made reachable by its path in the namespace
    network: str = "host"  # how its sockets are guarded (isolation/network.py)
    ports: list[int] | None = None  # its declared ports, guarded with it
    # Volumes bound in the namespace: [folder on the node, absolute path the task sees]
    mounts: list[list[str]] | None = None

    def save(self, path: str) -> None:
        with open(path, "w") as handle:
            json.dump(asdict(self), handle)

    @classmethod
    def load(cls, path: str) -> Applied | None:
        try:
            with open(path) as handle:
                return cls(**json.load(handle))
        except (OSError, ValueError, TypeError):
            return None


def record_path(run_dir: str, attempt: int) -> str:
    return os.path.join(run_dir, f"isolation-{attempt}.json")


class Isolation:
    def __init__(self, settings: Settings, home: str, user_table: str = users.TABLE):
        """`home`: the folder this provider (or Ray node) keeps its tasks in, named in
        the machine's user leases it takes."""
        self.settings = settings
        self.home = home
        self.user_table = user_table
        self.root = os.geteuid() == 0
        if settings.users == "none":
            self.users_why = 'off in config ([isolation] users = "none")'
        elif not self.root:
            self.users_why = NOT_ROOT  # tasks run as its own user
        else:
            self.users_why = ""
        self.hierarchy = (
            cgroups.found(settings.cgroups) if self.root else Hierarchy("", why_not=NOT_ROOT)
        )
        if not self.root:
            self.namespace_why = NOT_ROOT
        elif not self.users and settings.devices != "namespace":
            self.namespace_why = "tasks run as the daemon's user"
        else:
            self.namespace_why = namespace.refused()
        self.devices, self.devices_why = self._devices()
        self.network_why = self._network()

    def _network(self) -> str:
        """Why tasks' ports are not guarded ("" when they are)."""
        if self.settings.network == "host":
            return 'off in config ([isolation] network = "host")'
        if not self.users:  # the rules know a task by its own uid
            return f"no user per task ({self.users_why})"
        why = network.ready()
        if not why and self.settings.network_peers:
            try:
                network.add_peers(list(self.settings.network_peers))
            except (OSError, ValueError) as exc:
                why = f"the provider's address cannot be let in: {exc}"
        return why

    def _devices(self) -> tuple[str, str]:
        """How a task is kept to its own device nodes ("cgroup" or "namespace"), or why
        it is not."""
        wanted = self.settings.devices
        if wanted == "none":
            return "", 'off in config ([isolation] devices = "none")'
        if wanted in ("auto", "cgroup") and self.hierarchy.version == "v1":
            return "cgroup", ""
        if wanted == "cgroup":
            return "", "needs the cgroup v1 devices controller"
        if self.namespace_why:  # a /dev of its own needs a mount namespace
            return "", self.namespace_why
        return "namespace", ""

    @property
    def users(self) -> bool:
        return not self.users_why

    def _network_how(self) -> str:
        how = "its ports answer only itself and the provider (nftables, by socket uid)"
        if self.settings.network == "none":
            return f"no network: {how}; it connects only to itself"
        return f"isolated: {how}"

    def describe(self) -> dict[str, str]:
        """For the node's facts: what is enforced here, or why not."""
        devices_how = {
            "cgroup": "cgroup v1 device list",
            "namespace": "a /dev of its own (mount namespace)",
        }.get(self.devices, f"none: {self.devices_why}")
        return {
            "users": "a user per task (pool gpp-task-N)"
            if self.users
            else f"none: {self.users_why}",
            "cgroups": self.hierarchy.version or f"none: {self.hierarchy.why_not}",
            "devices": devices_how,
            "mounts": "its own /tmp, /dev/shm, /proc and IPC (namespaces)"
            if not self.namespace_why
            else f"none: {self.namespace_why}",
            "network": self._network_how() if not self.network_why else f"none: {self.network_why}",
        }

    def apply(
        self,
        task_id: str,
        attempt: int,
        run_dir: str,
        workdir: str,
        own_workdir: bool,
        memory_mib: int,
        cpu_milli: int,
        gpu_minors: list[int],
        container: list[str] | None = None,
        ports: list[int] | None = None,
        mounts: list[tuple[str, str]] | None = None,
    ) -> Applied:
        """Lend a user, make the cgroup, hand the work folder over; what there is to undo
        is recorded in the run folder before anything runs. OSError when it cannot be
        done (not the task's fault). For a `container` ([engine, name]) the engine
        enforces memory and devices; the cgroup holds its client."""
        applied = Applied(drop_privileges=container is None, container=container)
        os.chmod(run_dir, 0o700)  # exit records, log and this record: root's only
        try:
            if self.users:
                user = users.lend(self.user_table, self.home, f"{task_id}/{attempt}")
                applied.user, applied.uid = user.name, user.uid
                applied.gid, applied.lease = user.gid, user.lease
                applied.lease_token = user.token
                if own_workdir:
                    os.chown(workdir, user.uid, user.gid)
                    os.chmod(workdir, 0o700)
                    users.hand_over(workdir, user.uid, user.gid)  # a retry's earlier files
            if self.hierarchy.usable:
                s = self.settings
                allowed = (
                    devices.allowed(gpu_minors, s.proc_devices)
                    if self.devices == "cgroup" and container is None
                    else None
                )
                memory = self.memory_limit(memory_mib) if container is None else None
                limits = Limits(memory, cpu_milli, s.cpu_quota, s.pids_max, allowed)
                applied.cgroups = cgroups.create(self.hierarchy, f"{task_id}-{attempt}", limits)
            if not self.namespace_why and container is None:
                applied.namespace = True
                applied.workdir = workdir
                applied.mounts = [[source, target] for source, target in mounts or []]
                if self.devices == "namespace":
                    applied.dev_nodes = devices.nodes(gpu_minors)
            applied.memory_limit_bytes = self.memory_limit(memory_mib)
            if not self.network_why and applied.uid is not None:
                network.guard(applied.uid, list(ports or ()), self.settings.network)
                applied.network, applied.ports = self.settings.network, list(ports or ())
        except OSError:
            undo(applied)
            raise
        if applied.uid is not None or applied.cgroups or applied.container:
            applied.save(record_path(run_dir, attempt))  # what there is to undo
        return applied

    def memory_limit(self, memory_mib: int) -> int | None:
        """A task's memory limit: its reservation plus the margins; none without one."""
        if not memory_mib:
            return None
        s = self.settings
        return memory_mib * 2**20 * (100 + s.memory_margin_pct) // 100 + s.memory_margin_mib * 2**20

    def environment(self, workdir: str, applied: Applied) -> dict[str, str]:
        """What a task's environment starts from: never the daemon's own."""
        env = {"PATH": DEFAULT_PATH, "HOME": workdir, "LANG": "C.UTF-8"}
        if applied.user:
            env["USER"] = env["LOGNAME"] = applied.user
        return env


def undo(applied: Applied, give_user_back: bool = True) -> bool:
    """Kill what is left of the attempt (its cgroup; without one, its user's processes),
    remove its cgroup and container, lift its network rules, give its user back. True
    when all of it is gone (the user is given back only then). Safe to call again, from
    any process: what is done to its uid is done only while its lease still holds it,
    never to a uid lent since to another attempt. With `give_user_back` False, the user
    stays lent, its rules in place, until `give_user_back(applied)`: a runner records
    the attempt's end first, so that its GPU is not held while they are lifted."""
    gone = cgroups.kill_and_remove(applied.cgroups) if applied.cgroups else True
    if applied.container:  # its client is gone; the container may run on without it
        engine, name = applied.container
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                [engine, "rm", "--force", name],
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=CONTAINER_RM_TIMEOUT_S,
            )
    if applied.uid is None or not applied.lease:
        return gone
    with users.holding(applied.lease, applied.lease_token) as held:
        if not held:
            return True  # given back already, once nothing of it ran
        if not applied.cgroups and applied.drop_privileges:
            gone = users.kill_all(applied.uid)
        if not gone:
            return False
        if give_user_back:
            _give_back_held(applied)
    return True


def give_user_back(applied: Applied) -> None:
    """Lift the attempt's network rules and end its user's lease, once `undo` (with
    `give_user_back` False) found nothing of it left; only while its lease holds."""
    if applied.uid is None or not applied.lease:
        return
    with users.holding(applied.lease, applied.lease_token) as held:
        if held:
            _give_back_held(applied)


def _give_back_held(applied: Applied) -> None:
    assert applied.uid is not None
    if applied.network != "host":
        with contextlib.suppress(OSError):  # left guarded: the safe side
            network.release(applied.uid, applied.ports or [], applied.network)
    users.end(applied.lease)
