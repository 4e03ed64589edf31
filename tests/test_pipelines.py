"""Multi-stage pipelines against a real daemon: stages as tasks the pipeline owns,
pools, failure levels, pause/resume, wait stages, batching, restart safety, and
hostile specs refused with the field named."""

import random
import signal
import time
from pathlib import Path

import pytest

from gpuprovider.testing import Provider, wait_for

PY = "/usr/bin/python3"


def job(body: str) -> list[str]:
    return [PY, "-c", body]


def mark(folder: Path, name: str, code: int = 0, extra: str = "") -> list[str]:
    """A stage that appends its name to `folder`/runs.txt, then exits `code`."""
    return job(
        f"import sys, time\n{extra}\n"
        f"open({str(folder / 'runs.txt')!r}, 'a').write({name!r} + '\\n')\n"
        f"sys.exit({code})\n"
    )


def runs(folder: Path) -> list[str]:
    path = folder / "runs.txt"
    return path.read_text().split() if path.exists() else []


def submit(p: Provider, spec: dict, status: int = 201) -> dict:
    answer = p.api.post("/pipelines", json={"kind": "pipeline", **spec})
    assert answer.status_code == status, answer.text
    return answer.json()


def pipeline(p: Provider, ref: str) -> dict:
    answer = p.api.get(f"/pipelines/{ref}")
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_pipeline(p: Provider, ref: str, state: str, timeout: float = 30) -> dict:
    return wait_for(
        lambda: (found := pipeline(p, ref))["state"] == state and found,
        timeout,
        f"pipeline {ref} to be {state}",
    )


def stages(view: dict) -> dict[str, dict]:
    return {s["name"]: s for s in view["stages"]}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


def test_a_chain_runs_in_order_and_succeeds(provider, folder):
    made = submit(
        provider,
        {
            "name": "chain",
            "stages": [
                {"name": "a", "command": mark(folder, "a")},
                {"name": "b", "after": ["a"], "command": mark(folder, "b")},
                {"name": "c", "after": ["b"], "command": mark(folder, "c")},
            ],
        },
    )
    done = wait_pipeline(provider, made["id"], "succeeded")
    assert runs(folder) == ["a", "b", "c"]
    assert all(s["state"] == "done" for s in done["stages"])
    task = provider.task(stages(done)["b"]["task"])
    assert task["state"] == "succeeded"


def counter_stage(folder: Path, name: str, fail_times: int, code: int) -> list[str]:
    """A stage that fails `fail_times` times with `code`, then succeeds."""
    return job(
        "import pathlib, sys\n"
        f"path = pathlib.Path({str(folder / (name + '.count'))!r})\n"
        "n = int(path.read_text()) if path.exists() else 0\n"
        "path.write_text(str(n + 1))\n"
        f"open({str(folder / 'runs.txt')!r}, 'a').write({name!r} + '\\n')\n"
        f"sys.exit({code} if n < {fail_times} else 0)\n"
    )


def test_temporary_failures_retry_at_the_interval_then_succeed(provider, folder):
    made = submit(
        provider,
        {
            "stages": [
                {
                    "name": "flaky",
                    "command": counter_stage(folder, "flaky", 2, 75),
                    "failure": {
                        "exit_codes": {"temporary": [75]},
                        "max_retries": 3,
                        "retry_interval_s": 0.2,
                    },
                },
                {"name": "next", "after": ["flaky"], "command": mark(folder, "next")},
            ]
        },
    )
    done = wait_pipeline(provider, made["id"], "succeeded")
    assert runs(folder) == ["flaky", "flaky", "flaky", "next"]
    flaky = stages(done)["flaky"]
    assert flaky["attempts"] == 2 and flaky["state"] == "done"
    history = provider.api.get("/events", params={"kind": "stage", "id": f"{made['id']}.flaky"})
    reasons = [e["reason"] for e in history.json()["events"]]
    assert any("temporary: retry 1 of 3" in r for r in reasons), reasons


