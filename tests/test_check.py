"""`gpuprovider check`: status logic, catalogue, outputs, bad input and the daemon's use."""

import json
import re
import sys
import time

import pytest

from gpuprovider.check import (
    CheckContext,
    Result,
    Status,
    exit_code,
    hardware,
    run_checks,
    select,
    summary,
)
from gpuprovider.check.registry import GROUPS, Check
from gpuprovider.check.report import as_html, report_data
from gpuprovider.check.result import graded
from gpuprovider.config import ProviderConfig
from gpuprovider.domain import catalogue
from gpuprovider.domain.records import GpuRecord
from gpuprovider.inventory.local import NvmlReport

REQUIRED_MODELS = [
    "h200-141gb-sxm", "h100-80gb-sxm", "h100-80gb-pcie", "h100-94gb-nvl", "a100-40gb-sxm",
    "a100-80gb-sxm", "a100-40gb-pcie", "a100-80gb-pcie", "a10-24gb", "a10g-24gb", "l4-24gb",
    "l40-48gb", "l40s-48gb", "a40-48gb", "rtx-a6000-48gb", "rtx-6000-ada-48gb",
    "rtx-5090-32gb", "rtx-4090-24gb", "rtx-3090-24gb", "t4-16gb", "v100-16gb", "v100-32gb",
]  # fmt: skip


def test_graded_thresholds_both_directions():
    assert graded(96, pass_at=95) is Status.PASS
    assert graded(94, pass_at=95) is Status.FAIL
    assert graded(40, pass_at=50, warn_at=30) is Status.WARN
    assert graded(20, pass_at=50, warn_at=30) is Status.FAIL
    assert graded(80, pass_at=83, warn_at=90, higher_is_better=False) is Status.PASS
    assert graded(85, pass_at=83, warn_at=90, higher_is_better=False) is Status.WARN
    assert graded(95, pass_at=83, warn_at=90, higher_is_better=False) is Status.FAIL


def test_summary_and_exit_code():
    results = [Result(Status.PASS), Result(Status.WARN), Result(Status.SKIP)]
    assert exit_code(results) == 0
    assert summary(results) == {"PASS": 1, "WARN": 1, "FAIL": 0, "SKIP": 1}
    assert exit_code([*results, Result(Status.FAIL)]) == 1


def test_catalogue_has_every_figure_with_a_source():
    models = catalogue.models()
    for model_id in REQUIRED_MODELS:
        model = models[model_id]
        assert model.peak["fp32"] > 0 and model.bandwidth_gbs > 0, model_id
        assert model.perf_source and model.source
        assert all(v > 0 for v in model.peak.values())
        # dense tensor throughput is never below the plain fp32 rate where it exists
        for dtype in ("tf32", "bf16", "fp16", "int8"):
            if dtype in model.peak:
                assert model.peak[dtype] >= model.peak["fp32"], (model_id, dtype)
    assert "bf16" not in models["t4-16gb"].peak and "tf32" not in models["v100-32gb"].peak
    assert models["h100-80gb-sxm"].peak["bf16"] == 989.5  # dense, not the sparse 1979
    assert catalogue.from_device_name("NVIDIA H100 PCIe", 81559)[0] == "h100-80gb-pcie"
    assert catalogue.resolve("L40S") == {"l40s-48gb"}


def ctx(tmp_path, gpus=(), **config) -> CheckContext:
    return CheckContext(
        ProviderConfig.model_validate(config),
        tmp_path,
        scale=0.02,
        nvml=NvmlReport(gpus=list(gpus), unavailable_reason="" if gpus else "no driver (test)"),
    )


def test_a_check_that_raises_is_a_fail_and_the_suite_goes_on(tmp_path):
    def broken(_ctx):
        raise RuntimeError("sensor on fire")

    checks = [Check("hardware", "broken", "Broken", broken), *select(["preflight"])]
    run = run_checks(ctx(tmp_path), checks)
    first = run.results[0]
    assert (first.key, first.status) == ("hardware/broken", Status.FAIL)
    assert "RuntimeError: sensor on fire" in first.advice
    assert {r.group for r in run.results[1:]} == {"preflight"} and len(run.results) > 5


