"""Bring a store to this code's schema with Alembic, or refuse one that is newer.

The only module that imports Alembic: the daemon runs it in a child process
(`store.upgrade_in_child`), so that its own memory never carries Alembic.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, select

from gpuprovider.store import schema as t
from gpuprovider.store.store import Store, StoreError, Upgrade

MIGRATIONS = Path(__file__).with_name("migrations")
logging.getLogger("alembic").setLevel(logging.WARNING)  # its progress lines are noise here
# gpuprovider 0.1.0 made its tables without Alembic and wrote `meta.schema = 1`.
UNVERSIONED_0_1_0 = "0001"


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


def upgrade(store: Store) -> Upgrade:
    """Create the schema, or bring an older store to it with its data; refuse a store
    made by a newer gpuprovider (StoreError says so)."""
    try:
        with store.engine.connect() as conn:
            if store.is_sqlite:
                # SQLite alters a table by copying it, and dropping the old copy would
                # trip the foreign keys of rows that point at it: off while migrating
                # (outside a transaction, where SQLite honours it), checked after.
                conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
                conn.commit()
            with conn.begin():
                done = upgrade_on(conn)
                if store.is_sqlite and conn.exec_driver_sql("PRAGMA foreign_key_check").first():
                    raise StoreError("migrating the store left rows pointing nowhere")
            return done
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"cannot open the store at {store.url}: {exc}") from None


def upgrade_on(conn: Connection) -> Upgrade:
    """Migrate the store on `conn` to the head revision, in the caller's transaction."""
    before = current(conn)
    check_known(before)
    config = _config(conn)
    versioned = MigrationContext.configure(conn).get_current_revision() is not None
    if before == UNVERSIONED_0_1_0 and not versioned:
        command.stamp(config, UNVERSIONED_0_1_0)
    command.upgrade(config, "head")
    return Upgrade(before, head())


def main(url: str) -> int:
    """`python -m gpuprovider.store.migrate URL`: upgrade, say what happened as JSON."""
    store = Store(url)
    try:
        done = upgrade(store)
    except StoreError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    finally:
        store.close()
    print(json.dumps({"before": done.before, "after": done.after}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
