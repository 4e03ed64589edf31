"""Swan Computing Provider's job API, mapped onto the market model.

Swan's orchestrator pushes jobs to a provider: `POST /api/v1/computing/lagrange/jobs`
with a JobData body, `DELETE .../lagrange/jobs?task_uuid=`, `POST .../lagrange/jobs/renew`
and `GET .../lagrange/job/<job_uuid>` (the shapes of go-computing-provider's
`internal/models` and `internal/computing/cp_service.go`). A job names a *space*
(`job_source_uri`): JSON with its files, its owner and the hardware it ordered.

Its requests are signed like Ethereum's `personal_sign` (secp256k1 over Keccak-256 of
"\\x19Ethereum Signed Message:\\n<len><text>"), the text being the provider's account
address, its node id and the subject (the space URI, the task uuid or the job uuid),
and the signer must be the orchestrator's address. The original carries no nonce or
expiry, so any captured request can be replayed forever; renewals are not signed at
all; and a job's signature covers its space URI only, so its price, duration and ids
can be changed after signing. Here every request also carries `nonce` and
`expires_at`, appended to the signed text; a job's subject is every field that decides
what runs, for how long and at what price (`SIGNED_JOB_FIELDS`); a renewal is signed
over its task uuid and duration.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

import coincurve
import yaml
from Crypto.Hash import keccak
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gpuprovider.domain import catalogue
from gpuprovider.market.model import MAX_MONEY, MICROS, Order

ADDRESS = r"^0x[0-9a-fA-F]{40}$"
NONCE = r"^[A-Za-z0-9_-]{16,64}$"
MAX_TTL_S = 60  # the furthest in the future a signature may expire
HTTP_PORT = "http"  # the port a space's service is reached on: $GPUPROVIDER_PORT_HTTP


class SwanError(Exception):
    """A refusal in Swan's shape: `{"status": "fail", "code": code, "message": ...}`."""

    # go-computing-provider's util/response.go codes
    JSON = 4000
    BAD_PARAM = 4001
    SIGNATURE = 4002
    SOURCE = 4003  # the space could not be read
    NO_RESOURCES = 4006
    NOT_FOUND = 4008
    BELOW_PRICE = 4020

    def __init__(self, status: int, code: int, message: str):
        super().__init__(message)
        self.status, self.code = status, code

    def body(self) -> dict[str, Any]:
        return {"status": "fail", "code": self.code, "message": str(self)}


def ok(data: Any) -> dict[str, Any]:
    return {"status": "success", "code": 200, "data": data}


# -- signatures -------------------------------------------------------------------------


def _keccak(data: bytes) -> bytes:
    digest = keccak.new(digest_bits=256)
    digest.update(data)
    return digest.digest()


def _eth_hash(text: str) -> bytes:
    raw = text.encode()
    return _keccak(b"\x19Ethereum Signed Message:\n" + str(len(raw)).encode() + raw)


def address_of(public_key: coincurve.PublicKey) -> str:
    return "0x" + _keccak(public_key.format(compressed=False)[1:])[-20:].hex()


def sign(private_key: bytes, text: str) -> str:
    """`personal_sign` of `text`: 0x + r, s and v (27 or 28), as wallets write it."""
    signature = coincurve.PrivateKey(private_key).sign_recoverable(_eth_hash(text), hasher=None)
    return "0x" + signature[:64].hex() + f"{signature[64] + 27:02x}"


def signer(text: str, signature: str) -> str:
    """The address that signed `text` (lowercase), or SwanError saying why none did."""
    try:
        raw = bytes.fromhex(signature.removeprefix("0x"))
    except ValueError:
        raw = b""
    if len(raw) != 65:
        raise SwanError(400, SwanError.SIGNATURE, "the signature must be 65 bytes of hex")
    v = raw[64] - 27 if raw[64] in (27, 28) else raw[64]
    if v not in (0, 1):
        raise SwanError(400, SwanError.SIGNATURE, "the signature's recovery id must be 0/1/27/28")
    try:
        key = coincurve.PublicKey.from_signature_and_message(
            raw[:64] + bytes([v]), _eth_hash(text), hasher=None
        )
    except (ValueError, TypeError):
        raise SwanError(400, SwanError.SIGNATURE, "the signature does not verify") from None
    return address_of(key)