def test_fit_to_sell_only_when_a_gpu_was_measured(tmp_path):
    """A box whose GPU checks all skipped is never called fit to sell (#28)."""

    def gpu_check(status):
        return Check("hardware", "g", "G", lambda _c: Result(status, advice="x"), gpu=True)

    host = Check("hardware", "h", "H", lambda _c: Result(Status.PASS))
    skipped = run_checks(ctx(tmp_path), [host, gpu_check(Status.SKIP)])
    measured = run_checks(ctx(tmp_path), [host, gpu_check(Status.PASS)])
    failed = run_checks(ctx(tmp_path), [host, gpu_check(Status.FAIL)])
    assert (skipped.gpu_measured, measured.gpu_measured) == (False, True)
    verdicts = [
        report_data(r.results, r.started_at, r.wall_s, "n", r.gpu_measured)["verdict"]
        for r in (skipped, measured, failed)
    ]
    assert verdicts[0].startswith("NO GPU MEASURED")
    assert verdicts[1:] == ["FIT TO SELL", "NOT FIT: fix the FAILs"]
    assert all(c.gpu for c in select() if c.name in ("gpus", "vram", "gemm", "pytorch"))


def test_cpu_machine_gives_pass_or_skip_with_reasons(tmp_path):
    run = run_checks(ctx(tmp_path), select(["hardware", "compute", "workload"]))
    by_key = {r.key: r for r in run.results}
    for key in ("hardware/cpu-cores", "hardware/memory-bandwidth", "hardware/disk-write"):
        assert by_key[key].status is Status.PASS and by_key[key].value
    for key in ("hardware/vram", "compute/gemm", "workload/pytorch"):
        assert by_key[key].status is Status.SKIP
        assert "no NVIDIA GPU" in by_key[key].advice
    assert not list(tmp_path.iterdir()), "the disk check left its file behind"


def gpu(index=0, model="h100-80gb-sxm") -> GpuRecord:
    return GpuRecord(f"GPU-{index}", "n", index, model, "NVIDIA H100 80GB HBM3", 81559, 80, False)


def test_config_declaring_gpus_the_machine_lacks_fails_naming_the_mismatch(tmp_path):
    expected = {"inventory": {"expected_gpus": [{"model": "h100", "count": 2}]}}
    with pytest.raises(ValueError):  # "h100" names several models: the config must pick one
        ProviderConfig.model_validate(expected)
    expected["inventory"]["expected_gpus"][0]["model"] = "h100-80gb-sxm"
    result = hardware.gpus_present(ctx(tmp_path, [gpu(0)], **expected))
    assert result.status is Status.FAIL
    assert "expected 2 x h100-80gb-sxm, found 1" in result.advice
    none = hardware.gpus_present(ctx(tmp_path, [], **expected))
    assert none.status is Status.FAIL and "found 0" in none.advice
    ok = hardware.gpus_present(ctx(tmp_path, [gpu(0), gpu(1)], **expected))
    assert ok.status is Status.PASS and ok.value == "2 x h100-80gb-sxm"


class FakeNvml:
    """The few NVML calls the ECC and health checks make, with values set per test."""

    NVMLError = Exception
    NVMLError_NotSupported = type("NotSupported", (Exception,), {})
    NVML_AGGREGATE_ECC = 1
    NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, uncorrected=0, corrected=0, temp=50, throttle=0):
        self.errors = {0: corrected, 1: uncorrected}
        self.temp, self.throttle = temp, throttle

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return uuid

    def nvmlDeviceGetEccMode(self, handle):
        return 1, 1

    def nvmlDeviceGetTotalEccErrors(self, handle, kind, counter):
        return self.errors[kind]

    def nvmlDeviceGetRemappedRows(self, handle):
        return 0, 0, 0, 0

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle):
        return self.throttle

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return self.temp

    def nvmlDeviceGetPowerUsage(self, handle):
        return 300_000

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700_000


