"""provider.toml: every setting with its default, loaded strictly (a typo is an error).

The sections' models only: each feature reads its own section and builds what it needs
from it (features import config, never the reverse), so loading the config loads none
of them. A section whose keys depend on a kind (`[backend]`, each `[market.<name>]`)
is a union keyed by `kind`: a key of another kind is an error naming it."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gpuprovider.domain import catalogue
from gpuprovider.domain.durations import parse_duration
from gpuprovider.domain.pricing import PriceTable
from gpuprovider.domain.repair import RepairRule
from gpuprovider.domain.spec import is_domain

# The scheduler's policies (scheduler/plugins.py POLICIES; a test holds them equal).
PolicyName = Literal["best-fit", "fgd-full", "fgd-warm", "fgd", "first-fit", "spread", "random"]


class ConfigError(ValueError):
    """The config file is unreadable or wrong; the message says where and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ApiConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8085, ge=1, le=65535)
    max_body_bytes: int = Field(1_048_576, ge=1024, le=1 << 30)


class StoreConfig(_Section):
    url: str = ""  # empty: SQLite file `store.db` in the home


class LocalBackendConfig(_Section):
    """Tasks run as processes on this machine."""

    kind: Literal["local"] = "local"


class RayBackendConfig(_Section):
    """Tasks run on the nodes of a Ray cluster (`gpuprovider node join`)."""

    kind: Literal["ray"]
    address: str = ""  # the head's host:port; empty: RAY_ADDRESS or a local head
    # ray: a node runs its tasks only while its lease from the provider holds (renewed
    # by every poll); a node not heard from has its tasks run elsewhere only after the
    # lease ran out and the grace after it (which must cover the nodes' clock skew)
    lease_s: float = Field(7.0, ge=1, le=3600)
    lease_grace_s: float = Field(2.0, ge=0.5, le=600)
    # ray: on a clean stop (SIGTERM) every node is granted a lease this long, so that a
    # daemon back within it re-adopts everything (0: none; a kill -9 grants none)
    restart_grace_s: float = Field(600.0, ge=0, le=86400)
    # ray: where each node keeps its tasks' folders (logs, capped by [isolation]
    # log_max_mib; exit records; work folders), its key and its lease; "" = the path of
    # this home's tasks folder, on every node
    node_dir: str = Field("", pattern=r"^(/.*)?$")


BackendConfig = Annotated[LocalBackendConfig | RayBackendConfig, Field(discriminator="kind")]
# What `gpuprovider init` wrote under [backend] before kinds had keys of their own: a
# local backend with these at their defaults is read as it was meant.
_RAY_DEFAULTS = {"address": "", "lease_s": 10.0, "lease_grace_s": 2.0, "node_dir": ""}


class SchedulerConfig(_Section):
    policy: PolicyName = "best-fit"
    interval_s: float = Field(5.0, gt=0, le=3600)


class ExecutorConfig(_Section):
    poll_interval_s: float = Field(0.1, gt=0, le=60)
    stop_grace_s: float = Field(10.0, ge=0, le=3600)
    port_range: tuple[int, int] = (20000, 29999)
    container_engine: Literal["auto", "docker", "podman", "none"] = "auto"
    container_runtime: str = Field("", pattern=r"^[A-Za-z0-9_.-]{0,64}$")
    container_read_only: bool = True

    @field_validator("port_range")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        lo, hi = value
        if not 1024 <= lo <= hi <= 65535:
            raise ValueError("port_range must be [low, high] with 1024 <= low <= high <= 65535")
        return value


class SimulatedGpu(_Section):
    model: str
    count: int = Field(1, ge=1, le=64)

    @classmethod
    def parse(cls, text: str) -> SimulatedGpu:
        """`h100-80gb-sxm:8` (count 1 when left out); ValueError saying what is wrong."""
        model, _, count = text.partition(":")
        if count and not count.isdigit():
            raise ValueError(f"{text!r}: write MODEL:COUNT, e.g. h100-80gb-sxm:8")
        try:
            return cls(model=model, count=int(count or 1))
        except ValidationError as exc:
            raise ValueError(f"{text!r}: {exc.errors()[0]['msg']}") from None

    @field_validator("model")
    @classmethod
    def _known(cls, value: str) -> str:
        ids = catalogue.resolve(value)
        if len(ids) == 1:
            return next(iter(ids))
        if value in ids:
            return value
        raise ValueError(f"{value!r} names several models ({', '.join(sorted(ids))}); pick one")


class ExpectedGpu(SimulatedGpu):
    """GPUs this machine should have; `gpuprovider check` FAILs when NVML finds others."""


