"""The provider's home: where its config, store, secrets and task files live."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "~/.gpuprovider"


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def resolve(cls, home: str | Path | None = None) -> Home:
        chosen = home or os.environ.get("GPUPROVIDER_HOME") or DEFAULT_HOME
        return cls(Path(chosen).expanduser().absolute())

    @property
    def config(self) -> Path:
        return self.root / "provider.toml"

    @property
    def store(self) -> Path:
        return self.root / "store.db"

    @property
    def token(self) -> Path:
        """The admin token, for the CLI on this machine (mode 0600)."""
        return self.root / "admin.token"

    @property
    def gateway_token(self) -> Path:
        """The gateway's token (scope `gateway`: routes in, figures out; mode 0600)."""
        return self.root / "gateway.token"

    @property
    def gateway_pid(self) -> Path:
        return self.root / "gateway.pid"

    @property
    def node_key(self) -> Path:
        return self.root / "node.key"

    @property
    def verifier_key(self) -> Path:
        """The key `gpuprovider proof verify` signs its verdicts with."""
        return self.root / "verifier.key"

    @property
    def uploads(self) -> Path:
        """Tenants' uploads (one folder per tenant)."""
        return self.root / "uploads"

    @property
    def volumes(self) -> Path:
        """Tenants' volumes (one folder per tenant)."""
        return self.root / "volumes"

    @property
    def tasks(self) -> Path:
        return self.root / "tasks"

    @property
    def rentals(self) -> Path:
        return self.root / "rentals"

    @property
    def lock(self) -> Path:
        return self.root / "daemon.lock"

    def store_url(self, configured: str) -> str:
        return configured or f"sqlite:///{self.store}"


@contextmanager
def private_files() -> Iterator[None]:
    """Files and folders made meanwhile are their owner's alone (0600, 0700)."""
    before = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(before)


def make_private(home: Home) -> None:
    """What a home holds that an older gpuprovider made readable by others (the store,
    its journal files, the daemon's lock), made its owner's alone."""
    for path in (home.store, *home.root.glob("store.db-*"), home.lock, home.config):
        with contextlib.suppress(FileNotFoundError):
            path.chmod(0o600)


def write_secret(path: Path, data: bytes) -> None:
    """Create a file readable by its owner only; never overwrite one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
