"""Strategies by name: what `[market.<name>] strategy = "..."` and the simulator's
`--strategy` choose from."""

from __future__ import annotations

from collections.abc import Mapping

from gpuprovider.domain import catalogue
from gpuprovider.domain.pricing import PriceTable
from gpuprovider.market.baselines import (
    AkashDefault,
    AkashStockPricing,
    GepettoDefault,
    TablePricing,
    akash_mappings,
)
from gpuprovider.market.earnings import EarningsApps, EarningsStrategy
from gpuprovider.market.pricing import Unpriceable, gpu_rate
from gpuprovider.market.strategy import AppStrategy, Strategy

LEASE = ("akash-default", "swan-default", "earnings")
APPS = ("gepetto-default", "earnings")
BUILTIN = "built-in pricing"
BUSY_COST_SHARE = 0.3  # of the list price: what a working GPU costs when nothing says


class UnknownStrategy(ValueError):
    pass


def busy_costs(
    table: PriceTable, models: list[str], share: float = BUSY_COST_SHARE
) -> dict[str, float]:
    """The operator's cost of a working GPU per hour, per model: a share of its price."""
    found = {}
    for model in models:
        try:
            found[model] = share * gpu_rate(table, model)
        except Unpriceable:
            continue
    return found


def lease_strategy(
    name: str, table: PriceTable, busy_cost: Mapping[str, float] | None = None
) -> Strategy:
    """A lease market's strategy by name, priced from the provider's `[pricing]` table;
    `busy_cost`: USD per hour a working GPU costs, per model (earnings only)."""
    if name == "akash-default":
        return AkashDefault(AkashStockPricing(akash_mappings(table)))
    if name == "swan-default":
        return TablePricing("swan-default")
    if name == "earnings":
        models = sorted({*catalogue.models(), *table.gpu_hour})
        return EarningsStrategy(busy_cost or busy_costs(table, models))
    raise UnknownStrategy(f"unknown lease strategy {name!r}; choose one of {', '.join(LEASE)}")


def builtin() -> Strategy:
    """The daemon's built-in pricing: what a failing strategy falls back to."""
    return TablePricing(BUILTIN)


def app_strategy(name: str, hourly_cost: Mapping[str, float]) -> AppStrategy:
    if name == "gepetto-default":
        return GepettoDefault(hourly_cost)
    if name == "earnings":
        return EarningsApps()
    raise UnknownStrategy(f"unknown app-market strategy {name!r}; choose one of {', '.join(APPS)}")