@pytest.mark.parametrize(
    ("fake", "ecc", "health"),
    [
        (FakeNvml(), Status.PASS, Status.PASS),
        (FakeNvml(corrected=3), Status.WARN, Status.PASS),
        (FakeNvml(uncorrected=1), Status.FAIL, Status.PASS),
        (FakeNvml(temp=86), Status.PASS, Status.WARN),
        (FakeNvml(temp=93), Status.PASS, Status.FAIL),
        (FakeNvml(throttle=0x40), Status.PASS, Status.WARN),  # hardware thermal slowdown
        (FakeNvml(throttle=0x1), Status.PASS, Status.PASS),  # idle: normal
    ],
)
def test_nvml_gpu_checks_grade_what_the_driver_reports(monkeypatch, fake, ecc, health):
    monkeypatch.setattr(hardware, "pynvml", fake)
    found = hardware._ecc(gpu(0))
    assert found.status is ecc and found.gpu_uuid == "GPU-0" and found.subject == "GPU 0"
    assert (found.advice != "") == (ecc is not Status.PASS)
    assert hardware._health(gpu(0)).status is health


def test_workload_comparison_runs_the_same_model_on_both_sides():
    torch = pytest.importorskip("torch")
    from gpuprovider.check.workload import compare_with_cpu

    diff = compare_with_cpu(torch, "cpu")
    assert diff["train"] == 0.0 and diff["inference"] == 0.0


def test_html_report_is_self_contained_and_charts_gpus(tmp_path):
    results = [
        Result(Status.PASS, 700.0, "TFLOPS", subject="GPU 0", gpu_uuid="GPU-0", name="gemm-bf16",
               group="compute", data={"dtype": "bf16", "pct_of_peak": 70.7}),
        Result(Status.PASS, 2900.0, "GB/s", subject="GPU 0", gpu_uuid="GPU-0",
               name="device-memory", group="compute", data={"pct_of_peak": 86.6}),
        Result(Status.FAIL, 91.0, "%", subject="GPU 0", name="vram", group="hardware",
               advice="<b>replace</b> it"),
    ]  # fmt: skip
    page = as_html(report_data(results, time.time(), 1.5, "n-1", gpu_measured=True))
    assert "NOT FIT" in page and page.count("<svg") == 2 and "GPU 0 bf16" in page
    assert "&lt;b&gt;replace&lt;/b&gt;" in page  # escaped, never markup
    assert not re.search(r"(src|href)=|<script|<link|@import|url\(", page)  # opens offline


def run_cli(provider, *args):
    return provider.cli("check", "--quick", *args, timeout=120)


def test_cli_runs_every_group_stores_and_serves_results(provider, tmp_path):
    report = tmp_path / "report.html"
    done = run_cli(provider, "--json", "--report", str(report))
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(done.stdout)
    assert {r["group"] for r in data["results"]} == set(GROUPS)
    assert data["summary"]["FAIL"] == 0 and data["exit_code"] == 0
    for r in data["results"]:
        assert r["status"] in ("PASS", "WARN", "SKIP") and r["name"]
        assert r["status"] == "PASS" or r["advice"], r  # every non-pass says what to do
    # the test home offers declared GPUs only, whatever this machine has: no GPU is measured
    vram = next(r for r in data["results"] if r["group"] == "hardware" and r["name"] == "vram")
    assert vram["status"] == "SKIP" and "[inventory] nvml = false" in vram["advice"]
    assert report.read_text().startswith("<!doctype html>")
    node = provider.api.get("/nodes").json()[0]
    served = provider.api.get(f"/nodes/{node['name']}/checks").json()
    assert {r["key"] for r in served["results"]} >= {r["group"] + "/" + r["name"]
                                                     for r in data["results"]
                                                     if r["subject"] == data["host"]}  # fmt: skip
    # every GPU check skipped: never "fit to sell", whatever else passed (#28)
    assert data["verdict"].startswith("NO GPU MEASURED") and "FIT TO SELL" not in report.read_text()
    assert all(r["subject"] for r in data["results"])  # a whole-node result names the host
    table = run_cli(provider, "--only", "preflight", "--no-store")
    assert "NO GPU MEASURED" in table.stdout and "FIT TO SELL" not in table.stdout
    shown = provider.cli("node", "checks")
    assert shown.returncode == 0 and "hardware/memory-bandwidth" in shown.stdout
    assert provider.api.get("/nodes/nope/checks").status_code == 404


