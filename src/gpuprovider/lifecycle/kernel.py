"""One kernel for every aggregate's state machine: a table of allowed transitions, rules
bound to (from-states, to-states), and one `transition` that applies both in the
caller's transaction.

An aggregate (a task, a node, a service, a lease, a hub order, ...) is a `Machine`: its
kind, its table (enum states), its rules, and how to read and write its records. A
transition checks the table, runs the matching rules' guards (which may refuse the
change), gathers the fields they add, writes the change through the machine's `write`
(which stores it guarded against a concurrent change, with its journal row), then runs
the rules' consequences, which may themselves be transitions of this or another
aggregate. Nothing is committed here: the caller's transaction holds it all, so a
failure anywhere leaves nothing half-done.

This module is pure (the standard library only): the provider's lifecycle and the
hub, which has a store of its own, both build their machines on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, TypeVar

TxT = TypeVar("TxT")
RecordT = TypeVar("RecordT")
StateT = TypeVar("StateT", bound=StrEnum)


class IllegalTransition(ValueError):
    """A change the aggregate's table forbids; nothing was written."""

    def __init__(self, kind: str, subject: str, current: StrEnum, target: StrEnum, reason: str):
        why = f" (asked: {reason})" if reason else ""
        super().__init__(f"{kind} {subject} cannot go from {current} to {target}{why}")
        self.kind, self.subject, self.current, self.target = kind, subject, current, target


class Stale(RuntimeError):
    """The record changed since it was read; the caller reads it again and decides again.
    Nothing was written (the caller's transaction must not commit a partial change)."""

    def __init__(self, kind: str, subject: str):
        super().__init__(f"{kind} {subject} changed since it was read")
        self.kind, self.subject = kind, subject


class Refused(ValueError):
    """A rule's guard refused the change now; the message says why and what to do."""


@dataclass(frozen=True)
class Change(Generic[StateT]):
    """A transition being applied: the record is already in `target` when `then` runs."""

    source: StateT
    target: StateT
    reason: str


@dataclass(frozen=True)
class Rule(Generic[TxT, RecordT, StateT]):
    """What a transition from one of `sources` (None: any) to one of `targets` causes."""

    name: str
    doc: str
    targets: frozenset[StateT]
    sources: frozenset[StateT] | None = None
    # Checked before anything is written: raises Refused to stop the change.
    guard: Callable[[TxT, RecordT, Change[StateT]], None] | None = None
    # Fields written with the transition itself, from the record as it was read.
    changes: Callable[[TxT, RecordT], dict[str, Any]] | None = None
    # What the transition causes, in the same transaction, once it is written.
    then: Callable[[TxT, RecordT, Change[StateT]], None] | None = None

    def matches(self, source: StateT, target: StateT) -> bool:
        return target in self.targets and (self.sources is None or source in self.sources)


# write(tx, record, target, reason, fields): store the change guarded against a
# concurrent one (raise Stale), with its journal row, and update the record to match.
Writer = Callable[[TxT, RecordT, StateT, str, dict[str, Any]], None]


@dataclass
class Machine(Generic[TxT, RecordT, StateT]):
    kind: str
    table: Mapping[StateT, frozenset[StateT]]
    write: Writer[TxT, RecordT, StateT]
    state_of: Callable[[RecordT], StateT]
    subject_of: Callable[[RecordT], str]
    rules: list[Rule[TxT, RecordT, StateT]] = field(default_factory=list)
    _by_pair: dict[tuple[StateT, StateT], list[Rule[TxT, RecordT, StateT]]] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        self.check_rules()

    def allowed(self, source: StateT, target: StateT) -> bool:
        return target in self.table.get(source, frozenset())

    def rules_for(self, source: StateT, target: StateT) -> list[Rule[TxT, RecordT, StateT]]:
        found = self._by_pair.get((source, target))
        if found is None:
            found = self._by_pair[source, target] = [
                r for r in self.rules if r.matches(source, target)
            ]
        return found

    def add_rules(self, rules: Iterable[Rule[TxT, RecordT, StateT]]) -> None:
        """Rules of a feature built on this machine, applied after the ones it has."""
        self.rules.extend(rules)
        self._by_pair.clear()
        self.check_rules()

    def check_rules(self) -> None:
        """Every rule names states of this machine and fires on some allowed transition:
        a rule that can never fire is a mistake, found when the machine is built."""
        states = set(self.table)
        for rule in self.rules:
            named = set(rule.targets) | set(rule.sources or ())
            if not named <= states:
                raise ValueError(f"{self.kind} rule {rule.name}: unknown states {named - states}")
            pairs = [(s, t) for s in states for t in self.table[s] if rule.matches(s, t)]
            if not pairs:
                raise ValueError(f"{self.kind} rule {rule.name} matches no allowed transition")

    def check(self, record: RecordT, target: StateT, reason: str = "") -> StateT:
        """The record's state, if it may go to `target`; IllegalTransition if not."""
        source = self.state_of(record)
        if not self.allowed(source, target):
            raise IllegalTransition(self.kind, self.subject_of(record), source, target, reason)
        return source

    def transition(
        self, tx: TxT, record: RecordT, target: StateT, why: str, **fields: Any
    ) -> Change[StateT]:
        """Move `record` to `target` saying `why`, and apply what that causes, in `tx`;
        `fields` are written with the change.

        Raises IllegalTransition for a change the table forbids, Refused when a rule's
        guard stops it, Stale when the record changed since it was read; in each case
        before this change wrote anything.
        """
        source = self.check(record, target, why)
        change = Change(source, target, why)
        rules = self.rules_for(source, target)
        for rule in rules:
            if rule.guard is not None:
                rule.guard(tx, record, change)
        written: dict[str, Any] = {}
        for rule in rules:
            if rule.changes is not None:
                written.update(rule.changes(tx, record))
        written.update(fields)
        self.write(tx, record, target, why, written)
        for rule in rules:
            if rule.then is not None:
                rule.then(tx, record, change)
        return change

    def describe(self) -> list[dict[str, Any]]:
        """The rules as data: for documentation, `gpuprovider rules`, and tests."""
        return [
            {
                "rule": r.name,
                "doc": r.doc,
                "from": sorted(s.value for s in r.sources) if r.sources is not None else ["*"],
                "to": sorted(s.value for s in r.targets),
            }
            for r in self.rules
        ]
