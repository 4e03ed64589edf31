"""The store on SQLite and PostgreSQL: repositories in one transaction, migrations that
make exactly the declared schema, a 0.1.0 store upgraded in place with its data, and a
store newer than the code refused."""

import json
import shutil
import sys
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import IntegrityError

from gpuprovider.bootstrap import init_home
from gpuprovider.domain.records import OwnerKind
from gpuprovider.domain.spec import TaskSpec
from gpuprovider.domain.states import TaskState
from gpuprovider.lifecycle.kernel import Stale
from gpuprovider.lifecycle.tasks import submit, transition
from gpuprovider.store import migrate, schema
from gpuprovider.store.signals import Signal, Signals
from gpuprovider.store.store import Store, StoreError
from gpuprovider.testing import Provider, free_port, kill_task_processes, make_home, wait_for

OLD = Path(__file__).parent / "fixtures" / "store-0.1.0"
S = TaskState


def spec(**fields) -> TaskSpec:
    return TaskSpec.model_validate({"command": ["true"], **fields})


def test_store_operations(store_url):
    fired = []
    signals = Signals()
    signals.subscribe(Signal.QUEUED, fired.append)
    store = Store(store_url, signals)
    assert migrate.upgrade(store).before is None
    with store.tx() as tx:
        task = tx.tasks.insert(spec(name="job", resources={"gpu": 1}), "admin")
        submit(tx, task)
        assert fired == []  # published once committed, not before
    assert fired == [{task.id}]
    with pytest.raises(IntegrityError), store.tx() as tx:  # the name is live
        tx.tasks.insert(spec(name="job"), "admin")
    with store.tx() as tx:  # in this tenant: another's names are its own
        theirs = tx.tasks.insert(spec(name="job"), "team-b", idempotency_key="k-1")
    with pytest.raises(IntegrityError), store.tx() as tx:  # a key is used once per tenant
        tx.tasks.insert(spec(), "team-b", idempotency_key="k-1")
    with store.tx() as tx:
        tx.tasks.allocate(task, "n-1", ["GPU-a"], 1000, 0, 0)
        transition(tx, task, S.SCHEDULED, "placed")
        tx.tasks.set_ports(task.id, {"http": 20001})
    with store.read() as r:
        stale = r.tasks.get(task.id)
    stale.version -= 1
    with pytest.raises(Stale), store.tx() as tx:
        transition(tx, stale, S.STARTING, "should not apply")
    with store.read() as r:
        assert r.tasks.resolve("job", "admin").state == S.SCHEDULED
        assert r.tasks.resolve("job", "team-b").id == theirs.id
        assert r.tasks.submitted_with("team-b", "k-1").id == theirs.id
        assert r.tasks.submitted_with("admin", "k-1") is None
        assert r.tasks.active_allocations()[0].ports == {"http": 20001}
        assert [e.to_state for e in r.tasks.events(task.id)] == ["submitted", "queued", "scheduled"]
    with store.tx() as tx:
        transition(tx, task, S.CANCELLING, "test")  # nothing started: cancelled at once
    assert task.state == S.CANCELLED
    with store.tx() as tx:
        again = tx.tasks.insert(spec(name="job"), "admin")  # the name is free once it ended
        submit(tx, again)
    with store.read() as r:
        assert len(r.tasks.find(name="job", tenant="admin")) == 2
        assert r.tasks.count_by_state("admin") == {"cancelled": 1, "queued": 1}
        assert r.tasks.count_by_state() == {"cancelled": 1, "queued": 1, "submitted": 1}
        assert r.tasks.active_allocations() == []  # the cancel released it
    store.close()


def test_a_transaction_that_fails_writes_nothing(store_url):
    store = Store(store_url)
    migrate.upgrade(store)
    with pytest.raises(RuntimeError), store.tx() as tx:
        task = tx.tasks.insert(spec(name="half"), "admin")
        submit(tx, task)
        raise RuntimeError("the caller failed half way")
    with store.read() as r:
        assert r.tasks.find() == []
    store.close()