class InventoryConfig(_Section):
    interval_s: float = Field(30.0, gt=0, le=3600)
    node_name: str = ""  # empty: the host name
    nvml: bool = True  # false: offer only declared GPUs, whatever the driver reports
    labels: dict[str, str] = Field(default_factory=dict)
    simulated_gpus: list[SimulatedGpu] = Field(default_factory=list)
    expected_gpus: list[ExpectedGpu] = Field(default_factory=list)


class IsolationConfig(_Section):
    users: Literal["auto", "pool", "none"] = "auto"
    cgroups: Literal["auto", "v1", "v2", "none"] = "auto"
    memory_margin_pct: int = Field(10, ge=0, le=1000)
    memory_margin_mib: int = Field(64, ge=0, le=1 << 20)
    pids_max: int = Field(4096, ge=16, le=1 << 22)
    cpu_quota: bool = False
    # How a task is kept to its own GPU device nodes: "auto" (the cgroup v1 device list
    # where the v1 devices controller is mounted, else a /dev of its own in a mount
    # namespace), "cgroup", "namespace", or "none". true/false mean "auto"/"none".
    devices: Literal["auto", "cgroup", "namespace", "none"] = "auto"
    # A task's output kept on disk: the latest this many MiB (older output is dropped).
    log_max_mib: int = Field(64, ge=1, le=1 << 20)
    # Folders a spec's `workdir` may name (besides none: the task's own folder).
    workdir_roots: list[str] = Field(default_factory=list)
    # Who reaches a task's ports: "isolated" (the task and the provider's gateway only;
    # the task reaches out), "none" (isolated, and it connects nowhere but to itself),
    # "host" (anyone). Work from markets runs with this too: isolated by default.
    network: Literal["host", "isolated", "none"] = "isolated"

    @field_validator("devices", mode="before")
    @classmethod
    def _devices_switch(cls, value: object) -> object:
        if isinstance(value, bool):  # the switch it was before
            return "auto" if value else "none"
        return value

    @field_validator("workdir_roots")
    @classmethod
    def _absolute(cls, roots: list[str]) -> list[str]:
        for root in roots:
            if not root.startswith("/") or "\x00" in root:
                raise ValueError(f"{root!r} is not an absolute path")
        return [root.rstrip("/") or "/" for root in roots]


class FilesConfig(_Section):
    """Code in (uploads) and state kept (volumes), per tenant."""

    # A tenant's uploads together, as sent (compressed); the least recently used that
    # no live task needs make room for a new one.
    upload_quota_mib: int = Field(2048, ge=1, le=1 << 30)
    # One upload unpacked (a compression bomb stops here), and its entries.
    max_unpacked_mib: int = Field(8192, ge=1, le=1 << 30)
    max_entries: int = Field(200_000, ge=1, le=100_000_000)
    # A tenant's volumes, their sizes together, and one volume at most.
    volume_quota_mib: int = Field(102_400, ge=1, le=1 << 40)
    max_volume_mib: int = Field(102_400, ge=1, le=1 << 40)
    # An ended task's work folder (`task files`, `task download`) is kept this long.
    keep_work_h: float = Field(168.0, gt=0, le=24 * 3650)


class QuotaConfig(_Section):
    gpus: float = Field(ge=0, le=100_000, description="GPUs guaranteed to the tenant")


class PipelinePoolConfig(_Section):
    per_node: int | None = Field(None, ge=1, le=10_000)
    total: int | None = Field(None, ge=1, le=10_000)


class PipelineTenantConfig(_Section):
    """A tenant's overrides of its pipelines' specs (venus' per-miner policy): pool
    limits, and how many times a temporary failure is retried."""

    pools: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")], PipelinePoolConfig] = (
        Field(default_factory=dict)
    )
    max_retries: int | None = Field(None, ge=0, le=100)


class ProofConfig(_Section):
    required: bool = False
    max_age_s: float = Field(86400.0, gt=0, le=365 * 86400)
    simulated_memory_mib: int = Field(64, ge=1, le=4096)
    # Ed25519 public keys (hex) whose signed verdicts this provider stores and counts.
    trusted_verifiers: list[str] = Field(default_factory=list, max_length=64)
    # A verifier's session on a GPU ends this long after the fill (or its last step).
    session_s: float = Field(900.0, ge=5, le=86400)

    @field_validator("trusted_verifiers")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        for key in keys:
            try:
                if len(bytes.fromhex(key)) != 32:
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"{key!r} is not an Ed25519 public key (64 hex digits; "
                    "`gpuprovider proof key` prints a verifier's)"
                ) from None
        return [key.lower() for key in keys]


class ReaperConfig(_Section):
    interval_s: float = Field(5.0, gt=0, le=3600)


