"""Ray backend: tasks run on the Ray node the scheduler chose, under the same runner.

Each gpuprovider node of the Ray cluster (a Ray node labelled `gpuprovider.io/node`)
gets one detached agent actor pinned to it with hard node affinity (`agent.py`),
restarted by Ray when it dies. The agent runs the local backend's processes there (the
runner, its exit records, the task's log) and reports the node's hardware with the
same inventory code as a local node, under the node's own key: the node id survives
Ray and agent restarts. The daemon is a Ray driver (this module): it places with its
own scheduler and only asks the chosen node's agent to start, poll, stop or read a
task, with the provider's credential.

Fencing: every start and poll renews the node's lease, listing the attempts the
provider counts as running there, until `lease_s` after the call was sent. A node that
hears nothing (dead, hung, cut off) has its runners kill their commands when the lease
runs out (`runner.Fence`); the provider gives a node's attempts up as lost only after
the last deadline it sent plus `grace_s`. So an attempt never runs in two places: the
old copy stops before the new one starts, and a node that comes back is told which
attempts are still its own before anything else.

Every call here blocks, with a deadline: the daemon makes them from its loops' threads
(and log reads from worker threads), never from the thread that serves the API.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gpuprovider import __version__
from gpuprovider.backends.base import (
    Discovery,
    Exit,
    Handle,
    Launch,
    NodeDown,
    NodeNotReady,
    node_lost,
)
from gpuprovider.backends.ray.agent import AGENT_VERSION, NodeAgent, credential_hash
from gpuprovider.backends.ray.common import (
    CLUSTER_KEY,
    LABEL_NAME,
    LABEL_NODE,
    NAMESPACE,
    RayBackendError,
)
from gpuprovider.backends.ray.join import ray_init
from gpuprovider.backends.workfiles import NotInWorkdir
from gpuprovider.home import write_secret
from gpuprovider.isolation.policy import Settings
from gpuprovider.telemetry.node import NodeTelemetry

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 10.0  # a log read, from an API worker thread
# The executor's calls (starts, polls, stops) wait at most this long, and never more
# than a third of the lease: one node that hangs must not keep the others' leases from
# being renewed. A node that cannot answer in time is given up once its lease ran out.
POLL_TIMEOUT_S = 3.0
LIVENESS_S = 1.0  # how often nodes' liveness is asked between full discoveries
LEASE_S = 7.0  # with GRACE_S: a dead node's work runs elsewhere within 10 s
GRACE_S = 2.0
RESTART_GRACE_S = 600.0
GCS_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 5.0  # a clean stop waits this long for its nodes' restart leases
# The cluster's marker in Ray's KV says when the provider last ran, renewed this often
# (`node join` finds it stale after three periods: the provider is not running)
MARKER_EVERY_S = 10.0


def attempt_key(run_dir: str, attempt: int) -> str:
    return f"{run_dir}#{attempt}"


ALIVE = 0  # GcsNodeInfo.GcsNodeState.ALIVE


class ClusterReplaced(RayBackendError):
    """Ray's GCS answers for another cluster than the one this driver joined."""

    def __init__(self) -> None:
        super().__init__(
            "Ray's GCS now serves another cluster (it restarted without GCS fault "
            "tolerance): every node of the one this provider joined is gone, and their "
            "work is given up once their leases run out; restart the provider "
            "(`gpuprovider up`) to run on the new cluster, and run Ray's GCS fault "
            "tolerance so that a restarted GCS keeps its cluster"
        )


def asked_aside(question: Callable[..., Any], *args: Any) -> Future:
    """`question` asked on a thread of its own, which the process does not wait for at
    exit: a question to a GCS that is away may never be answered."""
    answer: Future = Future()

    def ask() -> None:
        try:
            answer.set_result(question(*args))
        except BaseException as exc:  # handed to whoever waits for the answer
            answer.set_exception(exc)

    threading.Thread(target=ask, name="ray-gcs", daemon=True).start()
    return answer


