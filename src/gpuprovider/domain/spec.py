"""The task spec: what a tenant submits, validated once at the edge."""

from __future__ import annotations

import posixpath
import re
import shlex
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gpuprovider.domain.resources import GpuRequest, parse_gpu_request, parse_memory_mib

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
ENV_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
# Set by the provider for each task from its allocation; a spec may not set them.
VISIBILITY_ENV = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")
PROVIDER_ENV = frozenset({"PORT", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", *VISIBILITY_ENV})
PROVIDER_ENV_PREFIX = "GPUPROVIDER_"


def set_by_provider(key: str) -> bool:
    """Whether the provider sets this environment variable for every task."""
    return key in PROVIDER_ENV or key.startswith(PROVIDER_ENV_PREFIX)


# Loader variables a spec may not set: they would run code in whatever the provider
# itself runs around the task (its runner's tools, an engine's client).
LOADER_ENV = frozenset({"LD_PRELOAD", "LD_AUDIT"})
# What one exec may carry (Linux: 128 KiB per string, ~2 MiB in all), with room to spare.
MAX_ARG_BYTES = 32 * 1024
MAX_ARGS = 1024
MAX_ENV = 256
MAX_EXEC_BYTES = 256 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _printable(value: str, what: str) -> str:
    """`value`, refused if it carries control characters (NUL, escapes, line breaks)."""
    if _CONTROL.search(value):
        raise ValueError(f"{what} {value[:40]!r} contains control characters")
    return value


# An image reference as the distribution spec defines it: [domain/]path[:tag][@digest].
# Nothing else reaches a container engine's command line from a spec.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?"
IMAGE_PATTERN = (
    rf"^(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)
UPLOAD_PATTERN = r"^sha256:[0-9a-f]{64}$"
# Where a volume may not be mounted: the system's own folders (the provider's home is
# refused by the service, which knows where it is).
SYSTEM_FOLDERS = (
    "/proc", "/sys", "/dev", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
    "/usr", "/boot", "/run", "/var/run", "/root",
)  # fmt: skip
MAX_VOLUMES = 16
MAX_CPU = 4096
MAX_MEMORY_MIB = 64 * 1024 * 1024  # 64 TiB
MAX_DURATION_S = 366 * 86400


class _Strict(BaseModel):
    # no key it does not know, and no type made from another: "4" or true is no number
    model_config = ConfigDict(extra="forbid", strict=True)


class RetryPolicy(_Strict):
    attempts: int = Field(1, ge=1, le=1000, description="total attempts, the first included")
    backoff_s: float = Field(1.0, ge=0, le=3600, description="wait before the second attempt")
    backoff_factor: float = Field(2.0, ge=1, le=10)
    max_backoff_s: float = Field(300.0, ge=0, le=86400)

    def delay_s(self, failed_attempts: int) -> float:
        """Wait before the attempt that follows `failed_attempts` failures."""
        delay = self.backoff_s * self.backoff_factor ** max(failed_attempts - 1, 0)
        return min(delay, self.max_backoff_s)


class PortSpec(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,31}$")]


class GangSpec(_Strict):
    """The workers of one distributed job: placed all together or not at all."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    size: int = Field(ge=2, le=1024, description="how many tasks carry this gang name")


class VolumeMount(_Strict):
    """A tenant's volume (`gpuprovider volume create`) mounted at `path`: absolute, or
    relative to the task's work folder."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    path: str = Field(min_length=1, max_length=1024)

    @field_validator("path")
    @classmethod
    def _a_place(cls, value: str) -> str:
        _printable(value, "volumes.path")
        if ".." in value.split("/"):
            raise ValueError(f"volumes.path {value!r} holds '..'; give a plain path")
        normal = posixpath.normpath(value)
        if normal in ("/", "."):
            raise ValueError(f"volumes.path {value!r} would cover the whole folder")
        for folder in SYSTEM_FOLDERS:
            if normal == folder or normal.startswith(folder + "/"):
                raise ValueError(
                    f"volumes.path {value!r} is over {folder}, a system folder; mount it "
                    "elsewhere (e.g. /data, or a path relative to the work folder)"
                )
        return normal


class Resources(_Strict):
    gpu: str = Field("0", description="count, fraction or constraint: 2, 0.5, H100:80GB:2")
    cpu: float = Field(0.0, ge=0, le=MAX_CPU, description="cores reserved (0 = best effort)")
    memory_mib: int = Field(0, ge=0, le=MAX_MEMORY_MIB)

    @model_validator(mode="before")
    @classmethod
    def _read_memory(cls, data: Any) -> Any:
        if isinstance(data, dict) and "memory" in data:
            data = dict(data)
            if "memory_mib" in data:
                raise ValueError("give either memory or memory_mib, not both")
            data["memory_mib"] = parse_memory_mib(data.pop("memory"))
        return data

    @field_validator("gpu", mode="before")
    @classmethod
    def _read_gpu(cls, value: Any) -> str:
        return parse_gpu_request(value).to_text()

    @cached_property
    def gpu_request(self) -> GpuRequest:
        return parse_gpu_request(self.gpu)


MAX_LABELS = 64

# A service's name is the first label of its host name: `<name>.<domain>`.
DNS_LABEL_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
MAX_REPLICAS = 100


class Readiness(_Strict):
    """When a replica takes traffic: an HTTP GET of `path` answering below 400, or (no
    path) a TCP connection to its port."""

    path: str | None = None
    timeout_s: float = Field(2.0, gt=0, le=60)
    period_s: float = Field(2.0, gt=0, le=300)

    @field_validator("path")
    @classmethod
    def _a_path(cls, value: str | None) -> str | None:
        if value is not None:
            _printable(value, "readiness.path")
            if not value.startswith("/") or " " in value or len(value) > 1024:
                raise ValueError(
                    f"readiness.path {value[:40]!r} is not a path; write one starting "
                    "with /, e.g. /health"
                )
        return value


class Autoscale(_Strict):
    """Replicas between `min` and `max`, sized for `target_in_flight` requests in
    flight (or `target_rps` requests a second) per replica."""

    min: int = Field(1, ge=1, le=MAX_REPLICAS)
    max: int = Field(ge=1, le=MAX_REPLICAS)
    target_in_flight: float | None = Field(None, gt=0, le=100_000)
    target_rps: float | None = Field(None, gt=0, le=1_000_000)
    up_delay_s: float = Field(0.0, ge=0, le=3600, description="load must stay high this long")
    down_delay_s: float = Field(300.0, ge=0, le=86400, description="and low this long")

    @model_validator(mode="after")
    def _sane(self) -> Autoscale:
        if self.min > self.max:
            raise ValueError(f"autoscale.min ({self.min}) is above autoscale.max ({self.max})")
        if (self.target_in_flight is None) == (self.target_rps is None):
            raise ValueError("autoscale needs one target: target_in_flight or target_rps")
        return self


class ServeSpec(_Strict):
    """How a service is served behind the gateway."""

    name: Annotated[str, Field(pattern=DNS_LABEL_PATTERN)] | None = Field(
        None, description="its host name's first label; default: from the task's name"
    )
    replicas: int = Field(1, ge=1, le=MAX_REPLICAS)
    autoscale: Autoscale | None = None
    readiness: Readiness = Field(default_factory=Readiness)
    auth: Literal["token", "public"] = "token"
    port: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,31}$")] | None = Field(
        None, description="the port the gateway sends traffic to; default: the first"
    )
    sticky: bool = Field(False, description="a client keeps its replica (cookie)")
    max_body_bytes: int = Field(100 << 20, ge=0, le=1 << 40)
    rate_per_s: float | None = Field(None, gt=0, le=1_000_000)

    @property
    def starting_replicas(self) -> int:
        return self.autoscale.min if self.autoscale else self.replicas


class TaskSpec(_Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    kind: Literal["job", "service"] = "job"
    command: list[str] | None = Field(None, description="argv; with image, the container's args")
    image: Annotated[str, Field(pattern=IMAGE_PATTERN, max_length=512)] | None = Field(
        None, description="a container image reference: [registry/]name[:tag][@digest]"
    )
    env: dict[Annotated[str, Field(pattern=ENV_KEY_PATTERN)], str] = Field(default_factory=dict)
    workdir: str | None = None
    resources: Resources = Field(default_factory=Resources)
    ports: list[PortSpec] = Field(default_factory=list, max_length=16)
    max_duration_s: float | None = Field(None, gt=0, le=MAX_DURATION_S)
    max_queue_s: float | None = Field(None, gt=0, le=MAX_DURATION_S)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    priority: int = Field(0, ge=-1000, le=1000)
    preemptible: bool = False
    gang: GangSpec | None = None
    node_selector: dict[
        Annotated[str, Field(max_length=63)], Annotated[str, Field(max_length=63)]
    ] = Field(default_factory=dict, description="labels a node must carry to run the task")
    labels: dict[Annotated[str, Field(max_length=63)], Annotated[str, Field(max_length=253)]] = (
        Field(default_factory=dict)
    )
    serve: ServeSpec | None = Field(None, description="a service's gateway settings")
    upload: Annotated[str, Field(pattern=UPLOAD_PATTERN)] | None = Field(
        None,
        description="sha256:<hex> of an upload (`task run --upload DIR` sends it): "
        "unpacked into the task's work folder before it starts",
    )
    volumes: list[VolumeMount] = Field(default_factory=list, max_length=MAX_VOLUMES)

    @field_validator("command", mode="before")
    @classmethod
    def _split_command(cls, value: Any) -> Any:
        if isinstance(value, str):
            return shlex.split(value)
        return value

    @field_validator("command")
    @classmethod
    def _check_command(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value or not value[0]:
                raise ValueError("command is empty; give the program to run and its arguments")
            if any("\x00" in arg for arg in value):
                raise ValueError("command contains a NUL byte")
            if len(value) > MAX_ARGS:
                raise ValueError(f"command has {len(value)} arguments; at most {MAX_ARGS}")
            if any(len(arg.encode()) > MAX_ARG_BYTES for arg in value):
                raise ValueError(f"a command argument is longer than {MAX_ARG_BYTES} bytes")
        return value

    @field_validator("ports", mode="before")
    @classmethod
    def _port_names(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("env")
    @classmethod
    def _check_env(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_ENV:
            raise ValueError(f"env has {len(value)} variables; at most {MAX_ENV}")
        for key, text in value.items():
            if set_by_provider(key):
                raise ValueError(
                    f"env {key} is set by the provider from the task's allocation; remove it"
                )
            if key in LOADER_ENV:
                raise ValueError(f"env {key} is a loader variable a task may not set")
            if "\x00" in text:
                raise ValueError(f"env {key} contains a NUL byte")
            if len(text.encode()) > MAX_ARG_BYTES:
                raise ValueError(f"env {key} is longer than {MAX_ARG_BYTES} bytes")
        return value

    @field_validator("labels", "node_selector")
    @classmethod
    def _check_labels(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_LABELS:
            raise ValueError(f"{len(value)} labels; at most {MAX_LABELS}")
        for key, text in value.items():
            _printable(key, "label")
            _printable(text, f"label {key}:")
        return value

    @field_validator("workdir")
    @classmethod
    def _check_workdir(cls, value: str | None) -> str | None:
        if value is not None:
            _printable(value, "workdir")
            if not posixpath.isabs(value) or ".." in value.split("/"):
                raise ValueError(f"workdir {value!r} must be an absolute path without '..'")
            if len(value) > 4096:
                raise ValueError("workdir is longer than 4096 characters")
        return value

    @model_validator(mode="after")
    def _check_whole(self) -> TaskSpec:
        if self.command is None and self.image is None:
            raise ValueError("give a command to run, or a container image")
        size = sum(len(a.encode()) + 1 for a in self.command or [])
        size += sum(len(k.encode()) + len(v.encode()) + 2 for k, v in self.env.items())
        if size > MAX_EXEC_BYTES:
            raise ValueError(f"command and env take {size} bytes; at most {MAX_EXEC_BYTES}")
        names = [p.name for p in self.ports]
        if len(set(names)) != len(names):
            raise ValueError(f"port names repeat: {names}")
        if self.upload is not None and self.workdir is not None:
            raise ValueError("upload unpacks into the task's own work folder; leave workdir out")
        if self.image is not None and (self.upload or self.volumes):
            raise ValueError(
                "upload and volumes are for commands, not container images yet; put the "
                "code in the image"
            )
        mounts = [v.path for v in self.volumes]
        if len(set(mounts)) != len(mounts):
            raise ValueError(f"volumes.path repeats: {mounts}")
        if self.serve is not None:
            if self.kind != "service":
                raise ValueError("serve applies to kind service only")
            if self.serve.port is not None and self.serve.port not in names:
                raise ValueError(f"serve.port {self.serve.port!r} is not one of ports {names}")
            if self.gang is not None:
                raise ValueError("a service behind the gateway cannot be a gang member")
        return self

    @property
    def route_port(self) -> str | None:
        """The port a service's traffic goes to."""
        if self.serve and self.serve.port:
            return self.serve.port
        return self.ports[0].name if self.ports else None

    @property
    def gpu(self) -> GpuRequest:
        return self.resources.gpu_request


_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})+$")


def is_domain(value: str) -> bool:
    """A lowercase DNS name of two labels or more (no scheme, port or wildcard)."""
    return len(value) <= 253 and bool(_DNS_NAME.match(value))
