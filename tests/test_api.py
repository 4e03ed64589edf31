"""The HTTP API of a real daemon on 127.0.0.1, with real task processes."""

import json
import stat
import sys

import httpx
import pytest

from gpuprovider.api.loopwatch import MARK
from gpuprovider.testing import wait_for

PY = sys.executable
PRINT_ENV = (
    "import os; print(repr(os.environ['CUDA_VISIBLE_DEVICES']), "
    "os.environ['NVIDIA_VISIBLE_DEVICES'], os.environ.get('GPUPROVIDER_GPU_SHARE'))"
)


def run_env(provider, gpu):
    task = provider.submit(command=[PY, "-c", PRINT_ENV], resources={"gpu": gpu})
    provider.wait_state(task["id"], "succeeded")
    return provider.logs(task["id"]).strip()


def test_open_endpoints_and_openapi(provider):
    assert httpx.get(provider.url + "/api/v1/health").json()["status"] == "ok"
    assert "version" in httpx.get(provider.url + "/api/v1/version").json()
    paths = httpx.get(provider.url + "/api/v1/openapi.json").json()["paths"]
    assert {"/api/v1/tasks", "/api/v1/tasks/{ref}/logs", "/api/v1/nodes", "/api/v1/gpus"} <= set(
        paths
    )


def test_auth_401_and_403(provider):
    bare = httpx.Client(base_url=provider.url + "/api/v1")
    assert bare.get("/tasks").status_code == 401
    assert "missing bearer token" in bare.get("/tasks").json()["error"]
    wrong = bare.get("/tasks", headers={"Authorization": "Bearer gpp_nope"})
    assert wrong.status_code == 401
    made = provider.api.post("/tokens", json={"name": "viewer", "scopes": ["read"]}).json()
    viewer = {"Authorization": f"Bearer {made['token']}"}
    assert bare.get("/tasks", headers=viewer).status_code == 200
    denied = bare.post("/tasks", json={"command": ["true"]}, headers=viewer)
    assert denied.status_code == 403 and "lacks the 'submit' scope" in denied.json()["error"]
    assert bare.post("/tokens", json={"name": "x"}, headers=viewer).status_code == 403


def test_visible_devices_are_exactly_the_allocation(provider):
    none = run_env(provider, "0")
    assert none == "'' none None"
    one = run_env(provider, "H100:1")
    assert one.split()[0] in ("'0'", "'1'") and one.endswith("None")
    assert run_env(provider, "H100:2").startswith("'0,1' 0,1")
    assert run_env(provider, "RTX4090:1").startswith("'2' 2")
    assert run_env(provider, "0.5").endswith("0.5")


def test_task_lifecycle_events_and_allocation(provider):
    task = provider.submit(name="life", command=[PY, "-c", "print('hi')"], resources={"gpu": 1})
    done = provider.wait_state("life", "succeeded")
    assert done["exit_code"] == 0 and done["attempt"] == 1
    states = [e["to"] for e in done["events"]]
    assert states == ["submitted", "queued", "scheduled", "starting", "running", "succeeded"]
    assert all(e["reason"] for e in done["events"])
    assert done["allocation"]["gpus"][0]["simulated"] is True
    assert done["allocation"]["active"] is False  # released when it ended
    assert provider.logs(task["id"]) == "hi\n"
    events = provider.api.get(f"/tasks/{task['id']}/events").json()
    assert events == done["events"]


def test_unplaceable_task_stays_queued_with_reason(provider):
    task = provider.submit(command=["true"], resources={"gpu": "H100:3"})
    queued = wait_for(
        lambda: (t := provider.task(task["id"]))["reason"].startswith("no node") and t
    )
    assert queued["state"] == "queued"
    assert queued["reason"] == "no node has 3 H100 free (at most 2 on one node)"
    listed = provider.api.get("/tasks", params={"state": "queued"}).json()
    assert any(t["id"] == task["id"] and t["reason"] == queued["reason"] for t in listed)
    provider.api.post(f"/tasks/{task['id']}/cancel")