def _duration(value: object) -> str:
    parse_duration(value)  # type: ignore[arg-type]
    return str(value)


class TelemetryConfig(_Section):
    # NVML is read this often on every node (the kernel log every second on this one).
    interval_s: float = Field(10.0, ge=1, le=3600)
    # XIDs: "auto" (/dev/kmsg where readable), a file something appends kernel lines to
    # (a journal export), or "" (none).
    kernel_log: str = "auto"


class RepairConfig(_Section):
    # true: rules record what they would do (events, alerts) and change nothing.
    dry_run: bool = False
    # At most max(1, this % of the fleet's GPUs) taken out by rules per breaker_window.
    breaker_max_pct: float = Field(25.0, gt=0, le=100)
    breaker_window: str = "10m"
    # Run on an idle GPU by the reset_gpu action; {uuid} and {index} are filled in.
    reset_command: list[str] = Field(
        default_factory=lambda: ["nvidia-smi", "--gpu-reset", "-i", "{uuid}"], min_length=1
    )
    # Added to (or, by name, replacing) the shipped rules.
    rules: list[RepairRule] = Field(default_factory=list)

    _window = field_validator("breaker_window", mode="before")(_duration)


class SmtpConfig(_Section):
    host: str = Field(min_length=1)
    port: int = Field(25, ge=1, le=65535)
    sender: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")
    to: list[str] = Field(min_length=1)
    starttls: bool = False
    username: str = ""
    password_file: str = ""

    @field_validator("to")
    @classmethod
    def _addresses(cls, values: list[str]) -> list[str]:
        for value in values:
            if "@" not in value or any(c.isspace() for c in value):
                raise ValueError(f"{value!r} is not an email address")
        return values


class AlertsConfig(_Section):
    webhooks: list[AnyHttpUrl] = Field(default_factory=list)
    smtp: SmtpConfig | None = None
    # The same alert (rule, node, GPU) is sent again after this long while it holds.
    resend_interval: str = "4h"
    timeout_s: float = Field(5.0, gt=0, le=120)

    _resend = field_validator("resend_interval", mode="before")(_duration)


