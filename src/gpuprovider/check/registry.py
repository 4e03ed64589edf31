"""Checks register here by group; the runner and the CLI read the registry."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, get_args

from gpuprovider.check.context import CheckContext
from gpuprovider.check.result import Result

Group = Literal["preflight", "hardware", "compute", "workload"]
GROUPS: tuple[Group, ...] = get_args(Group)

CheckFn = Callable[[CheckContext], Result | Iterable[Result]]


@dataclass(frozen=True)
class Check:
    group: str
    name: str
    title: str
    fn: CheckFn
    gpu: bool = False  # measures GPUs: when every such check skips, no GPU was measured


CHECKS: list[Check] = []


def check(group: str, name: str, title: str, gpu: bool = False) -> Callable[[CheckFn], CheckFn]:
    assert group in GROUPS, group

    def register(fn: CheckFn) -> CheckFn:
        CHECKS.append(Check(group, name, title, fn, gpu))
        return fn

    return register