def test_dry_run_says_whether_and_where_and_stores_nothing(provider):
    before = len(provider.api.get("/tasks").json())
    ok = provider.api.post(
        "/tasks", params={"dry_run": "true"}, json={"command": ["true"], "resources": {"gpu": 1}}
    )
    assert ok.status_code == 200 and ok.json()["placeable_now"] is True
    never = provider.api.post(
        "/tasks",
        params={"dry_run": "true"},
        json={"command": ["true"], "resources": {"gpu": "H100:3"}},
    ).json()
    assert never["placeable_now"] is False and never["would_wait"] is False
    assert "even when idle" in never["message"]
    too_large = {"command": ["true"], "resources": {"gpu": 8}}
    refused = provider.api.post("/tasks", json=too_large)
    assert refused.status_code == 422 and "more than any node has" in refused.text
    dry = provider.api.post("/tasks", params={"dry_run": "true"}, json=too_large).json()
    assert dry["would_wait"] is False and "the largest is" in dry["message"]
    assert len(provider.api.get("/tasks").json()) == before


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (
            {"command": ["true"], "resources": {"gpu": "H900:1"}},
            422,
            "resources.gpu: unknown GPU model 'H900'",
        ),
        ({"command": ["true"], "resources": {"cpu": -2}}, 422, "resources.cpu"),
        ({"command": ["true"], "resources": {"memory": "9000TB"}}, 422, "resources.memory_mib"),
        ({"command": ["true"], "resouces": {}}, 422, "resouces: unknown field"),
        ({"name": "x y", "command": ["true"]}, 422, "name:"),
        ({"command": ["true"], "resources": {"gpu": "T4:80GB:1"}}, 422, "no T4 has the GPU memory"),
        ({"image": "busybox"}, 422, "no container engine"),
        ([1, 2], 422, "body"),
        ({"command": ["true"], "resources": {"gpu": {"count": 1}}}, 422, "gpu must be a count"),
        ({"command": ["true"], "resources": {"memory": ["1GB"]}}, 422, "memory must be a size"),
        # what a hostile tenant sends: numbers that overflow, bytes that end strings or
        # paint terminals, loader variables, more than an exec can carry
        ({"command": ["true"], "resources": {"gpu": "1" + "0" * 400}}, 422, "at most 256"),
        ({"command": ["true"], "resources": {"gpu": int("9" * 400)}}, 422, "not a count of GPUs"),
        ({"command": ["true"], "resources": {"gpu": "1" + "0" * 40}}, 422, "more than 64"),
        ({"command": ["true"], "env": {"A": "x\u0000y"}}, 422, "env A contains a NUL byte"),
        ({"command": ["true"], "labels": {"a": "x\u001b[31m"}}, 422, "control characters"),
        ({"command": ["true"], "workdir": "/data/\u0000x"}, 422, "control characters"),
        ({"command": ["true"], "workdir": "/data/../etc"}, 422, "without '..'"),
        ({"command": ["true"], "env": {"LD_PRELOAD": "/x.so"}}, 422, "loader variable"),
        ({"command": ["true"], "env": {"A": "x" * 40000}}, 422, "longer than 32768 bytes"),
        ({"command": ["true"], "env": {f"A{i}": "x" for i in range(300)}}, 422, "at most 256"),
        ({"command": ["true", *["x"] * 2000]}, 422, "at most 1024"),
        ({"command": ["true"], "workdir": "/srv/data"}, 422, "outside the folders tasks may use"),
    ],
)
def test_bad_specs_are_rejected_naming_the_field(provider, body, status, message):
    before = provider.api.get("/tasks", params={"limit": 100000}).json()
    response = provider.api.post("/tasks", json=body)
    assert response.status_code == status and message in response.json()["error"], response.text
    assert provider.api.get("/tasks", params={"limit": 100000}).json() == before  # nothing stored