def test_temporary_failures_past_max_retries_are_permanent_and_pause(provider, folder):
    made = submit(
        provider,
        {
            "stages": [
                {
                    "name": "flaky",
                    "command": counter_stage(folder, "flaky", 10, 75),
                    "failure": {
                        "exit_codes": {"temporary": [75]},
                        "max_retries": 1,
                        "retry_interval_s": 0,
                    },
                }
            ]
        },
    )
    paused = wait_pipeline(provider, made["id"], "paused")
    flaky = stages(paused)["flaky"]
    assert flaky["state"] == "failed" and flaky["level"] == "permanent"
    assert "retried 1 times" in flaky["reason"]
    assert "waiting for a person" in paused["reason"]
    assert runs(folder) == ["flaky", "flaky"]


def test_permanent_failure_pauses_and_resume_runs_the_failed_stage_again(provider, folder):
    made = submit(
        provider,
        {
            "stages": [
                {"name": "a", "command": mark(folder, "a")},
                {"name": "b", "after": ["a"], "command": counter_stage(folder, "b", 1, 3)},
                {"name": "c", "after": ["b"], "command": mark(folder, "c")},
            ]
        },
    )
    paused = wait_pipeline(provider, made["id"], "paused")
    assert stages(paused)["b"]["level"] == "permanent"
    assert stages(paused)["c"]["state"] == "waiting"
    assert "exited with code 3" in stages(paused)["b"]["reason"]
    resumed = provider.api.post(f"/pipelines/{made['id']}/resume")
    assert resumed.status_code == 200, resumed.text
    wait_pipeline(provider, made["id"], "succeeded")
    assert runs(folder) == ["a", "b", "b", "c"]  # a never ran again


def test_resume_from_a_stage_runs_it_and_every_later_one_again(provider, folder):
    made = submit(
        provider,
        {
            "stages": [
                {"name": "a", "command": mark(folder, "a")},
                {"name": "b", "after": ["a"], "command": mark(folder, "b")},
                {"name": "c", "after": ["b"], "command": counter_stage(folder, "c", 1, 9)},
            ]
        },
    )
    wait_pipeline(provider, made["id"], "paused")
    resumed = provider.api.post(f"/pipelines/{made['id']}/resume", params={"from": "b"})
    assert resumed.status_code == 200, resumed.text
    wait_pipeline(provider, made["id"], "succeeded")
    assert runs(folder) == ["a", "b", "c", "b", "c"]
    unknown = provider.api.post(f"/pipelines/{made['id']}/resume", params={"from": "zz"})
    assert unknown.status_code == 409  # it is not paused any more


def status_stage(folder: Path, payload: str, code: int = 0) -> list[str]:
    return job(
        f"import sys\nopen('gpuprovider-status.json', 'w').write({payload})\nsys.exit({code})\n"
    )


@pytest.mark.parametrize(
    "payload, level, words",
    [
        ("""'{"level": "critical", "reason": "seed mismatch"}'""", "critical", "seed mismatch"),
        ("'{not json'", "permanent", "not JSON"),
        ("""'{"level": "sideways"}'""", "permanent", "none of ok"),
        ("'[' * 100000", "permanent", "bytes"),
    ],
)
def test_a_status_file_says_the_level_and_a_bad_one_is_permanent(
    provider, folder, payload, level, words
):
    made = submit(provider, {"stages": [{"name": "s", "command": status_stage(folder, payload)}]})
    paused = wait_pipeline(provider, made["id"], "paused")
    stage = stages(paused)["s"]
    assert stage["level"] == level and words in stage["reason"], stage
    assert provider.api.get("/health").status_code == 200


def test_a_status_file_that_is_a_link_is_not_followed(provider, folder):
    secret = folder / "secret.txt"
    secret.write_text('{"level": "ok", "reason": "TOP SECRET"}')
    body = f"import os\nos.symlink({str(secret)!r}, 'gpuprovider-status.json')\n"
    made = submit(provider, {"stages": [{"name": "s", "command": job(body)}]})
    paused = wait_pipeline(provider, made["id"], "paused")
    stage = stages(paused)["s"]
    assert "link" in stage["reason"] and "TOP SECRET" not in stage["reason"]