# A job's fields its signature covers: what runs (the space), as which lease and task,
# for how long, at what price. A change to any after signing fails the signature.
SIGNED_JOB_FIELDS = ("job_source_uri", "uuid", "task_uuid", "duration", "bid_price")


def job_subject(job: SwanJob) -> str:
    """What a job's signature is over, besides the account, node id, nonce and expiry."""
    return "|".join(str(getattr(job, name)) for name in SIGNED_JOB_FIELDS)


def signed_text(cp_account: str, node_id: str, subject: str, nonce: str, expires_at: int) -> str:
    """What the orchestrator signs: Swan's text, then the nonce and expiry it lacks."""
    return f"{cp_account}{node_id}{subject}|{nonce}|{expires_at}"


class Freshness(BaseModel):
    """The nonce and expiry every request carries (a body's fields or a query's)."""

    model_config = ConfigDict(extra="ignore")

    nonce: Annotated[str, Field(pattern=NONCE)]
    expires_at: Annotated[int, Field(gt=0, lt=1 << 40)]

    def check(self, now: float) -> None:
        if self.expires_at <= now:
            raise SwanError(400, SwanError.SIGNATURE, "the signature has expired")
        if self.expires_at > now + MAX_TTL_S:
            raise SwanError(
                400,
                SwanError.SIGNATURE,
                f"expires_at is more than {MAX_TTL_S} s ahead (check the clocks: NTP)",
            )


# -- what the orchestrator sends ---------------------------------------------------------


class SwanJob(Freshness):
    """models.JobData, as the orchestrator posts it (fields this provider does not use
    are accepted and ignored, as Go's decoder does), plus the nonce and expiry."""

    uuid: Annotated[str, Field(min_length=1, max_length=48, pattern=r"^[A-Za-z0-9_.-]+$")]
    name: Annotated[str, Field(max_length=256)] = ""
    duration: Annotated[int, Field(gt=0, le=366 * 86400)]
    job_source_uri: Annotated[str, Field(min_length=8, max_length=2048)]
    task_uuid: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    node_id_job_source_uri_signature: Annotated[str, Field(max_length=200)]
    job_type: int = 0  # 0: standard, 1: custom; priced the same here
    bid_price: Annotated[str, Field(max_length=40)]  # what the tenant pays for the whole job
    storage_source: Annotated[str, Field(max_length=256)] = ""

    @field_validator("bid_price")
    @classmethod
    def _price(cls, value: str) -> str:
        try:
            price = float(value)
        except ValueError:
            raise ValueError("bid_price must be a decimal number") from None
        if not (math.isfinite(price) and price > 0):
            raise ValueError("bid_price must be a positive number")
        return value


class Renewal(Freshness):
    task_uuid: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    duration: Annotated[int, Field(gt=0, le=366 * 86400)]
    signature: Annotated[str, Field(max_length=200)]


class SpaceFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[str, Field(max_length=256)]
    url: Annotated[str, Field(max_length=2048)]


class SpaceHardware(BaseModel):
    """models.SpaceHardware: what the space ordered."""

    model_config = ConfigDict(extra="ignore")

    description: str = ""
    hardware_type: str = ""  # "CPU" or "GPU"
    hardware: Annotated[str, Field(max_length=128)] = ""  # "Nvidia 3080", "CPU only"
    memory: Annotated[int, Field(ge=0, le=16 << 40)] = 0  # bytes
    vcpu: Annotated[int, Field(ge=0, le=1024)] = 0
    storage: Annotated[int, Field(ge=0, le=1 << 50)] = 0  # bytes
    gpu: Annotated[int, Field(ge=0, le=64)] = 0


class _Order(BaseModel):
    model_config = ConfigDict(extra="ignore")
    config: SpaceHardware


class _Space(BaseModel):
    model_config = ConfigDict(extra="ignore")
    uuid: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    name: Annotated[str, Field(max_length=256)] = ""
    activeOrder: _Order  # Swan's field name


class _Owner(BaseModel):
    model_config = ConfigDict(extra="ignore")
    public_address: Annotated[str, Field(max_length=64)] = ""


