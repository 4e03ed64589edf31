"""The store on PostgreSQL (`[store] url`): the same operations as on SQLite, and a
daemon running a task on it. Uses the PostgreSQL on 127.0.0.1:5432 that CI starts."""

import secrets
import sys

import pytest
from sqlalchemy import create_engine, text

from gpuprovider.bootstrap import init_home
from gpuprovider.domain.spec import TaskSpec
from gpuprovider.domain.states import TaskState
from gpuprovider.store.store import NameTaken, StaleTask, Store
from gpuprovider.testing import Provider, free_port, kill_task_processes, make_home

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _server_answers() -> bool:
    try:
        with create_engine(ADMIN_URL).connect() as conn:
            conn.execute(text("select 1"))
        return True
    except Exception:
        return False


pytestmark = pytest.mark.skipif(
    not _server_answers(), reason="no PostgreSQL answers on 127.0.0.1:5432 (.ci/run starts one)"
)


@pytest.fixture
def pg_url():
    name = "gpp_test_" + secrets.token_hex(4)
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


def test_store_operations_on_postgres(pg_url):
    store = Store(pg_url)
    store.create()
    store.check_schema()
    spec = TaskSpec.model_validate({"name": "pg-job", "command": ["true"], "resources": {"gpu": 1}})
    task = store.submit(spec, "admin")
    assert task.state == TaskState.QUEUED
    with pytest.raises(NameTaken):
        store.submit(spec, "admin")
    with store.tx() as tx:
        tx.allocate(task, "n-1", ["GPU-a"], 1000, 0, 0, {"http": 20001})
        tx.transition(task, TaskState.SCHEDULED, "placed")
    stale = store.task(task.id)
    stale.version -= 1
    with pytest.raises(StaleTask), store.tx() as tx:
        tx.transition(stale, TaskState.STARTING, "should not apply")
    assert store.task("pg-job").state == TaskState.SCHEDULED
    assert store.active_allocations()[0].ports == {"http": 20001}
    assert [e.to_state for e in store.events(task.id)] == ["submitted", "queued", "scheduled"]
    with store.tx() as tx:
        tx.release(task.id)
        tx.transition(task, TaskState.CANCELLING, "test")
        tx.transition(task, TaskState.CANCELLED, "test")
    store.submit(spec, "admin")  # the name is free once the first task ended
    assert len(store.tasks(name="pg-job")) == 2
    assert store.count_tasks() == {"cancelled": 1, "queued": 1}
    store.close()


@pytest.mark.slow
def test_daemon_runs_a_task_on_postgres(pg_url, tmp_path):
    port = free_port()
    home = make_home(tmp_path / "home", port)
    home.config.write_text(home.config.read_text().replace('url = ""', f'url = "{pg_url}"'))
    init_home(home)  # creates the schema and registers the home's admin token there
    provider = Provider(home, port)
    provider.start()
    try:
        task = provider.submit(
            command=[sys.executable, "-c", "print('on postgres')"], resources={"gpu": 1}
        )
        assert provider.wait_state(task["id"], "succeeded")["exit_code"] == 0
        assert provider.logs(task["id"]) == "on postgres\n"
    finally:
        provider.stop()
        kill_task_processes(home)