def test_pause_with_stop_stops_the_running_stage_and_resume_runs_it_again(provider, folder):
    gate = folder / "gate"
    long = job(
        "import pathlib, time\n"
        f"open({str(folder / 'runs.txt')!r}, 'a').write('long\\n')\n"
        f"while not pathlib.Path({str(gate)!r}).exists(): time.sleep(0.05)\n"
    )
    made = submit(
        provider,
        {
            "stages": [
                {"name": "long", "command": long},
                {"name": "after", "after": ["long"], "command": mark(folder, "after")},
            ]
        },
    )
    wait_for(lambda: runs(folder) == ["long"], what="the stage to start")
    paused = provider.api.post(f"/pipelines/{made['id']}/pause", params={"stop": "true"})
    assert paused.status_code == 200, paused.text
    stopped = wait_for(
        lambda: (
            (v := pipeline(provider, made["id"])) and stages(v)["long"]["state"] == "ready" and v
        ),
        what="the stage to stop",
    )
    assert stopped["state"] == "paused"
    assert provider.api.post(f"/pipelines/{made['id']}/pause").status_code == 409
    gate.touch()
    provider.api.post(f"/pipelines/{made['id']}/resume")
    wait_pipeline(provider, made["id"], "succeeded")
    assert runs(folder) == ["long", "long", "after"]


def test_wait_stages_end_by_timer_and_by_signal(provider, folder):
    made = submit(
        provider,
        {
            "stages": [
                {"name": "seed", "wait": {"signal": True}},
                {"name": "timer", "after": ["seed"], "wait": {"timer_s": 0.3}},
                {"name": "c2", "after": ["timer"], "command": mark(folder, "c2")},
            ]
        },
    )
    held = wait_for(
        lambda: stages(v := pipeline(provider, made["id"]))["seed"]["state"] == "held" and v
    )
    assert held["state"] == "running" and runs(folder) == []
    wrong = provider.api.post(f"/pipelines/{made['id']}/signal", params={"stage": "c2"})
    assert wrong.status_code == 409 and "no signal" in wrong.json()["error"]
    said = provider.api.post(f"/pipelines/{made['id']}/signal", params={"stage": "seed"})
    assert said.status_code == 200, said.text
    wait_pipeline(provider, made["id"], "succeeded")
    assert runs(folder) == ["c2"]


def overlaps(p: Provider, pipeline_ids: list[str], stage: str) -> int:
    """The most runs of `stage` at once, from the stages' start and end times."""
    spans = []
    for ref in pipeline_ids:
        s = stages(pipeline(p, ref))[stage]
        task = p.task(s["task"])
        spans.append((task["started_at"], task["finished_at"]))
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_pool_limits_hold_per_node_and_in_total(provider, folder):
    slow = job("import time; time.sleep(0.4)")
    made = [
        submit(
            provider,
            {
                "stages": [
                    {"name": "pc1", "command": slow},
                    {"name": "pc2", "after": ["pc1"], "command": slow},
                ],
                "pools": {"pc1": {"total": 2}, "pc2": {"per_node": 1}},
            },
        )["id"]
        for _ in range(4)
    ]
    waiting = wait_for(
        lambda: (
            [
                t
                for t in provider.api.get("/tasks", params={"state": "queued"}).json()
                if "pool pc2 is at its limit" in t["reason"]
            ]
            or [
                s
                for ref in made
                for s in pipeline(provider, ref)["stages"]
                if s["name"] == "pc1" and s["state"] == "ready"
            ]
        ),
        what="a stage to wait for its pool",
    )
    assert waiting
    for ref in made:
        wait_pipeline(provider, ref, "succeeded")
    assert overlaps(provider, made, "pc1") <= 2
    assert overlaps(provider, made, "pc2") == 1


def test_a_batch_runs_once_for_its_members_at_its_size(provider, folder):
    batch = job(
        "import os\n"
        "members = os.environ['PIPELINE_BATCH'].replace(' ', ',')\n"
        f"open({str(folder / 'runs.txt')!r}, 'a').write(members + '\\n')\n"
    )
    spec = {
        "stages": [
            {"name": "c2", "command": mark(folder, "c2")},
            {
                "name": "commit",
                "after": ["c2"],
                "command": batch,
                "batch": {"size": 3, "max_wait_s": 3600},
            },
        ]
    }
    made = [submit(provider, spec)["id"] for _ in range(3)]
    for ref in made:
        wait_pipeline(provider, ref, "succeeded")
    lines = [line for line in runs(folder) if line != "c2"]
    assert len(lines) == 1 and sorted(lines[0].split(",")) == sorted(made)
    tasks = {stages(pipeline(provider, ref))["commit"]["task"] for ref in made}
    assert len(tasks) == 1


