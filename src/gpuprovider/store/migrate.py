"""Bring a store to this code's schema with Alembic, or refuse one that is newer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, select

from gpuprovider.store import schema as t

MIGRATIONS = Path(__file__).with_name("migrations")
logging.getLogger("alembic").setLevel(logging.WARNING)  # its progress lines are noise here
# gpuprovider 0.1.0 made its tables without Alembic and wrote `meta.schema = 1`.
UNVERSIONED_0_1_0 = "0001"


class StoreError(RuntimeError):
    """The store cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Upgrade:
    before: str | None  # revision found (None: an empty store)
    after: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


def _config(conn: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory(str(MIGRATIONS))


def head() -> str:
    return _scripts().get_current_head() or ""


def current(conn: Connection) -> str | None:
    """The store's revision: Alembic's, or 0001 for a 0.1.0 store, or None when empty."""
    revision = MigrationContext.configure(conn).get_current_revision()
    if revision is not None:
        return revision
    if inspect(conn).has_table("meta"):
        schema = conn.execute(select(t.meta.c.value).where(t.meta.c.key == "schema")).scalar()
        if schema == "1":
            return UNVERSIONED_0_1_0
        if schema is not None:
            raise StoreError(
                f"the store says schema {schema} but has no migration record; "
                "it was not written by gpuprovider"
            )
    if inspect(conn).get_table_names():
        raise StoreError("the store has tables gpuprovider did not make; give it an empty database")
    return None


def check_known(revision: str | None) -> None:
    """Refuse a store written by a newer gpuprovider."""
    if revision is None:
        return
    scripts = _scripts()
    try:
        scripts.get_revision(revision)
    except Exception:
        raise StoreError(
            f"the store was written by a newer gpuprovider (schema revision {revision}; "
            f"this one knows up to {scripts.get_current_head()}); upgrade gpuprovider"
        ) from None


def upgrade(conn: Connection) -> Upgrade:
    """Migrate the store on `conn` to the head revision, in the caller's transaction."""
    before = current(conn)
    check_known(before)
    config = _config(conn)
    versioned = MigrationContext.configure(conn).get_current_revision() is not None
    if before == UNVERSIONED_0_1_0 and not versioned:
        command.stamp(config, UNVERSIONED_0_1_0)
    command.upgrade(config, "head")
    return Upgrade(before, head())
