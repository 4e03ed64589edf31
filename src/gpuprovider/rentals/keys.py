"""A rental's SSH host key, made by the provider when the rental is made, so that the
tenant can check it from the first login (`gpuprovider rent ssh` writes it to a
known_hosts file) and it stays the same across stops, starts and daemon restarts."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


class KeyError_(OSError):
    """No host key could be made; the message says why."""


def unavailable() -> str:
    if shutil.which("dropbearkey") is None:
        return "dropbearkey is not installed (Debian: dropbear-bin)"
    return ""


def make_host_key(path: Path) -> str:
    """An Ed25519 host key in dropbear's format at `path` (mode 0600); its public key
    as `ssh-ed25519 BASE64`."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.unlink(missing_ok=True)
    try:
        made = subprocess.run(
            ["dropbearkey", "-t", "ed25519", "-f", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KeyError_(f"cannot make a host key: {exc}") from None
    if made.returncode != 0:
        raise KeyError_(f"cannot make a host key: {made.stderr.strip()[-300:]}")
    os.chmod(path, 0o600)
    for line in made.stdout.splitlines():
        if line.startswith("ssh-ed25519 "):
            return " ".join(line.split()[:2])
    raise KeyError_("dropbearkey printed no public key")


def write_authorized_keys(home: Path, keys: list[str]) -> None:
    """The rental's home as its SSH server reads it: `home/.ssh/authorized_keys`, all
    root's and read-only to the tenant (mounted read-only too), so a login can never
    add a key of its own there."""
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o755)
    os.chmod(ssh_dir, 0o755)
    tmp = ssh_dir / "authorized_keys.tmp"
    tmp.write_text("".join(f"{key}\n" for key in keys))
    os.chmod(tmp, 0o644)
    os.replace(tmp, ssh_dir / "authorized_keys")
