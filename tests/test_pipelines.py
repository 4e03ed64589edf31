"""Multi-stage pipelines against a real daemon: stages as tasks the pipeline owns,
pools, failure levels, pause/resume, wait stages, batching, restart safety, and
hostile specs refused with the field named."""

import json
import signal
from pathlib import Path

import pytest

from gpuprovider.testing import Provider, free_port, kill_task_processes, make_home, wait_for

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