def test_a_body_nested_too_deep_or_overflowing_is_refused_cleanly(provider):
    before = provider.api.get("/tasks", params={"limit": 100000}).json()
    deep = b'{"command": ["true"], "labels": ' + b"[" * 50000 + b"]" * 50000 + b"}"
    response = provider.api.post(
        "/tasks", content=deep, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400 and "nested too deep" in response.json()["error"]
    overflow = b'{"command": ["true"], "resources": {"memory_mib": 1e400}}'
    response = provider.api.post(
        "/tasks", content=overflow, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422 and "memory_mib" in response.json()["error"]
    assert provider.api.get("/tasks", params={"limit": 100000}).json() == before
    assert "Traceback" not in provider.log()


def test_malformed_json_and_oversized_bodies(provider):
    bad = provider.api.post(
        "/tasks", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert bad.status_code == 400 and "not JSON" in bad.json()["error"], bad.text
    huge = {"command": ["true"], "env": {"BIG": "x" * 2_000_000}}
    too_big = provider.api.post("/tasks", json=huge)
    assert too_big.status_code == 413 and "larger than the limit" in too_big.json()["error"]

    def chunks():
        yield b'{"command": ["true"], "env": {"BIG": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}}'

    streamed = provider.api.post(
        "/tasks", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert streamed.status_code == 413
    assert provider.api.get("/health").status_code == 200  # still serving


def test_name_clash_and_unknown_task(provider):
    provider.submit(name="clash", command=[PY, "-c", "import time; time.sleep(30)"])
    again = provider.api.post("/tasks", json={"name": "clash", "command": ["true"]})
    assert again.status_code == 409 and "already named 'clash'" in again.json()["error"]
    provider.api.post("/tasks/clash/cancel")
    provider.wait_state("clash", "cancelled")
    # once the first ended, the name is free again
    reused = provider.submit(name="clash", command=["true"])
    assert provider.wait_state("clash", "succeeded")["id"] == reused["id"]
    missing = provider.api.get("/tasks/t-doesnotexist")
    assert missing.status_code == 404 and "no task with id or name" in missing.json()["error"]
    assert provider.api.post("/tasks/t-doesnotexist/cancel").status_code == 404


def test_cancel_running_queued_and_finished(provider):
    running = provider.submit(
        command=[PY, "-c", "import time; print('up', flush=True); time.sleep(60)"],
        resources={"gpu": 1},
    )
    provider.wait_state(running["id"], "running")
    # fits the node, but not beside the running task: it waits
    queued = provider.submit(command=["true"], resources={"gpu": "H100:3"})
    provider.wait_state(queued["id"], "queued")
    assert provider.api.post(f"/tasks/{queued['id']}/cancel").json()["state"] == "cancelled"
    again = provider.api.post(f"/tasks/{queued['id']}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]
    assert provider.api.post(f"/tasks/{running['id']}/cancel").json()["state"] == "cancelling"
    done = provider.wait_state(running["id"], "cancelled")
    assert done["exit_code"] == -15 and "cancelled" in done["reason"]


def test_retries_with_backoff_then_failed(provider):
    task = provider.submit(
        command=[PY, "-c", "import sys; print('try'); sys.exit(4)"],
        retry={"attempts": 3, "backoff_s": 0.1},
    )
    done = provider.wait_state(task["id"], "failed")
    assert done["attempt"] == 3 and done["exit_code"] == 4
    reasons = [e["reason"] for e in done["events"] if e["to"] == "queued"]
    assert reasons[1:] == ["retry: attempt 2 of 3 in 0.1s", "retry: attempt 3 of 3 in 0.2s"]
    assert provider.logs(task["id"]) == "try\n" * 3


def test_max_duration_fails_the_job(provider):
    task = provider.submit(command=[PY, "-c", "import time; time.sleep(60)"], max_duration_s=0.5)
    done = provider.wait_state(task["id"], "failed")
    assert "max duration" in done["reason"]


def test_queue_deadline_expires(provider):
    blocker = provider.submit(
        command=[PY, "-c", "import time; time.sleep(60)"], resources={"gpu": 1}
    )
    provider.wait_state(blocker["id"], "running")
    task = provider.submit(command=["true"], resources={"gpu": "H100:3"}, max_queue_s=0.3)
    done = provider.wait_state(task["id"], "expired")
    assert "queued past its deadline" in done["reason"]
    provider.api.post(f"/tasks/{blocker['id']}/cancel")


def test_service_gets_its_port_and_endpoint(provider):
    code = (
        "import os, time; print(os.environ['PORT'], os.environ['GPUPROVIDER_PORT_HTTP'], "
        "flush=True); time.sleep(60)"
    )
    task = provider.submit(kind="service", command=[PY, "-c", code], ports=["http"])
    running = provider.wait_state(task["id"], "running")
    port = running["allocation"]["ports"]["http"]
    assert 31000 <= port <= 31999
    assert running["endpoints"]["http"] == f"http://127.0.0.1:{port}"
    assert wait_for(lambda: provider.logs(task["id"])).split() == [str(port), str(port)]
    provider.api.post(f"/tasks/{task['id']}/cancel")
    provider.wait_state(task["id"], "cancelled")


def test_service_is_restarted_when_it_exits(provider):
    task = provider.submit(
        kind="service", command=[PY, "-c", "print('up')"], retry={"backoff_s": 0.1}
    )
    restarted = wait_for(
        lambda: (t := provider.task(task["id"]))["attempt"] >= 3 and t, what="two restarts"
    )
    assert any(e["reason"].startswith("service restarting") for e in restarted["events"])
    assert restarted["state"] not in ("succeeded", "failed")  # a service never ends by itself
    provider.api.post(f"/tasks/{task['id']}/cancel")
    provider.wait_state(task["id"], "cancelled")


def test_logs_follow_streams_until_the_end(provider):
    code = "import time\nfor i in range(3):\n    print('line', i, flush=True); time.sleep(0.2)"
    task = provider.submit(command=[PY, "-c", code])
    chunks, end = [], None
    with provider.api.stream("GET", f"/tasks/{task['id']}/logs", params={"follow": "true"}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        event = "message"
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
                if event == "end":
                    end = data
                    break
                chunks.append(data)
    assert "".join(chunks) == "line 0\nline 1\nline 2\n"
    assert end == "succeeded"
    assert len(chunks) >= 2  # it streamed while the task ran, not all at once


def test_list_filters_and_tenants(provider):
    made = provider.api.post(
        "/tokens", json={"name": "team-b", "scopes": ["read", "submit"]}
    ).json()
    team_b = httpx.Client(
        base_url=provider.url + "/api/v1", headers={"Authorization": f"Bearer {made['token']}"}
    )
    mine = team_b.post("/tasks", json={"name": "b-job", "command": ["true"]}).json()
    assert mine["tenant"] == "team-b"
    admin_task = provider.submit(name="admin-job", command=["true"])
    assert [t["id"] for t in team_b.get("/tasks").json()] == [mine["id"]]
    assert team_b.get(f"/tasks/{admin_task['id']}").status_code == 404
    assert team_b.post(f"/tasks/{admin_task['id']}/cancel").status_code == 404
    named = provider.api.get("/tasks", params={"name": "b-job"}).json()
    assert [t["id"] for t in named] == [mine["id"]]
    bad_state = provider.api.get("/tasks", params={"state": "sleeping"})
    assert bad_state.status_code == 422 and "sleeping" in bad_state.json()["error"]


def test_nodes_and_gpus_mark_simulated_and_show_use(provider):
    nodes = provider.api.get("/nodes").json()
    assert len(nodes) == 1 and nodes[0]["status"] == "ready"
    assert nodes[0]["gpu_count"] == 3 and nodes[0]["simulated_gpus"] == 3
    assert nodes[0]["cpu_count"] >= 1 and nodes[0]["memory_mib"] > 0
    task = provider.submit(
        command=[PY, "-c", "import time; time.sleep(30)"], resources={"gpu": "RTX4090:0.25"}
    )
    running = provider.wait_state(task["id"], "running")
    assert running["allocation"]["node"] == nodes[0]["name"]
    assert running["allocation"]["gpus"][0]["model"] == "rtx-4090-24gb"
    gpus = {g["model"]: g for g in provider.api.get("/gpus").json()}
    assert gpus["rtx-4090-24gb"]["simulated"] is True
    assert gpus["rtx-4090-24gb"]["used_share"] == 0.25 and gpus["rtx-4090-24gb"]["tasks"] == [
        task["id"]
    ]
    provider.api.post(f"/tasks/{task['id']}/cancel")


def test_logs_are_read_by_range(provider):
    code = "print('x' * 9999)"  # 10,000 bytes with its newline
    task = provider.submit(command=[PY, "-c", code])
    provider.wait_state(task["id"], "succeeded")
    page = provider.api.get(f"/tasks/{task['id']}/logs", params={"offset": 4000, "limit": 5000})
    assert page.status_code == 200 and page.content == b"x" * 5000
    assert (page.headers["X-Log-Start"], page.headers["X-Log-Next"]) == ("4000", "9000")
    rest = provider.api.get(f"/tasks/{task['id']}/logs", params={"offset": 9000})
    assert rest.content == b"x" * 999 + b"\n" and rest.headers["X-Log-Next"] == "10000"
    for bad in ({"offset": -1}, {"limit": 0}, {"limit": 1 << 40}, {"offset": "1e400"}):
        answer = provider.api.get(f"/tasks/{task['id']}/logs", params=bad)
        assert answer.status_code == 422, bad


def test_nothing_blocked_the_event_loop(provider):
    """Every request this module made ran its slow parts off the loop that serves the
    API: no handler used 50 ms of CPU there or made a call that waits (a subprocess, a
    sleep, a connect). Last in the module: it reads what all the others did."""
    image = provider.api.post("/tasks", json={"image": "busybox:latest", "command": ["true"]})
    assert image.status_code in (201, 422)  # the engine is asked, off the loop
    listing = provider.api.get("/tasks", params={"limit": 100000})
    assert listing.status_code == 200
    blocked = [line for line in provider.log().splitlines() if MARK in line]
    assert blocked == []


def test_the_home_is_the_providers_alone(provider):
    """The store (and its journal files), the lock, the config, the secrets: no file
    the daemon keeps in its home is readable by anyone else."""
    kept = [p for p in provider.home.root.iterdir() if p.name not in ("tasks", "daemon.log")]
    assert any(p.name == "store.db" for p in kept)
    for path in kept:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
