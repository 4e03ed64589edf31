"""Tenants of one provider, tried as hostile ones would: names of their own, nothing of
another's in /gpus or /health, tokens that expire and are revoked, submissions that a
retry cannot double."""

import sys
import threading

import httpx

from gpuprovider.testing import wait_for

PY = sys.executable
SLEEP = [PY, "-c", "import time; time.sleep(60)"]
JSON = {"content-type": "application/json"}


def test_names_are_each_tenants_own(provider):
    a, b = provider.tenant("names-a"), provider.tenant("names-b")
    mine = a.post("/tasks", json={"name": "train", "command": SLEEP}).json()
    theirs = b.post("/tasks", json={"name": "train", "command": SLEEP})
    assert theirs.status_code == 201  # the same name, another tenant: no clash
    theirs = theirs.json()
    assert a.get("/tasks/train").json()["id"] == mine["id"]
    assert b.get("/tasks/train").json()["id"] == theirs["id"]
    clash = b.post("/tasks", json={"name": "train", "command": ["true"]})
    assert clash.status_code == 409 and theirs["id"] in clash.json()["error"]
    assert mine["id"] not in clash.text
    # An admin names a tenant's task as TENANT:NAME; a tenant cannot reach across.
    assert provider.task("names-b:train")["id"] == theirs["id"]
    assert a.get("/tasks/names-b:train").status_code == 404
    assert a.get(f"/tasks/{theirs['id']}").status_code == 404
    assert a.post(f"/tasks/{theirs['id']}/cancel").status_code == 404
    # nor read or follow its output: refused before any stream starts
    for ref in (theirs["id"], "names-b:train"):
        assert a.get(f"/tasks/{ref}/logs").status_code == 404
        followed = a.get(f"/tasks/{ref}/logs", params={"follow": "true"})
        assert followed.status_code == 404 and "no task" in followed.json()["error"]
    # and its journal rows are not in this tenant's feed
    feed = a.get("/events", params={"limit": 1000}).json()["events"]
    assert {row["id"] for row in feed} <= {mine["id"]}
    assert any(row["to"] == "running" or row["to"] == "queued" for row in feed)
    for task in (mine, theirs):
        provider.api.post(f"/tasks/{task['id']}/cancel")


def test_gpus_and_health_reveal_no_other_tenants_work(provider):
    a, b = provider.tenant("seen-a"), provider.tenant("seen-b")
    theirs = a.post("/tasks", json={"command": SLEEP, "resources": {"gpu": "RTX4090:0.5"}}).json()
    provider.wait_state(theirs["id"], "running")
    [gpu] = [g for g in b.get("/gpus").json() if g["model"] == "rtx-4090-24gb"]
    assert gpu["used_share"] == 0.5 and gpu["tasks"] == []  # in use; by whom is not b's
    [gpu] = [g for g in a.get("/gpus").json() if g["model"] == "rtx-4090-24gb"]
    assert gpu["tasks"] == [theirs["id"]]
    assert theirs["id"] in str(provider.api.get("/gpus").json())

    bare = httpx.get(provider.url + "/api/v1/health").json()
    assert bare == {"status": "ok"}  # no counts for anyone who asks
    assert b.get("/health").json() == {"status": "ok", "tasks": {}}
    assert a.get("/health").json()["tasks"] == {"running": 1}
    assert provider.api.get("/health").json()["tasks"]["running"] >= 1
    wrong = httpx.get(provider.url + "/api/v1/health", headers={"Authorization": "Bearer x"})
    assert wrong.status_code == 401
    provider.api.post(f"/tasks/{theirs['id']}/cancel")


def test_tokens_are_listed_expire_and_are_revoked(provider):
    short = provider.tenant("short-lived", expires_in_s=1.5)
    assert short.get("/tasks").status_code == 200
    gone = wait_for(lambda: (r := short.get("/tasks")).status_code == 401 and r, what="expiry")
    assert "has expired" in gone.json()["error"]

    doomed = provider.tenant("doomed")
    assert doomed.get("/tasks").status_code == 200  # now in the daemon's auth cache
    revoked = provider.api.delete("/tokens/doomed")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    refused = doomed.get("/tasks")  # at once: the daemon drops its cached entry
    assert refused.status_code == 401 and "was revoked" in refused.json()["error"]
    listed = {t["name"]: t for t in provider.api.get("/tokens").json()}
    assert listed["doomed"]["revoked_at"] and listed["short-lived"]["expires_at"]
    assert "token" not in listed["doomed"]  # never a secret
    again = provider.api.post("/tokens", json={"name": "doomed"})
    assert again.status_code == 409 and "revoked ones keep their names" in again.json()["error"]
    assert provider.api.delete("/tokens/no-such").status_code == 404
    for bad in ("0", "-5", "1e400", "1" + "0" * 400, '"soon"'):
        body = f'{{"name": "bad-expiry", "expires_in_s": {bad}}}'
        made = provider.api.post("/tokens", content=body, headers=JSON)
        assert made.status_code == 422 and "expires_in_s" in made.text, bad
    # A tenant cannot list, mint or revoke tokens.
    tenant = provider.tenant("plain")
    assert tenant.get("/tokens").status_code == 403
    assert tenant.delete("/tokens/plain").status_code == 403
    assert tenant.post("/tokens", json={"name": "mine", "scopes": ["admin"]}).status_code == 403


def test_the_last_admin_token_cannot_be_revoked(provider):
    admins = [t for t in provider.api.get("/tokens").json() if "admin" in t["scopes"]]
    live = [t for t in admins if t["revoked_at"] is None]
    assert [t["name"] for t in live] == ["admin"]
    refused = provider.api.delete("/tokens/admin")
    assert refused.status_code == 409 and "last admin token" in refused.json()["error"]
    assert provider.api.get("/tasks").status_code == 200


def test_cli_revokes_a_token(provider):
    provider.tenant("cli-doomed")
    done = provider.cli("token", "revoke", "cli-doomed")
    assert done.returncode == 0 and "revoked" in done.stdout
    listed = provider.cli("token", "list")
    assert "cli-doomed" in listed.stdout and "revoked" in listed.stdout
    assert provider.cli("token", "create", "x", "--expires-in", "soon").returncode == 2


def test_an_idempotency_key_makes_one_task_however_often_it_is_sent(provider):
    a, b = provider.tenant("retry-a"), provider.tenant("retry-b")
    spec = {"command": ["true"], "name": "once"}
    key = {"Idempotency-Key": "order-17"}
    first = a.post("/tasks", json=spec, headers=key)
    again = a.post("/tasks", json=spec, headers=key)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = a.post("/tasks", json={**spec, "name": "twice"}, headers=key)
    assert other.status_code == 409 and first.json()["id"] in other.json()["error"]
    # Keys are each tenant's own: b's "order-17" is b's task, and says nothing of a's.
    bs = b.post("/tasks", json=spec, headers=key)
    assert bs.status_code == 201 and bs.json()["id"] != first.json()["id"]
    for bad in ("", "with space", "x" * 256, "naïve"):
        refused = a.post("/tasks", json=spec, headers={"Idempotency-Key": bad.encode()})
        assert refused.status_code == 422, bad

    # Many clients retrying at once (a flaky network): still one task.
    answers, spec = [], {"command": ["true"]}

    def send():
        answers.append(
            a.post("/tasks", json={"command": ["true"]}, headers={"Idempotency-Key": "k"})
        )

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.status_code for r in answers) == [200] * 7 + [201]
    assert len({r.json()["id"] for r in answers}) == 1
