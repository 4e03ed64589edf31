"""What the dashboard's pages show, computed once per page from the store: the
overview's figures (nodes, GPUs used/free/unschedulable, tasks by state, earnings per
window), a page of tasks by cursor, a node with its GPUs. The pages (`api/ui/`) only
render these; a tenant's view holds its own tasks and nothing of the market."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from gpuprovider.domain.records import TokenRecord
from gpuprovider.domain.states import TaskState
from gpuprovider.domain.usability import Usability
from gpuprovider.market.model import LeaseRecord, charge
from gpuprovider.service.errors import NotFound, Rejected
from gpuprovider.service.market import MarketService
from gpuprovider.service.views import gpu_views, node_view, task_view
from gpuprovider.store.store import Store

PAGE = 50  # tasks per page of the task list
WINDOWS = (("today", 86_400.0), ("7 d", 7 * 86_400.0), ("30 d", 30 * 86_400.0))
MICROS = 1_000_000
PAID_TTL_S = 30.0  # what a hub says it paid is asked at most this often (pages refresh live)
LEASES_SHOWN = 200


def earned_between(lease: LeaseRecord, since: float, now: float) -> int:
    """Micros the lease earned by this provider's count while running in [since, now]."""
    if lease.running_since is None:
        return 0
    end = min(lease.ended_at or now, lease.running_since + lease.order.get("duration_s", 0), now)
    start = max(lease.running_since, since)
    return charge(lease.price_per_hour, end - start) if end > start else 0


@dataclass(frozen=True)
class TaskCursor:
    """Where a page of the task list (newest first) goes on from: the last task shown."""

    created_at: float
    task_id: str

    def text(self) -> str:
        return f"{self.created_at!r}~{self.task_id}"

    @classmethod
    def parse(cls, text: str) -> TaskCursor:
        at, _, task_id = text.partition("~")
        try:
            created_at = float(at)
        except ValueError:
            created_at = float("nan")
        if not math.isfinite(created_at) or not task_id or len(task_id) > 64:
            raise Rejected(f"before: {text[:40]!r} is not a cursor this page gave")
        return cls(created_at, task_id)


class Dashboard:
    def __init__(self, store: Store, usability: Usability, markets: list[MarketService]):
        self.store = store
        self.usability = usability
        self.markets = markets
        self._paid: dict[str, tuple[float, int | None]] = {}

    def paid(self, market: MarketService) -> int | None:
        """Micros the market's hub says it paid (None: it does not answer), asked at most
        every PAID_TTL_S: a page refreshed on every journal row never floods the hub."""
        now = time.monotonic()
        kept = self._paid.get(market.market)
        if kept is not None and now - kept[0] < PAID_TTL_S:
            return kept[1]
        try:
            value = market.earnings()["paid_by_the_hub"]
        except Exception:  # a hub that does not answer: shown as unknown
            value = None
        self._paid[market.market] = (now, value)
        return value

    def markets_view(self) -> list[dict[str, Any]]:
        """Each market's standing (reliability as its hub computes it), its earnings by
        our count beside the hub's, and its newest leases."""
        now = time.time()
        views = []
        for market in self.markets:
            with self.store.read() as r:
                rows = r.market.list(market.market)
            leases = market.leases(limit=LEASES_SHOWN)
            views.append(
                {
                    "status": market.status(),
                    "earned_by_our_count": sum(lease.earned(now) for lease in rows),
                    "paid_by_the_hub": self.paid(market),
                    "gpu_seconds_reported": round(sum(x.usage_gpu_seconds for x in rows), 3),
                    "leases": sorted(leases, key=lambda lease: lease["id"], reverse=True),
                }
            )
        return views

    def overview(self, who: TokenRecord) -> dict[str, Any]:
        """The overview's figures as `who` may see them (earnings: admins only). Asks
        each market's hub what it paid: call it off the event loop."""
        now = time.time()
        with self.store.read() as r:
            nodes = r.nodes.list()
            allocations = r.tasks.active_allocations()
            by_state = r.tasks.count_by_state(None if who.is_admin else who.tenant)
            leases = r.market.list() if who.is_admin and self.markets else []
        gpus = [g for g in gpu_views(nodes, allocations, self.usability) if g["present"]]
        used = sum(1 for g in gpus if g["used_share"] > 0)
        unschedulable = sum(1 for g in gpus if g["used_share"] == 0 and g["unusable_reason"])
        figures: dict[str, Any] = {
            "nodes": dict(Counter(n.status.value for n in nodes)),
            "node_count": len(nodes),
            "gpus": {
                "total": len(gpus),
                "used": used,
                "unschedulable": unschedulable,
                "free": len(gpus) - used - unschedulable,
                "simulated": sum(1 for g in gpus if g["simulated"]),
            },
            "tasks": {s.value: by_state.get(s.value, 0) for s in TaskState},
            "earnings": self._earnings(leases, now) if who.is_admin else None,
        }
        return figures

    def _earnings(self, leases: list[LeaseRecord], now: float) -> dict[str, Any]:
        rows: dict[tuple[str, str], dict[str, float]] = {}
        for lease in leases:
            key = (lease.market, lease.model or "any")
            row = rows.setdefault(key, {name: 0.0 for name, _ in WINDOWS} | {"leases": 0})
            row["leases"] += 1
            for name, span in WINDOWS:
                row[name] += earned_between(lease, now - span, now) / MICROS
        paid = {market.market: self.paid(market) for market in self.markets}
        return {
            "windows": [name for name, _ in WINDOWS],
            "rows": [
                {"market": market, "model": model, **row}
                for (market, model), row in sorted(rows.items())
            ],
            "paid_by_the_hub": {
                name: (None if value is None else value / MICROS) for name, value in paid.items()
            },
        }

    def tasks(
        self,
        who: TokenRecord,
        state: str = "",
        name: str = "",
        tenant: str = "",
        before: str = "",
    ) -> dict[str, Any]:
        """A page of tasks `who` may see, newest first, after the cursor `before`, and
        the cursor of the next page (None: the last page)."""
        try:
            states = [TaskState(state)] if state else None
        except ValueError:
            known = ", ".join(s.value for s in TaskState)
            raise Rejected(f"state: {state[:40]!r} unknown; known: {known}") from None
        cursor = TaskCursor.parse(before) if before else None
        with self.store.read() as r:
            found = r.tasks.find(
                states=states,
                name=name or None,
                tenant=(tenant or None) if who.is_admin else who.tenant,
                before=(cursor.created_at, cursor.task_id) if cursor else None,
                limit=PAGE + 1,
                newest_first=True,
            )
        page = found[:PAGE]
        following = (
            TaskCursor(page[-1].created_at, page[-1].id).text() if len(found) > PAGE else None
        )
        return {"tasks": [task_view(t) for t in page], "next": following}

    def node(self, ref: str) -> dict[str, Any]:
        """A node with its events, its GPUs (the tasks on each) and its checks."""
        with self.store.read() as r:
            node = r.nodes.get(ref)
            if node is None:
                raise NotFound(f"no node {ref!r}")
            events = r.nodes.events(node.id)
            allocations = r.tasks.active_allocations()
            checks = r.checks.latest(node.id)
        view = node_view(node, self.usability, events)
        view["gpus"] = gpu_views([node], allocations, self.usability)
        view["checks"] = checks  # the latest result of each check (`gpuprovider check`)
        return view
