"""Ray backend: tasks run on the Ray node the scheduler chose, under the same runner.

Each gpuprovider node of the Ray cluster (a Ray node labelled `gpuprovider.io/node`)
gets one detached agent actor pinned to it with hard node affinity (`agent.py`). The
agent runs the local backend's processes there (the runner, its exit records, the
task's log) and reports the node's hardware with the same inventory code as a local
node. The daemon is a Ray driver (this module): it places with its own scheduler and
only asks the chosen node's agent to start, poll, stop or read a task. Agents are
detached, so a restarted daemon finds them and the runners they started. Every call
here blocks, with a deadline: the daemon makes them from its loops' threads, never
from the thread that serves the API.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gpuprovider import __version__
from gpuprovider.backends.base import Discovery, Exit, Handle, Launch, NodeDown, node_lost
from gpuprovider.backends.ray.agent import NodeAgent
from gpuprovider.backends.ray.common import (
    CLUSTER_KEY,
    LABEL_NAME,
    LABEL_NODE,
    NAMESPACE,
    RayBackendError,
    our_node_id,
)
from gpuprovider.backends.ray.join import reachable
from gpuprovider.isolation.policy import Settings
from gpuprovider.telemetry.node import NodeTelemetry

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 30.0
# An executor pass waits this long at most for all its polls together; a node that
# cannot answer in time is checked for death.
POLL_TIMEOUT_S = 3.0
LIVENESS_S = 1.0  # how often nodes' liveness is asked between full discoveries


class RayBackend:
    name = "ray"
    liveness_interval_s = LIVENESS_S

    def __init__(self, address: str, data_dir: Path, isolation: Settings | None = None):
        self.address, self.data_dir = address, str(data_dir)
        self.isolation = asdict(isolation or Settings())
        self.ray: Any = None
        self.agents: dict[str, Any] = {}  # our node id -> agent actor handle
        self.ray_ids: dict[str, str] = {}  # our node id -> Ray node id
        self.dead: set[str] = set()

    def connect(self) -> None:
        """Join the Ray cluster as a driver (once); RayBackendError says what to fix."""
        if self.ray is not None:
            return
        try:
            import ray
        except ImportError:
            raise RayBackendError(
                "[backend] kind = \"ray\" needs Ray: pip install 'gpuprovider[ray]'"
            ) from None
        if self.address:
            reachable(self.address)
        try:
            ray.init(
                address=self.address or "auto",
                namespace=NAMESPACE,
                log_to_driver=False,
                logging_level=logging.WARNING,
                configure_logging=False,
            )
        except Exception as exc:
            raise RayBackendError(
                f"cannot connect to the Ray cluster at {self.address or 'auto'}: {exc}; "
                "check [backend] address (host:port of the Ray head) and that the head runs"
            ) from None
        self._agent_cls = ray.remote(NodeAgent)
        self.ray = ray
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(
            CLUSTER_KEY, json.dumps({"gpuprovider": __version__}), namespace=NAMESPACE
        )

    # -- nodes -------------------------------------------------------------------

    def _gpuprovider_nodes(self) -> list[dict]:
        self.connect()
        found = []
        for info in self.ray.nodes():
            labels = info.get("Labels") or {}
            if labels.get(LABEL_NODE) != "1":
                continue
            node_id = our_node_id(info["NodeID"])
            self.ray_ids[node_id] = info["NodeID"]
            if info["Alive"]:
                self.dead.discard(node_id)
            else:
                self.dead.add(node_id)
                self.agents.pop(node_id, None)
            found.append(info | {"node_id": node_id, "labels": labels})
        return found

    def discover(self, full: bool) -> Discovery:
        """Without `full`: the gpuprovider nodes Ray reports dead (cheap: no node is
        asked). With it: also every alive node's hardware, as its agent reports it."""
        infos = self._gpuprovider_nodes()
        if not full:
            dead = {n["node_id"]: "Ray reports the node dead" for n in infos if not n["Alive"]}
            return Discovery(lost=dead)
        refs, dead = [], {}
        for info in infos:
            node_id = info["node_id"]
            if not info["Alive"]:
                dead[node_id] = "Ray reports the node dead"
                continue
            agent = self._agent(node_id, info["NodeID"], info["labels"])
            refs.append((node_id, agent.inventory.remote(info["NodeManagerAddress"])))
        nodes = []
        for node_id, ref in refs:
            try:
                nodes.append(self.ray.get(ref, timeout=CALL_TIMEOUT_S))
            except Exception as exc:  # one node's trouble never hides the others
                dead[node_id] = f"its agent does not answer: {type(exc).__name__}"
        return Discovery(nodes, dead)

    def telemetry(self, poll_nvml: bool, kernel_log: str) -> list[NodeTelemetry]:
        """Asked of every agent at once, only when NVML is due: each agent reads its
        kernel log then too, so XIDs on Ray nodes arrive at the NVML interval."""
        if not poll_nvml:
            return []
        asked = {
            agent.telemetry.remote(True, kernel_log): node_id
            for node_id, agent in list(self.agents.items())
            if node_id not in self.dead and hasattr(agent, "telemetry")
        }
        if not asked:
            return []
        ready, late = self.ray.wait(list(asked), num_returns=len(asked), timeout=CALL_TIMEOUT_S)
        reports = []
        for ref in ready:
            try:
                reports.append(self.ray.get(ref))
            except Exception as exc:  # the agent died; liveness is discover's to report
                log.info("no telemetry from node %s: %s", asked[ref], type(exc).__name__)
        for ref in late:
            log.info("no telemetry from node %s within %gs", asked[ref], CALL_TIMEOUT_S)
        return reports

    def _agent(self, node_id: str, ray_node_id: str, labels: dict[str, str]):
        agent = self.agents.get(node_id)
        if agent is None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            agent = self._agent_cls.options(
                name=f"agent-{ray_node_id}",
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                max_concurrency=16,
                scheduling_strategy=NodeAffinitySchedulingStrategy(ray_node_id, soft=False),
            ).remote(node_id, labels.get(LABEL_NAME, ""), labels, self.data_dir, self.isolation)
            self.agents[node_id] = agent
        return agent

    def _agent_of(self, node_id: str) -> Any:
        agent = self.agents.get(node_id)
        if agent is None:
            self.discover(full=True)
            agent = self.agents.get(node_id)
        if agent is None:
            raise NodeDown(node_id, f"node {node_id} is not an alive node of the Ray cluster")
        return agent

    def _call(self, node_id: str, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        return self.ray.get(getattr(self._agent_of(node_id), method).remote(*args), timeout=timeout)

    # -- tasks -------------------------------------------------------------------

    def _fan_out(
        self, node_of: list[str], items: list[Any], many: str, one: str, timeout_s: float
    ) -> tuple[dict[int, Any], dict[str, str]]:
        """Ask every node at once: for the items of each node, its agent's `many` call
        (or `one` call per item, on an agent an older gpuprovider started), waiting
        `timeout_s` at most for all. Returns ({item index: answer}, {node id: why it
        gave none}); RayBackendError when Ray itself cannot be reached."""
        answers: dict[int, Any] = {}
        failed: dict[str, str] = {}
        by_node: dict[str, list[int]] = {}
        for i, node_id in enumerate(node_of):
            by_node.setdefault(node_id, []).append(i)
        pending: dict[Any, tuple[str, list[int], bool]] = {}  # call -> node, items, many
        for node_id, rows in by_node.items():
            try:
                agent = self._agent_of(node_id)
            except NodeDown as exc:
                failed[node_id] = str(exc)
                continue
            if hasattr(agent, many):
                pending[getattr(agent, many).remote([items[i] for i in rows])] = (
                    node_id,
                    rows,
                    True,
                )
            else:
                for i in rows:
                    pending[getattr(agent, one).remote(items[i])] = (node_id, [i], False)
        if pending:
            ready, late = self.ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
            for ref in ready:
                node_id, rows, is_many = pending[ref]
                try:
                    answer = self.ray.get(ref)
                except Exception as exc:  # the actor died, the node went
                    failed[node_id] = f"{type(exc).__name__}: {exc}"
                    continue
                answers.update(zip(rows, answer if is_many else [answer], strict=True))
            for ref in late:
                failed[pending[ref][0]] = f"no answer within {timeout_s:g}s"
        return answers, failed

    def start_many(self, launches: list[Launch]) -> list[Handle | OSError]:
        """Every node asked at once, one call for all its launches."""
        results: list[Handle | OSError | None] = [None] * len(launches)
        asked = [i for i, launch in enumerate(launches) if launch.node_id not in self.dead]
        for i, launch in enumerate(launches):
            if launch.node_id in self.dead:
                results[i] = NodeDown(launch.node_id, f"node {launch.node_id} died")
        try:
            answers, failed = self._fan_out(
                [launches[i].node_id for i in asked],
                [launches[i] for i in asked],
                "start_many",
                "start",
                CALL_TIMEOUT_S,
            )
        except RayBackendError as exc:
            answers, failed = {}, {launches[i].node_id: str(exc) for i in asked}
        dead = self._dead_among(failed) if failed else set()
        for k, i in enumerate(asked):
            node_id = launches[i].node_id
            if k in answers:
                results[i] = answers[k]
            elif node_id in dead:
                results[i] = NodeDown(node_id, f"node {node_id} died")
            else:
                results[i] = OSError(f"Ray could not start it on {node_id}: {failed[node_id]}")
        return results  # type: ignore[return-value]

    def poll_many(self, handles: list[Handle]) -> list[Exit | None]:
        """Every node asked at once, one call for all its tasks, waiting POLL_TIMEOUT_S
        at most for them all. A task whose node cannot answer reads None (nothing
        known, ask again later) unless Ray reports the node dead."""
        results: list[Exit | None] = [None] * len(handles)
        asked = [i for i, handle in enumerate(handles) if handle.node_id not in self.dead]
        for i, handle in enumerate(handles):
            if handle.node_id in self.dead:
                results[i] = node_lost(handle.node_id)
        try:
            answers, failed = self._fan_out(
                [handles[i].node_id for i in asked],
                [handles[i] for i in asked],
                "poll_many",
                "poll",
                POLL_TIMEOUT_S,
            )
        except RayBackendError:
            return results  # Ray itself is unreachable: nothing is known
        dead = self._dead_among(failed) if failed else set()
        for k, i in enumerate(asked):
            node_id = handles[i].node_id
            if k in answers:
                results[i] = answers[k]
            elif node_id in dead:
                results[i] = node_lost(node_id)
        for node_id, why in failed.items():
            if node_id not in dead:
                log.warning("polling tasks on %s failed: %s", node_id, why)
        return results

    def _dead_among(self, node_ids: Iterable[str]) -> set[str]:
        """Those of `node_ids` that Ray no longer lists alive (asked once), marked dead."""
        alive = {n["NodeID"] for n in self.ray.nodes() if n["Alive"]}
        dead = {node_id for node_id in node_ids if self.ray_ids.get(node_id) not in alive}
        self.dead |= dead
        for node_id in dead:
            self.agents.pop(node_id, None)
        return dead

    def stop(self, handle: Handle) -> bool:
        try:
            return self._call(handle.node_id, "stop", handle)
        except Exception:
            return False

    def kill(self, handle: Handle) -> None:
        try:
            self._call(handle.node_id, "kill", handle)
        except Exception as exc:
            log.warning("could not kill %s on %s: %s", handle.pid, handle.node_id, exc)

    def recover(self, run_dir: str, attempt: int, node_id: str = "") -> Handle | None:
        try:
            return self._call(node_id, "recover", run_dir, attempt)
        except Exception:
            return None

    def read_log(self, node_id: str, run_dir: str, offset: int, limit: int) -> tuple[int, bytes]:
        try:
            return self._call(node_id, "read_log", run_dir, offset, limit)
        except Exception:
            return offset, b""

    def close(self) -> None:
        pass  # agents and their runners outlive the daemon by design