def test_a_batch_flushes_by_hand_and_at_its_deadline(provider, folder):
    batch = job(
        "import os\n"
        "env = os.environ\n"
        "members = env.get('PIPELINE_BATCH', env['PIPELINE_ID']).replace(' ', ',')\n"
        f"open({str(folder / 'runs.txt')!r}, 'a').write(members + '\\n')\n"
    )

    def spec(wait: float) -> dict:
        return {
            "stages": [
                {"name": "flushme", "command": batch, "batch": {"size": 8, "max_wait_s": wait}},
            ]
        }

    by_hand = [submit(provider, spec(3600))["id"] for _ in range(2)]
    wait_for(
        lambda: all(
            stages(pipeline(provider, r))["flushme"]["state"] == "batching" for r in by_hand
        )
    )
    flushed = provider.api.post("/pipeline-batches/flushme/flush")
    assert flushed.status_code == 200 and flushed.json()["flushed"] == 2
    for ref in by_hand:
        wait_pipeline(provider, ref, "succeeded")
    (folder / "runs.txt").unlink()
    timed = submit(
        provider,
        {"stages": [{"name": "late", "command": batch, "batch": {"size": 8, "max_wait_s": 0.3}}]},
    )
    wait_pipeline(provider, timed["id"], "succeeded")
    assert runs(folder) == [timed["id"]]


@pytest.mark.parametrize(
    "spec, field",
    [
        (
            {
                "stages": [
                    {"name": "a", "after": ["b"], "command": ["x"]},
                    {"name": "b", "after": ["a"], "command": ["x"]},
                ]
            },
            "cycle",
        ),
        ({"stages": [{"name": "a", "after": ["zz"], "command": ["x"]}]}, "stages.a.after"),
        ({"stages": [{"name": "a", "command": ["x"]}], "pools": {"a": {"total": 0}}}, "pools"),
        ({"stages": [{"name": "a", "command": ["x"]}], "pools": {"a": {"per_node": -1}}}, "pools"),
        ({"stages": [{"name": "a", "command": ["x"]}], "pools": {"zz": {"total": 1}}}, "pools.zz"),
        (
            {
                "stages": [
                    {"name": "a", "command": ["x"], "batch": {"size": 10**9, "max_wait_s": 1}}
                ]
            },
            "batch.size",
        ),
        (
            {
                "stages": [
                    {
                        "name": "a",
                        "command": ["x"],
                        "failure": {"exit_codes": {"temporary": [1, 2], "permanent": [2]}},
                    }
                ]
            },
            "code 2",
        ),
        (
            {"stages": [{"name": "a", "command": ["x"], "resources": {"gpu": 64}}]},
            "stages.a.resources",
        ),
        ({"stages": [{"name": "a", "command": ["x"]}], "work_store": "/etc/x"}, "work_store"),
        ({"stages": [{"name": "a", "command": ["x"]}], "work_store": "/tmp/../etc"}, "work_store"),
        ({"stages": [{"name": "a", "command": ["x"]}] * 2}, "repeat"),
        ({"stages": [{"name": f"s{i}", "command": ["x"]} for i in range(65)]}, "stages"),
        (
            {"stages": [{"name": "a", "command": ["x"], "env": {"GPUPROVIDER_TASK_ID": "x"}}]},
            "GPUPROVIDER_TASK_ID",
        ),
        ({"stages": [{"name": "a"}]}, "command"),
        ({"stages": []}, "stages"),
    ],
)
def test_bad_specs_are_refused_naming_the_field_and_store_nothing(provider, spec, field):
    before = provider.api.get("/pipelines", params={"limit": 10000}).json()
    answer = provider.api.post("/pipelines", json={"kind": "pipeline", **spec})
    assert 400 <= answer.status_code < 500, answer.text
    assert field in answer.json()["error"], answer.json()
    assert provider.api.get("/pipelines", params={"limit": 10000}).json() == before


