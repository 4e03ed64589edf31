"""Swan's job API: jobs pushed in Swan's payload shapes (tests/fixtures/swan) by a test
orchestrator run as leases on a real provider; and every way a hostile orchestrator or
a stranger could misuse the routes fails, storing nothing and running nothing."""

import copy
import json
import signal
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import coincurve
import httpx
import pytest

from gpuprovider.market.swan import (
    SIGNED_JOB_FIELDS,
    Deploy,
    Space,
    SwanError,
    SwanJob,
    address_of,
    parse_deploy,
    sign,
    signed_text,
    signer,
    to_order,
)
from gpuprovider.testing import (
    Provider,
    free_port,
    kill_task_processes,
    make_home,
    swan_home,
    wait_for,
)

FIXTURES = Path(__file__).parent / "fixtures" / "swan"
ORCHESTRATOR_KEY = bytes.fromhex("11" * 32)
ORCHESTRATOR = address_of(coincurve.PrivateKey(ORCHESTRATOR_KEY).public_key)
STRANGER_KEY = bytes.fromhex("22" * 32)
CP_ACCOUNT = "0x9A3F1b6E2c7D4a5B8e0F1c2D3e4A5b6C7d8E9f01"
NODE_ID = "04b8d2c1e0f3a6b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4"
JOBS = "/api/v1/computing/lagrange/jobs"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def test_signatures_are_ethereum_personal_sign():
    # eth-account's documented example: Account.sign_message(encode_defunct(text="I♥SF"))
    key = bytes.fromhex("b25c7db31feed9122727bf0939dc769a96564b2de4c4726d035b36ecf1e5b364")
    signature = sign(key, "I♥SF")
    assert signature == (
        "0xe6ca9bba58c88611fad66a6ce8f996908195593807c4b38bd528d2cff09d4eb3"
        "3e5bfbbf4d3e39b1a2fd816a7680c19ebebaf3a141b239934ad43cb33fcec8ce1c"
    )
    assert signer("I♥SF", signature) == "0x5ce9454909639d2d17a3f753ce7d93fa0b9ab12e"
    assert signer("I♥SF", signature[:-2] + "01") == signer("I♥SF", signature)  # v as 0/1
    assert signer("I♥NY", signature) != "0x5ce9454909639d2d17a3f753ce7d93fa0b9ab12e"
    for bad in ("", "0x1234", "zz" * 65, signature[:-2] + "05"):
        with pytest.raises(SwanError):
            signer("I♥SF", bad)


def job_of(**change) -> SwanJob:
    body = fixture("job.json") | {"job_source_uri": "http://s/x", "nonce": "n" * 16}
    body |= {"expires_at": 1} | change
    return SwanJob.model_validate(body)


def test_a_job_is_an_order_priced_per_hour_for_its_model_and_never_free():
    space = Space.model_validate(fixture("space.json"))
    deploy = parse_deploy((FIXTURES / "deploy.yaml").read_text())
    order = to_order(job_of(), space, deploy, token_price=0.5)
    assert order.kind == "service" and order.duration_s == 3600
    assert order.resources.gpus == 1 and order.resources.gpu_model == "H100"
    assert order.max_price_per_hour == 2_250_000  # 4.5 tokens for the hour at 0.5 each
    assert order.payload["env"] == {"MODEL": "sd-1.5", "STEPS": "20"}
    # Swan priced any job under an hour at 0 (duration/3600 in integers): not here
    short = to_order(job_of(duration=60, bid_price="0.01"), space, deploy, token_price=1)
    assert short.max_price_per_hour == 600_000
    cpu = copy.deepcopy(fixture("space.json"))
    cpu["data"]["space"]["activeOrder"]["config"] |= {
        "hardware": "CPU only",
        "hardware_type": "CPU",
        "gpu": 0,
    }
    assert to_order(job_of(), Space.model_validate(cpu), deploy, 1).resources.gpus == 0
    odd = copy.deepcopy(fixture("space.json"))
    odd["data"]["space"]["activeOrder"]["config"]["hardware"] = "Nvidia Voodoo5"
    with pytest.raises(SwanError, match="unknown GPU model 'Nvidia Voodoo5'"):
        to_order(job_of(), Space.model_validate(odd), deploy, 1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("services: [", "not YAML"),
        ("services: {cmd: [sh], privileged: true}", "services.privileged"),
        ("services: {cmd: []}", "services.cmd"),
        ("version: 1", "services"),
        ("- a list", "the file"),
    ],
)
def test_a_deploy_file_that_is_not_one_is_refused(text, message):
    with pytest.raises(SwanError, match=message):
        parse_deploy(text)
    env = Deploy.model_validate({"services": {"cmd": ["x"], "envs": ["NOEQUALS"]}})
    space = Space.model_validate(fixture("space.json"))
    with pytest.raises(SwanError, match="not K=V"):
        to_order(job_of(), space, env, 1)


