"""JSON views of records, shared by the API (and so by the CLI). Their shapes are the
response models of `api/schemas.py`."""

from __future__ import annotations

import time
from typing import Any

from gpuprovider.domain.records import (
    AllocationRecord,
    JournalRow,
    NodeRecord,
    TaskRecord,
    TokenRecord,
)
from gpuprovider.domain.usability import Usability


def task_view(
    task: TaskRecord,
    allocation: AllocationRecord | None = None,
    node: NodeRecord | None = None,
    events: list[JournalRow] | None = None,
) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": task.id,
        "name": task.name,
        "tenant": task.tenant,
        "kind": task.kind,
        "state": task.state.value,
        "reason": task.state_reason,
        "priority": task.priority,
        "attempt": task.attempt,
        "preemptions": task.preemptions,
        "gang": task.gang,
        "exit_code": task.exit_code,
        "node_id": task.node_id,
        "pid": task.pid,
        "created_at": task.created_at,
        "started_at": task.started_at,
        "finished_at": task.finished_at,
        "gpu": task.spec.get("resources", {}).get("gpu", "0"),
        "spec": task.spec,
    }
    if allocation is not None:
        gpus = {g.uuid: g for g in node.gpus} if node else {}
        view["allocation"] = {
            "node_id": allocation.node_id,
            "node": node.name if node else allocation.node_id,
            "active": allocation.active,
            "gpus": [
                {
                    "uuid": uuid,
                    "index": gpus[uuid].idx if uuid in gpus else None,
                    "model": gpus[uuid].model if uuid in gpus else None,
                    "simulated": gpus[uuid].simulated if uuid in gpus else None,
                }
                for uuid in allocation.gpu_uuids
            ],
            "gpu_share": allocation.gpu_milli / 1000,
            "cpu": allocation.cpu_milli / 1000,
            "memory_mib": allocation.memory_mib,
            "ports": allocation.ports,
        }
        if allocation.ports and allocation.active and node is not None:
            view["endpoints"] = {
                name: f"http://{node.address}:{port}" for name, port in allocation.ports.items()
            }
    if events is not None:
        view["events"] = [e.brief() for e in events]
    return view


def node_view(
    node: NodeRecord, usability: Usability, events: list[JournalRow] | None = None
) -> dict[str, Any]:
    now = time.time()
    view: dict[str, Any] = {
        "id": node.id,
        "name": node.name,
        "address": node.address,
        "backend": node.backend,
        "status": node.status.value,
        "reason": node.status_reason,
        "labels": node.labels,
        "cpu_count": node.cpu_count,
        "memory_mib": node.memory_mib,
        "disk_free_mib": node.disk_mib,
        "gpu_count": sum(1 for g in node.gpus if g.present),
        "simulated_gpus": sum(1 for g in node.gpus if g.present and g.simulated),
        # GPUs given no new work, and why (a FAILed check, a cordon, no proof, gone)
        "unusable_gpus": [
            {"index": g.idx, "uuid": g.uuid, "reason": reason}
            for g in node.gpus
            if (reason := usability.gpu_reason(g, now))
        ],
        "public_key": node.public_key,
        "facts": node.facts,
        "last_heartbeat": node.last_heartbeat,
    }
    if events is not None:
        view["events"] = [e.brief() for e in events]
    return view


def gpu_views(
    nodes: list[NodeRecord], allocations: list[AllocationRecord], usability: Usability
) -> list[dict[str, Any]]:
    now = time.time()
    used: dict[str, list[tuple[str, int]]] = {}
    for alloc in allocations:
        for uuid in alloc.gpu_uuids:
            used.setdefault(uuid, []).append((alloc.task_id, alloc.gpu_milli))
    views = []
    for node in nodes:
        for gpu in node.gpus:
            holders = used.get(gpu.uuid, [])
            views.append(
                {
                    "uuid": gpu.uuid,
                    "node_id": node.id,
                    "node": node.name,
                    "index": gpu.idx,
                    "model": gpu.model,
                    "device_name": gpu.device_name,
                    "memory_gb": gpu.memory_gb,
                    "memory_mib": gpu.memory_mib,
                    "simulated": gpu.simulated,
                    "present": gpu.present,
                    "health": gpu.health,
                    "health_reason": gpu.health_reason,
                    "cordon_reason": gpu.cordon_reason,
                    # the scheduler's own verdict, from the same rule
                    "unusable_reason": usability.node_reason(node)
                    or usability.gpu_reason(gpu, now),
                    "proof": None
                    if gpu.proof_passed is None
                    else {
                        "passed": gpu.proof_passed,
                        "at": gpu.proof_at,
                        "reason": gpu.proof_reason,
                        "verifier_key": gpu.proof_verifier_key,
                        "trusted": gpu.proof_verifier_key in usability.trusted_verifiers,
                        "model": gpu.proof_model,
                        "simulated": gpu.proof_simulated,
                        "timed": gpu.proof_timed,
                        "covered_bytes": gpu.proof_covered_bytes,
                        "protocol": gpu.proof_protocol,
                    },
                    "driver_version": gpu.driver_version,
                    "cuda_version": gpu.cuda_version,
                    "used_share": sum(m for _, m in holders) / 1000,
                    "tasks": [task_id for task_id, _ in holders],
                }
            )
    return views


def token_view(token: TokenRecord) -> dict[str, Any]:
    return {
        "name": token.name,
        "scopes": token.scopes,
        "tenant": token.tenant,
        "created_at": token.created_at,
        "expires_at": token.expires_at,
        "revoked_at": token.revoked_at,
    }