def test_another_tenant_sees_none_of_a_pipeline(provider, folder):
    made = submit(provider, {"stages": [{"name": "s", "wait": {"signal": True}}]})
    other = provider.tenant("pipeline-stranger")
    assert other.get(f"/pipelines/{made['id']}").status_code == 404
    assert other.post(f"/pipelines/{made['id']}/cancel").status_code == 404
    assert other.post(f"/pipelines/{made['id']}/signal", params={"stage": "s"}).status_code == 404
    assert made["id"] not in [v["id"] for v in other.get("/pipelines").json()]
    assert other.post("/pipeline-batches/s/flush").json()["flushed"] == 0
    cancelled = provider.api.post(f"/pipelines/{made['id']}/cancel")
    assert cancelled.status_code == 200
    wait_pipeline(provider, made["id"], "cancelled")


def test_cli_shows_the_stages_as_a_table(provider, folder, tmp_path):
    spec = tmp_path / "p.yaml"
    spec.write_text(
        "kind: pipeline\nname: cli-pipe\nstages:\n"
        f"  - name: one\n    command: [{PY}, -c, 'print(1)']\n"
        "  - name: two\n    after: [one]\n    wait: {signal: true}\n"
    )
    made = provider.cli("pipeline", "submit", "-f", str(spec))
    assert made.returncode == 0, made.stderr
    ref = made.stdout.split()[0]
    wait_for(lambda: stages(pipeline(provider, ref))["two"]["state"] == "held")
    shown = provider.cli("pipeline", "get", "cli-pipe", columns=80)
    assert shown.returncode == 0, shown.stderr
    assert "STAGE" in shown.stdout and "held" in shown.stdout and "done" in shown.stdout
    assert all(len(line) <= 80 for line in shown.stdout.splitlines())
    logs = provider.cli("pipeline", "logs", "cli-pipe", "one")
    assert logs.stdout.strip() == "1"
    assert provider.cli("pipeline", "signal", "cli-pipe", "two").returncode == 0
    wait_pipeline(provider, ref, "succeeded")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: pipeline\nstages:\n  - name: a\n    after: [a]\n    command: [x]\n")
    refused = provider.cli("pipeline", "submit", "-f", str(bad))
    assert refused.returncode == 2 and "stages.a.after" in refused.stderr


def started(
    p: Provider, tmp_path: Path, roots: list[Path] | None = None, text: str = ""
) -> Provider:
    if roots:
        config = p.home.config.read_text()
        listed = ", ".join(f'"{r}"' for r in roots)
        p.home.config.write_text(
            config.replace("workdir_roots = []", f"workdir_roots = [{listed}]") + text
        )
    elif text:
        p.home.config.write_text(p.home.config.read_text() + text)
    p.start()
    return p


def test_a_work_store_is_shared_by_stages_and_cleaned_on_abort(fresh_provider, tmp_path):
    root = tmp_path / "stores"
    root.mkdir()
    p = started(fresh_provider, tmp_path, [root])
    write = job("open('sector.dat', 'w').write('sealed')")
    read = job("import sys; sys.exit(0 if open('sector.dat').read() == 'sealed' else 1)")
    abort = job("import sys; open('partial.dat', 'w').write('x'); sys.exit(42)")
    made = submit(
        p,
        {
            "work_store": str(root),
            "stages": [
                {"name": "write", "command": write},
                {"name": "read", "after": ["write"], "command": read},
                {
                    "name": "bad",
                    "after": ["read"],
                    "command": abort,
                    "failure": {"exit_codes": {"abort": [42]}},
                },
            ],
        },
    )
    store = Path(made["work_store"])
    assert store.parent == root
    ended = wait_pipeline(p, made["id"], "aborted")
    assert stages(ended)["read"]["state"] == "done"
    assert stages(ended)["bad"]["level"] == "abort"
    assert store.is_dir() and list(store.iterdir()) == []  # cleaned
    outside = p.api.post(
        "/pipelines",
        json={
            "kind": "pipeline",
            "work_store": str(tmp_path),
            "stages": [{"name": "a", "command": write}],
        },
    )
    assert outside.status_code == 422 and "work_store" in outside.json()["error"]


