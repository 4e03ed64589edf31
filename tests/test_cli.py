"""The CLI tour of the README, run as a user would: subprocesses against a real daemon."""

import json
import os
import subprocess
import sys

from gpuprovider.testing import free_port, wait_for

PY = sys.executable


def test_tour(provider):
    ran = provider.cli(
        "task",
        "run",
        "--gpu",
        "1",
        "--name",
        "hello",
        "--",
        PY,
        "-c",
        "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])",
    )
    assert ran.returncode == 0, ran.stderr
    assert "hello" in ran.stdout
    logs = provider.cli("task", "logs", "hello", "--follow")
    assert logs.returncode == 0 and logs.stdout.strip() in ("0", "1")
    listed = provider.cli("task", "list")
    assert listed.returncode == 0 and "hello" in listed.stdout and "succeeded" in listed.stdout
    got = provider.cli("task", "get", "hello")
    assert got.returncode == 0
    for text in ("succeeded", "exited with code 0", "placed on", "[simulated]", "Events"):
        assert text in got.stdout, text
    nodes = provider.cli("node", "list")
    assert nodes.returncode == 0 and "3 simulated" in nodes.stdout
    gpus = provider.cli("gpu", "list")
    assert gpus.returncode == 0 and gpus.stdout.count("[simulated]") == 3


def test_json_on_every_listing(provider):
    provider.submit(name="json-job", command=["true"])
    for args in (
        ("task", "list"),
        ("node", "list"),
        ("gpu", "list"),
        ("token", "list"),
        ("task", "get", "json-job"),
    ):
        done = provider.cli(*args, "--json")
        assert done.returncode == 0, (args, done.stderr)
        json.loads(done.stdout)


def test_every_listing_reads_at_80_columns(provider):
    """No line wider than the terminal, no id, model name or header broken inside a
    word (#28: `gpu list` wrapped `h100-8 / 0gb-sx / m`)."""
    provider.submit(
        name="a-rather-long-name-for-a-training-run", command=["sleep", "30"], resources={"gpu": 1}
    )
    provider.submit(name="waits", command=["true"], resources={"gpu": "H100:3"})
    running = provider.wait_state("a-rather-long-name-for-a-training-run", "running")
    waiting = provider.wait_state("waits", "queued")
    node = provider.api.get("/nodes").json()[0]
    intact = {
        ("task", "list"): [running["id"], waiting["id"], "training-", "H100:3", "REASON"],
        ("task", "get", "waits"): ["no node has 3"],
        ("node", "list"): [node["name"], "HEARTBEAT", "simulated)"],
        ("gpu", "list"): [f"{node['name']}/0", "h100-80gb-", "[simulated]", running["id"]],
        ("token", "list"): ["admin"],
        ("service", "list"): ["READY/LIVE/WANTED"],
        ("repair", "rules"): ["xid-high-single-bit-rate", "cordon_gpu,"],
        ("repair", "events"): ["OUTCOME"],
        ("market", "status"): ["RELIABILITY"],
        ("accounting",): ["BOOKED GPU-H"],
    }
    for args, words in intact.items():
        done = provider.cli(*args, columns=80)
        assert done.returncode == 0, (args, done.stderr)
        lines = done.stdout.splitlines()
        assert all(len(line) <= 80 for line in lines), done.stdout
        for word in words:
            assert any(word in line for line in lines), (args, word, done.stdout)
    provider.cli("task", "cancel", running["id"])
    provider.cli("task", "cancel", waiting["id"])


def test_cancel_and_queued_reason(provider):
    provider.cli("task", "run", "--name", "sleepy", "--", PY, "-c", "import time; time.sleep(60)")
    provider.wait_state("sleepy", "running")
    cancelled = provider.cli("task", "cancel", "sleepy")
    assert cancelled.returncode == 0 and "cancelling" in cancelled.stdout
    provider.wait_state("sleepy", "cancelled")
    provider.cli("task", "run", "--name", "big", "--gpu", "H100:2", "--", "true")
    provider.cli("task", "run", "--name", "bigger", "--gpu", "H100:3", "--", "true")
    provider.wait_state("bigger", "queued")
    listed = provider.cli("task", "list", "--state", "queued")
    assert "no node has 3 H100 free" in listed.stdout
    dry = provider.cli("task", "run", "--dry-run", "--gpu", "H100:3", "--", "true")
    assert dry.returncode == 3 and "even when idle" in dry.stdout
    assert provider.cli("task", "run", "--dry-run", "--gpu", "1", "--", "true").returncode == 0
    provider.cli("task", "cancel", "bigger")


