"""Run the registered checks: one that raises becomes a FAIL and the suite goes on."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gpuprovider.check import compute, hardware, preflight, workload  # noqa: F401 (register)
from gpuprovider.check.context import CheckContext
from gpuprovider.check.registry import CHECKS, GROUPS, Check
from gpuprovider.check.result import Result, Status

log = logging.getLogger(__name__)


class UnknownGroup(ValueError):
    pass


def select(only: Iterable[str] = ()) -> list[Check]:
    wanted = list(only)
    unknown = [g for g in wanted if g not in GROUPS]
    if unknown:
        raise UnknownGroup(
            f"unknown check group {', '.join(map(repr, unknown))}; choose from {', '.join(GROUPS)}"
        )
    chosen = [c for c in CHECKS if not wanted or c.group in wanted]
    return sorted(chosen, key=lambda c: GROUPS.index(c.group))  # stable: registry order within


@dataclass
class Run:
    results: list[Result]
    started_at: float
    wall_s: float
    gpu_measured: bool  # some check that measures GPUs did not skip


def run_checks(
    ctx: CheckContext,
    checks: list[Check],
    on_start: Callable[[Check], None] = lambda _c: None,
    on_done: Callable[[Check, list[Result]], None] = lambda _c, _r: None,
) -> Run:
    started = time.time()
    t0 = time.perf_counter()
    results: list[Result] = []
    gpu_measured = False
    for item in checks:
        on_start(item)
        found = run_one(ctx, item)
        results.extend(found)
        gpu_measured |= item.gpu and any(r.status != Status.SKIP for r in found)
        on_done(item, found)
    return Run(results, started, time.perf_counter() - t0, gpu_measured)


def run_one(ctx: CheckContext, item: Check) -> list[Result]:
    try:
        produced = item.fn(ctx)
        found = [produced] if isinstance(produced, Result) else list(produced)
    except Exception as exc:
        log.debug("check %s/%s raised", item.group, item.name, exc_info=True)
        found = [
            Result(
                Status.FAIL,
                advice=f"the check itself failed: {type(exc).__name__}: {exc}",
            )
        ]
    for result in found:
        result.group = item.group
        result.name = result.name or item.name
    return found
