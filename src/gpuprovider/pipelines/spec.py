"""The pipeline spec: named stages, each a task of its own, with `after:` dependencies,
per-stage pools, failure levels, wait stages and batching. Validated once at the edge:
a cycle, an unknown stage name, a limit out of range or overlapping exit codes is
refused naming the field, before anything is stored.
"""

from __future__ import annotations

import posixpath
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gpuprovider.domain.spec import (
    ENV_KEY_PATTERN,
    IMAGE_PATTERN,
    MAX_DURATION_S,
    NAME_PATTERN,
    Resources,
    TaskSpec,
)

STAGE_NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
MAX_STAGES = 64
MAX_EXIT_CODES = 256
# No tenant may hold more live pipelines than this: a batch larger can never fill.
MAX_LIVE_PIPELINES = 10_000
MAX_POOL_LIMIT = 10_000
MAX_RETRIES = 100
# Labels the provider sets on a stage's task (a stage may not set them itself).
POOL_LABEL = "gpuprovider.pool"
POOL_PER_NODE_LABEL = "gpuprovider.pool-per-node"
STAGE_LABEL = "gpuprovider.stage"
PIPELINE_LABEL = "gpuprovider.pipeline"
NODE_LABEL = "gpuprovider.node"  # the node its work store is on


class Level(StrEnum):
    """How bad a stage's failure is, and what it causes."""

    TEMPORARY = "temporary"  # retried after retry_interval_s, up to max_retries; then permanent
    PERMANENT = "permanent"  # the pipeline pauses, waiting for a person
    CRITICAL = "critical"  # the same, said louder (an operator's alert)
    ABORT = "abort"  # the work store is cleaned and the pipeline ends


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Failure(_Strict):
    """A stage's exit as a failure level: by exit code (codes not listed: `default`),
    or by the status file it writes (`gpuprovider-status.json` in its folder)."""

    exit_codes: dict[Level, list[Annotated[int, Field(ge=1, le=255)]]] = Field(
        default_factory=dict, description="level -> exit codes"
    )
    # not strict: a stored spec (JSON) is read back with its levels as text
    default: Annotated[Level, Field(strict=False)] = Level.PERMANENT
    max_retries: int = Field(3, ge=0, le=MAX_RETRIES, description="temporary failures retried")
    retry_interval_s: float = Field(10.0, ge=0, le=86400)

    @field_validator("exit_codes", mode="before")
    @classmethod
    def _levels(cls, value: Any) -> Any:
        if isinstance(value, dict):  # strict mode takes enum keys as their values only
            return {Level(k) if k in Level._value2member_map_ else k: v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _no_overlap(self) -> Failure:
        seen: dict[int, Level] = {}
        total = 0
        for level, codes in self.exit_codes.items():
            total += len(codes)
            for code in codes:
                if code in seen and seen[code] != level:
                    raise ValueError(
                        f"exit_codes: code {code} is both {seen[code]} and {level}; "
                        "give each code one level"
                    )
                seen[code] = level
        if total > MAX_EXIT_CODES:
            raise ValueError(f"exit_codes lists {total} codes; at most {MAX_EXIT_CODES}")
        return self

    def level_of(self, exit_code: int | None) -> Level:
        for level, codes in self.exit_codes.items():
            if exit_code in codes:
                return level
        return self.default


class Wait(_Strict):
    """A stage that runs nothing: it is done after `timer_s`, or when signalled
    (`gpuprovider pipeline signal NAME STAGE`)."""

    timer_s: float | None = Field(None, ge=0, le=MAX_DURATION_S)
    signal: bool = False

    @model_validator(mode="after")
    def _one(self) -> Wait:
        if (self.timer_s is None) == (not self.signal):
            raise ValueError("wait: give timer_s or signal: true (one of them)")
        return self


class Batch(_Strict):
    """The stage runs once for up to `size` pipelines that reached it: when `size` wait,
    when the oldest has waited `max_wait_s`, or by hand (`pipeline flush STAGE`)."""

    size: int = Field(ge=2, le=MAX_LIVE_PIPELINES)
    max_wait_s: float = Field(ge=0, le=MAX_DURATION_S)


class Stage(_Strict):
    name: Annotated[str, Field(pattern=STAGE_NAME_PATTERN)]
    after: list[Annotated[str, Field(max_length=32)]] = Field(default_factory=list, max_length=64)
    command: list[str] | str | None = None
    image: Annotated[str, Field(pattern=IMAGE_PATTERN, max_length=512)] | None = None
    env: dict[Annotated[str, Field(pattern=ENV_KEY_PATTERN)], str] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    max_duration_s: float | None = Field(None, gt=0, le=MAX_DURATION_S)
    pool: Annotated[str, Field(pattern=STAGE_NAME_PATTERN)] | None = Field(
        None, description="the pool whose limits apply; default: the stage's name"
    )
    failure: Failure = Field(default_factory=Failure)
    wait: Wait | None = None
    batch: Batch | None = None

    @model_validator(mode="after")
    def _what_it_runs(self) -> Stage:
        runs = self.command is not None or self.image is not None
        if self.wait is not None:
            if runs:
                raise ValueError(f"stages.{self.name}: a wait stage runs nothing; drop command")
            if self.batch is not None:
                raise ValueError(f"stages.{self.name}: a wait stage cannot be batched")
        elif not runs:
            raise ValueError(f"stages.{self.name}: give a command or image (or wait:)")
        return self

    @property
    def pool_name(self) -> str:
        return self.pool or self.name

    def task_spec(self, priority: int, node_selector: dict[str, str]) -> TaskSpec:
        """The stage as a task spec (validated like any task: the same refusals)."""
        fields: dict[str, Any] = {
            "command": self.command,
            "env": dict(self.env),
            "resources": self.resources.model_dump(),
            "priority": priority,
            "node_selector": dict(node_selector),
        }
        if self.image is not None:
            fields["image"] = self.image
        if self.max_duration_s is not None:
            fields["max_duration_s"] = self.max_duration_s
        return TaskSpec.model_validate(fields)


class PoolLimit(_Strict):
    """How many stages of a pool may run at once: on one node, and in all (per tenant)."""

    per_node: int | None = Field(None, ge=1, le=MAX_POOL_LIMIT)
    total: int | None = Field(None, ge=1, le=MAX_POOL_LIMIT)


class PipelineSpec(_Strict):
    kind: Literal["pipeline"] = "pipeline"
    name: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    stages: list[Stage] = Field(min_length=1, max_length=MAX_STAGES)
    pools: dict[Annotated[str, Field(pattern=STAGE_NAME_PATTERN)], PoolLimit] = Field(
        default_factory=dict, max_length=MAX_STAGES
    )
    work_store: str | None = Field(
        None, description="a folder under [isolation] workdir_roots; every stage works in it"
    )
    priority: int = Field(0, ge=-1000, le=1000 - MAX_STAGES)
    node_selector: dict[
        Annotated[str, Field(max_length=63)], Annotated[str, Field(max_length=63)]
    ] = Field(default_factory=dict, max_length=64)

    @field_validator("work_store")
    @classmethod
    def _store_path(cls, value: str | None) -> str | None:
        if value is not None and (
            not posixpath.isabs(value)
            or ".." in value.split("/")
            or len(value) > 1024
            or any(ord(c) < 32 or c == "\x7f" for c in value)
        ):
            raise ValueError(f"work_store {value[:80]!r} must be an absolute path without '..'")
        return value

    @model_validator(mode="after")
    def _graph(self) -> PipelineSpec:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"stages: names repeat: {', '.join(twice)}")
        known = set(names)
        for stage in self.stages:
            unknown = [a for a in stage.after if a not in known]
            if unknown:
                raise ValueError(
                    f"stages.{stage.name}.after: unknown stage {unknown[0]!r}; "
                    f"stages are {', '.join(names)}"
                )
            if stage.name in stage.after:
                raise ValueError(f"stages.{stage.name}.after: a stage cannot wait for itself")
        cycle = find_cycle({s.name: s.after for s in self.stages})
        if cycle:
            raise ValueError(f"stages.after: a cycle {' -> '.join(cycle)}; stages must form a DAG")
        pools = {s.pool_name for s in self.stages}
        for pool in self.pools:
            if pool not in pools:
                raise ValueError(
                    f"pools.{pool}: no stage uses this pool; pools are {', '.join(sorted(pools))}"
                )
        for stage in self.stages:
            for key in stage.env:
                if key.startswith("GPUPROVIDER_"):
                    raise ValueError(f"stages.{stage.name}.env.{key} is set by the provider")
            # each stage must be a task the provider accepts (the same refusals)
            if stage.wait is None:
                try:
                    stage.task_spec(0, self.node_selector)
                except ValidationError as exc:
                    first = exc.errors()[0]
                    where = ".".join(str(p) for p in first["loc"])
                    msg = str(first["msg"]).removeprefix("Value error, ")
                    raise ValueError(f"stages.{stage.name}.{where}: {msg}") from None
        return self

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def depth(self) -> dict[str, int]:
        """Each stage's place in the chain: 0 for a first stage, one more than the
        deepest of those it waits for. Later stages run first (work drains)."""
        after = {s.name: s.after for s in self.stages}
        found: dict[str, int] = {}

        def of(name: str) -> int:
            if name not in found:
                found[name] = 1 + max((of(a) for a in after[name]), default=-1)
            return found[name]

        for name in after:
            of(name)
        return found

    def descendants(self, name: str) -> set[str]:
        """The stage and every stage that waits for it, directly or not."""
        found = {name}
        changed = True
        while changed:
            changed = False
            for stage in self.stages:
                if stage.name not in found and any(a in found for a in stage.after):
                    found.add(stage.name)
                    changed = True
        return found


def find_cycle(after: dict[str, list[str]]) -> list[str]:
    """A cycle in the `after` graph as the names along it (first == last), or []."""
    colour: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str]:
        colour[name] = 1
        path.append(name)
        for nxt in after.get(name, []):
            if colour.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if colour.get(nxt) is None and (found := visit(nxt)):
                return found
        path.pop()
        colour[name] = 2
        return []

    for name in after:
        if colour.get(name) is None and (found := visit(name)):
            return found
    return []
