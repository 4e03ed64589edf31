"""Task operations behind the API: submit, dry-run, list, inspect, cancel, logs."""

from __future__ import annotations

import asyncio
import builtins
import codecs
import json
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any

from sqlalchemy.exc import IntegrityError

from gpuprovider.backends.base import Backend, NodeDown
from gpuprovider.backends.workfiles import NotInWorkdir
from gpuprovider.domain.records import OwnerKind, TaskRecord, TokenRecord
from gpuprovider.domain.spec import TaskSpec
from gpuprovider.domain.states import TERMINAL, TaskState
from gpuprovider.domain.usability import Usability
from gpuprovider.lifecycle import services as service_lifecycle
from gpuprovider.lifecycle import tasks as lifecycle
from gpuprovider.lifecycle.kernel import Stale
from gpuprovider.market.pricing import Quote, Unpriceable
from gpuprovider.market.strategy import Option, probe
from gpuprovider.scheduler import Framework, Placement, Policy, TaskRequest
from gpuprovider.scheduler.state import ClusterState
from gpuprovider.service.errors import Conflict, NotFound, Rejected, Unavailable
from gpuprovider.service.files import Uploads, Volumes
from gpuprovider.service.placement import build_snapshot, larger_than_every_node, task_request
from gpuprovider.service.serving import Serving
from gpuprovider.service.views import task_view
from gpuprovider.store.store import Store, Tx

FOLLOW_POLL_S = 0.2
LOG_CHUNK = 1 << 20  # one read from a task's log, local or remote


