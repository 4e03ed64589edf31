"""The journal as one feed: every transition of what a caller may see, by page and as
server-sent events that resume from a cursor; a cursor that is malformed or from the
future refused naming it; a follower that does not keep up dropped, never holding the
daemon's memory or its loop."""

from __future__ import annotations

import asyncio
import json
import sys
import threading

import httpx
import pytest

from gpuprovider.api.sse import EventStream
from gpuprovider.domain.records import JournalRow
from gpuprovider.service import journal as feed
from gpuprovider.service.journal import Follower, Journal, Scope
from gpuprovider.testing import StoreWorld, wait_for

PY = sys.executable


def test_the_journal_pages_every_transition_by_cursor(provider):
    start = provider.api.get("/events", params={"after": "now"}).json()["next"]
    task = provider.submit(command=[PY, "-c", "pass"])
    provider.wait_state(task["id"], "succeeded")
    page = provider.api.get("/events", params={"after": start, "kind": "task"}).json()
    mine = [(e["from"], e["to"]) for e in page["events"] if e["id"] == task["id"]]
    assert mine[0] == (None, "submitted") and mine[-1] == ("running", "succeeded")
    cursors = [int(e["cursor"]) for e in page["events"]]
    assert cursors == sorted(cursors) and page["next"] == str(cursors[-1])
    # one subject's rows, and nothing after the last cursor
    one = provider.api.get("/events", params={"id": task["id"]}).json()["events"]
    assert {e["id"] for e in one} == {task["id"]} and len(one) == len(mine)
    assert (
        provider.api.get("/events", params={"after": page["next"], "id": task["id"]}).json()[
            "events"
        ]
        == []
    )
    # the CLI reads the same feed
    done = provider.cli("events", "--id", task["id"])
    assert done.returncode == 0 and "running -> succeeded" in done.stdout


@pytest.mark.parametrize(
    ("cursor", "says"),
    [("abc", "not one this provider gave"), ("99999999999", "from the future"), ("-1", "not one")],
)
def test_a_bad_cursor_is_refused_naming_it(provider, cursor, says):
    for path in ("/events", "/events/stream"):
        answer = provider.api.get(path, params={"after": cursor})
        assert answer.status_code == 400 and says in answer.json()["error"], answer.text
    unknown = provider.api.get("/events", params={"kind": "rocket"})
    assert unknown.status_code == 400 and "rocket" in unknown.json()["error"]


def _stream(client: httpx.Client, got: list[dict], stop: threading.Event, **params) -> None:
    with client.stream("GET", "/events/stream", params=params, timeout=60) as answer:
        assert answer.status_code == 200
        fields: dict[str, str] = {}
        for line in answer.iter_lines():
            if stop.is_set():
                return
            if line.startswith(("id:", "event:", "data:")):
                name, _, value = line.partition(":")
                fields[name] = value.strip()
            elif line == "" and "data" in fields:
                got.append({"id": fields.get("id"), **json.loads(fields["data"])})
                fields = {}


def test_a_follower_sees_transitions_as_they_happen_and_resumes(provider):
    start = provider.api.get("/events", params={"after": "now"}).json()["next"]
    got: list[dict] = []
    stop = threading.Event()
    reader = threading.Thread(
        target=_stream, args=(provider.api, got, stop), kwargs={"after": start}, daemon=True
    )
    reader.start()
    task = provider.submit(command=[PY, "-c", "pass"])
    wait_for(
        lambda: any(e["id"] == task["id"] and e["to"] == "succeeded" for e in got),
        30,
        "the stream to carry the task's end",
    )
    stop.set()
    ids = [int(e["cursor"]) for e in got]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # a reconnecting client sends its last id: it gets what came after, only
    middle = got[len(got) // 2]
    again: list[dict] = []
    stop2 = threading.Event()
    resumed = threading.Thread(
        target=_stream,
        args=(
            httpx.Client(
                base_url=provider.url + "/api/v1",
                headers={**provider.api.headers, "Last-Event-ID": middle["cursor"]},
            ),
            again,
            stop2,
        ),
        daemon=True,
    )
    resumed.start()
    wait_for(lambda: len(again) >= len(got) - len(got) // 2 - 1, 20, "the resumed backlog")
    stop2.set()
    assert [e["cursor"] for e in again][: len(got) - len(got) // 2 - 1] == [
        e["cursor"] for e in got[len(got) // 2 + 1 :]
    ]


def test_a_tenant_follows_only_its_own(provider):
    alice = provider.tenant("feed-alice")
    start = provider.api.get("/events", params={"after": "now"}).json()["next"]
    theirs = provider.submit(command=[PY, "-c", "pass"])  # the admin's
    mine = alice.post("/tasks", json={"command": [PY, "-c", "pass"]}).json()
    provider.wait_state(theirs["id"], "succeeded")
    provider.wait_state(mine["id"], "succeeded")
    page = alice.get("/events", params={"after": start, "limit": 1000}).json()["events"]
    assert {e["id"] for e in page} == {mine["id"]} and all(e["kind"] == "task" for e in page)
    # asking for another tenant's rows, or the provider's own (nodes), gets its own only
    asked = alice.get("/events", params={"tenant": "admin", "kind": "node"}).json()["events"]
    assert asked == []


# -- no daemon: the feed's bounds ---------------------------------------------------------


def _rows(first: int, count: int, tenant: str = "a") -> list[JournalRow]:
    return [
        JournalRow(i, "task", f"t-{i}", tenant, 0.0, "queued", "scheduled", "x")
        for i in range(first, first + count)
    ]


def test_a_follower_that_does_not_keep_up_is_dropped_with_a_bounded_buffer(tmp_path):
    async def scenario() -> tuple[bool, int, int]:
        follower = Follower(Scope("a"), asyncio.get_running_loop())
        for first in range(0, feed.FOLLOWER_BUFFER * 3, 500):
            follower.offer(_rows(first, 500))
            follower.offer(_rows(first, 500, tenant="b"))  # not its own: never held
        await asyncio.sleep(0)  # the loop takes what was handed over
        held = follower.queue.qsize()
        return follower.dropped, follower.pending, held

    dropped, pending, held = asyncio.run(scenario())
    assert dropped and pending <= feed.FOLLOWER_BUFFER
    assert held <= feed.FOLLOWER_BUFFER // 500 + 1  # the rows it had, then the end


def test_the_feed_reads_new_rows_once_for_every_follower(tmp_path):
    world = StoreWorld(tmp_path)
    journal = Journal(world.store)

    async def scenario() -> list[int]:
        followers = [journal.follow(Scope(None)) for _ in range(50)]
        world.submit()  # a task submitted and queued: two rows
        assert journal.pump() == 2
        got = [await f.next() for f in followers]
        return [len(rows or []) for rows in got]

    assert asyncio.run(scenario()) == [2] * 50
    world.store.close()


def test_a_client_that_never_reads_is_dropped_after_the_send_timeout():
    async def events():
        while True:
            yield "data: x\n\n"

    async def scenario() -> None:
        async def receive() -> dict:
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body":
                await asyncio.sleep(3600)  # the client's window is full: it never reads

        stream = EventStream(events(), send_timeout_s=0.2)
        # it ends by itself (a bound, not a timing: it would wait an hour otherwise)
        await asyncio.wait_for(stream({"type": "http"}, receive, send), 60)

    asyncio.run(scenario())