class _SpaceData(BaseModel):
    model_config = ConfigDict(extra="ignore")
    files: list[SpaceFile] = Field(default_factory=list, max_length=256)
    owner: _Owner = Field(default_factory=_Owner)
    space: _Space


class Space(BaseModel):
    """models.SpaceJSON: what `job_source_uri` answers."""

    model_config = ConfigDict(extra="ignore")
    data: _SpaceData
    message: str = ""
    status: str = ""


class _Services(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str | None = None
    cmd: list[Annotated[str, Field(max_length=4096)]] = Field(min_length=1, max_length=256)
    envs: list[Annotated[str, Field(max_length=8192)]] = Field(default_factory=list, max_length=256)
    expose_port: list[Annotated[int, Field(ge=1, le=65535)]] = Field(
        default_factory=list, max_length=1
    )


class Deploy(BaseModel):
    """A space's `deploy.yaml` (models.YamlContent): what runs, and the port it serves."""

    model_config = ConfigDict(extra="forbid")
    version: str | int = "1"
    services: _Services


DEPLOY_FILE = "deploy.yaml"


def parse_deploy(text: str) -> Deploy:
    try:
        return Deploy.model_validate(yaml.safe_load(text))
    except yaml.YAMLError as exc:
        raise SwanError(400, SwanError.SOURCE, f"{DEPLOY_FILE} is not YAML: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the file"
        raise SwanError(400, SwanError.SOURCE, f"{DEPLOY_FILE}: {where}: {first['msg']}") from None


def gpu_model(hardware: str) -> str:
    """A catalogue name for Swan's hardware text ("Nvidia 3080", "NVIDIA A100"), or
    SwanError for a GPU the catalogue does not know (never priced as some default)."""
    name = re.sub(r"(?i)^nvidia\s*", "", hardware.strip())
    for candidate in (name, f"RTX {name}"):
        if candidate and catalogue.names_a_model(candidate):
            return candidate
    raise SwanError(
        400, SwanError.NO_RESOURCES, f"unknown GPU model {hardware!r} in the space's order"
    )


def to_order(job: SwanJob, space: Space, deploy: Deploy, token_price: float) -> Order:
    """The market order a Swan job is: a service running the space's command, for the
    job's duration, under a cap of its bid (for the whole job, in tokens) per hour."""
    hw = space.data.space.activeOrder.config
    wants_gpu = hw.gpu > 0 or hw.hardware_type.upper() == "GPU"
    model = gpu_model(hw.hardware) if wants_gpu else ""
    total = float(job.bid_price) * token_price * MICROS
    cap = math.floor(total * 3600 / job.duration)
    if not 0 < cap <= MAX_MONEY:
        raise SwanError(400, SwanError.BELOW_PRICE, f"bid_price {job.bid_price} pays nothing")
    env: dict[str, str] = {}
    for item in deploy.services.envs:
        key, sep, value = item.partition("=")
        if not sep:
            raise SwanError(400, SwanError.SOURCE, f"{DEPLOY_FILE}: env {item[:40]!r} is not K=V")
        env[key] = value
    payload: dict[str, Any] = {
        "command": deploy.services.cmd,
        "env": env,
        "ports": [{"name": HTTP_PORT}],
        "serve": {"port": HTTP_PORT, "auth": "public"},
        "labels": {"swan-task": job.task_uuid, "swan-space": space.data.space.uuid},
    }
    if deploy.services.image:
        payload["image"] = deploy.services.image
    try:
        return Order.model_validate(
            {
                "id": job.uuid,
                "market": "swan",
                "kind": "service",
                "resources": {
                    "gpus": max(hw.gpu, 1) if wants_gpu else 0,
                    "gpu_model": model,
                    "cpus": hw.vcpu,
                    "memory_gb": hw.memory / (1 << 30),
                    "storage_gb": hw.storage / (1 << 30),
                },
                "max_price_per_hour": cap,
                "duration_s": job.duration,
                "payload": payload,
            }
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SwanError(400, SwanError.BAD_PARAM, f"{where}: {first['msg']}") from None


def deploy_status(state: str) -> str:
    """A lease state in Swan's job_status words (models.GetDeployStatusStr), where one fits."""
    return {
        "won": "downloadSource",
        "awaiting_payload": "downloadSource",
        "provisioning": "pullImage",
        "running": "deployToK8s",
    }.get(state, state)