class TaskService:
    def __init__(
        self,
        store: Store,
        policy: Policy,
        usability: Usability,
        backend: Backend,
        container_engine: Callable[[], str | None],
        serving: Serving,
        workdir_roots: list[str] | None = None,
        uploads: Uploads | None = None,
        volumes: Volumes | None = None,
        home: str = "",
    ):
        self.uploads, self.volumes, self.home = uploads, volumes, home
        self.store = store
        self.serving = serving
        # The scheduler loop has its own framework; dry runs come from API threads.
        self._framework = Framework(policy)
        self._framework_lock = threading.Lock()
        self.usability = usability
        self.backend = backend
        self.container_engine = container_engine
        self.workdir_roots = workdir_roots or []

    # -- submit --------------------------------------------------------------------

    def live_of(self, tenant: str) -> list[TaskRecord]:
        with self.store.read() as r:
            live = [s for s in TaskState if s not in TERMINAL]
            return r.tasks.find(states=live, tenant=tenant)

    def uploads_in_use(self, tenant: str) -> set[str]:
        """The uploads the tenant's live tasks still need (never made room from)."""
        return {t.task_spec.upload for t in self.live_of(tenant) if t.task_spec.upload}

    def mounted_by(self, tenant: str, volume: str) -> str | None:
        """A live task of the tenant that mounts `volume`, if any."""
        for task in self.live_of(tenant):
            if any(v.name == volume for v in task.task_spec.volumes):
                return task.label
        return None

    def _check_files(self, spec: TaskSpec, tenant: str) -> None:
        """What the spec brings in (an upload, volumes) is the tenant's and can be had."""
        if spec.upload and (self.uploads is None or not self.uploads.have(tenant, spec.upload)):
            raise Rejected(
                f"upload: {spec.upload} was never uploaded by tenant {tenant} (or made room "
                "for since); `task run --upload DIR` sends it"
            )
        if not spec.volumes:
            return
        if self.volumes is None:
            raise Rejected("volumes: this provider keeps no volumes")
        if self.backend is not None and self.backend.name != "local":
            raise Rejected(
                f"volumes: this provider runs tasks on {self.backend.name}, across machines; "
                "a volume is a folder on one machine's disk, so only the local backend "
                "mounts volumes"
            )
        home = self.home.rstrip("/")
        for mount in spec.volumes:
            if home and (mount.path == home or mount.path.startswith(home + "/")):
                raise Rejected(
                    f"volumes.path {mount.path!r} is over the provider's home ({home}); "
                    "mount it elsewhere"
                )
            if self.volumes.size_bytes(tenant, mount.name) is None:
                raise Rejected(
                    f"volumes: no volume {mount.name!r} of tenant {tenant}; make it with "
                    "`gpuprovider volume create`"
                )
            if holder := self.mounted_by(tenant, mount.name):
                raise Conflict(
                    f"volumes: {mount.name} is mounted by live task {holder}; one task at "
                    "a time mounts a volume"
                )

    def _check_runnable(self, spec: TaskSpec) -> None:
        if spec.workdir and not any(
            spec.workdir == root or spec.workdir.startswith(root.rstrip("/") + "/")
            for root in self.workdir_roots
        ):
            roots = ", ".join(self.workdir_roots) or "none are configured"
            raise Rejected(
                f"workdir: {spec.workdir} is outside the folders tasks may use "
                f"([isolation] workdir_roots: {roots}); leave it out to work in the task's "
                "own folder"
            )
        if spec.image and self.container_engine() is None:
            raise Rejected(
                "image: no container engine to run it (docker or podman must answer, and "
                "[executor] container_engine allow it); start one, or give a command instead"
            )

    def submit(
        self, spec: TaskSpec, who: TokenRecord, idempotency_key: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Store a spec and queue it, in one transaction; with an idempotency key the
        tenant used before for the same spec, the task it made instead. The task, and
        whether it is new. The caller ran `check_runnable` first (it may ask the
        container engine: never on the event loop, never inside the transaction)."""
        for _ in range(2):  # a concurrent submission may win the name or the key
            try:
                with self.store.tx() as tx:
                    task, created = self.submit_in(tx, spec, who.tenant, idempotency_key)
                if not created:
                    return self._replay(task, spec, idempotency_key or ""), False
                return self._with_service(task_view(task), task), True
            except IntegrityError:
                continue  # read again: the winner is now there to name
        raise Conflict(f"task {spec.name or ''} keeps being submitted concurrently; try again")

    def submit_in(
        self,
        tx: Tx,
        spec: TaskSpec,
        tenant: str,
        idempotency_key: str | None = None,
        owner: tuple[OwnerKind, str] | None = None,
    ) -> tuple[TaskRecord, bool]:
        """`submit` in the caller's transaction, for an `owner` (a lease) that commits
        its own change with the task's: the task (a service's first replica), and
        whether it is new (False: the task this key made before). Checks nothing the
        caller did not: call `check_runnable` first."""
        if idempotency_key and (earlier := tx.tasks.submitted_with(tenant, idempotency_key)):
            return earlier, False
        if spec.gang:
            self._check_gang(tx.tasks.gang_members(f"{tenant}/{spec.gang.name}"), spec)
        if spec.name and (holder := tx.tasks.live_named(tenant, spec.name)):
            raise self._name_taken(spec.name, holder)
        if spec.kind != "service":
            task = tx.tasks.insert(spec, tenant, idempotency_key, owner)
            lifecycle.submit(tx, task)
            return task, True
        service = self.serving.register(tx, spec, tenant, owner)
        task = tx.tasks.insert(spec, tenant, idempotency_key, (OwnerKind.SERVICE, service.id))
        lifecycle.submit(tx, task)
        if service.replicas > 1:
            service_lifecycle.add_replicas(
                tx, service, service.replicas - 1, "started with the service"
            )
        return task, True

    def check_runnable(
        self, spec: TaskSpec, tx: Tx | None = None, tenant: str | None = None
    ) -> None:
        """Refuse what this provider cannot run at all (Rejected, naming the field):
        what it may not run, what `tenant` cannot bring in (an upload or a volume it
        does not have), and what is larger than every node it has (read in `tx` when
        the caller holds one)."""
        self._check_runnable(spec)
        if spec.upload or spec.volumes:
            self._check_files(spec, tenant or "")
        if tx is None:
            with self.store.read() as r:
                nodes = r.nodes.list()
        else:
            nodes = tx.nodes.list()
        if reason := larger_than_every_node(spec, nodes):
            raise Rejected(reason)

    @staticmethod
    def _replay(earlier: TaskRecord, spec: TaskSpec, key: str) -> dict[str, Any]:
        if earlier.task_spec.model_dump(mode="json") != spec.model_dump(mode="json"):
            raise Conflict(
                f"Idempotency-Key {key!r} was used for a different submission (task "
                f"{earlier.id}); send a new key for a new task"
            )
        return task_view(earlier)

    def _with_service(self, view: dict[str, Any], task: TaskRecord) -> dict[str, Any]:
        """A replica's view names its service and where to reach it."""
        if task.service_id:
            view["service"] = self.serving.brief(task.service_id)
        return view

    @staticmethod
    def _name_taken(name: str, holder: TaskRecord) -> Conflict:
        return Conflict(
            f"a live task is already named {name!r} ({holder.id}); cancel it or choose another name"
        )

    @staticmethod
    def _check_gang(members: list[TaskRecord], spec: TaskSpec) -> None:
        assert spec.gang is not None
        live = [t for t in members if t.state not in TERMINAL]
        sizes = {t.task_spec.gang.size for t in live if t.task_spec.gang}
        if sizes and spec.gang.size not in sizes:
            raise Conflict(
                f"gang.size: gang {spec.gang.name!r} already has members of size "
                f"{sizes.pop()}; this task says {spec.gang.size}"
            )
        if len(live) >= spec.gang.size:
            raise Conflict(f"gang {spec.gang.name!r} already has its {spec.gang.size} live members")

    def dry_run(self, spec: TaskSpec, who: TokenRecord) -> dict[str, Any]:
        """What would happen to `spec` now, storing nothing."""
        self._check_runnable(spec)
        with self.store.read() as r:
            if spec.name and (holder := r.tasks.live_named(who.tenant, spec.name)):
                raise self._name_taken(spec.name, holder)
            nodes = r.nodes.list()
            allocations = r.tasks.active_allocations()
        if too_large := larger_than_every_node(spec, nodes):
            return {
                "placeable_now": False,
                "would_wait": False,
                "reason": too_large,
                "message": f"would be refused: {too_large}",
            }
        request = task_request("dry-run", spec)
        with self._framework_lock:
            now = self._framework.place_one(
                build_snapshot(nodes, allocations, self.usability), request
            )
            if isinstance(now, Placement):
                return {"placeable_now": True, "would_wait": False, "placement": asdict(now)}
            ever = self._framework.place_one(
                build_snapshot(nodes, [], self.usability, idle=True), request
            )
        verdict: dict[str, Any] = {"placeable_now": False, "reason": now.reason}
        if isinstance(ever, Placement):
            verdict["would_wait"] = True
            verdict["message"] = f"would stay queued until resources free up: {now.reason}"
        else:
            verdict["would_wait"] = False
            verdict["message"] = (
                f"would stay queued: no node could run it even when idle ({ever.reason})"
            )
        return verdict

    def probe(
        self,
        requests: dict[str, TaskRequest],
        quotes: dict[str, Quote | Unpriceable],
        fits_later: dict[str, bool],
    ) -> tuple[tuple[Option, ...], ClusterState]:
        """For a market strategy: each model's option on the live cluster (where the
        scheduler would place it now, tried and given back), and the cluster itself."""
        with self.store.read() as r:
            nodes = r.nodes.list()
            allocations = r.tasks.active_allocations()
        cluster = ClusterState.from_snapshot(build_snapshot(nodes, allocations, self.usability))
        with self._framework_lock:
            options = probe(cluster, self._framework, requests, quotes, fits_later)
        return options, cluster

    def placeable(self, spec: TaskSpec) -> tuple[bool, bool, str]:
        """Whether `spec` fits now, and whether it would once the work that must give way
        to it (preemptible, of lower priority) did: (now, after that, why not now)."""
        self._check_runnable(spec)
        with self.store.read() as r:
            nodes = r.nodes.list()
            allocations = r.tasks.active_allocations()
            holders = {t.id: t for t in r.tasks.by_ids({a.task_id for a in allocations})}
        if too_large := larger_than_every_node(spec, nodes):
            return False, False, too_large
        kept = [
            a
            for a in allocations
            if not (
                (holder := holders.get(a.task_id))
                and holder.spec.get("preemptible")
                and holder.priority < spec.priority
            )
        ]
        request = task_request("placeable", spec)
        with self._framework_lock:
            now = self._framework.place_one(
                build_snapshot(nodes, allocations, self.usability), request
            )
            if isinstance(now, Placement):
                return True, True, ""
            later = self._framework.place_one(build_snapshot(nodes, kept, self.usability), request)
        return False, isinstance(later, Placement), now.reason

    # -- read ----------------------------------------------------------------------

    def visible(self, ref: str, who: TokenRecord) -> TaskRecord:
        """The task `ref` (an id, or a name of the caller's tenant; an admin may write
        TENANT:NAME) as `who` may see it; another tenant's task is not found."""
        tenant, name = who.tenant, ref
        if who.is_admin and ":" in ref:
            tenant, _, name = ref.partition(":")
        with self.store.read() as r:
            task = r.tasks.resolve(name, tenant)
        if task is None or not who.sees(task.tenant):
            raise NotFound(f"no task with id or name {ref!r}")
        return task

    def list(
        self,
        who: TokenRecord,
        states: list[str],
        name: str | None,
        kind: str | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        try:
            wanted = [TaskState(s) for item in states for s in item.split(",") if s]
        except ValueError as exc:
            known = ", ".join(s.value for s in TaskState)
            raise Rejected(f"state: {exc}; known: {known}") from None
        with self.store.read() as r:
            found = r.tasks.find(
                states=wanted,
                name=name,
                kind=kind,
                tenant=None if who.is_admin else who.tenant,
                limit=limit,
                newest_first=True,
            )
        return [task_view(t) for t in found]

    def detail(self, ref: str, who: TokenRecord) -> dict[str, Any]:
        """The task with its allocation, endpoints and events."""
        task = self.visible(ref, who)
        with self.store.read() as r:
            alloc = r.tasks.allocation(task.id)
            node = next(iter(r.nodes.list([alloc.node_id], removed=True)), None) if alloc else None
            events = r.tasks.events(task.id)
        return self._with_service(task_view(task, alloc, node, events), task)

    def events(self, ref: str, who: TokenRecord) -> builtins.list[dict[str, Any]]:
        return self.detail(ref, who)["events"]

    def counts(self, who: TokenRecord | None) -> dict[str, int] | None:
        """Tasks by state, of those `who` sees (None for no one; the store is asked
        still, so that /health says it answers)."""
        with self.store.read() as r:
            if who is None or not who.allows("read"):
                r.answers()
                return None
            return r.tasks.count_by_state(None if who.is_admin else who.tenant)

    # -- cancel --------------------------------------------------------------------

    def cancel(self, ref: str, who: TokenRecord) -> dict[str, Any]:
        for _ in range(5):
            task = self.visible(ref, who)
            if task.state in TERMINAL:
                raise Conflict(f"task {task.label} already {task.state}; nothing to cancel")
            if task.state == TaskState.CANCELLING:
                return task_view(task)
            try:
                with self.store.tx() as tx:
                    lifecycle.request_cancel(tx, task, who.name)
            except Stale:
                continue  # changed under us: read again and decide again
            return task_view(task)
        raise Conflict(f"task {ref} keeps changing; try the cancel again")

    # -- logs ----------------------------------------------------------------------

    def _read_log(self, task: TaskRecord, offset: int, limit: int = LOG_CHUNK) -> tuple[int, bytes]:
        """The next piece of a task's output, from whichever node runs it, and where it
        starts (past `offset` when the output there was dropped to keep the log capped)."""
        if not task.run_dir:
            return offset, b""
        try:
            return self.backend.read_log(task.node_id or "", task.run_dir, offset, limit)
        except NodeDown as exc:
            raise Unavailable(
                f"the log of {task.label} is on a node that does not answer: {exc}"
            ) from None

    def tail(self, task_id: str, limit: int) -> str:
        """The last `limit` bytes of a task's output, as text (for a market's tenant to
        see why its lease ended); "" when it has none or its node does not answer."""
        with self.store.read() as r:
            task = r.tasks.get(task_id)
        if task is None:
            return ""
        _, data = self._read_log(task, -limit, limit)
        return data.decode("utf-8", errors="replace")

    def log(self, ref: str, who: TokenRecord, offset: int, limit: int) -> tuple[int, bytes]:
        """Up to `limit` bytes of the task's output from `offset`, and where they start."""
        return self._read_log(self.visible(ref, who), offset, limit)

    async def follow(self, task_id: str, offset: int) -> AsyncIterator[str]:
        """Server-sent events: one `data:` event per chunk (text, never a character cut
        in two), `event: skipped` with the number of bytes dropped by the log's cap
        before the next chunk, `event: end` when done. One chunk at a time: a follower
        costs the daemon the same memory however much the task writes. The caller
        checked, before the stream began, that `task_id` is the follower's to see."""
        position = offset
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            task = await asyncio.to_thread(self._reread, task_id)
            done = task is None or task.state in TERMINAL
            try:
                start, chunk = (
                    await asyncio.to_thread(self._read_log, task, position)
                    if task
                    else (position, b"")
                )
            except Unavailable as exc:  # its node went: say so, never a quiet end
                yield f"event: error\ndata: {json.dumps(str(exc))}\n\n"
                return
            if start > position:
                yield f"event: skipped\ndata: {start - position}\n\n"
            position = start
            if chunk:
                position += len(chunk)
                if text := decoder.decode(chunk):
                    yield f"data: {json.dumps(text)}\n\n"
                continue
            if done:
                if tail := decoder.decode(b"", final=True):
                    yield f"data: {json.dumps(tail)}\n\n"
                state = task.state.value if task else "gone"
                yield f"event: end\ndata: {json.dumps(state)}\n\n"
                return
            await asyncio.sleep(FOLLOW_POLL_S)

    # -- files ---------------------------------------------------------------------

    def _work_of(self, ref: str, who: TokenRecord) -> TaskRecord:
        task = self.visible(ref, who)
        if not task.run_dir:
            raise NotFound(f"task {task.label} has not started: no files yet")
        spec = task.task_spec
        if spec.workdir and not spec.image:
            raise NotFound(f"task {task.label} works in {spec.workdir}, no folder of its own")
        return task

    def files(self, ref: str, who: TokenRecord, path: str) -> builtins.list[dict[str, Any]]:
        """The entries of a folder in the task's work folder (404 for one not there, a
        link, or a path with '..')."""
        task = self._work_of(ref, who)
        try:
            return self.backend.list_files(task.node_id or "", task.run_dir or "", path)
        except NotInWorkdir:
            what = f"no file or folder {path!r} in the work folder of {task.label}"
            raise NotFound(what) from None
        except NodeDown as exc:
            gone = f"the files of {task.label} are on a node that is gone: {exc}"
            raise Unavailable(gone) from None

    def download(
        self, ref: str, who: TokenRecord, path: str, offset: int, limit: int
    ) -> tuple[int, bytes]:
        """Up to `limit` bytes of a file of the task's work folder from `offset`, and the
        file's size."""
        task = self._work_of(ref, who)
        node, run_dir = task.node_id or "", task.run_dir or ""
        try:
            return self.backend.read_file(node, run_dir, path, offset, limit)
        except NotInWorkdir:
            raise NotFound(f"no file {path!r} in the work folder of {task.label}") from None
        except NodeDown as exc:
            gone = f"the files of {task.label} are on a node that is gone: {exc}"
            raise Unavailable(gone) from None

    def _reread(self, task_id: str) -> TaskRecord | None:
        with self.store.read() as r:
            return r.tasks.get(task_id)
