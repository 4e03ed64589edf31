"""Rentals: what the API and CLI call to make, read, stop, start, evict and delete them.

The slow parts of making one (its SSH host key, its disk's filesystem) happen before
its transaction, in its own folder; a request refused after that leaves nothing behind
(the folder is removed). Every change of state is a transition of the rental machine
(`lifecycle/rentals.py`); what its environment's task does reaches the rental through
its owner hook, in the task's own transaction.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError

from gpuprovider.backends.launch import port_free
from gpuprovider.config import ProviderConfig
from gpuprovider.domain.records import TokenRecord
from gpuprovider.domain.rentals import (
    ACTIVE,
    AT_REST,
    RentalRecord,
    RentalSpec,
    RentalState,
    route_name,
)
from gpuprovider.home import Home
from gpuprovider.lifecycle import rentals as lifecycle
from gpuprovider.lifecycle.kernel import IllegalTransition, Refused, Stale
from gpuprovider.rentals import disks, keys
from gpuprovider.rentals.disks import RentalFolder
from gpuprovider.service.errors import Conflict, Forbidden, NotFound, Rejected, Unavailable
from gpuprovider.store.rentals import new_rental_id
from gpuprovider.store.store import Store, Tx

log = logging.getLogger(__name__)


def rentals_dir(config: ProviderConfig, home: Home) -> Path:
    return Path(config.rentals.disks_dir) if config.rentals.disks_dir else home.rentals


class RentalService:
    def __init__(self, store: Store, config: ProviderConfig, folder: Path):
        self.store = store
        self.settings = config.rentals
        self.folder = folder

    # -- making one ----------------------------------------------------------------

    def create(self, spec: RentalSpec, who: TokenRecord) -> dict[str, Any]:
        self._check(spec)
        why = disks.unavailable() or keys.unavailable()
        if why:
            raise Unavailable(f"rentals cannot be made on this provider: {why}")
        rental_id = new_rental_id()
        folder = RentalFolder(self.folder, rental_id)
        try:
            host_key = keys.make_host_key(folder.host_key)
            keys.write_authorized_keys(folder.home, spec.ssh_keys)
            disks.create(folder.image, spec.disk_gib)
            with self.store.tx() as tx:
                spec = self._whole_node(tx, spec)
                ssh_port, ports = self._ports(tx, spec)
                expires = tx.now + spec.duration_s if spec.duration_s else None
                try:
                    rental = tx.rentals.insert(
                        spec,
                        who.tenant,
                        ssh_port,
                        ports,
                        str(folder.image),
                        host_key,
                        expires,
                        rental_id,
                    )
                except IntegrityError:
                    raise Conflict(
                        f"name: a rental named {spec.name} exists; choose another name"
                    ) from None
                lifecycle.start_environment(tx, rental, self.settings.priority)
        except BaseException:
            folder.wipe()
            raise
        return self.get(rental_id, who)

    def _check(self, spec: RentalSpec) -> None:
        if spec.disk_gib > self.settings.max_disk_gib:
            raise Rejected(
                f"disk_gib: {spec.disk_gib:g} is over this provider's largest disk "
                f"({self.settings.max_disk_gib:g} GiB, [rentals] max_disk_gib)"
            )
        if spec.whole_node and spec.gpu != "0":
            raise Rejected("gpu: give either gpu or whole_node, not both")
        lo, hi = self.settings.port_range
        for i, port in enumerate(spec.ports):
            if port.port is not None and not lo <= port.port <= hi:
                raise Rejected(
                    f"ports[{i}].port: {port.port} is outside this provider's rental ports "
                    f"{lo}-{hi}; leave it out to be given one"
                )

    def _whole_node(self, tx: Tx, spec: RentalSpec) -> RentalSpec:
        """For a whole node: every GPU, CPU and memory of the largest node (the
        scheduler then places it where all of that is free, or frees it)."""
        if not spec.whole_node:
            return spec
        nodes = [n for n in tx.nodes.list() if n.status == "ready"]
        if not nodes:
            raise Conflict("whole_node: no node is ready")
        node = max(nodes, key=lambda n: (len(n.gpus), n.cpu_count, n.memory_mib))
        return spec.model_copy(
            update={
                "gpu": str(len(node.gpus)),
                "cpu": float(node.cpu_count),
                "memory_mib": node.memory_mib,
            }
        )

    def _ports(self, tx: Tx, spec: RentalSpec) -> tuple[int, dict[str, int]]:
        taken = tx.rentals.ports_taken()
        for i, port in enumerate(spec.ports):
            if port.port is not None and (port.port in taken or not port_free(port.port)):
                raise Conflict(f"ports[{i}].port: {port.port} is taken; choose another")
        asked = {p.port for p in spec.ports if p.port is not None}
        lo, hi = self.settings.port_range
        free = (p for p in range(lo, hi + 1) if p not in taken and p not in asked and port_free(p))
        try:
            ssh_port = next(free)
            ports = {p.name: p.port if p.port is not None else next(free) for p in spec.ports}
        except StopIteration:
            raise Conflict(f"ports: every rental port {lo}-{hi} is taken") from None
        return ssh_port, ports

    # -- reading -------------------------------------------------------------------

    def _find(self, tx: Tx, ref: str, who: TokenRecord) -> RentalRecord:
        rental = tx.rentals.get(ref, None if who.is_admin else who.tenant)
        if rental is None or not who.sees(rental.tenant):
            raise NotFound(f"no rental {ref}")
        return rental

    def get(self, ref: str, who: TokenRecord) -> dict[str, Any]:
        with self.store.read() as r:
            rental = self._find(r, ref, who)
            events = [
                {"at": e.at, "state": e.to_state, "reason": e.reason}
                for e in r.rentals.events(rental.id)
            ]
            return self.view(r, rental, events)

    def list(self, who: TokenRecord) -> list[dict[str, Any]]:
        with self.store.read() as r:
            rentals = r.rentals.list(None if who.is_admin else who.tenant)
            return [self.view(r, rental) for rental in rentals]

    def view(
        self, tx: Tx, rental: RentalRecord, events: builtins.list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        spec = rental.rental_spec
        node = tx.nodes.get(rental.node_id) if rental.node_id else None
        host = node.address if node is not None and node.address else "127.0.0.1"
        ssh = None
        if rental.ssh_port is not None:
            ssh = {
                "host": host,
                "port": rental.ssh_port,
                "user": rental.login,
                "command": f"ssh -p {rental.ssh_port} {rental.login}@{host}",
                "known_hosts": f"[{host}]:{rental.ssh_port} {rental.host_key}",
            }
        reason = rental.state_reason
        task = tx.tasks.get(rental.task_id) if rental.task_id else None
        if rental.state == RentalState.PROVISIONING and task is not None and task.state_reason:
            reason = f"{reason}; its environment is {task.state}: {task.state_reason}"
        return {
            "id": rental.id,
            "name": rental.name,
            "tenant": rental.tenant,
            "state": rental.state.value,
            "reason": reason,
            "image": spec.image,
            "gpu": spec.gpu,
            "whole_node": spec.whole_node,
            "cpu": spec.cpu,
            "memory_mib": spec.memory_mib,
            "disk_gib": spec.disk_gib,
            "ssh": ssh,
            "ports": dict(rental.ports),
            "routes": [route_name(rental.name, p.name) for p in spec.ports if p.http],
            "host_key": rental.host_key,
            "node_id": rental.node_id,
            "task_id": rental.task_id,
            "starts": rental.starts,
            "requested_at": rental.requested_at,
            "ready_s": rental.ready_s,
            "expires_at": rental.expires_at,
            "created_at": rental.created_at,
            "events": events,
        }

    # -- changing one --------------------------------------------------------------

    def _change(
        self, ref: str, who: TokenRecord, what: str, allowed: frozenset[RentalState], act: Any
    ) -> dict[str, Any]:
        for _ in range(5):
            try:
                with self.store.tx() as tx:
                    rental = self._find(tx, ref, who)
                    if rental.state not in allowed:
                        raise Conflict(f"rental {rental.name} is {rental.state}: cannot {what} it")
                    act(tx, rental)
                return self.get(rental.id, who)
            except Stale:
                continue  # its environment changed under the request: read again
            except (Refused, IllegalTransition) as exc:
                raise Conflict(str(exc)) from None
        raise Conflict(f"rental {ref} keeps changing; try again")

    def stop(self, ref: str, who: TokenRecord) -> dict[str, Any]:
        return self._change(ref, who, "stop", ACTIVE, lambda tx, r: lifecycle.stop(tx, r, who.name))

    def start(self, ref: str, who: TokenRecord) -> dict[str, Any]:
        priority = self.settings.priority
        return self._change(
            ref, who, "start", AT_REST, lambda tx, r: lifecycle.start(tx, r, who.name, priority)
        )

    def evict(self, ref: str, why: str, who: TokenRecord) -> dict[str, Any]:
        if not who.is_admin:
            raise Forbidden("evicting a rental is the owner's (an admin token)")
        return self._change(ref, who, "evict", ACTIVE, lambda tx, r: lifecycle.evict(tx, r, why))

    def delete(self, ref: str, who: TokenRecord) -> dict[str, Any]:
        """Delete a rental at rest and wipe its disk."""
        view = self._change(
            ref,
            who,
            "delete (stop it first)",
            AT_REST,
            lambda tx, r: lifecycle.delete(tx, r, who.name),
        )
        folder = RentalFolder(self.folder, view["id"])
        try:
            folder.wipe()
        except OSError as exc:  # the rental is gone; its folder is left for the owner
            log.warning(
                "rental %s deleted but its folder %s stays: %s", view["id"], folder.root, exc
            )
        with contextlib.suppress(NotFound):
            return self.get(view["id"], who)
        return view