def test_cli_rejects_unknown_group_and_unwritable_report(provider, tmp_path):
    bad = run_cli(provider, "--only", "gpu-burn")
    assert bad.returncode == 2 and "unknown check group 'gpu-burn'" in bad.stderr
    blocked = tmp_path / "a-file"  # tests may run as root: a file as the parent blocks anyone
    blocked.write_text("")
    unwritable = run_cli(provider, "--only", "preflight", "--report", str(blocked / "r.html"))
    assert unwritable.returncode == 2 and "cannot write the report" in unwritable.stderr
    assert "Not a directory" in unwritable.stderr
    missing = run_cli(provider, "--only", "preflight", "--report", "/nonexistent/dir/r.html")
    assert missing.returncode == 2 and "No such file or directory" in missing.stderr


def test_config_gpu_mismatch_exits_1_from_the_cli(fresh_provider):
    home = fresh_provider.home
    home.config.write_text(
        home.config.read_text() + '\n[[inventory.expected_gpus]]\nmodel = "a100-80gb-sxm"\n'
    )
    done = fresh_provider.cli("check", "--quick", "--only", "hardware")
    assert done.returncode == 1
    assert "expected 1 x a100-80gb-sxm, found 0" in done.stdout


def test_failed_gpu_gets_no_new_work_and_says_why(fresh_provider):
    p = fresh_provider
    p.start()
    assert "preflight:" in p.log()  # `up` ran the preflight group and logged its summary
    node = p.api.get("/nodes").json()[0]
    assert any(
        r["group"] == "preflight"
        for r in p.api.get(f"/nodes/{node['id']}/checks").json()["results"]
    )
    h100s = [g for g in p.api.get("/gpus").json() if g["model"] == "h100-80gb-sxm"]
    bad = h100s[0]
    failed = Result(Status.FAIL, 60.0, "%", subject=f"GPU {bad['index']}", gpu_uuid=bad["uuid"],
                    group="hardware", name="vram", advice="replace the card")  # fmt: skip
    post_results(p, node["id"], failed)
    listed = p.cli("gpu", "list")
    assert "failed" in listed.stdout
    node = p.api.get("/nodes").json()[0]
    assert node["unusable_gpus"][0]["uuid"] == bad["uuid"]
    assert "hardware/vram" in node["unusable_gpus"][0]["reason"]
    # H100 work now fits only on the other H100; a second task waits, saying why
    first = p.submit(name="on-good", command=[sys.executable, "-c", "import time; time.sleep(30)"],
                     resources={"gpu": "H100:1"})  # fmt: skip
    p.wait_state(first["id"], "running")
    assert [g["uuid"] for g in p.task(first["id"])["allocation"]["gpus"]] != [bad["uuid"]]
    second = p.submit(name="waits", command=["true"], resources={"gpu": "H100:1"})
    waiting = wait_for_reason(p, second["id"], "last check FAILed")
    assert "hardware/vram" in waiting["reason"]
    # a passing result clears the GPU and the waiting task runs on it
    passed = Result(Status.PASS, 99.0, "%", subject=failed.subject, gpu_uuid=bad["uuid"],
                    group="hardware", name="vram")  # fmt: skip
    post_results(p, node["id"], passed)
    p.wait_state(second["id"], "succeeded")
    p.cancel_all()


def post_results(p, node_id, *results):
    """What `gpuprovider check` sends to a running provider."""
    body = {"ran_at": time.time(), "results": [r.to_dict() for r in results]}
    response = p.api.post(f"/nodes/{node_id}/checks", json=body)
    assert response.status_code == 200, response.text


def wait_for_reason(p, task_id, text):
    from gpuprovider.testing import wait_for

    return wait_for(
        lambda: (t := p.task(task_id))["state"] == "queued" and text in t["reason"] and t,
        what=f"queued reason mentioning {text!r}",
    )
