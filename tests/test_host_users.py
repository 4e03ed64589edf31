"""Task users are leased host-wide: two providers on one machine (two homes, as two Ray
nodes on one server or the test suite beside a running daemon) never lend one uid at
once, and the clean-up of one never kills the other's tasks."""

import json
import os
import pwd
import threading
from pathlib import Path

import psutil
import pytest

from gpuprovider.backends.base import Launch
from gpuprovider.backends.local import LocalProcesses
from gpuprovider.isolation import users
from gpuprovider.isolation.policy import Applied, Settings, record_path, undo
from gpuprovider.testing import kill_processes_mentioning, wait_for

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="task users need root")]

EACH = 50  # tasks per provider, all at once
# No cgroup: what is left of an attempt is found by its uid, the way that would kill
# another provider's task if a uid were shared.
POOL = Settings(users="pool", cgroups="none", devices="none")


@pytest.fixture
def two_homes(tmp_path):
    homes = [tmp_path / "provider-a", tmp_path / "provider-b"]
    yield [LocalProcesses(home, isolation=POOL) for home in homes]
    for home in homes:
        kill_processes_mentioning(home)
        for record in home.glob("*/isolation-*.json"):
            if applied := Applied.load(str(record)):
                undo(applied)


def launches(home: Path, wave: str) -> list[Launch]:
    return [
        Launch(
            task_id=f"{wave}-{i}",
            attempt=1,
            argv=["/bin/sleep", "300"],
            env={},
            workdir=str(home / f"{wave}-{i}" / "work"),
            run_dir=str(home / f"{wave}-{i}"),
        )
        for i in range(EACH)
    ]


def start_together(work: list[tuple[LocalProcesses, list[Launch]]]) -> list[list]:
    """Start each provider's launches at once, each from a thread of its own."""
    results: list[list] = [[] for _ in work]

    def start(i: int) -> None:
        results[i] = work[i][0].start_many(work[i][1])

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for started in results:
        assert not [r for r in started if isinstance(r, OSError)]
    return results


def task_uid(handle) -> int | None:
    """The uid the attempt's command runs as, once it runs."""
    try:
        with open(Path(handle.run_dir) / f"runner-{handle.attempt}.json") as record:
            child = json.load(record)["child_pid"]
        uid = psutil.Process(child).uids().real
    except (OSError, ValueError, KeyError, psutil.NoSuchProcess):
        return None
    return uid or None  # still root: not yet its user


def running_uids(handles: list) -> list[int]:
    found = [task_uid(h) for h in handles]
    return found if None not in found else []


def test_two_providers_never_share_a_uid_nor_reap_each_others_tasks(two_homes, tmp_path):
    a, b = two_homes
    home_a, home_b = tmp_path / "provider-a", tmp_path / "provider-b"
    first_a, first_b = start_together([(a, launches(home_a, "a")), (b, launches(home_b, "b"))])
    uids_a = wait_for(lambda: running_uids(first_a), 60, "provider A's tasks to run")
    uids_b = wait_for(lambda: running_uids(first_b), 60, "provider B's tasks to run")
    assert len(set(uids_a) | set(uids_b)) == 2 * EACH  # no uid lent twice at once
    held = users.held_by(str(home_a)) + users.held_by(str(home_b))
    assert len(held) == 2 * EACH
    assert {pwd.getpwnam(name).pw_uid for name in held} == set(uids_a) | set(uids_b)

    # Provider A's tasks end; provider B starts more, on the uids A gave back.
    for handle in first_a:
        a.stop(handle)
    wait_for(lambda: all(a.poll(h) for h in first_a), 60, "provider A's tasks to end")
    wait_for(lambda: not users.held_by(str(home_a)), 30, "provider A's users back")
    (second_b,) = start_together([(b, launches(home_b, "b2"))])
    uids_b2 = wait_for(lambda: running_uids(second_b), 60, "provider B's new tasks to run")
    assert set(uids_b2) & set(uids_a)  # A's uids, lent again
    # A cleans up after its attempts once more (a daemon that finds a runner gone, a
    # test's clean-up): what now runs under those uids is B's, and stays.
    for i in range(EACH):
        applied = Applied.load(record_path(str(home_a / f"a-{i}"), 1))
        assert applied is not None and applied.uid in uids_a
        assert undo(applied)
    everyone = first_b + second_b
    assert all(b.poll(h) is None for h in everyone)  # B's tasks all run on
    assert sorted(running_uids(everyone)) == sorted(uids_b + uids_b2)
    assert len(users.held_by(str(home_b))) == 2 * EACH


def test_a_lease_of_a_home_that_is_gone_is_swept_and_no_other(tmp_path, monkeypatch):
    table = str(tmp_path / "table")
    running: list[int] = []  # the table here is the test's own; its uids run elsewhere
    monkeypatch.setattr(users, "processes_of", lambda uid: running)
    gone = users.lend(table, str(tmp_path / "deleted-home"), "t/1")
    kept = users.lend(table, str(tmp_path), "t/2")
    assert gone.uid != kept.uid
    running.append(1)
    assert users.sweep(table) == 0  # something still runs as its user
    running.clear()
    assert users.sweep(table) == 1
    assert not os.path.exists(gone.lease) and os.path.exists(kept.lease)
    users.give_back(kept.lease, "not-its-token")  # only its holder gives it back
    assert os.path.exists(kept.lease)
    users.give_back(kept.lease, kept.token)
    assert not os.path.exists(kept.lease)


def test_users_an_older_provider_lent_from_its_own_folder_are_not_lent_again(tmp_path, monkeypatch):
    """An upgrade while tasks run: their users were leased in the home's own `.users`
    folder; the table takes them in until those leases end."""
    table, home = str(tmp_path / "table"), tmp_path / "home"
    running: list[int] = []
    monkeypatch.setattr(users, "processes_of", lambda uid: running)
    (home / ".users").mkdir(parents=True)
    (home / ".users" / "gpp-task-0").write_text("t-old/1")
    assert users.adopt_legacy(str(home / ".users"), str(home), table) == 1
    lent = users.lend(table, str(home), "t-new/1")
    assert lent.name != "gpp-task-0"  # still the old attempt's
    assert users.sweep(table) == 0
    users.give_back(str(home / ".users" / "gpp-task-0"))  # the old attempt's clean-up
    assert users.sweep(table) == 1
    assert users.held_by(str(home), table) == [lent.name]