def test_a_request_larger_than_every_node_is_refused_at_submit(provider):
    """`--cpu 8` on a 2-core machine is refused, not queued forever (#28)."""
    node = provider.api.get("/nodes").json()[0]
    cores = node["cpu_count"]
    huge = ["--gpu", "16", "--cpu", str(cores + 1), "--", "true"]
    refused = provider.cli("task", "run", "--name", "huge", *huge)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    message = " ".join(refused.stderr.split())
    assert f"asks for {cores + 1} CPU and 16 GPU(s), more than any node has" in message
    assert f"the largest is {node['name']} with {cores} CPU" in message and "3 GPU(s)" in message
    dry = provider.cli("task", "run", "--dry-run", *huge)
    assert dry.returncode == 3 and "would be refused" in dry.stdout
    assert provider.api.get("/tasks/huge").status_code == 404


def test_submit_from_yaml_file(provider, tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: from-file\ncommand: [{PY}, -c, 'print(42)']\nresources:\n  gpu: 0.5\n")
    done = provider.cli("task", "submit", "-f", str(spec))
    assert done.returncode == 0, done.stderr
    provider.wait_state("from-file", "succeeded")
    assert provider.cli("task", "logs", "from-file").stdout == "42\n"


def test_exit_codes_for_bad_input(provider, tmp_path):
    unknown = provider.cli("task", "run", "--gpu", "H900:1", "--", "true")
    assert unknown.returncode == 2 and "unknown GPU model 'H900'" in unknown.stderr
    missing = provider.cli("task", "get", "no-such-task")
    assert missing.returncode == 2 and "no task with id or name" in missing.stderr
    usage = provider.cli("task", "list", "--colour")
    assert usage.returncode == 2
    bad_env = provider.cli("task", "run", "--env", "NOEQUALS", "--", "true")
    assert bad_env.returncode == 2 and "KEY=VALUE" in bad_env.stderr
    not_yaml = tmp_path / "bad.yaml"
    not_yaml.write_text("name: [unclosed\n")
    assert provider.cli("task", "submit", "-f", str(not_yaml)).returncode == 2
    assert provider.cli("task", "submit", "-f", str(tmp_path / "absent.yaml")).returncode == 2
    deep = tmp_path / "deep.yaml"
    deep.write_text("command: [true]\nlabels: " + "[" * 20000 + "]" * 20000 + "\n")
    refused = provider.cli("task", "submit", "-f", str(deep))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    wrong_token = provider.cli("--token", "gpp_wrong", "task", "list")
    assert wrong_token.returncode == 2 and "unknown token" in wrong_token.stderr


def test_unreachable_provider_exits_1(provider):
    done = provider.cli("--url", f"http://127.0.0.1:{free_port()}", "task", "list")
    assert done.returncode == 1 and "cannot reach the provider" in done.stderr


def test_task_get_shows_reasons_verbatim(provider):
    provider.cli("task", "run", "--name", "exits-3", "--", "sh", "-c", "exit 3")
    provider.wait_state("exits-3", "failed")
    got = provider.cli("task", "get", "exits-3")
    assert got.returncode == 0 and "exited with code 3" in got.stdout
    assert "preempted 0x" in got.stdout
    cores = str(provider.api.get("/nodes").json()[0]["cpu_count"])
    provider.cli("task", "run", "--name", "holder", "--cpu", "1", "--", "sleep", "60")
    provider.wait_state("holder", "running")
    provider.cli("task", "run", "--name", "picky", "--gpu", "1", "--cpu", cores, "--", "true")
    reason = wait_for(lambda: "CPU" in (t := provider.task("picky"))["reason"] and t["reason"])
    shown = " ".join(provider.cli("task", "get", "picky").stdout.split())
    assert reason in shown  # "vm: not enough free CPU (at most 1 of 2 cores)", brackets and all
    provider.cli("task", "cancel", "picky")
    provider.cli("task", "cancel", "holder")


def test_commands_that_talk_to_the_api_load_no_server(provider):
    """A command that only asks the API loads neither the daemon nor the hub, the
    gateway or the store: those would cost every call a second or more."""
    servers = ["gpuprovider.daemon.daemon", "gpuprovider.hub.app", "gpuprovider.gateway.router"]
    servers += ["fastapi", "sqlalchemy", "alembic", "ray"]
    code = (
        "import sys\n"
        "from gpuprovider.cli.main import run\n"
        "sys.argv = ['gpuprovider', *sys.argv[1:]]\n"
        "try:\n"
        "    run()\n"
        "finally:\n"
        f"    print('loaded:', [m for m in {servers!r} if m in sys.modules], file=sys.stderr)\n"
    )
    env = {"GPUPROVIDER_HOME": str(provider.home.root)}
    for command in (["task", "list"], ["node", "list"], ["gpu", "history", "GPU-x"]):
        ran = subprocess.run(
            [PY, "-c", code, *command], capture_output=True, text=True, env=os.environ | env
        )
        assert "loaded: []" in ran.stderr, (command, ran.stderr)
    help_text = provider.cli("--help").stdout
    for name in ("init", "up", "task", "node", "gpu", "hub", "accounting"):
        assert f" {name} " in help_text
