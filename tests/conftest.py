"""Fixtures: a real provider home and a real daemon on 127.0.0.1."""

import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from gpuprovider.api.loopwatch import ENV as LOOP_WATCH
from gpuprovider.testing import (
    GPUPROVIDER,
    Provider,
    free_port,
    kill_task_processes,
    make_home,
    wait_for,
)

__all__ = ["GPUPROVIDER", "free_port", "wait_for"]


@pytest.fixture
def fresh_provider(tmp_path: Path) -> Iterator[Provider]:
    """A provider of one's own, for tests that stop, kill or reconfigure it."""
    port = free_port()
    provider = Provider(make_home(tmp_path / "home", port), port)
    yield provider
    provider.stop(signal.SIGKILL)
    kill_task_processes(provider.home)


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    """One running provider shared by a module's tests, with its event loop watched:
    a handler that blocks it is logged (test_api's last test holds the log to it)."""
    port = free_port()
    p = Provider(make_home(tmp_path_factory.mktemp("home"), port), port)
    p.env[LOOP_WATCH] = "50"
    p.start()
    yield p
    p.cancel_all()
    p.stop()
    kill_task_processes(p.home)


PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _postgres_answers() -> bool:
    try:
        engine = create_engine(PG_ADMIN_URL)
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """An empty database on the PostgreSQL that CI starts on 127.0.0.1:5432."""
    if not _postgres_answers():
        pytest.skip("no PostgreSQL answers on 127.0.0.1:5432 (.ci/run starts one)")
    name = "gpp_test_" + secrets.token_hex(4)
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty store of each kind gpuprovider supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_url")