class GatewayConfig(_Section):
    # `up` starts the gateway (`gpuprovider gateway`) beside the API.
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8086, ge=1, le=65535)
    # Services answer at <name>.<domain> (a wildcard DNS record and certificate);
    # empty: at <name>.localhost and /s/<name>/ on this machine.
    domain: str = ""
    # The router terminates TLS itself with these (PEM); empty: plain HTTP (an nginx in
    # front terminates it: `gpuprovider gateway nginx-config`).
    tls_cert: str = ""
    tls_key: str = ""
    # A proxied request may wait this long for its next byte (long LLM streams).
    read_timeout_s: float = Field(3600.0, gt=0, le=7 * 86400)
    refresh_s: float = Field(0.5, gt=0, le=60)
    # The router's edge (gateway/edge.py): request heads (request line and headers) over
    # max_header_bytes or with over max_headers headers: 414/431; a head must arrive
    # within header_timeout_s, a connection may idle keepalive_timeout_s between
    # requests and a body pause body_timeout_s; connections per client address (not
    # trusted proxies: 429) and in total (the longest-waiting one closed to make room).
    max_header_bytes: int = Field(32768, ge=1024, le=1 << 20)
    max_headers: int = Field(100, ge=8, le=10_000)
    header_timeout_s: float = Field(10.0, gt=0, le=3600)
    keepalive_timeout_s: float = Field(75.0, gt=0, le=3600)
    body_timeout_s: float = Field(60.0, gt=0, le=86400)
    max_connections: int = Field(4096, ge=16, le=1_000_000)
    max_connections_per_client: int = Field(256, ge=1, le=1_000_000)
    # Proxies in front (nginx) whose X-Forwarded-For/-Proto/-Host and X-Real-IP are
    # believed and who are not limited per client (they limit their own callers).
    trusted_proxies: list[str] = Field(["127.0.0.1", "::1"], max_length=64)

    @field_validator("trusted_proxies")
    @classmethod
    def _addresses(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(
                    f"{value!r} is not an IP address; write one address each, e.g. 10.0.0.5"
                ) from None
        return values

    @field_validator("domain")
    @classmethod
    def _a_domain(cls, value: str) -> str:
        if value and not is_domain(value):
            raise ValueError(
                f"{value!r} is not a domain; write e.g. gpus.example.com (lowercase, "
                "no scheme, no port)"
            )
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> GatewayConfig:
        # the files themselves are read where the gateway starts (gateway/tls.py)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        return self


class RentalsConfig(_Section):
    # Each rental's SSH port and raw TCP ports come from this range (same number inside
    # and outside its container), fixed for the rental's life.
    port_range: tuple[int, int] = (30000, 30999)
    # The largest disk one rental may ask for, and where the disks are kept (a folder of
    # this machine; empty: `rentals/` in the provider's home).
    max_disk_gib: float = Field(100.0, gt=0, le=1024 * 1024)
    disks_dir: str = ""
    # A rental's environment is a task of this priority and never preemptible: the
    # owner's preemptible work of lower priority gives way to it.
    priority: int = Field(1000, ge=-1000, le=1000)
    # DBC's rental status broadcast: {"node_id", "status": "renting"|"empty"} as JSON,
    # base64, one UDP datagram to broadcast_address:broadcast_port per change.
    broadcast: bool = False
    broadcast_address: str = "255.255.255.255"
    broadcast_port: int = Field(55555, ge=1, le=65535)

    @field_validator("broadcast_address")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv4 address, e.g. 255.255.255.255") from None
        return value

    @field_validator("port_range")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        lo, hi = value
        if not 1024 <= lo <= hi <= 65535:
            raise ValueError("port_range must be [low, high] with 1024 <= low <= high <= 65535")
        return value


class _MarketConfig(_Section):
    """What every market section has."""

    priority: int = Field(500, ge=-1000, le=1000)  # lease tasks: preemptible work gives way
    usage_interval_s: float = Field(60.0, ge=0.5, le=86400)
    # how orders are answered beside [pricing] (market/strategies.py): "" is the
    # built-in rule (the cheapest quote that fits, under the order's cap)
    strategy: Literal["", "akash-default", "swan-default", "earnings"] = ""


class HubMarketConfig(_MarketConfig):
    """[market.<name>] kind "hub": the reference hub, pulled (its event stream)."""

    kind: Literal["hub"] = "hub"
    url: str = Field(pattern=r"^https?://[^\s]+$")
    # The hub's verifier key (`gpuprovider hub key`): its proofs of this provider's GPUs
    # are trusted like a key in [proof] trusted_verifiers.
    verifier_key: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    provider_name: str = Field("", pattern=r"^[A-Za-z0-9_.-]{0,64}$")  # default: the node's
    api_url: str = ""  # where the hub reaches this API; default http://[api] host:port
    heartbeat_s: float = Field(10.0, gt=0, le=3600)
    bid_valid_s: float = Field(60.0, gt=0, le=3600)


class SwanMarketConfig(_MarketConfig):
    """[market.<name>] kind "swan": Swan's orchestrator pushes jobs to this API."""

    kind: Literal["swan"]
    # whose signatures are obeyed, and what they are signed over
    orchestrator: str = Field(pattern=r"^0x[0-9a-fA-F]{40}$")
    cp_account: str = Field(pattern=r"^0x[0-9a-fA-F]{40}$")
    node_id: str = Field(min_length=1, max_length=256)
    token_price: float = Field(gt=0, le=1e6)  # one Swan token in [pricing]'s currency
    source_hosts: list[str] = Field(min_length=1, max_length=64)  # host[:port]


MarketConfig = Annotated[HubMarketConfig | SwanMarketConfig, Field(discriminator="kind")]


def _with_kind(section: object, default: str) -> object:
    """A section with its `kind` written out (a union needs it to choose)."""
    if isinstance(section, dict) and "kind" not in section:
        return {"kind": default, **section}
    return section


class ProviderConfig(_Section):
    api: ApiConfig = Field(default_factory=ApiConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    backend: BackendConfig = Field(default_factory=LocalBackendConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    inventory: InventoryConfig = Field(default_factory=InventoryConfig)
    reaper: ReaperConfig = Field(default_factory=ReaperConfig)
    proof: ProofConfig = Field(default_factory=ProofConfig)
    isolation: IsolationConfig = Field(default_factory=IsolationConfig)
    files: FilesConfig = Field(default_factory=FilesConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    repair: RepairConfig = Field(default_factory=RepairConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    rentals: RentalsConfig = Field(default_factory=RentalsConfig)
    pricing: PriceTable = Field(default_factory=PriceTable)
    market: dict[Annotated[str, Field(pattern=r"^[a-z0-9-]{1,32}$")], MarketConfig] = Field(
        default_factory=dict, max_length=8
    )
    # Per tenant: work within its GPUs is guaranteed; work beyond them runs only as
    # preemptible. A tenant without an entry has no limit.
    quotas: dict[str, QuotaConfig] = Field(default_factory=dict)
    # Per tenant: overrides of its pipelines' pool limits and retries.
    pipelines: dict[str, PipelineTenantConfig] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _kinds(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        backend = _with_kind(data.get("backend", {}), "local")
        if isinstance(backend, dict) and backend.get("kind") == "local":
            # a config an older `init` wrote: the Ray keys at their defaults, unused
            backend = {k: v for k, v in backend.items() if _RAY_DEFAULTS.get(k, ...) != v}
        data["backend"] = backend
        markets = data.get("market")
        if isinstance(markets, dict):
            data["market"] = {name: _with_kind(m, "hub") for name, m in markets.items()}
        return data

    @model_validator(mode="after")
    def _one_swan(self) -> ProviderConfig:
        swans = [name for name, m in self.market.items() if isinstance(m, SwanMarketConfig)]
        if len(swans) > 1:
            raise ValueError(f"one swan market at most (its routes are fixed): {swans}")
        return self

    @model_validator(mode="after")
    def _ports_apart(self) -> ProviderConfig:
        lo, hi = self.executor.port_range
        if lo <= self.api.port <= hi:
            raise ValueError(f"api.port {self.api.port} lies inside executor.port_range")
        if self.gateway.enabled and lo <= self.gateway.port <= hi:
            raise ValueError(f"gateway.port {self.gateway.port} lies inside executor.port_range")
        if self.gateway.enabled and self.gateway.port == self.api.port:
            raise ValueError(f"gateway.port {self.gateway.port} is api.port too; give another")
        rlo, rhi = self.rentals.port_range
        if rlo <= hi and lo <= rhi:
            raise ValueError("rentals.port_range overlaps executor.port_range; keep them apart")
        if rlo <= self.api.port <= rhi:
            raise ValueError(f"api.port {self.api.port} lies inside rentals.port_range")
        return self


_KIND_TAGS = {"local", "ray", "hub", "swan"}


def _where(loc: tuple) -> str:
    """(`api`, `prot`) -> `[api] prot`; (`repair`, `rules`, 0, `window`) ->
    `[repair] rules[0].window`; (`market`, `a`, `swan`, `url`) -> `[market.a] url`."""
    section, rest = str(loc[0]), list(loc[1:])
    if section == "market" and rest:  # a table of tables: [market.<name>]
        section, rest = f"market.{rest[0]}", rest[1:]
    if rest and rest[0] in _KIND_TAGS:  # the union's choice, not a key
        rest = rest[1:]
    if not rest:  # a whole section's own rule
        known = section in ProviderConfig.model_fields or section.startswith("market.")
        return f"[{section}]" if known else section
    key = ""
    for part in rest:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return f"[{section}] {key}"


# The sections with a model per kind: a key of one kind written under another is named
# as such, not as a typo.
_BY_KIND: dict[str, dict[str, type[BaseModel]]] = {
    "backend": {"local": LocalBackendConfig, "ray": RayBackendConfig},
    "market": {"hub": HubMarketConfig, "swan": SwanMarketConfig},
}


def _other_kind(loc: tuple) -> str | None:
    """The kind whose key `loc` names, when the section it is in has another kind."""
    kinds = _BY_KIND.get(str(loc[0]), {})
    if not kinds or not loc or not isinstance(loc[-1], str):
        return None
    tag = next((part for part in loc[1:] if part in kinds), None)
    for kind, model in kinds.items():
        if kind != tag and loc[-1] in model.model_fields:
            return kind
    return None


def describe_validation_error(path: Path | str, error: ValidationError) -> str:
    lines = [f"{path} is not a valid provider config:"]
    for item in error.errors():
        where = _where(item["loc"]) if item["loc"] else "(top level)"
        if item["type"] == "extra_forbidden":
            other = _other_kind(item["loc"])
            if other:
                lines.append(f'  {where}: unknown key here; it is a key of kind = "{other}"')
            else:
                lines.append(
                    f"  {where}: unknown key; check its spelling against `gpuprovider init`'s file"
                )
        elif item["type"] == "literal_error":
            expected = item["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
            lines.append(f"  {where}: {item['input']!r} is not one of {expected}")
        elif item["type"] == "union_tag_invalid":
            expected = item["ctx"]["expected_tags"].replace("'", "")
            lines.append(f"  {where} kind: {item['ctx']['tag']!r} is not one of {expected}")
        else:
            lines.append(f"  {where}: {item['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def load_config(path: Path) -> ProviderConfig:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist; run `gpuprovider init` first") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    try:
        return ProviderConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(path, exc)) from None


def render_default_config(simulated_gpus: list[SimulatedGpu]) -> str:
    """provider.toml as `gpuprovider init` writes it: every default, commented."""
    d = ProviderConfig()
    ray = RayBackendConfig(kind="ray")
    sim = "\n".join(
        f'[[inventory.simulated_gpus]]\nmodel = "{g.model}"\ncount = {g.count}\n'
        for g in simulated_gpus
    )
    if not sim:
        sim = (
            "# Declare GPUs on a machine without them (shown as simulated everywhere):\n"
            '# [[inventory.simulated_gpus]]\n# model = "h100-80gb-sxm"\n# count = 2\n'
        )
    lo, hi = d.executor.port_range
    return f"""\
# gpuprovider configuration. Every setting is written out with its default.
# Secrets (API tokens, the node key) live in their own files, never here.

[api]
# Address the HTTP API listens on. Keep 127.0.0.1 unless a proxy fronts it.
host = "{d.api.host}"
port = {d.api.port}
# Requests with a larger body are refused with 413.
max_body_bytes = {d.api.max_body_bytes}

[store]
# SQLAlchemy URL of the store. Empty: the SQLite file store.db in this home.
url = "{d.store.url}"

[backend]
# Where tasks run: "local" (processes on this machine) or "ray" (on the nodes of a
# Ray cluster that joined with `gpuprovider node join`).
kind = "{d.backend.kind}"
# With kind = "ray", these too (written here at their defaults):
# address = ""          # the Ray head, host:port; empty: $RAY_ADDRESS or the local head
# Each node runs its tasks only while its lease from this provider holds (renewed with
# every poll). A node not heard from stops its tasks when the lease runs out; they run
# elsewhere only after the lease and the grace (more than the nodes' clock skew: run
# NTP). Lower both to move work off a dead node sooner.
# lease_s = {ray.lease_s}
# lease_grace_s = {ray.lease_grace_s}
# On a clean stop (SIGTERM) each node is granted a lease this long: a daemon back
# within it (an upgrade) re-adopts all running work. A kill -9 grants none.
# restart_grace_s = {ray.restart_grace_s}
# Where each node keeps its tasks' folders (their logs, capped by [isolation]
# log_max_mib), its key and its lease. Empty: this home's tasks folder, same path.
# node_dir = ""

[scheduler]
# Placement policy: "best-fit" (pack CPU and GPU; the fastest packer), "fgd-full"
# (fragmentation aware: the most GPUs allocated on the openb traces), "fgd-warm",
# "fgd", "first-fit", "spread" or "random".
policy = "{d.scheduler.policy}"
# The scheduler runs on every submission and whenever capacity frees up; it
# also reconsiders every queued task this often.
interval_s = {d.scheduler.interval_s}

[executor]
# How often running tasks are checked for exit.
poll_interval_s = {d.executor.poll_interval_s}
# On cancel: SIGTERM, then SIGKILL after this many seconds.
stop_grace_s = {d.executor.stop_grace_s}
# Ports handed to services, as [low, high]; each node chooses free ones in it.
port_range = [{lo}, {hi}]
# Engine for tasks given as an image: "auto" (docker, else podman: the first that
# answers), "docker", "podman", or "none" (refuse image tasks).
container_engine = "{d.executor.container_engine}"
# The engine's OCI runtime ("": its default; e.g. "runc" where crun cannot run on a
# hybrid cgroup hierarchy). Containers run with a read-only root unless set to false.
container_runtime = "{d.executor.container_runtime}"
container_read_only = {str(d.executor.container_read_only).lower()}

[inventory]
# How often this node's hardware and heartbeat are refreshed.
interval_s = {d.inventory.interval_s}
# Name of this node. Empty: the host name.
node_name = "{d.inventory.node_name}"
# Labels of this node, matched by a task's node_selector.
labels = {{}}
# Offer the NVIDIA GPUs the driver reports (false: only the GPUs declared below).
nvml = {str(d.inventory.nvml).lower()}

{sim}
# GPUs this machine must have; `gpuprovider check` FAILs when the driver reports
# others (a card that fell off the bus, a wrong model):
# [[inventory.expected_gpus]]
# model = "h100-80gb-sxm"
# count = 8

[files]
# `task run --upload DIR`: a tenant's uploads together (as sent, compressed), MiB. The
# least recently used that no live task needs make room for a new one.
upload_quota_mib = {d.files.upload_quota_mib}
# One upload unpacked (a compression bomb stops here), and its entries.
max_unpacked_mib = {d.files.max_unpacked_mib}
max_entries = {d.files.max_entries}
# `gpuprovider volume create`: a tenant's volumes (their sizes together), and one.
volume_quota_mib = {d.files.volume_quota_mib}
max_volume_mib = {d.files.max_volume_mib}
# An ended task's work folder (`task files`, `task download`) is kept this many hours.
keep_work_h = {d.files.keep_work_h}

[reaper]
# How often queue deadlines are checked.
interval_s = {d.reaper.interval_s}

[proof]
# Proof of GPU (`gpuprovider proof`). Verdicts are stored only when signed by one of
# trusted_verifiers (each verifier prints its key with `gpuprovider proof key`). When
# required, new work goes only to GPUs whose latest trusted proof passed less than
# max_age_s ago.
required = {str(d.proof.required).lower()}
max_age_s = {d.proof.max_age_s}
trusted_verifiers = []
# A verifier's session (walk, openings, verdict) must end this long after the fill;
# meanwhile the GPU takes no new work and no other challenge.
session_s = {d.proof.session_s}
# A simulated GPU proves this much host memory with the CPU prover.
simulated_memory_mib = {d.proof.simulated_memory_mib}

[isolation]
# Each task runs as a user of its own ("pool": system users gpp-task-N, made on first
# need; "auto": the pool when the daemon runs as root, else tasks run as the daemon's
# user and `node list` says "isolation: none"), in cgroups of its own (memory limited to
# its reservation plus the margins below, CPU weighted by its reservation, a process
# count cap, and only its own GPU device nodes), with a clean environment.
users = "{d.isolation.users}"
cgroups = "{d.isolation.cgroups}"
memory_margin_pct = {d.isolation.memory_margin_pct}
memory_margin_mib = {d.isolation.memory_margin_mib}
pids_max = {d.isolation.pids_max}
# true: cap CPU at the reservation too (CFS quota); false: weight only.
cpu_quota = {str(d.isolation.cpu_quota).lower()}
# Only its own GPU device nodes: "auto" (the cgroup v1 device list, else a /dev of its
# own in a mount namespace), "cgroup", "namespace", "none".
devices = "{d.isolation.devices}"
# A task's output kept on disk: the latest this many MiB; older output is dropped.
log_max_mib = {d.isolation.log_max_mib}
# Absolute folders a task spec's workdir may name; none: only the task's own folder.
workdir_roots = []
# Who may connect to a task's ports (nftables rules by socket owner; needs root and
# nft): "isolated" (the task itself and the provider's gateway only; the task reaches
# the internet), "none" (isolated, and it connects nowhere but to itself), "host"
# (anyone on the machine or network). Work from markets gets this too.
network = "{d.isolation.network}"

[telemetry]
# GPU telemetry (utilisation, memory, temperature, power, ECC, retired pages, remapped
# rows, throttling, PCIe and NVLink errors) is read from NVML this often.
interval_s = {d.telemetry.interval_s}
# Where XIDs are read: "auto" (/dev/kmsg where readable), a file kernel lines are
# appended to, or "" (none).
kernel_log = "{d.telemetry.kernel_log}"

[repair]
# Rules act on what telemetry sees (shipped: NVIDIA's XID catalogue, DLWS' ECC rule;
# `gpuprovider repair rules` lists them). true: record and alert, change nothing.
dry_run = {str(d.repair.dry_run).lower()}
# Circuit breaker: rules take at most max(1, this % of the GPUs) out per window.
breaker_max_pct = {d.repair.breaker_max_pct}
breaker_window = "{d.repair.breaker_window}"
# reset_gpu runs this on an idle GPU ({{uuid}}, {{index}} filled in).
reset_command = {list(d.repair.reset_command)!r}
# Add a rule, or replace a shipped one by its name (enabled = false turns it off):
# [[repair.rules]]
# name = "ecc-corrected-storm"
# signal = "ecc_corrected"     # xid, ecc_uncorrected, ecc_corrected, retired_pages,
#                              # pcie_replays, nvlink_errors, temperature, gpu_lost,
#                              # row_remap_failure, row_remap_pending, node_unreachable
# threshold = 1000
# window = "1h"
# actions = ["warn", "alert"]  # warn, cordon_gpu, cordon_node, drain, reschedule,
#                              # reset_gpu, remove_node (node_unreachable only), alert

[alerts]
# Webhooks get one JSON body read by Slack, Discord and Alertmanager's webhook receiver.
webhooks = []
# The same alert is sent again after this long while its rule still holds.
resend_interval = "{d.alerts.resend_interval}"
timeout_s = {d.alerts.timeout_s}
# Email as well:
# [alerts.smtp]
# host = "127.0.0.1"
# port = 25
# sender = "gpuprovider@example.org"
# to = ["ops@example.org"]

[gateway]
# Services are reachable through the gateway, a router `up` starts beside the API:
# at http://<name>.localhost:<port>/ and http://<host>:<port>/s/<name>/, or with a
# domain at <name>.<domain> (a wildcard DNS record and certificate).
enabled = {str(d.gateway.enabled).lower()}
host = "{d.gateway.host}"
port = {d.gateway.port}
domain = "{d.gateway.domain}"
# TLS in the router itself (PEM files; `gpuprovider gateway self-signed` makes a pair
# for development). Empty: plain HTTP, e.g. behind `gpuprovider gateway nginx-config`.
tls_cert = "{d.gateway.tls_cert}"
tls_key = "{d.gateway.tls_key}"
# How long a proxied request may wait for its next byte (long token streams).
read_timeout_s = {d.gateway.read_timeout_s}
# How often the router fetches routes: a replica set change is routable within this.
refresh_s = {d.gateway.refresh_s}
# The edge: a request head (request line and headers) over max_header_bytes or with
# more than max_headers headers is refused (414/431) before a replica sees it; it must
# arrive within header_timeout_s (slow ones are closed), a connection may idle
# keepalive_timeout_s between requests and a request body pause body_timeout_s.
max_header_bytes = {d.gateway.max_header_bytes}
max_headers = {d.gateway.max_headers}
header_timeout_s = {d.gateway.header_timeout_s}
keepalive_timeout_s = {d.gateway.keepalive_timeout_s}
body_timeout_s = {d.gateway.body_timeout_s}
# Connections held at once, in total (cut to what the open-file limit allows, which the
# router raises to its hard limit) and per client address (429 beyond). When all are
# taken, the one waiting longest for a request is closed to make room.
max_connections = {d.gateway.max_connections}
max_connections_per_client = {d.gateway.max_connections_per_client}
# Proxies in front (nginx) whose X-Forwarded-* and X-Real-IP are believed, and which
# are not limited per client. Empty: the router is the edge itself.
trusted_proxies = {list(d.gateway.trusted_proxies)!r}

[rentals]
# Environments tenants log in to over SSH (`gpuprovider rent`). Each rental's SSH port
# and raw TCP ports come from port_range and stay the same for its whole life.
port_range = {list(d.rentals.port_range)!r}
# The largest disk one rental may ask for (GiB); disks live in disks_dir (empty:
# rentals/ in the provider's home), one ext4 image each, mounted while in use.
max_disk_gib = {d.rentals.max_disk_gib}
disks_dir = "{d.rentals.disks_dir}"
# The priority of a rental's environment (never preemptible): the owner's preemptible
# work of lower priority is stopped to make room for it.
priority = {d.rentals.priority}
# DeepBrainChain's rental status broadcast, for an owner's DBC-aware scripts: each time
# a node turns renting or empty, {{"node_id", "status"}} as base64 JSON over UDP.
broadcast = {str(d.rentals.broadcast).lower()}
broadcast_address = "{d.rentals.broadcast_address}"
broadcast_port = {d.rentals.broadcast_port}

[pricing]
# What market orders are charged here, in currency units per hour (USD on the
# reference hub): per GPU model id or family (an id wins; a model with no price is not
# offered, never priced at a guess), plus per core, GB of memory and GB of storage.
# `gpuprovider price quote ORDER.json` shows what an order would cost and why.
gpu_hour = {{}}  # e.g. {{ "h100" = 1.83, "rtx-4090-24gb" = 0.52 }}
cpu_hour = {d.pricing.cpu_hour}
memory_gb_hour = {d.pricing.memory_gb_hour}
storage_gb_hour = {d.pricing.storage_gb_hour}
min_duration_s = {d.pricing.min_duration_s}
# Or an Akash provider's pricing script: the order as Akash's JSON on stdin, a price
# per block (script_block_s) in micros on stdout.
script = "{d.pricing.script}"
script_block_s = {d.pricing.script_block_s}
script_timeout_s = {d.pricing.script_timeout_s}
script_concurrency = {d.pricing.script_concurrency}

# Markets this provider takes work from (`gpuprovider market status`):
# [market.hub]
# url = "http://127.0.0.1:8090"      # `gpuprovider hub serve`
# verifier_key = "..."               # `gpuprovider hub key`: its proofs are trusted
# provider_name = ""                 # default: this node's name
# priority = 500                     # lease tasks preempt preemptible work below this
# usage_interval_s = 60              # signed, chained usage records per lease
# strategy = ""                      # "" the built-in rule; akash-default, swan-default,
#                                    # or earnings (docs/market-strategy.md)

# Per-tenant GPU quotas (DLWS style): work within a tenant's quota is guaranteed;
# beyond it, work runs only as preemptible and gives way to guaranteed work.
# [quotas.team-a]
# gpus = 8

# Per-tenant overrides of pipeline specs (venus-cluster's per-miner policy), applied
# to the tenant's pipelines submitted from then on.
# [pipelines.team-a]
# max_retries = 5                    # temporary failures retried, every stage
# pools.pc2 = {{ per_node = 1, total = 4 }}
"""
