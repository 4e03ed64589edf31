"""Fixtures: a real provider home and a real daemon on 127.0.0.1."""

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    """One running provider shared by a module's tests."""
    port = free_port()
    p = Provider(make_home(tmp_path_factory.mktemp("home"), port), port)
    p.start()
    yield p
    p.cancel_all()
    p.stop()
    kill_task_processes(p.home)