def test_tenant_overrides_change_limits_and_retries(fresh_provider, tmp_path, folder):
    text = "\n[pipelines.admin]\nmax_retries = 0\npools.s = { total = 1 }\n"
    p = started(fresh_provider, tmp_path, text=text)
    made = submit(
        p,
        {
            "stages": [
                {
                    "name": "s",
                    "command": counter_stage(folder, "s", 5, 75),
                    "failure": {"exit_codes": {"temporary": [75]}, "max_retries": 5},
                }
            ]
        },
    )
    paused = wait_pipeline(p, made["id"], "paused")
    assert stages(paused)["s"]["level"] == "permanent"
    assert runs(folder) == ["s"]  # the override: no retry
    assert pipeline(p, made["id"])["spec"]["pools"] == {"s": {"total": 1}}


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_no_pipeline_and_runs_no_stage_twice(
    fresh_provider, tmp_path, folder
):
    """The operators' main complaint about venus: state desync after restarts."""
    p = started(fresh_provider, tmp_path)
    step = job(
        "import os, sys, time\n"
        f"out = {str(folder)!r}\n"
        "me = os.environ['PIPELINE_ID'] + '.' + os.environ['PIPELINE_STAGE']\n"
        "open(os.path.join(out, 'runs.txt'), 'a').write(me + '\\n')\n"
        "time.sleep(0.1)\n"
    )
    spec = {
        "stages": [
            {"name": "pc1", "command": step},
            {"name": "pc2", "after": ["pc1"], "command": step, "resources": {"gpu": 1}},
            {"name": "seed", "after": ["pc2"], "wait": {"timer_s": 0.2}},
            {"name": "c2", "after": ["seed"], "command": step, "resources": {"gpu": 1}},
            {
                "name": "commit",
                "after": ["c2"],
                "command": step,
                "batch": {"size": 4, "max_wait_s": 1},
            },
        ],
        "pools": {"pc1": {"total": 4}, "pc2": {"per_node": 1}, "c2": {"per_node": 1}},
    }
    made = [submit(p, spec)["id"] for _ in range(50)]
    rng = random.Random(30)
    for kill in range(3):  # spread over the run: early, midway, late
        enough = 1 + 40 * kill
        wait_for(lambda: len(runs(folder)) >= enough, timeout=120, what="work to run")  # noqa: B023
        time.sleep(rng.uniform(0.2, 1.5))
        p.stop(signal.SIGKILL)
        p.start()
    for ref in made:
        wait_pipeline(p, ref, "succeeded", timeout=300)
    seen = runs(folder)
    # a commit batch writes once per batch (as its first member)
    for ref in made:
        for stage in ("pc1", "pc2", "c2"):
            assert seen.count(f"{ref}.{stage}") == 1, (ref, stage, seen)
    assert overlaps(p, made, "pc2") == 1
    assert overlaps(p, made, "c2") == 1


def test_a_freed_slot_goes_to_the_later_stage_of_a_started_pipeline(provider, folder):
    """The drain policy: when a pool slot frees, the deepest waiting stage takes it
    (the second stage of a started pipeline before the first stage of a new one), so
    work drains rather than piles up."""
    gate = folder / "gate"
    first = job(
        "import os, pathlib, time\n"
        f"while not pathlib.Path({str(gate)!r}).exists(): time.sleep(0.05)\n"
        f"open({str(folder / 'runs.txt')!r}, 'a').write(os.environ['PIPELINE_ID'] + '.a\\n')\n"
    )
    second = job(
        "import os\n"
        f"open({str(folder / 'runs.txt')!r}, 'a').write(os.environ['PIPELINE_ID'] + '.b\\n')\n"
    )
    spec = {
        "stages": [
            {"name": "a", "command": first, "pool": "gpu"},
            {"name": "b", "after": ["a"], "command": second, "pool": "gpu"},
        ],
        "pools": {"gpu": {"total": 1}},
    }
    one = submit(provider, spec)["id"]
    two = submit(provider, spec)["id"]
    assert stages(pipeline(provider, two))["a"]["state"] == "ready"  # the pool is full
    gate.touch()
    wait_pipeline(provider, one, "succeeded")
    wait_pipeline(provider, two, "succeeded")
    assert runs(folder) == [f"{one}.a", f"{one}.b", f"{two}.a", f"{two}.b"]
