"""The hub's aggregates as typed records, with the states of those that have a machine
of their own (`hub/lifecycle.py`); a lease's states are the market model's."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from gpuprovider.market.model import LeaseState


class ParticipantKind(StrEnum):
    PROVIDER = "provider"
    TENANT = "tenant"


class ParticipantStatus(StrEnum):
    PENDING = "pending"  # a provider registered, its GPUs not proven yet
    ADMITTED = "admitted"  # may trade (a tenant is admitted when it registers)
    REFUSED = "refused"  # its GPUs were not proven; proven again, it is admitted


class OrderState(StrEnum):
    OPEN = "open"  # taking bids, or dispatched and waiting for an answer
    MATCHED = "matched"  # it became a lease
    UNMATCHED = "unmatched"  # no one took it: its deposit went back


def _from(cls: type, row: Any) -> Any:
    mapping = row._mapping
    return cls(**{f.name: mapping[f.name] for f in fields(cls) if f.name in mapping})


@dataclass
class Participant:
    key: str
    kind: ParticipantKind
    name: str
    status: ParticipantStatus
    status_reason: str
    registered_at: float
    api_url: str = ""
    verify_token: str = ""
    gpus: list[dict[str, Any]] = field(default_factory=list)
    last_heartbeat: float | None = None
    last_proof_at: float | None = None
    completed: int = 0  # leases that ended well, or through no fault of the provider
    failed: int = 0  # leases the provider failed (not placed, lost, preempted)

    @classmethod
    def of(cls, row: Any) -> Participant:
        made: Participant = _from(cls, row)
        made.kind = ParticipantKind(made.kind)
        made.status = ParticipantStatus(made.status)
        return made

    @property
    def reliability(self) -> float:
        """The leases it did not fail, counting one of each to start with."""
        return (self.completed + 1) / (self.completed + self.failed + 2)


@dataclass
class HubOrder:
    id: str
    tenant: str
    spec: dict[str, Any]
    mode: str  # auction, dispatch
    state: OrderState
    deposit: int
    created_at: float
    decide_at: float
    dispatched_to: str | None = None
    refused_by: list[str] = field(default_factory=list)
    reason: str = ""

    @classmethod
    def of(cls, row: Any) -> HubOrder:
        made: HubOrder = _from(cls, row)
        made.state = OrderState(made.state)
        made.refused_by = list(made.refused_by or [])
        return made


@dataclass
class HubLease:
    id: str
    tenant: str
    provider: str
    state: LeaseState
    price_per_hour: int
    gpus: float
    duration_s: int
    created_at: float
    running_at: float | None = None
    billed_s: float = 0.0
    charged: int = 0
    endpoint: str = ""
    close_reason: str = ""
    close_detail: str = ""
    closing_at: float | None = None
    closed_at: float | None = None
    access_token: str = ""  # for the tenant alone: calls the lease's service
    log_tail: str = ""  # the end of its work's output, as the provider sent it at the close

    @classmethod
    def of(cls, row: Any) -> HubLease:
        made: HubLease = _from(cls, row)
        made.state = LeaseState(made.state)
        return made
