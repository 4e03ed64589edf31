"""Request and response models of the HTTP API: what the OpenAPI schema documents.

Responses are built as plain dicts by `service/views.py` in these shapes (fast to
serialise) and declared here; the fuzz test holds every answer to its schema."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpuprovider.check.registry import Group

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- requests ---------------------------------------------------------------------


class ProofParamsIn(_In):
    n: int
    m: int
    per_step: int
    matrices: int
    steps: int
    rounds: int
    checks: int


class ChallengeIn(_In):
    id: Annotated[str, Field(max_length=64)]
    seed: Annotated[str, Field(max_length=128)]
    gpu_uuid: Annotated[str, Field(max_length=96)]
    model: Annotated[str, Field(max_length=64)]
    provider_key: Annotated[str, Field(max_length=128)]
    params: ProofParamsIn


class WalkIn(_In):
    challenge_id: Annotated[str, Field(max_length=64)]
    nonce: Annotated[str, Field(max_length=128)]


class AttestIn(WalkIn):
    """The nonce is attestation.nonce_for(challenge id, the walk's commitment)."""


class AttestationOut(BaseModel):
    report: str  # base64: SPDM GET_MEASUREMENTS request and signed response (NVML)
    cert_chain: str  # base64: the GPU's attestation certificate chain, PEM, leaf first


class OpeningsIn(_In):
    challenge_id: Annotated[str, Field(max_length=64)]
    openings: Annotated[
        list[Annotated[list[int], Field(min_length=3, max_length=3)]],
        Field(min_length=1, max_length=100_000),
    ]


class SignedVerdictIn(_In):
    verdict: dict[str, Any]  # checked field by field against the verifier's signature
    signature: Annotated[str, Field(max_length=128)]


class CheckResultIn(_In):
    """One result of `gpuprovider check`, as the CLI posts it."""

    status: Literal["PASS", "WARN", "FAIL", "SKIP"]
    value: float | Annotated[str, Field(max_length=500)] | None = None
    unit: Annotated[str, Field(max_length=32)] = ""
    threshold: Annotated[str, Field(max_length=2000)] = ""
    advice: Annotated[str, Field(max_length=2000)] = ""
    subject: Annotated[str, Field(max_length=64)] = ""
    gpu_uuid: Annotated[str, Field(max_length=96)] = ""
    data: dict[str, Any] = Field(default_factory=dict)
    group: Group
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")]


class CheckRunIn(_In):
    ran_at: Annotated[float, Field(gt=0)]
    results: Annotated[list[CheckResultIn], Field(min_length=1, max_length=10_000)]


class TokenIn(_In):
    name: Annotated[str, Field(pattern=NAME)]
    scopes: list[str] = Field(default_factory=lambda: ["read", "submit"], min_length=1)
    tenant: Annotated[str, Field(pattern=NAME)] | None = None
    expires_in_s: float | None = Field(
        None, gt=0, le=10 * 365 * 86400, description="refused this long after it is made"
    )


class CordonIn(_In):
    reason: Annotated[str, Field(max_length=500)] = ""


# -- responses ----------------------------------------------------------------------


class ErrorOut(BaseModel):
    error: str
    details: list[str] | None = None


class HealthOut(BaseModel):
    status: Literal["ok"]
    tasks: dict[str, int] | None = Field(
        None, description="tasks by state: only with a token, and only those it sees"
    )


class VersionOut(BaseModel):
    name: str
    version: str
    api: str


class EventOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    at: float
    from_: str | None = Field(alias="from")
    to: str
    reason: str


class JournalEventOut(BaseModel):
    """One row of the journal: a transition (or, with from == to, a note)."""

    model_config = ConfigDict(populate_by_name=True)
    cursor: str
    kind: str
    id: str
    tenant: str
    at: float
    from_: str | None = Field(alias="from")
    to: str
    reason: str


class EventsPageOut(BaseModel):
    events: list[JournalEventOut]
    next: str  # the cursor to ask from next


class ServiceBriefOut(BaseModel):
    id: str
    name: str
    urls: list[str]


class TaskOut(BaseModel):
    id: str
    name: str | None
    tenant: str
    kind: str
    state: str
    reason: str
    priority: int
    attempt: int
    preemptions: int
    gang: str | None
    exit_code: int | None
    node_id: str | None
    pid: int | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    gpu: str
    spec: dict[str, Any]
    service: ServiceBriefOut | None = None  # a service's replica: where it answers


class AllocatedGpuOut(BaseModel):
    uuid: str
    index: int | None
    model: str | None
    simulated: bool | None


class AllocationOut(BaseModel):
    node_id: str
    node: str
    active: bool
    gpus: list[AllocatedGpuOut]
    gpu_share: float
    cpu: float
    memory_mib: int
    ports: dict[str, int]


class TaskDetailOut(TaskOut):
    allocation: AllocationOut | None = None
    endpoints: dict[str, str] | None = None
    events: list[EventOut]


class PlacementOut(BaseModel):
    task_id: str
    node_id: str
    gpu_uuids: list[str]
    gpu_milli: int
    cpu_milli: int
    memory_mib: int


class DryRunOut(BaseModel):
    placeable_now: bool
    would_wait: bool
    placement: PlacementOut | None = None
    reason: str | None = None
    message: str | None = None


class UnusableGpuOut(BaseModel):
    index: int
    uuid: str
    reason: str


class NodeOut(BaseModel):
    id: str
    name: str
    address: str
    backend: str
    status: Literal["ready", "cordoned", "draining", "unreachable", "removed"]
    reason: str
    labels: dict[str, str]
    cpu_count: int
    memory_mib: int
    disk_free_mib: int
    gpu_count: int
    simulated_gpus: int
    unusable_gpus: list[UnusableGpuOut]
    public_key: str
    facts: dict[str, Any]
    last_heartbeat: float


class NodeDetailOut(NodeOut):
    events: list[EventOut]


class NodeStatusOut(BaseModel):
    node: str
    status: str


class DrainOut(NodeStatusOut):
    moved: list[str]
    finishing: list[str]


class RemovedOut(BaseModel):
    node: str
    removed: bool


class CheckResultOut(BaseModel):
    node_id: str
    key: str
    group: str
    name: str
    subject: str
    gpu_uuid: str
    status: str
    value: float | str | None
    unit: str
    threshold: str
    advice: str
    data: dict[str, Any]
    ran_at: float


class NodeChecksOut(BaseModel):
    node_id: str
    node: str
    results: list[CheckResultOut]


class ChecksSavedOut(BaseModel):
    node_id: str
    saved: int
    returned: list[str] = []  # GPUs a repair rule had cordoned, back in service


class ProofVerdictOut(BaseModel):
    passed: bool
    at: float | None
    reason: str
    verifier_key: str  # "" when nobody signed it (stored before schema 6)
    trusted: bool  # signed by a key in [proof] trusted_verifiers
    model: str
    simulated: bool
    timed: bool
    covered_bytes: int
    protocol: str = ""  # the proof protocol it was given under; only the current one counts


class GpuOut(BaseModel):
    uuid: str
    node_id: str
    node: str
    index: int
    model: str
    device_name: str
    memory_gb: int
    memory_mib: int
    simulated: bool
    present: bool
    health: str
    health_reason: str
    cordon_reason: str
    unusable_reason: str
    proof: ProofVerdictOut | None
    driver_version: str
    cuda_version: str
    used_share: float
    tasks: list[str]


class GpuCordonOut(BaseModel):
    gpu_uuid: str
    cordoned: bool
    reason: str


class ProofInfoOut(BaseModel):
    gpu_uuid: str
    model: str
    simulated: bool
    memory_bytes: int
    provider_key: str
    proof: dict[str, Any] | None


class FilledOut(BaseModel):
    challenge_id: str
    fill_s: float


class CommitmentOut(BaseModel):
    challenge_id: str
    nonce: str
    roots: str  # base64, 32 bytes per state
    signature: str
    prover_s: float
    backend: str


class VerdictStoredOut(BaseModel):
    gpu_uuid: str
    stored: bool
    passed: bool


class TokenOut(BaseModel):
    name: str
    scopes: list[str]
    tenant: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None


class TokenCreatedOut(TokenOut):
    token: str


class RepairEventOut(BaseModel):
    id: int
    at: float
    node_id: str
    gpu_uuid: str
    rule: str
    signal: str
    action: str
    outcome: str
    detail: str
    evidence: dict[str, Any]


class RepairRulesOut(BaseModel):
    dry_run: bool
    breaker_max_pct: float
    breaker_window_s: float
    rules: list[dict[str, Any]]


class UsageOut(BaseModel):
    tenant: str
    model: str
    booked_gpu_hours: float
    idle_gpu_hours: float
    idle_ratio: float


class HistoryPointOut(BaseModel):
    at: float
    utilization_ratio: float | None
    memory_used_bytes: float | None


class GpuHistoryOut(BaseModel):
    gpu_uuid: str
    step_s: int
    points: list[HistoryPointOut]


class DeliveryOut(BaseModel):
    target: str
    ok: bool
    detail: str


class AlertTestOut(BaseModel):
    deliveries: list[DeliveryOut]


class ReplicaOut(BaseModel):
    task_id: str
    name: str
    state: str
    draining: bool


class ServiceOut(BaseModel):
    id: str
    name: str
    tenant: str
    state: str
    urls: list[str]
    auth: str
    replicas_wanted: int
    replicas_live: int
    replicas_ready: int | None
    autoscale: dict[str, Any] | None
    replicas: list[ReplicaOut]
    stats: dict[str, Any] | None
    events: list[dict[str, Any]] | None = None


class ScaleIn(_In):
    replicas: int = Field(ge=0, le=100)


class RoutesOut(BaseModel):
    services: list[dict[str, Any]]
    token_hashes: dict[str, list[str]]


Window = Literal["30s", "60s", "300s"]


class ReplicaFiguresIn(_In):
    ready: bool
    in_flight: int = Field(ge=0, le=1 << 31)


class ServiceFiguresIn(_In):
    name: Annotated[str, Field(max_length=63)]
    in_flight: int = Field(ge=0, le=1 << 31)
    replicas: dict[Annotated[str, Field(max_length=32)], ReplicaFiguresIn] = Field(max_length=1000)
    requests: dict[Window, Annotated[int, Field(ge=0)]]
    errors: dict[Window, Annotated[int, Field(ge=0)]]
    rps: dict[Window, Annotated[float, Field(ge=0)]]
    latency_p50_ms: dict[Window, Annotated[float, Field(ge=0)] | None]
    ttfb_p50_ms: dict[Window, Annotated[float, Field(ge=0)] | None]
    total: int = Field(0, ge=0, le=1 << 62)  # requests since the router started
    router_started: float = Field(0.0, ge=0, le=1e11)


class GatewayStatsIn(_In):
    services: list[ServiceFiguresIn] = Field(max_length=100_000)


# -- markets ------------------------------------------------------------------------------


class MarketFiguresOut(BaseModel):
    orders: int
    bids: int
    declined: int
    won: int
    lost: int
    report_errors: int  # reports the market refused, could not take, or answered badly
    leases_retrying: int  # leases whose report waits for its next try


class MarketOut(BaseModel):
    market: str
    url: str
    status: str
    status_reason: str
    last_event: int
    reliability: float | None  # as the market computes it, from its last heartbeat answer
    reliability_floor: float | None
    leases: dict[str, int]  # by state
    figures: MarketFiguresOut


class LeaseOut(BaseModel):
    id: str
    market: str
    state: str
    model: str
    gpus: float
    price_per_hour: int  # micros
    duration_s: int
    earned: int  # micros, by this provider's count
    task_id: str | None
    service_id: str | None
    endpoint: str
    close_reason: str
    reason: str
    reported: str  # what the market was last told
    usage_records: int
    usage_gpu_seconds: float
    usage_requests: int


class EarningsOut(BaseModel):
    market: str
    earned_by_our_count: int  # micros
    paid_by_the_hub: int | None
    gpu_seconds_reported: float
    leases: int


class StageOut(BaseModel):
    name: str
    state: str
    reason: str
    pool: str
    task: str | None
    attempts: int
    level: str
    due_at: float | None
    started_at: float | None
    finished_at: float | None


class PipelineOut(BaseModel):
    id: str
    name: str | None
    tenant: str
    state: str
    reason: str
    work_store: str | None
    node: str | None
    created_at: float
    finished_at: float | None
    stages: list[StageOut]


class PipelineDetailOut(PipelineOut):
    events: list[EventOut]
    spec: dict[str, Any]


class FlushOut(BaseModel):
    stage: str
    flushed: int


class RentalSshOut(BaseModel):
    host: str
    port: int
    user: str
    command: str
    known_hosts: str  # the line for a known_hosts file: the host key is checked


class RentalOut(BaseModel):
    id: str
    name: str
    tenant: str
    state: str
    reason: str
    image: str
    gpu: str
    whole_node: bool
    cpu: float
    memory_mib: int
    disk_gib: float
    ssh: RentalSshOut | None
    ports: dict[str, int]
    routes: list[str]  # the gateway's names for its HTTP ports: <name>.localhost, /s/<name>/
    host_key: str
    node_id: str | None
    task_id: str | None
    starts: int
    requested_at: float
    ready_s: float | None  # request -> environment running, for the current start
    expires_at: float | None
    created_at: float
    events: list[dict[str, Any]] | None = None


class EvictIn(_In):
    reason: str = Field("the owner needs the machine", min_length=1, max_length=500)