def provider_credential(path: Path) -> str:
    """The secret the provider's calls to its agents carry (made once, kept 0600)."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        secret = secrets.token_urlsafe(32)
        try:
            write_secret(path, secret.encode())
        except FileExistsError:
            return path.read_text().strip()
        return secret


class RayBackend:
    name = "ray"
    liveness_interval_s: float | None = LIVENESS_S

    def __init__(
        self,
        address: str,
        data_dir: Path,
        credential_file: Path,
        isolation: Settings | None = None,
        lease_s: float = LEASE_S,
        grace_s: float = GRACE_S,
        kernel_log: str = "auto",
        restart_grace_s: float = RESTART_GRACE_S,
        grants_file: Path | None = None,
    ):
        self.address, self.data_dir = address, str(data_dir)
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        self.credential = provider_credential(credential_file)
        self.isolation = asdict(isolation or Settings())
        self.lease_s, self.grace_s = lease_s, grace_s
        self.restart_grace_s, self.grants_file = restart_grace_s, grants_file
        self.quick_s = min(POLL_TIMEOUT_S, lease_s / 3)  # the executor's and discovery's
        # node -> when the oldest call it has not answered was sent (none: all answered)
        self.waiting_since: dict[str, float] = {}
        self.kernel_log = kernel_log  # [telemetry] kernel_log, read on every node
        self.ray: Any = None
        self.agents: dict[str, Any] = {}  # our node id -> agent actor handle
        self.ray_of: dict[str, str] = {}  # our node id -> the Ray node serving it now
        self.node_of: dict[str, str] = {}  # Ray node id -> our node id
        self.dead: set[str] = set()
        self.started = time.time()
        # the latest deadline a node not heard from may hold: what a daemon before this
        # one could have sent it (kill -9), unless a clean stop granted more
        self.floor = self.started + lease_s
        # node -> the latest lease deadline it may hold: sent by this daemon, or a restart
        # lease the daemon before it granted on a clean stop
        self.deadline: dict[str, float] = {}
        self.sent: dict[str, float] = {}  # node -> the latest deadline this daemon sent
        self.acked_grants: set[str] = set()  # restart leases the nodes said they hold
        self._read_grants()
        # nodes whose last call failed or went unanswered: their lease is not renewed
        # until one answers (a dead node's work moves lease_s + grace_s after it died)
        self.failing: set[str] = set()
        self._marker_at = 0.0
        self.running: dict[str, set[str]] = {}  # node -> attempts it was last told to run
        self._trouble: dict[str, str] = {}  # node -> what was last logged about it
        self._gcs_question: Future | None = None

    def connect(self) -> None:
        """Join the Ray cluster as a driver (once); RayBackendError says what to fix."""
        if self.ray is not None:
            return
        ray = ray_init(self.address)
        self._agent_cls = ray.remote(NodeAgent)
        self.ray = ray
        try:
            self._mark()
        except Exception as exc:  # asked again with the next question to the GCS
            log.warning("could not mark the Ray cluster as served: %s", type(exc).__name__)

    def _mark(self, stopped: bool = False) -> None:
        """Say in Ray's KV that this provider runs on the cluster, and when it last did
        (`node join` refuses a cluster whose provider is not running)."""
        now = time.time()
        marker: dict[str, Any] = {"gpuprovider": __version__, "alive_at": now}
        marker["renew_s"] = MARKER_EVERY_S
        if stopped:
            marker["stopped_at"] = now
        self.ray._private.worker.global_worker.gcs_client.internal_kv_put(
            CLUSTER_KEY.encode(),
            json.dumps(marker).encode(),
            True,
            NAMESPACE.encode(),
            timeout=GCS_TIMEOUT_S,
        )
        self._marker_at = now

    def _ask_gcs(self) -> list[dict]:
        """One question to the GCS (on its thread): the nodes, then the marker when
        due. Asked of Ray's Python GCS client, which raises where `ray.nodes()` would
        end the process (a GCS restarted without fault tolerance: another cluster)."""
        gcs = self.ray._private.worker.global_worker.gcs_client
        try:
            found = gcs.get_all_node_info(timeout=GCS_TIMEOUT_S)
        except Exception as exc:
            if "WrongClusterID" in str(exc):
                raise ClusterReplaced from None
            raise
        infos = [
            {
                "NodeID": info.node_id.hex(),
                "Alive": info.state == ALIVE,
                "Labels": dict(info.labels),
                "NodeManagerAddress": info.node_manager_address,
                "Resources": dict(info.resources_total),
            }
            for info in found.values()
        ]
        if time.time() - self._marker_at >= MARKER_EVERY_S:
            self._mark()
        return infos

    def _read_grants(self) -> None:
        """The restart leases the daemon before this one granted when it stopped."""
        if self.grants_file is None:
            return
        try:
            grants = json.loads(self.grants_file.read_text())["nodes"]
            for node_id, grant in grants.items():
                self.deadline[node_id] = float(grant["deadline"])
                if grant["acked"] is True:
                    self.acked_grants.add(node_id)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # unreadable: every node may hold the longest lease a stop could grant
            log.warning("restart leases unreadable (%s): assuming the longest", exc)
            self.floor = self.started + self.restart_grace_s

    # -- nodes -------------------------------------------------------------------

    def _ray_nodes(self) -> list[dict]:
        """The gpuprovider nodes Ray lists (alive or dead), from Ray's GCS, within
        GCS_TIMEOUT_S: an outage makes this RayBackendError, not a thread stuck for its
        length (one question at a time is out; the next waits for its answer)."""
        self.connect()
        if self._gcs_question is None or self._gcs_question.done():
            self._gcs_question = asked_aside(self._ask_gcs)
        try:
            infos = self._gcs_question.result(timeout=GCS_TIMEOUT_S)
        except ClusterReplaced:
            raise
        except Exception as exc:  # its client's timeout (RpcError), or ours
            why = "" if isinstance(exc, FuturesTimeout) else f" ({type(exc).__name__})"
            raise RayBackendError(
                f"Ray's GCS has not answered for {GCS_TIMEOUT_S:g}s or more{why}: no node "
                "is discovered or lost meanwhile; tasks run on while their nodes answer "
                "(run Ray's GCS fault tolerance so that a restarted head keeps its cluster)"
            ) from None
        return [i for i in infos if (i.get("Labels") or {}).get(LABEL_NODE) == "1"]

    def _lost(self, infos: list[dict]) -> dict[str, str]:
        """Our nodes whose Ray node Ray reports dead, unless another Ray node (Ray
        restarted there) serves the same node now."""
        lost = {}
        for info in infos:
            node_id = self.node_of.get(info["NodeID"])
            if node_id and not info["Alive"] and self.ray_of.get(node_id) == info["NodeID"]:
                lost[node_id] = "Ray reports the node dead"
        for node_id in lost:
            self.dead.add(node_id)
            self.agents.pop(node_id, None)
        return lost

    def discover(self, full: bool) -> Discovery:
        """Without `full`: the nodes Ray reports dead (cheap: no node is asked). With
        it: also every alive node's hardware and identity, as its agent reports them
        (an agent of another gpuprovider version is replaced)."""
        try:
            infos = self._ray_nodes()
        except ClusterReplaced as exc:  # said once; every node the provider knew is gone
            if self._trouble.get("") != str(exc):
                self._trouble[""] = str(exc)
                log.error("%s", exc)
            lost = {node_id: "Ray's cluster was made again without it" for node_id in self.ray_of}
            self.dead.update(lost)
            self.agents.clear()
            return Discovery(lost=lost)
        lost = self._lost(infos)
        if not full:  # an alive node whose agent is not known (gone, replaced) is news
            unknown = [
                i for i in infos if i["Alive"] and self.node_of.get(i["NodeID"]) not in self.agents
            ]
            return Discovery(lost=lost, unanswered=len(unknown))
        asked = {}
        for info in infos:
            if info["Alive"]:
                agent = self._agent(info)
                try:
                    ref = agent.inventory.remote(self.credential, info["NodeManagerAddress"])
                except TypeError as exc:  # its methods are not ours: another version's
                    self._replace(agent, info["NodeID"], f"an agent of other methods: {exc}")
                    continue
                asked[ref] = (info["NodeID"], agent)
        nodes = []
        if asked:
            ready, late = self.ray.wait(list(asked), num_returns=len(asked), timeout=self.quick_s)
            for ref in ready:
                ray_id, agent = asked[ref]
                try:
                    node = self.ray.get(ref)
                except self.ray.exceptions.RayTaskError as exc:  # it answered, not as ours
                    self._replace(agent, ray_id, f"an agent that failed: {exc}"[:300])
                    continue
                except Exception as exc:  # one node's trouble never hides the others
                    if isinstance(exc, self.ray.exceptions.RayActorError):
                        self._forget(ray_id)  # found again by name: restarted, or replaced
                    self._say(ray_id, f"its agent does not answer: {type(exc).__name__}")
                    continue
                if (version := node.facts.get("agent_version")) != AGENT_VERSION:
                    self._replace(agent, ray_id, f"it runs gpuprovider {version}")
                    continue
                self.node_of[ray_id], self.ray_of[node.id] = node.id, ray_id
                self.agents[node.id] = agent
                self.failing.discard(node.id)  # it answers: its lease is renewed again
                self.dead.discard(node.id)
                lost.pop(node.id, None)
                nodes.append(node)
            for ref in late:  # a new agent waits for its node's GPUs, which others may hold
                self._say(
                    asked[ref][0],
                    f"its agent did not answer within {self.quick_s:g}s (a new agent "
                    "waits for every GPU Ray counts there: other Ray work may hold them)",
                )
        alive = sum(bool(info["Alive"]) for info in infos)
        return Discovery(nodes, lost, unanswered=alive - len(nodes))

    def _say(self, node: str, why: str) -> None:
        """Log trouble with a node once per kind of trouble (not every pass)."""
        if self._trouble.get(node) != why:
            self._trouble[node] = why
            log.warning("Ray node %s: %s", node, why)

    def _forget(self, ray_id: str) -> None:
        node_id = self.node_of.get(ray_id)
        if node_id and self.ray_of.get(node_id) == ray_id:
            self.agents.pop(node_id, None)

    def _replace(self, agent: Any, ray_id: str, why: str) -> None:
        """An agent another gpuprovider started: killed (its runners live on, and the
        new agent finds them by their run folders) and started again at this version."""
        log.warning(
            "replacing the agent on Ray node %s (%s; this is gpuprovider %s)",
            ray_id,
            why,
            AGENT_VERSION,
        )
        self._forget(ray_id)
        with contextlib.suppress(Exception):
            self.ray.kill(agent, no_restart=True)

    def _agent(self, info: dict) -> Any:
        """The node's agent: the one known, else the one of that name in Ray, else a new
        one, which claims every GPU Ray counts on the node (no other Ray work is given
        them: the provider hands them out)."""
        ray_id, labels = info["NodeID"], info.get("Labels") or {}
        node_id = self.node_of.get(ray_id)
        agent = self.agents.get(node_id) if node_id else None
        if agent is not None and node_id and self.ray_of.get(node_id) == ray_id:
            return agent
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return self._agent_cls.options(
            name=f"agent-{ray_id}",
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            num_gpus=(info.get("Resources") or {}).get("GPU", 0),
            max_concurrency=16,
            max_restarts=-1,  # a dead agent comes back on its node (its tasks live on)
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray_id, soft=False),
        ).remote(
            credential_hash(self.credential),
            labels.get(LABEL_NAME, ""),
            labels,
            self.data_dir,
            self.isolation,
            self.kernel_log,
        )

    def telemetry(self, poll_nvml: bool, kernel_log: str) -> list[NodeTelemetry]:
        """Asked of every agent at once, only when NVML is due: each agent reads its
        kernel log then too, so XIDs on Ray nodes arrive at the NVML interval."""
        if not poll_nvml:
            return []
        calls = {
            node_id: ("telemetry", (True, kernel_log))
            for node_id in list(self.agents)
            if node_id not in self.dead
        }
        answers, failed = self._ask(calls, CALL_TIMEOUT_S)  # the telemetry loop's own thread
        for node_id, why in failed.items():
            log.info("no telemetry from node %s: %s", node_id, why)
        return list(answers.values())

    # -- calls -------------------------------------------------------------------

    def _ask(
        self, calls: dict[str, tuple[str, tuple]], timeout_s: float
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Every node's call at once, `timeout_s` at most for all: ({node: answer},
        {node: why none}). A dead agent's handle is kept: Ray restarts the agent behind
        it, and discovery forgets one that will not come back."""
        answers: dict[str, Any] = {}
        failed: dict[str, str] = {}
        pending: dict[Any, str] = {}
        for node_id, (method, args) in calls.items():
            agent = self.agents.get(node_id)
            if agent is None:
                failed[node_id] = "no agent known there"
                continue
            try:
                pending[getattr(agent, method).remote(self.credential, *args)] = node_id
                self.waiting_since.setdefault(node_id, time.time())
            except (TypeError, AttributeError) as exc:  # not our agent: discovery replaces it
                failed[node_id] = f"its agent is not this provider's: {exc}"
                self.agents.pop(node_id, None)
        if not pending:
            return answers, failed
        ready, late = self.ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
        for ref in ready:
            node_id = pending[ref]
            self.waiting_since.pop(node_id, None)  # answered, or failed: never runs later
            try:
                answers[node_id] = self.ray.get(ref)
                self.failing.discard(node_id)
            except Exception as exc:  # the actor died (Ray restarts it), the node went
                failed[node_id] = f"{type(exc).__name__}: {str(exc)[:200]}"
                self.failing.add(node_id)
        for ref in late:
            failed[pending[ref]] = f"no answer within {timeout_s:g}s"
            self.failing.add(pending[ref])
        return answers, failed

    def _call(self, node_id: str, method: str, *args: Any, timeout_s: float = 0.0) -> Any:
        answers, failed = self._ask({node_id: (method, args)}, timeout_s or self.quick_s)
        if node_id in failed:
            raise NodeDown(node_id, f"node {node_id} does not answer: {failed[node_id]}")
        return answers[node_id]

    def _lease(self, node_id: str) -> tuple[float, float, list[str]]:
        """The lease a call to `node_id` carries: (deadline, period, attempts). A node
        whose last call failed or went unanswered is not renewed until one answers:
        calls queued there would renew it when it wakes, so none may reach past the
        deadline already sent (and it runs out)."""
        now = time.time()
        if self._unsure(node_id, now):
            deadline = self.deadline.get(node_id, self.floor)
        else:
            deadline = now + self.lease_s
            self.deadline[node_id] = max(self.deadline.get(node_id, 0.0), deadline)
            self.sent[node_id] = max(self.sent.get(node_id, 0.0), deadline)
        return deadline, self.lease_s, sorted(self.running.get(node_id, ()))

    def _unsure(self, node_id: str, now: float) -> bool:
        """Whether `node_id` is sent no new lease: its last call failed or went
        unanswered, or it has been silent for half a lease."""
        return node_id in self.failing or now - self.waiting_since.get(node_id, now) > (
            self.lease_s / 2
        )

    def _renewed(self, node_id: str, carried: float) -> None:
        """A node answered a call whose lease ran to `carried`: a restart lease it said
        it held is now cut back to what this daemon sent (the agent rewrites a lease
        whose deadline moves by more than a quarter of the period)."""
        held = self.deadline.get(node_id, 0.0)
        if node_id in self.acked_grants and held - carried > self.lease_s / 4:
            self.acked_grants.discard(node_id)
            self.deadline[node_id] = self.sent[node_id]

    def fenced(self, node_id: str, now: float) -> bool:
        """Whether every runner on `node_id` has surely stopped for want of a lease:
        the last deadline it may hold (sent by this daemon, granted by the one before it
        on a clean stop, or, neither, what that one could have sent) has passed, and the
        grace after it."""
        last = self.deadline.get(node_id, self.floor)
        return now > last + self.grace_s

    # -- tasks -------------------------------------------------------------------

    def start_many(self, launches: list[Launch]) -> list[Handle | OSError]:
        """Every node asked at once, one call for all its launches, each listed in the
        node's lease before its runner starts."""
        results: list[Handle | OSError | None] = [None] * len(launches)
        by_node: dict[str, list[int]] = {}
        for i, launch in enumerate(launches):
            if launch.node_id in self.dead:
                results[i] = NodeDown(launch.node_id, f"node {launch.node_id} is not alive")
            elif launch.node_id not in self.agents:  # not found since this daemon started
                results[i] = NodeNotReady(f"node {launch.node_id} is not discovered yet")
            elif self._unsure(launch.node_id, time.time()):  # its lease is not renewed
                results[i] = NodeNotReady(
                    f"node {launch.node_id} did not answer its last call; nothing starts "
                    "there until it answers"
                )
            else:
                by_node.setdefault(launch.node_id, []).append(i)
        for i in (i for rows in by_node.values() for i in rows):
            if launches[i].upload:  # the node has no copy: the bytes go with the start
                try:
                    launches[i].upload_data = Path(launches[i].upload).read_bytes()
                except OSError as exc:
                    results[i] = OSError(f"upload cannot be read: {exc}")
        by_node = {
            node_id: [i for i in rows if results[i] is None] for node_id, rows in by_node.items()
        }
        by_node = {node_id: rows for node_id, rows in by_node.items() if rows}
        calls = {}
        for node_id, rows in by_node.items():
            keys = {attempt_key(launches[i].run_dir, launches[i].attempt) for i in rows}
            self.running[node_id] = self.running.get(node_id, set()) | keys
            calls[node_id] = ("start_many", ([launches[i] for i in rows], *self._lease(node_id)))
        try:
            answers, failed = self._ask(calls, self.quick_s)
        except Exception as exc:  # Ray itself cannot be reached
            answers, failed = {}, {node_id: type(exc).__name__ for node_id in calls}
        for node_id, rows in by_node.items():
            if node_id in answers:
                self._renewed(node_id, calls[node_id][1][1])
                for i, started in zip(rows, answers[node_id], strict=True):
                    results[i] = started
            else:
                for i in rows:
                    results[i] = NodeDown(
                        node_id, f"node {node_id} could not start it: {failed[node_id]}"
                    )
        return results  # type: ignore[return-value]

    def poll_many(self, handles: list[Handle]) -> list[Exit | None]:
        """Every node asked at once, one call for all its tasks (which renews its lease
        for exactly them), `quick_s` at most for all. A task whose node cannot
        answer reads None (nothing known yet) until the node is surely fenced: then it
        is lost, and may run elsewhere."""
        results: list[Exit | None] = [None] * len(handles)
        by_node: dict[str, list[int]] = {}
        for i, handle in enumerate(handles):
            by_node.setdefault(handle.node_id, []).append(i)
        self.running = {
            node_id: {attempt_key(handles[i].run_dir, handles[i].attempt) for i in rows}
            for node_id, rows in by_node.items()
        }
        calls = {
            node_id: ("poll_many", ([handles[i] for i in rows], *self._lease(node_id)))
            for node_id, rows in by_node.items()
            if node_id not in self.dead and node_id in self.agents
        }
        try:
            answers, failed = self._ask(calls, self.quick_s)
        except Exception as exc:  # Ray itself cannot be reached: nothing is known
            answers, failed = {}, {node_id: type(exc).__name__ for node_id in calls}
        now = time.time()
        for node_id, rows in by_node.items():
            if node_id in answers:
                self._renewed(node_id, calls[node_id][1][1])
                self._trouble.pop(node_id, None)
                for i, ended in zip(rows, answers[node_id], strict=True):
                    results[i] = ended
            elif self.fenced(node_id, now):
                self.running.pop(node_id, None)
                for i in rows:
                    results[i] = node_lost(node_id)
            else:
                self._say(node_id, failed.get(node_id, "not alive") + "; waiting out its lease")
        return results

    def stop(self, handle: Handle) -> bool:
        try:
            return self._call(handle.node_id, "stop", handle)
        except NodeDown:
            return False

    def kill(self, handle: Handle) -> None:
        try:
            self._call(handle.node_id, "kill", handle)
        except NodeDown as exc:
            log.warning("could not kill %s on %s: %s", handle.pid, handle.node_id, exc)

    def recover(self, run_dir: str, attempt: int, node_id: str = "") -> Handle | None:
        try:
            return self._call(node_id, "recover", run_dir, attempt)
        except NodeDown:
            return None

    def read_log(self, node_id: str, run_dir: str, offset: int, limit: int) -> tuple[int, bytes]:
        """NodeDown when the node cannot be asked (never an empty log in its place)."""
        if node_id not in self.agents:
            raise NodeDown(node_id, f"node {node_id} is not alive; its log is there")
        return self._call(node_id, "read_log", run_dir, offset, limit, timeout_s=CALL_TIMEOUT_S)

    def list_files(self, node_id: str, run_dir: str, path: str) -> list[dict]:
        if node_id not in self.agents:
            raise NodeDown(node_id, f"node {node_id} is not alive; the files are there")
        found = self._call(node_id, "list_files", run_dir, path, timeout_s=CALL_TIMEOUT_S)
        if found is None:
            raise NotInWorkdir(path)
        return found

    def read_file(
        self, node_id: str, run_dir: str, path: str, offset: int, limit: int
    ) -> tuple[int, bytes]:
        if node_id not in self.agents:
            raise NodeDown(node_id, f"node {node_id} is not alive; the files are there")
        found = self._call(
            node_id, "read_file", run_dir, path, offset, limit, timeout_s=CALL_TIMEOUT_S
        )
        if found is None:
            raise NotInWorkdir(path)
        return found

    def remove_work(self, node_id: str, run_dir: str) -> None:
        if node_id not in self.agents:
            raise NodeDown(node_id, f"node {node_id} is not alive")
        self._call(node_id, "remove_work", run_dir, timeout_s=CALL_TIMEOUT_S)

    def close(self) -> None:
        """A clean stop: agents and their runners outlive the daemon by design, and
        every node that answers is granted a restart lease (`restart_grace_s`) for what
        it runs, so that a daemon down for an upgrade costs no running work; the next
        daemon reads the grants and gives nothing up as lost before they end. A kill -9
        grants nothing: nodes keep the usual lease."""
        if self.ray is None:
            return
        if self.restart_grace_s > 0:
            self._grant_restart_leases()
        try:
            asked_aside(self._mark, True).result(timeout=GCS_TIMEOUT_S)
        except Exception as exc:  # no GCS: `node join` finds the marker stale instead
            log.warning("could not mark the Ray cluster stopped: %s", type(exc).__name__)

    def _grant_restart_leases(self) -> None:
        now = time.time()
        deadline = now + self.restart_grace_s
        granted: dict[str, dict[str, Any]] = {}
        for node_id, deadline_held in self.deadline.items():  # earlier grants still held
            if deadline_held > now:
                granted[node_id] = {"deadline": deadline_held, "acked": False}
        calls = {
            node_id: ("renew", (deadline, self.restart_grace_s, sorted(attempts)))
            for node_id, attempts in self.running.items()
            if attempts
            and node_id in self.agents
            and node_id not in self.dead
            and node_id not in self.failing
            and not self.waiting_since.get(node_id)
        }
        if calls:  # recorded before they are sent: a node may hear one it never answers
            for node_id in calls:
                granted[node_id] = {"deadline": deadline, "acked": False}
            self._write_grants(granted)
            try:
                answers, failed = self._ask(calls, CLOSE_TIMEOUT_S)
            except Exception as exc:
                answers, failed = {}, {node_id: type(exc).__name__ for node_id in calls}
            for node_id in answers:
                granted[node_id]["acked"] = True
            for node_id, why in failed.items():
                log.warning("node %s has no restart lease: %s", node_id, why)
        self._write_grants(granted)
        log.info(
            "restart leases of %g s granted to %d node(s): a daemon back before then "
            "re-adopts their work",
            self.restart_grace_s,
            len(calls) - len([n for n in calls if not granted[n]["acked"]]),
        )

    def _write_grants(self, granted: dict[str, dict[str, Any]]) -> None:
        if self.grants_file is None:
            return
        tmp = self.grants_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"nodes": granted}))
        tmp.replace(self.grants_file)
