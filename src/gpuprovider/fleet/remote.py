"""SSH to a fleet host (asyncssh): host keys checked, commands quoted, files copied.

A host's key must be in the operator's `~/.ssh/known_hosts` or the provider's own
`fleet/known_hosts`. An unknown host is refused unless the operator said
`--accept-new`: then its key is pinned on that first connection (trust on first use,
as `ssh -o StrictHostKeyChecking=accept-new`). A host whose key changed is refused
always: `--accept-new` never replaces a key."""

from __future__ import annotations

import secrets
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

with warnings.catch_warnings():  # asyncssh still names DSA, which cryptography deprecates
    warnings.simplefilter("ignore")
    import asyncssh

from gpuprovider.fleet.inventory import Host, Jump

CONNECT_TIMEOUT_S = 15.0


class RemoteError(RuntimeError):
    """A connection or a remote command failed; `output` is what the host said."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


@dataclass(frozen=True)
class Done:
    exit_status: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return (self.stdout + self.stderr).strip()


def _pattern(address: str, port: int) -> str:
    return address if port == 22 else f"[{address}]:{port}"


class KnownHosts:
    """The operator's known_hosts files (read) and the provider's own (read, pinned into)."""

    def __init__(self, own: Path, others: list[Path] | None = None) -> None:
        self.own = own
        self.others = others if others is not None else [Path.home() / ".ssh" / "known_hosts"]

    def load(self) -> asyncssh.SSHKnownHosts:
        files = [str(p) for p in [*self.others, self.own] if p.exists()]
        return asyncssh.read_known_hosts(files) if files else asyncssh.SSHKnownHosts()

    def knows(self, address: str, port: int) -> bool:
        keys, ca_keys, *_ = self.load().match(address, address, port)
        return bool(keys or ca_keys)

    def pin(self, address: str, port: int, key: Any) -> None:
        line = key.export_public_key("openssh").decode().split()
        self.own.parent.mkdir(parents=True, exist_ok=True)
        with self.own.open("a") as out:
            out.write(f"{_pattern(address, port)} {line[0]} {line[1]}\n")
        self.own.chmod(0o600)


async def _open(
    address: str,
    port: int,
    user: str,
    key: str | None,
    known: KnownHosts,
    accept_new: bool,
    tunnel: Any = None,
) -> tuple[Any, bool]:
    """A connection, and whether its host key was pinned just now."""
    known_before = known.knows(address, port)
    pin = not known_before and accept_new
    # an unknown host is still reached (its key is checked before any credential goes
    # out), so that an unreachable one is said to be unreachable
    checked: Any = None if pin else known.load()
    options: dict[str, Any] = {
        "host": address,
        "port": port,
        "username": user,
        "known_hosts": checked,
        "connect_timeout": CONNECT_TIMEOUT_S,
        "tunnel": tunnel,
        "config": [],  # never the operator's ~/.ssh/config: the inventory says it all
    }
    if key:
        options.update(client_keys=[key], agent_path=None)
    try:
        connection = await asyncssh.connect(**options)
    except asyncssh.HostKeyNotVerifiable as exc:
        if not known_before:
            raise RemoteError(
                f"the host key of {_pattern(address, port)} is not known; check it and add it "
                f"to ~/.ssh/known_hosts (ssh-keyscan -p {port} {address}), or rerun with "
                "--accept-new to pin the key it shows on this first connection"
            ) from None
        raise RemoteError(
            f"{_pattern(address, port)} REFUSED: its host key is not the one known for it "
            f"({exc.reason}). It may have been reinstalled, or someone is in the middle; "
            "check it out of band, then remove its old line from known_hosts"
        ) from None
    except asyncssh.PermissionDenied as exc:
        raise RemoteError(
            f"{user}@{_pattern(address, port)}: permission denied ({exc.reason})"
        ) from None
    except (TimeoutError, OSError, asyncssh.Error) as exc:
        why = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or repr(exc)
        raise RemoteError(f"cannot connect to {_pattern(address, port)}: {why}") from None
    if pin:
        known.pin(address, port, connection.get_server_host_key())
    return connection, pin


class Session:
    """An open connection to one host; commands run as root (through `sudo -n` when the
    inventory's user is another)."""

    def __init__(self, host: Host, connection: Any, jump: Any = None) -> None:
        self.host = host
        self.connection = connection
        self.jump = jump
        self.pinned: list[str] = []

    @classmethod
    async def open(cls, host: Host, known: KnownHosts, accept_new: bool) -> Session:
        jump_connection = None
        pinned = []
        if isinstance(host.jump, Jump):
            jump_connection, was = await _open(
                host.jump.host, host.jump.port, host.jump.user, host.key, known, accept_new
            )
            if was:
                pinned.append(_pattern(host.jump.host, host.jump.port))
        try:
            connection, was = await _open(
                host.address, host.port, host.user, host.key, known, accept_new, jump_connection
            )
        except BaseException:
            if jump_connection is not None:
                jump_connection.close()
            raise
        if was:
            pinned.append(_pattern(host.address, host.port))
        made = cls(host, connection, jump_connection)
        made.pinned = pinned
        return made

    def close(self) -> None:
        self.connection.close()
        if self.jump is not None:
            self.jump.close()

    async def run(
        self, argv: list[str], timeout_s: float = 600.0, stdin: str | None = None
    ) -> Done:
        """Run argv on the host, each word quoted: nothing in it is read by a shell."""
        words = argv if self.host.user == "root" else ["sudo", "-n", "--", *argv]
        try:
            done = await self.connection.run(
                shlex.join(words), check=False, timeout=timeout_s, input=stdin
            )
        except asyncssh.TimeoutError as exc:
            raise RemoteError(
                f"{argv[0]} did not finish within {timeout_s:g}s",
                f"{exc.stdout or ''!s}{exc.stderr or ''!s}",
            ) from None
        except (OSError, asyncssh.Error) as exc:
            raise RemoteError(f"the connection broke: {exc}") from None
        if done.exit_status is None or done.exit_status < 0:
            if done.exit_signal:
                raise RemoteError(
                    f"{argv[0]} was killed on the host ({done.exit_signal[0]})",
                    f"{done.stdout or ''}{done.stderr or ''}",
                )
            raise RemoteError(
                f"the connection broke while {argv[0]} ran",
                f"{done.stdout or ''}{done.stderr or ''}",
            )
        return Done(
            done.exit_status,
            str(done.stdout or ""),
            str(done.stderr or ""),
        )

    async def check(
        self, argv: list[str], timeout_s: float = 600.0, stdin: str | None = None
    ) -> str:
        """stdout of argv; RemoteError with its output when it fails."""
        done = await self.run(argv, timeout_s, stdin)
        if done.exit_status != 0:
            raise RemoteError(f"`{shlex.join(argv)[:200]}` exited {done.exit_status}", done.output)
        return done.stdout

    async def put(self, local: Path, remote: str) -> None:
        """Copy a file to the host (SFTP), written aside and renamed into place (through
        /tmp when the inventory's user is not root and sudo moves it)."""
        partial = f"{remote}.partial"
        if self.host.user != "root":
            partial = f"/tmp/.gpuprovider-{secrets.token_hex(8)}"
        try:
            async with self.connection.start_sftp_client() as sftp:
                await sftp.put(str(local), partial)
        except (OSError, asyncssh.Error) as exc:
            raise RemoteError(f"copying {local.name} to {remote} failed: {exc}") from None
        await self.check(["mv", "-f", partial, remote])

    async def write(self, text: str, remote: str, mode: str = "0644") -> None:
        """A small file on the host, from text (through stdin: never a command line)."""
        partial = f"{remote}.partial"
        await self.check(["tee", partial], stdin=text)
        await self.check(["chmod", mode, partial])
        await self.check(["mv", "-f", partial, remote])
