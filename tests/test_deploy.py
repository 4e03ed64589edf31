"""What deploy/ ships for Prometheus and Grafana users: the alert rules pass promtool's
own tests and mirror the daemon's shipped repair rules, and a real Prometheus (Debian's)
on 127.0.0.1 scrapes a real daemon with a metrics-scope token and loads the rules;
every metric the Grafana dashboard draws is one the daemon serves."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from gpuprovider.telemetry.rules import DEFAULT_RULES
from gpuprovider.testing import Provider, StandinGpus, free_port, make_home, wait_for, watch_home

DEPLOY = Path(__file__).parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: `make test` installs Debian's prometheus"
)


@needs_promtool
def test_the_shipped_alert_rules_pass_promtool():
    checked = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [PROMTOOL, "test", "rules", "rules_test.yml"],
        capture_output=True,
        text=True,
        cwd=RULES.parent,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_shipped_repair_rule_has_its_prometheus_alert():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    mirrored = {r["labels"].get("rule") for g in groups for r in g["rules"]}
    assert {rule.name for rule in DEFAULT_RULES} <= mirrored


def _dashboard_metrics() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "gpuprovider.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    found = {m for e in exprs for m in re.findall(r"gpuprovider_[a-z_]+", e)}
    return {re.sub(r"_(bucket|count|sum)$", "", m) for m in found}


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus missing: `make test` installs it")
def test_a_real_prometheus_scrapes_the_daemon_and_loads_the_rules(tmp_path):
    port = free_port()
    home = make_home(tmp_path / "home", port, gpus="")
    (tmp_path / "kern.log").write_text("")
    watch_home(home, tmp_path / "kern.log")
    gpus = StandinGpus(tmp_path / "nvml.json", 2)
    provider = Provider(home, port)
    provider.env = gpus.env
    provider.start()
    prometheus = None
    try:
        made = provider.api.post("/tokens", json={"name": "prometheus", "scopes": ["metrics"]})
        token_file = tmp_path / "token"
        token_file.write_text(made.json()["token"])
        config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(RULES)]
        job = config["scrape_configs"][0]
        job["authorization"]["credentials_file"] = str(token_file)
        job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        web = free_port()
        prometheus = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{web}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "prometheus.log").open("wb"),
        )
        api = f"http://127.0.0.1:{web}/api/v1"

        def query(expr: str) -> list:
            try:
                answer = httpx.get(f"{api}/query", params={"query": expr}, timeout=5)
            except httpx.TransportError:
                return []
            return answer.json()["data"]["result"] if answer.status_code == 200 else []

        up = wait_for(lambda: query('up{job="gpuprovider"} == 1'), 60, "a successful scrape")
        assert up[0]["metric"]["instance"] == f"127.0.0.1:{port}"
        utilisation = wait_for(
            lambda: query("gpuprovider_gpu_utilization_ratio"), 30, "GPU telemetry in Prometheus"
        )
        assert {r["metric"]["uuid"] for r in utilisation} == {g["uuid"] for g in gpus.gpus}
        rules = httpx.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
        loaded = [r for g in rules for r in g["rules"]]
        assert len(loaded) >= len(DEFAULT_RULES) and all(r["health"] != "err" for r in loaded)

        # a task on a GPU, one that fails, an XID: every family the dashboard draws exists
        provider.submit(command=["sleep", "60"], resources={"gpu": "1"})
        provider.submit(command=["false"])
        with (tmp_path / "kern.log").open("a") as f:
            f.write(gpus.kernel_line(0, 13, "an application's own fault"))
        headers = {"Authorization": f"Bearer {made.json()['token']}"}

        def served() -> set[str]:
            text = httpx.get(provider.url + "/metrics", headers=headers).text
            return set(re.findall(r"^# TYPE (gpuprovider_[a-z_]+)", text, re.M))

        names = wait_for(
            lambda: (
                {
                    "gpuprovider_gpu_booked_seconds_total",
                    "gpuprovider_task_failures_total",
                    "gpuprovider_gpu_xid_errors_total",
                }
                <= (n := served())
                and n
            ),
            30,
            "accounting, failures and XIDs in /metrics",
        )
        missing = _dashboard_metrics() - names
        assert missing == set(), "the dashboard draws metrics the daemon never serves"
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(10)
        provider.stop()


@pytest.mark.slow
def test_gpu_sh_runs_what_it_can_and_says_what_it_skipped(tmp_path):
    script = Path(__file__).parent.parent / "bench" / "gpu.sh"
    done = subprocess.run(
        [str(script), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "out" / "gpu.json").read_text())
    steps = [
        "nvml",
        "telemetry",
        "check",
        "identity",
        "proof",
        "calibration",
        "tradeoff",
        "metrics",
    ]
    for step in steps:
        assert result[step]["status"] in ("ran", "skipped"), result[step]
        if result[step]["status"] == "skipped":
            assert result[step]["why"], f"{step} skipped without saying why"
            assert f"{step:12} skipped" in done.stdout
    assert result["check"]["status"] == "ran" and (tmp_path / "out" / "check.html").exists()
    assert result["metrics"]["status"] == "ran"
    assert json.loads(done.stdout.strip().splitlines()[-1])["check"]["status"] == "ran"
