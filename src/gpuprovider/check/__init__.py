"""`gpuprovider check`: is this machine fit to sell, and how fast is it really?"""

from __future__ import annotations

from gpuprovider.check.context import CheckContext
from gpuprovider.check.registry import GROUPS
from gpuprovider.check.result import Result, Status, exit_code, summary
from gpuprovider.check.runner import Run, UnknownGroup, run_checks, select

__all__ = [
    "GROUPS",
    "CheckContext",
    "Result",
    "Run",
    "Status",
    "UnknownGroup",
    "exit_code",
    "run_checks",
    "select",
    "summary",
]