def test_migrations_make_exactly_the_schema_the_code_declares(store_url):
    store = Store(store_url)
    migrate.upgrade(store)
    with store.engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), schema.metadata)
        assert conn.execute(select(schema.meta.c.value)).scalar() == str(schema.SCHEMA_VERSION)
    assert differences == []
    assert not migrate.upgrade(store).changed  # upgrading again changes nothing
    store.close()


def test_a_store_newer_than_the_code_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    migrate.upgrade(store)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(StoreError, match=r"written by a newer gpuprovider.*revision 0099"):
        migrate.upgrade(store)
    store.close()


def test_the_daemon_refuses_a_newer_store_with_a_clear_error(tmp_path):
    port = free_port()
    home = make_home(tmp_path / "home", port)
    engine = create_engine(home.store_url(""))
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    done = Provider(home, port).cli("up", timeout=60)
    assert done.returncode == 1 and "newer gpuprovider" in done.stderr
    assert "Traceback" not in done.stderr


def load_pg_dump(url: str, folder: Path = OLD) -> None:
    """pg_dump's output as psql would run it (its \\-commands aside)."""
    sql = "\n".join(
        line
        for line in (folder / "store.pg.sql").read_text().splitlines()
        if not line.startswith("\\")
    )
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as conn:
        conn.execute(sql)  # no parameters: the dump's '%' signs stay as they are


JOURNAL_0008 = Path(__file__).parent / "fixtures" / "store-0008"


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_0008_store_keeps_its_history_in_the_journal(tmp_path, kind, request):
    """The three event tables of schema 0008 (tasks', nodes', services') become one
    journal, in the order they were written; replicas name their service as owner."""
    made = json.loads((JOURNAL_0008 / "made.json").read_text())[kind]
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
        shutil.copy(JOURNAL_0008 / "store.db", tmp_path / "store.db")
    else:
        url = request.getfixturevalue("postgres_url")
        load_pg_dump(url, JOURNAL_0008)
    store = Store(url)
    with store.engine.connect() as conn:
        before = {
            table: conn.execute(text(f"SELECT count(*) FROM {table}")).scalar()
            for table in ("events", "node_events", "service_events")
        }
    done = migrate.upgrade(store)
    assert (done.before, done.after) == ("0008", migrate.head())
    with store.read() as r:
        rows = r.journal.after(0, 10_000)
        kinds = [row.kind for row in rows]
        assert kinds.count("task") == before["events"] and kinds.count("node") == 3
        assert kinds.count("service") == before["service_events"] > 0
        assert [row.at for row in rows] == sorted(row.at for row in rows)
        done_task = [(e.from_state, e.to_state) for e in r.tasks.events(made["tasks"]["done"])]
        assert done_task[0] == (None, "submitted") and done_task[-1] == ("running", "succeeded")
        assert all(row.tenant == "admin" for row in rows if row.kind == "task")
        node = [(e.to_state, e.reason) for e in r.nodes.events(made["node"])]
        assert [state for state, _ in node] == ["ready", "cordoned", "ready"]
        service = r.services.get(made["service"])
        assert service is not None and service.state == "stopped"
        history = [
            (e.from_state, e.to_state, e.reason) for e in r.journal.of("service", service.id)
        ]
        assert history[0] == ("live", "live", "scaled 1 -> 2 by admin")  # a note
        assert history[-1] == ("live", "stopped", "stopped by admin")  # a transition
        replicas = r.tasks.owned(OwnerKind.SERVICE, service.id)
        assert len(replicas) == 2 and all(t.service_id == service.id for t in replicas)
    with store.engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), schema.metadata)
    assert differences == []
    store.close()


