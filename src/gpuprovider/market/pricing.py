"""What an order is charged: a built-in price table, or an Akash pricing script.

Both answer a `Quote` in micros per hour for one GPU model, and a total for the
order's duration (at least the minimum duration, rounded up to the micro: a short job
is never free). A model with no price is refused by name, never priced at a default.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import threading
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Protocol

from gpuprovider.domain import catalogue
from gpuprovider.domain.pricing import PriceTable
from gpuprovider.market.model import MAX_MONEY, MICROS, Order, OrderResources, charge

GIB = 2**30


class Unpriceable(ValueError):
    """This order cannot be priced (no price for its model, a failing script)."""


@dataclass(frozen=True)
class Quote:
    model: str  # the GPU model priced
    price_per_hour: int  # micros
    total: int  # micros for the order's duration (at least the minimum)
    billed_s: int  # the duration charged
    lines: list[tuple[str, int]] = field(default_factory=list)  # what makes the hourly price

    def explain(self) -> str:
        return "; ".join(f"{what} {micros / MICROS:.6f}/h" for what, micros in self.lines)


def gpu_rate(table: PriceTable, model_id: str) -> float:
    """The table's price of one GPU of `model_id` per hour: its own, else its family's;
    Unpriceable (never a guess) when it has none."""
    if model_id in table.gpu_hour:
        return table.gpu_hour[model_id]
    family = catalogue.models()[model_id].family if model_id in catalogue.models() else None
    for name, rate in table.gpu_hour.items():
        try:
            if model_id in catalogue.resolve(name):
                return rate
        except catalogue.UnknownGpuModel:
            continue
    raise Unpriceable(
        f"no price for {model_id}"
        + (f" (family {family})" if family else "")
        + " in [pricing] gpu_hour: it is not offered rather than priced at a guess"
    )


def _micros(value: float) -> int:
    return math.ceil(Decimal(str(value)) * MICROS)


def _total(
    table: PriceTable, order: Order, model: str, per_hour: int, lines: list[tuple[str, int]]
) -> Quote:
    billed = max(order.duration_s, table.min_duration_s)
    return Quote(model, per_hour, charge(per_hour, billed), billed, lines)


def quote_table(table: PriceTable, order: Order, model: str) -> Quote:
    """The built-in policy: GPUs (fractions pro rata) plus CPU, memory and storage."""
    r = order.resources
    lines = []
    if r.gpus:
        lines.append((f"{r.gpus:g} x {model}", _micros(r.gpus * gpu_rate(table, model))))
    for what, amount, rate in (
        (f"{r.cpus:g} cores", r.cpus, table.cpu_hour),
        (f"{r.memory_gb:g} GB memory", r.memory_gb, table.memory_gb_hour),
        (f"{r.storage_gb:g} GB storage", r.storage_gb, table.storage_gb_hour),
    ):
        if amount and rate:
            lines.append((what, _micros(amount * rate)))
    per_hour = sum(micros for _, micros in lines)
    if per_hour <= 0:
        raise Unpriceable("the price table prices this order at 0: set [pricing] rates")
    return _total(table, order, model, min(per_hour, MAX_MONEY), lines)


def akash_input(order: Order, model: str, block_s: float) -> dict[str, Any]:
    """The order as an Akash provider hands it to its pricing script."""
    r: OrderResources = order.resources
    entry: dict[str, Any] = {
        "memory": int(r.memory_gb * GIB),
        "cpu": int(r.cpus * 1000),
        "storage": [{"class": "ephemeral", "size": int(r.storage_gb * GIB)}],
        "count": 1,
        "endpoint_quantity": 1 if order.kind == "service" else 0,
        "ip_lease_quantity": 0,
    }
    if r.gpus:
        known = catalogue.models().get(model)
        name = re.sub(r"[^a-z0-9]", "", known.family if known else model)
        entry["gpu"] = {
            "units": math.ceil(r.gpus),
            "attributes": {
                "vendor": {
                    "nvidia": {"model": name, "ram": f"{known.memory_gb}gi" if known else ""}
                }
            },
        }
    cap_per_block = Decimal(order.max_price_per_hour) * Decimal(str(block_s)) / 3600
    return {
        "resources": [entry],
        "price": {"denom": "umicros", "amount": f"{cap_per_block:.6f}"},
        "price_precision": 6,
    }


class ScriptPricing:
    """Runs an Akash pricing script: resources JSON on stdin, a decimal price per block
    (in micros) on stdout; bounded in time and in how many run at once."""

    def __init__(self, table: PriceTable):
        self.table = table
        self.path = Path(table.script).expanduser()
        self.slots = threading.BoundedSemaphore(table.script_concurrency)

    def quote(self, order: Order, model: str) -> Quote:
        if not os.access(self.path, os.X_OK):
            raise Unpriceable(f"pricing script {self.path} is not an executable file")
        payload = json.dumps(akash_input(order, model, self.table.script_block_s)).encode()
        timeout = self.table.script_timeout_s
        if not self.slots.acquire(timeout=timeout):
            raise Unpriceable(f"{self.table.script_concurrency} pricing scripts already run")
        try:
            done = subprocess.run(
                [str(self.path)],
                input=payload,
                capture_output=True,
                timeout=timeout,
                start_new_session=True,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise Unpriceable(f"pricing script gave no price within {timeout:g} s") from None
        except OSError as exc:
            raise Unpriceable(f"pricing script {self.path} cannot run: {exc}") from None
        finally:
            self.slots.release()
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip()[-200:]
            raise Unpriceable(f"pricing script exited {done.returncode}: {tail}")
        text = done.stdout.decode(errors="replace").strip()
        try:
            per_block = Decimal(text)
            if not per_block.is_finite() or per_block <= 0:
                raise InvalidOperation
        except InvalidOperation:
            raise Unpriceable(
                f"pricing script printed {text[:80]!r}, not a positive price per block"
            ) from None
        per_hour = math.ceil(per_block * 3600 / Decimal(str(self.table.script_block_s)))
        if per_hour > MAX_MONEY:
            raise Unpriceable(f"pricing script asked {per_hour} micros per hour: too much")
        return _total(self.table, order, model, per_hour, [("pricing script", per_hour)])


class PricingPolicy(Protocol):
    def quote(self, order: Order, model: str) -> Quote:
        """The price of `order` on a GPU of `model`; Unpriceable when there is none."""


class Pricing:
    """The provider's policy: the script when one is configured, else the table."""

    def __init__(self, table: PriceTable):
        self.table = table
        self.script = ScriptPricing(table) if table.script else None

    def quote(self, order: Order, model: str) -> Quote:
        if self.script:
            return self.script.quote(order, model)
        return quote_table(self.table, order, model)
