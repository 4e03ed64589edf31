"""The rental machine alone, on a store with one node and no daemon: what its
environment's task transitions cause for it (its owner hook), what stopping, evicting,
starting and deleting do, and the node's rented status. Runs anywhere (no container)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gpuprovider.domain.process import Exit
from gpuprovider.domain.rentals import RentalSpec, RentalState
from gpuprovider.domain.states import TaskState
from gpuprovider.lifecycle import rentals, tasks
from gpuprovider.lifecycle.kernel import IllegalTransition, Refused
from gpuprovider.store.signals import Signal
from gpuprovider.testing import NODE, StoreWorld

R = RentalState
KEY = (
    Ed25519PrivateKey.generate()
    .public_key()
    .public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    .decode()
)


@pytest.fixture
def world(tmp_path) -> StoreWorld:
    return StoreWorld(tmp_path)


def rent(world: StoreWorld, name: str = "box", expires_in: float | None = None, **extra):
    spec = RentalSpec(name=name, image="localhost/r:1", ssh_keys=[KEY], gpu="1", **extra)
    with world.store.tx() as tx:
        expires = tx.now + expires_in if expires_in else None
        port = 30000 + len(tx.rentals.list())
        rental = tx.rentals.insert(spec, "team", port, {}, "/x/disk.img", "ssh-ed25519 AAAA",
                                   expires)  # fmt: skip
        rentals.start_environment(tx, rental, 1000)
    return rental


def rental_now(world: StoreWorld, ref: str = "box"):
    with world.store.read() as r:
        return r.rentals.get(ref)


def environment(world: StoreWorld, ref: str = "box"):
    return world.get(rental_now(world, ref).task_id)


def history(world: StoreWorld, ref: str = "box") -> list[str]:
    with world.store.read() as r:
        return [e.to_state for e in r.rentals.events(rental_now(world, ref).id)][::-1]


def rented(world: StoreWorld) -> list[str]:
    return sorted(s for signal, subjects in world.fired if signal == Signal.RENTED
                  for s in subjects)  # fmt: skip


def test_its_environment_is_an_owned_never_preemptible_task_of_the_rentals_priority(world):
    rent(world, expires_in=3600, ports=[{"name": "web"}])
    task = environment(world)
    spec = task.task_spec
    assert task.owner_kind == "rental" and task.state == TaskState.QUEUED
    assert spec.image == "localhost/r:1" and spec.command[0] == "/usr/sbin/dropbear"
    assert "-s" in spec.command and "-w" in spec.command  # keys only, never root
    assert spec.command[spec.command.index("-p") + 1] == "30000"
    assert [p.name for p in spec.ports] == ["ssh", "web"]
    assert spec.priority == 1000 and not spec.preemptible and spec.retry.attempts == 1
    assert 3590 < spec.max_duration_s <= 3600  # its time left


def test_running_makes_it_running_and_the_node_renting_then_a_stop_keeps_it_at_rest(world):
    rent(world)
    world.run(environment(world))
    rental = rental_now(world)
    assert rental.state == R.RUNNING and rental.node_id == NODE and rental.ready_s >= 0
    assert rented(world) == [f"{NODE}=renting"]
    with world.store.read() as r:
        notes = [e.reason for e in r.journal.latest("node", NODE, 10)]
    assert any(n.startswith("renting: rental box") for n in notes)
    world.apply(rentals.stop, rental, "team")
    assert rental_now(world).state == R.STOPPING
    assert environment(world).state == TaskState.CANCELLING
    world.end(environment(world), Exit(-15, "stopped on request", stopped=True))
    assert rental_now(world).state == R.STOPPED
    assert rented(world) == [f"{NODE}=empty", f"{NODE}=renting"]
    assert history(world) == ["provisioning", "running", "stopping", "stopped"]


def test_a_start_makes_a_new_environment_and_an_old_ones_news_is_ignored(world):
    rent(world)
    first = environment(world)
    world.run(first)
    world.apply(rentals.stop, rental_now(world), "team")
    world.end(environment(world), Exit(-15, "stopped", stopped=True))
    world.apply(rentals.start, rental_now(world), "team", 1000)
    rental = rental_now(world)
    assert rental.state == R.PROVISIONING and rental.starts == 2 and rental.task_id != first.id
    assert rental.ready_s is None  # measured again for this start
    world.run(environment(world))
    assert rental_now(world).state == R.RUNNING


def test_a_preempted_environment_makes_it_provisioning_and_an_ended_one_stopped(world):
    rent(world)
    world.run(environment(world))
    world.apply(tasks.transition, environment(world), TaskState.PREEMPTED, "a higher priority")
    assert rental_now(world).state == R.PROVISIONING
    world.end(environment(world), Exit(-15, "stopped", stopped=True))
    assert environment(world).state == TaskState.QUEUED  # the owner's rule re-queued it
    assert rental_now(world).state == R.PROVISIONING  # waiting for its place again
    world.run(environment(world))
    assert rental_now(world).state == R.RUNNING
    world.end(environment(world), Exit(1, "exited with code 1"))
    rental = rental_now(world)
    assert rental.state == R.STOPPED and "its environment ended" in rental.state_reason


def test_its_time_running_out_makes_it_expired_and_it_cannot_start_again(world):
    rental = rent(world, expires_in=3600)
    world.run(environment(world))
    with world.store.tx() as tx:  # its time has passed
        tx.rentals.update(rental_now(world), expires_at=tx.now - 1)
    world.end(environment(world), Exit(-15, "exceeded its max duration", timed_out=True))
    assert rental_now(world).state == R.EXPIRED
    with pytest.raises(Refused, match="no time left"):
        world.apply(rentals.start, rental_now(world), "team", 1000)
    assert rental_now(world).state == R.EXPIRED and rental.name == "box"  # nothing written


def test_the_owner_evicts_it_and_a_delete_waits_for_nothing_to_run(world):
    rent(world)
    world.run(environment(world))
    with pytest.raises(IllegalTransition):
        world.apply(rentals.delete, rental_now(world), "team")
    world.apply(rentals.evict, rental_now(world), "maintenance")
    rental = rental_now(world)
    assert rental.state == R.EVICTING and "maintenance" in rental.state_reason
    world.end(environment(world), Exit(-15, "stopped", stopped=True))
    assert rental_now(world).state == R.EVICTED
    world.apply(rentals.delete, rental_now(world), "team")
    gone = rental_now(world)
    assert gone.state == R.DELETED and gone.ssh_port is None
    rent(world)  # the name and the port are free again
    assert rental_now(world).state == R.PROVISIONING and rental_now(world).ssh_port == 30000


def test_stopping_one_whose_environment_already_ended_stops_it_at_once(world):
    rent(world)
    world.apply(tasks.request_cancel, environment(world), "someone")  # never placed
    assert environment(world).state == TaskState.CANCELLED
    assert rental_now(world).state == R.STOPPED  # its environment ended on its own
    world.apply(rentals.start, rental_now(world), "team", 1000)
    world.apply(rentals.stop, rental_now(world), "team")
    assert rental_now(world).state in (R.STOPPING, R.STOPPED)


def test_every_rule_names_states_of_the_table():
    described = rentals.RENTALS.describe()
    assert {r["rule"] for r in described} == {
        "stop-environment", "time-to-ready", "node-rented", "delete-at-rest",
    }  # fmt: skip