def old_home(tmp_path: Path, kind: str, request: pytest.FixtureRequest) -> tuple[Provider, dict]:
    """A home whose store (and node key, admin token) gpuprovider 0.1.0 made."""
    made = json.loads((OLD / "tokens.json").read_text())[kind]
    port = free_port()
    home = make_home(tmp_path / "home", port)
    config = home.config.read_text().replace("labels = {}", 'labels = {zone = "later"}')
    if kind == "sqlite":
        for leftover in home.root.glob("store.db*"):
            leftover.unlink()
        shutil.copy(OLD / "store.db", home.store)
    else:
        url = request.getfixturevalue("postgres_url")
        load_pg_dump(url)
        config = config.replace('url = ""', f'url = "{url}"')
    home.config.write_text(config)
    home.node_key.unlink()
    shutil.copy(OLD / f"{'pg' if kind == 'postgresql' else kind}-node.key", home.node_key)
    home.node_key.chmod(0o600)
    home.token.write_text(made["admin"])
    return Provider(home, port), made


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_0_1_0_store_upgrades_in_place_and_the_provider_carries_on(tmp_path, kind, request):
    provider, made = old_home(tmp_path, kind, request)
    tasks = made["tasks"]
    provider.start()
    try:
        assert f"store upgraded from schema 0001 to {migrate.head()}" in provider.log()
        done = provider.task(tasks["done"])
        assert done["state"] == "succeeded" and done["exit_code"] == 0
        assert [e["to"] for e in done["events"]][-1] == "succeeded" and len(done["events"]) == 6
        assert provider.task(tasks["broken"])["exit_code"] == 3
        assert provider.task(tasks["dropped"])["state"] == "cancelled"
        # the task 0.1.0 left queued runs now that the node carries its label
        later = provider.wait_state(tasks["later"], "succeeded")
        assert provider.logs(tasks["later"]) == "ran after the upgrade\n"
        assert later["tenant"] == "team-a"
        # the tenant's token still works and still sees only its own tasks
        tenant = provider.api.__class__(
            base_url=provider.url + "/api/v1",
            headers={"Authorization": f"Bearer {made['team-a']}"},
        )
        assert [t["id"] for t in tenant.get("/tasks").json()] == [tasks["later"]]
        # the same node, with the proof of GPU and the check results 0.1.0 stored
        nodes = provider.api.get("/nodes").json()
        assert len(nodes) == 1
        proven = next(
            g for g in provider.api.get("/gpus").json() if g["uuid"] == made["proven_gpu"]
        )
        assert proven["proof"]["passed"] is True
        # kept as it was, but a v1 verdict nobody signed never counts as proof
        assert proven["proof"]["verifier_key"] == "" and proven["proof"]["trusted"] is False
        node = nodes[0]["id"]
        checks = provider.api.get(f"/nodes/{node}/checks").json()["results"]
        assert any(r["group"] == "preflight" for r in checks)
        assert provider.cli("task", "run", "--", sys.executable, "-c", "pass").returncode == 0
    finally:
        provider.stop()
        kill_task_processes(provider.home)


@pytest.mark.slow
def test_init_upgrades_a_0_1_0_store_and_says_so(tmp_path, request):
    provider, _ = old_home(tmp_path, "sqlite", request)
    done = provider.cli("init")
    assert done.returncode == 0, done.stderr
    assert f"upgraded from schema 0001 to {migrate.head()}" in done.stdout
    again = provider.cli("init")
    assert "upgraded" not in again.stdout and "exists, kept" in again.stdout


@pytest.mark.slow
def test_daemon_runs_a_task_on_postgres(postgres_url, tmp_path):
    port = free_port()
    home = make_home(tmp_path / "home", port)
    home.config.write_text(home.config.read_text().replace('url = ""', f'url = "{postgres_url}"'))
    init_home(home)  # creates the schema and registers the home's admin token there
    provider = Provider(home, port)
    provider.start()
    try:
        task = provider.submit(
            command=[sys.executable, "-c", "print('on postgres')"], resources={"gpu": 1}
        )
        assert provider.wait_state(task["id"], "succeeded")["exit_code"] == 0
        wait_for(lambda: provider.logs(task["id"]) == "on postgres\n", what="the task's output")
    finally:
        provider.stop()
        kill_task_processes(home)
