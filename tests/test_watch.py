"""Watch and repair through a real daemon: a stand-in NVML (the driver's functions,
scripted values) and a kernel log file in the driver's XID format drive the shipped
rules end to end: a GPU fails, it is cordoned, its task moves to another GPU, a webhook
server in the test receives the alert; /metrics serves it all."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from gpuprovider.testing import Provider, StandinGpus, free_port, make_home, wait_for, watch_home


class _Hook(BaseHTTPRequestHandler):
    def do_POST(self):
        self.server.got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


class Watched:
    def __init__(self, root: Path, dry_run: bool = False, count: int = 2):
        self.hook = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
        self.hook.got = []
        threading.Thread(target=self.hook.serve_forever, daemon=True).start()
        port = free_port()
        home = make_home(root / "home", port, gpus="")
        self.kernel_log = root / "kern.log"
        self.kernel_log.write_text("")
        self.reset_marks = root / "resets"
        self.reset_marks.mkdir()
        watch_home(
            home,
            self.kernel_log,
            webhooks=(f"http://127.0.0.1:{self.hook.server_port}/alerts",),
            reset_command=("touch", f"{self.reset_marks}/{{uuid}}"),
            dry_run=dry_run,
        )
        self.gpus = StandinGpus(root / "nvml.json", count)
        self.provider = Provider(home, port)
        self.provider.env = self.gpus.env

    def log_xid(self, index: int, code: int) -> None:
        with self.kernel_log.open("a") as f:
            f.write(self.gpus.kernel_line(index, code, "as the driver says it"))

    def gpu(self, index: int) -> dict:
        return next(g for g in self.provider.api.get("/gpus").json() if g["index"] == index)

    def repairs(self, **params) -> list[dict]:
        return self.provider.api.get("/repairs", params=params).json()

    def alerts(self) -> list[str]:
        return [body["text"] for body in self.hook.got]

    def close(self) -> None:
        self.provider.cancel_all()
        self.provider.stop()
        self.hook.shutdown()


@pytest.fixture
def watched(tmp_path):
    w = Watched(tmp_path)
    w.provider.start()
    yield w
    w.close()


def _gpus_of(task: dict) -> list[str]:
    return [g["uuid"] for g in (task.get("allocation") or {}).get("gpus", [])]


def _running_on(provider: Provider, task_id: str, gpu_uuid: str) -> bool:
    task = provider.task(task_id)
    return task["state"] == "running" and gpu_uuid in _gpus_of(task)


def test_ecc_rise_cordons_the_gpu_moves_its_task_and_alerts(watched):
    p, gpus = watched.provider, watched.gpus
    task = p.submit(command=["sleep", "300"], resources={"gpu": "1"})
    running = p.wait_state(task["id"], "running")
    held = _gpus_of(running)[0]
    index = next(i for i, g in enumerate(gpus.gpus) if g["uuid"] == held)
    other = gpus.gpus[1 - index]["uuid"]

    gpus.set(index, ecc={"uncorrected_volatile": 1})

    gpu = wait_for(lambda: (g := watched.gpu(index))["cordon_reason"] and g, 15, "a cordon")
    assert gpu["cordon_reason"].startswith("repair rule ecc-uncorrected")
    wait_for(lambda: _running_on(p, task["id"], other), 20, "the task to move to the other GPU")
    events = p.task(task["id"])["events"]
    assert any("failed repair rule ecc-uncorrected" in e["reason"] for e in events)
    wait_for(lambda: watched.alerts(), 10, "the alert at the webhook")
    assert "ecc-uncorrected" in watched.alerts()[0] and "critical" in watched.alerts()[0]
    done = {(e["action"], e["outcome"]) for e in watched.repairs(gpu=held)}
    assert {("cordon_gpu", "done"), ("reschedule", "done"), ("alert", "sent")} <= done
    assert json.loads(json.dumps(watched.repairs(gpu=held)[0]["evidence"]))["rise"] == 1

    # A person cannot wave it back in; a passing check does.
    refused = p.api.post(f"/gpus/{held}/uncordon")
    assert refused.status_code == 409 and "gpuprovider check" in refused.json()["error"]
    node_id = gpu["node_id"]
    result = {
        "group": "hardware",
        "name": "ecc",
        "subject": f"gpu{index}",
        "gpu_uuid": held,
        "status": "PASS",
        "value": 0,
        "unit": "",
        "threshold": "",
        "advice": "",
        "data": {},
    }
    saved = p.api.post(f"/nodes/{node_id}/checks", json={"results": [result], "ran_at": 1.0})
    assert saved.status_code == 200 and saved.json()["returned"] == [held]
    assert watched.gpu(index)["cordon_reason"] == ""


def test_xid_48_cordons_and_resets_the_gpu_once_idle_and_benign_xids_do_nothing(watched):
    p = watched.provider
    for code in (13, 31, 43, 45, 63, 94) * 20:  # application faults: never a cordon
        watched.log_xid(0, code)
    with watched.kernel_log.open("a") as f:
        f.write("NVRM: Xid (PCI:garbled): nonsense\n")  # skipped, counted
    scrape = httpx.get(p.url + "/metrics", headers={"Authorization": f"Bearer {p.token}"})
    wait_for(
        lambda: 'gpuprovider_gpu_xid_errors_total{code="94"' in _metrics(p),
        10,
        "the benign XIDs in /metrics",
    )
    assert scrape.status_code == 200
    assert watched.gpu(0)["cordon_reason"] == "" and watched.repairs() == []
    assert "gpuprovider_kernel_log_malformed_lines_total" in _metrics(p)

    with watched.kernel_log.open("a") as f:  # no GPU of this node has that address
        f.write("NVRM: Xid (PCI:0000:99:00): 48, pid=1, name=x, DBE\n")
    wait_for(lambda: watched.repairs(), 10, "the unplaced XID's repair events")
    assert {e["outcome"] for e in watched.repairs() if e["action"] != "alert"} == {"skipped"}
    assert not any(watched.gpu(i)["cordon_reason"] for i in (0, 1))

    watched.log_xid(1, 48)
    wait_for(lambda: watched.gpu(1)["cordon_reason"], 10, "XID 48 to cordon GPU 1")
    uuid = watched.gpus.gpus[1]["uuid"]

    def resets() -> set[str]:
        return {e["outcome"] for e in watched.repairs(gpu=uuid) if e["action"] == "reset_gpu"}

    wait_for(lambda: "done" in resets(), 10, "the idle GPU's reset, recorded")
    assert resets() == {"pending", "done"} and (watched.reset_marks / uuid).exists()
    assert watched.gpu(0)["cordon_reason"] == ""


def _metrics(p: Provider, token: str | None = None) -> str:
    answer = httpx.get(p.url + "/metrics", headers={"Authorization": f"Bearer {token or p.token}"})
    assert answer.status_code == 200, answer.text
    return answer.text


def test_metrics_need_the_metrics_scope_and_show_gpus_tasks_and_accounting(watched):
    p = watched.provider
    assert httpx.get(p.url + "/metrics").status_code == 401
    tenant = p.tenant("team-a")
    reader = tenant.get("/tasks")  # a tenant's read token is no scraper
    assert reader.status_code == 200
    assert tenant.get("/repairs").status_code == 403  # they name other tenants' tasks
    token = tenant.headers["Authorization"].removeprefix("Bearer ")
    assert (
        httpx.get(p.url + "/metrics", headers={"Authorization": f"Bearer {token}"}).status_code
        == 403
    )
    made = p.api.post("/tokens", json={"name": "prometheus", "scopes": ["metrics"]}).json()
    assert made["token"]
    assert p.api.post("/tokens", json={"name": "x", "scopes": ["metric"]}).status_code == 422

    task = tenant.post("/tasks", json={"command": ["sleep", "60"], "resources": {"gpu": "1"}})
    p.wait_state(task.json()["id"], "running")
    watched.gpus.set(0, utilization=0)
    watched.gpus.set(1, utilization=0)

    def accounted() -> str:
        text = _metrics(p, made["token"])
        return (
            'gpuprovider_gpu_idle_seconds_total{model="h100-80gb-sxm",tenant="team-a"}' in text
            and text
        )

    text = wait_for(accounted, 10, "booked and idle GPU-seconds")
    for name in (
        "gpuprovider_node_up",
        "gpuprovider_gpu_info",
        "gpuprovider_gpu_utilization_ratio",
        "gpuprovider_gpu_memory_total_bytes",
        "gpuprovider_gpu_temperature_celsius",
        "gpuprovider_gpu_power_watts",
        'gpuprovider_gpu_ecc_errors_total{index="0"',
        "gpuprovider_gpu_remapped_rows_total",
        "gpuprovider_gpu_clock_event_active",
        "gpuprovider_gpu_pcie_replays_total",
        "gpuprovider_gpu_nvlink_errors_total",
        "gpuprovider_gpu_healthy",
        'gpuprovider_tasks{state="running"} 1.0',
        'gpuprovider_task_transitions_total{state="running"}',
        "gpuprovider_queue_wait_seconds_bucket",
        "gpuprovider_scheduler_pass_seconds_count",
        "gpuprovider_gpu_booked_seconds_total",
    ):
        assert name in text, name
    assert task.json()["id"] not in text  # task ids are never labels
    usage = tenant.get("/accounting").json()
    assert [u["tenant"] for u in usage] == ["team-a"] and usage[0]["idle_ratio"] == 1.0
    history = p.api.get(f"/gpus/{watched.gpus.gpus[0]['uuid']}/history").json()
    assert history["points"] and history["points"][-1]["utilization_ratio"] == 0.0


def test_a_vanished_gpu_is_cordoned_and_the_breaker_stops_the_next(tmp_path):
    w = Watched(tmp_path, count=2)  # the breaker allows max(1, 25 % of 2) = 1 per window
    w.provider.start()
    try:
        w.gpus.set(0, lost=True)
        wait_for(lambda: w.gpu(0)["cordon_reason"], 15, "the lost GPU's cordon")
        assert "gpu-lost" in w.gpu(0)["cordon_reason"]
        w.gpus.set(1, ecc={"uncorrected_volatile": 5})
        wait_for(
            lambda: any(e["outcome"] == "breaker-open" for e in w.repairs()),
            15,
            "the circuit breaker to hold the second GPU back",
        )
        assert w.gpu(1)["cordon_reason"] == ""
        assert "gpuprovider_repair_circuit_breaker_open 1.0" in _metrics(w.provider)
        wait_for(lambda: any("circuit breaker" in a for a in w.alerts()), 10, "its alert")
    finally:
        w.close()


def test_dry_run_records_and_alerts_but_changes_nothing(tmp_path):
    w = Watched(tmp_path, dry_run=True)
    w.provider.start()
    try:
        w.log_xid(0, 79)
        wait_for(lambda: any(e["outcome"] == "dry-run" for e in w.repairs()), 10, "a dry-run event")
        node = w.provider.api.get("/nodes").json()[0]
        assert node["status"] == "ready" and w.gpu(0)["cordon_reason"] == ""
        wait_for(lambda: any("dry run: would cordon_node" in a for a in w.alerts()), 10, "alert")
        out = w.provider.cli("repair", "rules")
        assert (
            out.returncode == 0 and "dry run" in out.stdout and "xid-fallen-off-bus" in out.stdout
        )
        out = w.provider.cli("alert", "test")
        assert out.returncode == 0 and "ok" in out.stdout
    finally:
        w.close()
