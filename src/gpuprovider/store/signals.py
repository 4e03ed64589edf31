"""What a committed transaction changed, for whoever waits on it (the daemon's loops).

A transaction notes signals as it writes; the store publishes them once the
transaction has committed, so a loop never wakes to look for a change not yet visible.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import StrEnum

log = logging.getLogger(__name__)


class Signal(StrEnum):
    QUEUED = "queued"  # tasks (ids) wait for the scheduler: submitted, retried, re-queued
    CAPACITY = "capacity"  # resources freed: look at every queued task again
    NODES = "nodes"  # nodes or GPUs changed (status, health, cordons, proofs, hardware)
    PLACED = "placed"  # tasks (ids) placed: the executor starts them
    STOP = "stop"  # tasks (ids) whose process must stop: cancel, preemption, drain
    EXITED = "exited"  # a backend saw task processes end (not from the store)
    JOURNAL = "journal"  # rows were added to the journal: its followers read them
    LEASES = "leases"  # market leases (ids) changed: their market reports them
    TIMERS = "timers"  # a pipeline stage's timer was set: the reaper looks when it is due
    RENTED = "rented"  # nodes whose rented status changed ("<node id>=renting|empty")


Fired = dict[Signal, set[str]]
Subscriber = Callable[[set[str]], None]


class Signals:
    """Publish and subscribe, by signal. Subscribers must be quick and thread-safe:
    they are called on the publisher's thread."""

    def __init__(self) -> None:
        self._subscribers: dict[Signal, list[Subscriber]] = {}

    def subscribe(self, signal: Signal, subscriber: Subscriber) -> None:
        self._subscribers.setdefault(signal, []).append(subscriber)

    def publish(self, fired: Fired) -> None:
        for signal, subjects in fired.items():
            for subscriber in self._subscribers.get(signal, ()):
                try:
                    subscriber(subjects)
                except Exception:  # a listener's trouble never fails the writer
                    log.exception("a %s subscriber failed", signal)

    def fire(self, signal: Signal, *subjects: str) -> None:
        self.publish({signal: set(subjects)})
