"""`gpuprovider key ...`: the node's identity, shown, backed up and restored."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from gpuprovider.cli.client import CliError
from gpuprovider.cli.common import globals_of
from gpuprovider.cli.output import console, print_json
from gpuprovider.daemon.daemon import DaemonError, lock_home
from gpuprovider.home import write_secret
from gpuprovider.identity.backup import BackupError, Identity, backup, read_identity, restore
from gpuprovider.identity.keys import load_node_key

key_app = typer.Typer(help="The node's identity key.", no_args_is_help=True)
PASSPHRASE_ENV = "GPUPROVIDER_KEY_PASSPHRASE"
PASSPHRASE_FILE = typer.Option(
    None,
    "--passphrase-file",
    help=f"Read the passphrase from the first line of this file (else ${PASSPHRASE_ENV}, "
    "else it is asked for).",
)


def _passphrase(file: Path | None, confirm: bool) -> str:
    if file is not None:
        try:
            return file.read_text().splitlines()[0] if file.stat().st_size else ""
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"cannot read the passphrase from {file}: {exc}", 2) from None
    if PASSPHRASE_ENV in os.environ:
        return os.environ[PASSPHRASE_ENV]
    if not sys.stdin.isatty():
        raise CliError(f"no passphrase: give --passphrase-file or set ${PASSPHRASE_ENV}", 2)
    return typer.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm)


def _key(ctx: typer.Context):
    path = globals_of(ctx).home.node_key
    try:
        return load_node_key(path)
    except FileNotFoundError:
        raise CliError(f"no node key at {path}; `gpuprovider init` makes one", 2) from None
    except ValueError as exc:
        raise CliError(f"{path} is not a node key: {exc}", 1) from None


def _say(identity: Identity, as_json: bool, **more: str) -> None:
    if as_json:
        return print_json({"node_id": identity.node_id, "public_key": identity.public_key, **more})
    console.print(f"node id     {identity.node_id}\npublic key  {identity.public_key}")
    for name, value in more.items():
        console.print(f"{name.replace('_', ' '):<11} {value}")


@key_app.command("show")
def show(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """Print the node id and public key (never the private key)."""
    _say(Identity.of(_key(ctx)), as_json, path=str(globals_of(ctx).home.node_key))


@key_app.command("backup")
def backup_key(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="Where to write the backup (a new file)."),
    passphrase_file: Path | None = PASSPHRASE_FILE,
) -> None:
    """Write the node key encrypted with a passphrase (scrypt + AES-256-GCM).

    Keep the file and the passphrase apart: either alone is useless."""
    key = _key(ctx)
    try:
        data = backup(key, _passphrase(passphrase_file, confirm=True))
        write_secret(file, data)
    except BackupError as exc:
        raise CliError(str(exc), 2) from None
    except FileExistsError:
        raise CliError(f"{file} exists; name a new file (nothing was written)", 2) from None
    except OSError as exc:
        raise CliError(f"cannot write {file}: {exc.strerror}", 1) from None
    _say(Identity.of(key), False, backup=str(file))


@key_app.command("restore")
def restore_key(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="A file `key backup` wrote."),
    replace: bool = typer.Option(
        False, help="Replace a different key of this home (kept beside it as node.key.<id>)."
    ),
    passphrase_file: Path | None = PASSPHRASE_FILE,
) -> None:
    """Restore the node key from a backup.

    A different key of this home is refused (unless --replace, with the daemon stopped)."""
    home = globals_of(ctx).home
    try:
        data = file.read_bytes()
        read_identity(data)  # a wrong file is said before a passphrase is asked
    except OSError as exc:
        raise CliError(f"cannot read {file}: {exc.strerror}", 2) from None
    except BackupError as exc:
        raise CliError(f"{file}: {exc}", 2) from None
    home.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        lock = lock_home(home) if replace else None  # the daemon would go on as the old node
    except DaemonError as exc:
        raise CliError(str(exc), 1) from None
    try:
        identity, aside = restore(data, _passphrase(passphrase_file, False), home.node_key, replace)
    except BackupError as exc:
        raise CliError(f"{file}: {exc}", 2) from None
    finally:
        if lock is not None:
            lock.close()
    _say(identity, False, **({"old_key_at": str(aside)} if aside else {}))