# -- on a real provider -----------------------------------------------------------------


class Sources:
    """The space API a job's `job_source_uri` points at: path -> (status, headers, body)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict, bytes]] = {}
        self.hits: list[str] = []
        sources = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                sources.hits.append(self.path)
                status, headers, body = sources.routes.get(self.path, (404, {}, b"{}"))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def space(self, name: str, hardware: dict | None = None, deploy: bytes | None = None) -> str:
        """Serve a space (the fixture, with `hardware` changed) and its deploy.yaml."""
        space = fixture("space.json")
        space["data"]["space"]["activeOrder"]["config"] |= hardware or {}
        for file in space["data"]["files"]:
            file["url"] = f"http://{self.host}/files/{name}/{file['name']}"
        self.routes[f"/spaces/{name}"] = (200, {}, json.dumps(space).encode())
        deploy_text = deploy if deploy is not None else (FIXTURES / "deploy.yaml").read_bytes()
        self.routes[f"/files/{name}/sd-demo/deploy.yaml"] = (200, {}, deploy_text)
        return f"http://{self.host}/spaces/{name}"


class Orchestrator:
    """Swan's orchestrator, signing as `key` over the provider's account and node id."""

    def __init__(self, provider: Provider, key: bytes = ORCHESTRATOR_KEY):
        self.provider, self.key = provider, key
        self.http = provider.api  # its bearer token is not what authorises anything here

    def fresh(self, ttl_s: int = 30) -> dict:
        return {"nonce": uuid.uuid4().hex, "expires_at": int(time.time()) + ttl_s}

    def signature(self, subject: str, fresh: dict) -> str:
        text = signed_text(CP_ACCOUNT, NODE_ID, subject, fresh["nonce"], fresh["expires_at"])
        return sign(self.key, text)

    def job(self, source: str, **change) -> dict:
        body = fixture("job.json") | {
            "uuid": str(uuid.uuid4()),
            "task_uuid": str(uuid.uuid4()),
            "job_source_uri": source,
        }
        body |= self.fresh() | change
        body.setdefault("node_id_job_source_uri_signature", "")
        if not body["node_id_job_source_uri_signature"]:
            subject = "|".join(str(body[name]) for name in SIGNED_JOB_FIELDS)
            body["node_id_job_source_uri_signature"] = self.signature(subject, body)
        return body

    def post(self, body) -> tuple[int, dict]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        answer = self.provider.api.post(
            self.provider.url + JOBS, content=raw, headers={"Content-Type": "application/json"}
        )
        return answer.status_code, answer.json()

    def cancel(self, task_uuid: str, **change) -> tuple[int, dict]:
        fresh = self.fresh()
        query = fresh | {
            "task_uuid": task_uuid,
            "node_id_task_uuid_signature": self.signature(task_uuid, fresh),
        }
        answer = self.provider.api.delete(self.provider.url + JOBS, params=query | change)
        return answer.status_code, answer.json()

    def renew(self, task_uuid: str, duration: int, signed_duration: int | None = None):
        fresh = self.fresh()
        signed = signed_duration if signed_duration is not None else duration
        body = fresh | {
            "task_uuid": task_uuid,
            "duration": duration,
            "signature": self.signature(f"{task_uuid}{signed}", fresh),
        }
        answer = self.provider.api.post(self.provider.url + JOBS + "/renew", json=body)
        return answer.status_code, answer.json()

    def status(self, job_uuid: str) -> tuple[int, dict]:
        fresh = self.fresh()
        query = fresh | {"signature": self.signature(job_uuid, fresh)}
        answer = self.provider.api.get(
            self.provider.url + f"/api/v1/computing/lagrange/job/{job_uuid}", params=query
        )
        return answer.status_code, answer.json()


@pytest.fixture(scope="module")
def swan(tmp_path_factory):
    sources = Sources()
    port, gateway_port = free_port(), free_port()
    home = make_home(tmp_path_factory.mktemp("swan") / "provider", port, gateway_port=gateway_port)
    swan_home(home, ORCHESTRATOR, CP_ACCOUNT, NODE_ID, sources.host, {"h100": 1.83})
    provider = Provider(home, port)
    provider.start()
    provider.gateway = f"http://127.0.0.1:{gateway_port}"
    yield provider, Orchestrator(provider), sources
    provider.cancel_all()
    provider.stop(signal.SIGKILL)
    kill_task_processes(home)
    sources.server.shutdown()


def reach(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.TransportError:  # the gateway is still starting
        return None


def lease_of(provider: Provider, job_uuid: str) -> dict:
    leases = provider.api.get("/market/leases").json()
    return next((x for x in leases if x["id"] == f"swan.{job_uuid}"), {})


@pytest.mark.slow
def test_a_swan_job_runs_as_a_lease_is_renewed_and_deleted(swan):
    provider, orchestrator, sources = swan
    body = orchestrator.job(sources.space("run"))
    status, answer = orchestrator.post(body)
    assert status == 200 and answer["status"] == "success", answer
    job = answer["data"]
    assert job["uuid"] == body["uuid"] and job["price_per_hour"] == 1_830_000
    assert "lease-swan" in job["job_real_uri"]  # the service behind the gateway
    assert job["node_id_job_source_uri_signature"] == ""  # never echoed back
    wait_for(
        lambda: orchestrator.status(body["uuid"])[1]["data"]["job_status"] == "deployToK8s",
        timeout=60,
        what="the job to run",
    )
    lease = lease_of(provider, body["uuid"])
    assert lease["state"] == "running" and lease["market"] == "swan"
    task = provider.task(lease["task_id"])
    assert task["spec"]["env"]["MODEL"] == "sd-1.5" and task["spec"]["priority"] == 500
    # the space serves through the gateway; its requests are metered in the lease's usage
    name = urlsplit(job["job_real_uri"]).hostname.split(".")[0]
    page = wait_for(
        lambda: (x := reach(f"{provider.gateway}/s/{name}/")) and x.status_code == 200 and x,
        timeout=60,
        what="the space to answer through the gateway",
    )
    assert "Directory listing" in page.text
    for _ in range(4):
        assert httpx.get(f"{provider.gateway}/s/{name}/").status_code == 200
    # every request the gateway passed on, once: what the router counted in 300 s
    routed = wait_for(
        lambda: (
            (stats := provider.api.get(f"/services/{name}").json()["stats"])
            and stats["requests"]["300s"] >= 5
            and stats["requests"]["300s"]
        ),
        timeout=30,
        what="the router to report the requests",
    )
    wait_for(
        lambda: lease_of(provider, body["uuid"])["usage_requests"] == routed,
        timeout=30,
        what="the requests in the lease's usage",
    )
    time.sleep(2)  # two more usage records: nothing counted again
    assert lease_of(provider, body["uuid"])["usage_requests"] == routed
    assert orchestrator.renew(body["task_uuid"], 600)[0] == 200
    assert lease_of(provider, body["uuid"])["duration_s"] == 4200
    status, answer = orchestrator.cancel(body["task_uuid"])
    assert status == 200 and answer["data"] == "deleted success"
    closed = wait_for(
        lambda: (x := lease_of(provider, body["uuid"]))["state"] == "closed" and x,
        timeout=60,
        what="the lease to close",
    )
    assert closed["close_reason"] == "tenant" and closed["earned"] > 0
    assert orchestrator.status(body["uuid"])[1]["data"]["lease_state"] == "closed"
    provider.wait_state(lease["task_id"], {"cancelled", "succeeded", "failed"})
    # a closed job cannot be renewed
    assert orchestrator.renew(body["task_uuid"], 600)[0] == 404


@pytest.mark.slow
def test_a_swan_job_ends_when_its_duration_is_up(swan):
    provider, orchestrator, sources = swan
    body = orchestrator.job(sources.space("short"), duration=2, bid_price="0.01")
    assert orchestrator.post(body)[0] == 200
    closed = wait_for(
        lambda: (x := lease_of(provider, body["uuid"]))["state"] == "closed" and x,
        timeout=60,
        what="the short job to expire",
    )
    assert closed["close_reason"] == "expired"


def refused(answer: tuple[int, dict], status: int, code: int, message: str) -> None:
    got_status, body = answer
    assert (got_status, body["status"], body["code"]) == (status, "fail", code), body
    assert message in body["message"], body


@pytest.mark.slow
def test_a_hostile_orchestrator_or_stranger_gets_nothing(swan):
    provider, orchestrator, sources = swan
    tasks_before = len(provider.api.get("/tasks").json())
    source = sources.space("hostile")
    stranger = Orchestrator(provider, STRANGER_KEY)
    # not the orchestrator's key; a signature over another space; not JSON; wrong fields
    refused(stranger.post(stranger.job(source)), 401, 4002, "not signed by")
    tampered = orchestrator.job(source)
    tampered["job_source_uri"] = sources.space("other")
    refused(orchestrator.post(tampered), 401, 4002, "not signed by")
    # every field that decides what runs, how long, at what price, is signed
    for field, value in (
        ("bid_price", "999999"),
        ("duration", 366 * 86400),
        ("uuid", str(uuid.uuid4())),
        ("task_uuid", str(uuid.uuid4())),
    ):
        changed = orchestrator.job(source)
        changed[field] = value
        refused(orchestrator.post(changed), 401, 4002, "over job_source_uri, uuid, task_uuid")
        assert field in orchestrator.post(changed)[1]["message"]
    refused(orchestrator.post(b"{not json"), 400, 4000, "not JSON")
    refused(orchestrator.post(b"[" * 5000 + b"]" * 5000), 400, 4000, "nested too deep")
    refused(orchestrator.post(b"[1, 2]"), 400, 4000, "JSON object")
    refused(orchestrator.post({"uuid": "x"}), 400, 4001, "Field required")
    refused(orchestrator.post(orchestrator.job(source, bid_price="NaN")), 400, 4001, "bid_price")
    # expired, too far ahead, replayed
    stale = orchestrator.job(source, expires_at=int(time.time()) - 1)
    refused(orchestrator.post(stale), 400, 4002, "expired")
    ahead = orchestrator.job(source, expires_at=int(time.time()) + 3600)
    refused(orchestrator.post(ahead), 400, 4002, "ahead")
    hits = len(sources.hits)
    # a space on a host the operator did not allow is never fetched
    elsewhere = orchestrator.job(f"http://127.0.0.1:{free_port()}/spaces/x")
    refused(orchestrator.post(elsewhere), 400, 4003, "not an allowed source host")
    assert len(sources.hits) == hits
    # a redirect is not followed; too big, no deploy file, a bad one: refused
    sources.routes["/spaces/moved"] = (302, {"Location": "http://10.0.0.1/"}, b"")
    refused(
        orchestrator.post(orchestrator.job(f"http://{sources.host}/spaces/moved")), 502, 4003, "302"
    )
    sources.routes["/spaces/huge"] = (200, {}, b"[" * (2 << 20))
    refused(
        orchestrator.post(orchestrator.job(f"http://{sources.host}/spaces/huge")),
        400,
        4003,
        "larger",
    )
    bare = json.loads(sources.routes["/spaces/hostile"][2])
    bare["data"]["files"] = []
    sources.routes["/spaces/bare"] = (200, {}, json.dumps(bare).encode())
    refused(
        orchestrator.post(orchestrator.job(f"http://{sources.host}/spaces/bare")),
        400,
        4003,
        "deploy.yaml",
    )
    bad = sources.space("bad", deploy=b"services: {cmd: [sh], privileged: true}")
    refused(orchestrator.post(orchestrator.job(bad)), 400, 4003, "privileged")
    # what no one here can run, or pays too little: declined with the reason, recorded
    voodoo = sources.space("voodoo", {"hardware": "Nvidia Voodoo5"})
    refused(orchestrator.post(orchestrator.job(voodoo)), 400, 4006, "unknown GPU model")
    many = sources.space("many", {"gpu": 64})
    refused(orchestrator.post(orchestrator.job(many)), 400, 4006, "")
    cheap = orchestrator.job(source, bid_price="0.0001")
    refused(orchestrator.post(cheap), 400, 4020, "above the cap")
    assert lease_of(provider, cheap["uuid"])["state"] == "lost"
    # the same job twice (a new nonce), and the same request replayed
    first = orchestrator.job(source)
    assert orchestrator.post(first)[0] == 200
    again = orchestrator.job(source, uuid=first["uuid"], task_uuid=first["task_uuid"])
    refused(orchestrator.post(again), 409, 4001, "already received")
    refused(orchestrator.post(first), 401, 4002, "replayed")
    # renewals and deletions: only the orchestrator's, for what it signed
    refused(orchestrator.renew(first["task_uuid"], 86400, signed_duration=60), 401, 4002, "")
    refused(stranger.renew(first["task_uuid"], 60), 401, 4002, "")
    refused(orchestrator.renew("no-such-task", 60), 404, 4008, "no running job")
    refused(orchestrator.renew(first["task_uuid"], 366 * 86400), 400, 4001, "")
    refused(stranger.cancel(first["task_uuid"]), 401, 4002, "")
    refused(orchestrator.cancel(first["task_uuid"], node_id_task_uuid_signature=""), 400, 4001, "")
    refused(orchestrator.cancel("no-such-task"), 404, 4008, "")
    refused(stranger.status(first["uuid"]), 401, 4002, "")
    assert lease_of(provider, first["uuid"])["duration_s"] == 3600  # nothing renewed it
    # one task came of it all: the one job accepted; and the daemon is fine
    tasks = provider.api.get("/tasks").json()
    assert len(tasks) == tasks_before + 1
    assert orchestrator.cancel(first["task_uuid"])[0] == 200
    assert provider.api.get("/health").status_code == 200


@pytest.mark.slow
def test_a_request_replayed_after_a_restart_is_still_refused(swan):
    provider, orchestrator, sources = swan
    body = orchestrator.job(sources.space("restart"))
    assert orchestrator.post(body)[0] == 200
    fresh = orchestrator.fresh(ttl_s=60)
    renewal = fresh | {
        "task_uuid": body["task_uuid"],
        "duration": 600,
        "signature": orchestrator.signature(f"{body['task_uuid']}600", fresh),
    }
    url = provider.url + JOBS + "/renew"
    assert provider.api.post(url, json=renewal).status_code == 200
    provider.stop()
    provider.start()
    again = provider.api.post(url, json=renewal)
    assert again.status_code == 401 and "replayed" in again.json()["message"]
    assert lease_of(provider, body["uuid"])["duration_s"] == 4200  # renewed once
    assert orchestrator.cancel(body["task_uuid"])[0] == 200
