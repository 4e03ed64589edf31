"""A task's ports kept from everyone but itself and the provider: one nftables table
per machine (`inet gpuprovider`), shared by every provider home and Ray node on it,
whose rules match the uid of the socket that sends (`meta skuid`). Task users are the
machine's (isolation/users.py: a uid is lent to one attempt at a time, host-wide), so a
uid says whose a socket is.

Modes (`[isolation] network`):
- "host": the host's network, as it is; anyone may connect to the task's ports.
- "isolated": the task's sockets answer only the task itself (its own uid), the
  provider (root: its gateway and daemon) and, on a Ray node, the provider's machine
  (`peers`); it reaches anything else, the internet included.
- "none": isolated, and it may connect to nothing but its own ports on this machine.

How (the rules below, in the output hook; nothing per packet of other traffic):
- A new connection to a local address records who opened it in its conntrack mark:
  the task's uid for a task's socket, ROOT_MARK for root's, nothing (0) for anyone else.
- Every packet a guarded task's socket sends as the *answering* side of a connection
  (conntrack's reply direction: a SYN-ACK, a UDP answer) passes only to the task
  itself, to root, or (off the machine) to a peer; anything else is dropped. This
  guards every port a task listens on, declared or not, jobs' as services': the kernel
  finds the listener's uid, whoever it is.
- A task's declared ports are refused at once (a TCP reset, not a timeout) to anyone
  but root and the task, before the listener is reached.
- A "none" task's new connections off the machine are rejected; answers to its
  connections on the machine pass only from its own sockets.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import ipaddress
import json
import os
import shutil
import subprocess
import threading

TABLE = "gpuprovider"
LOCK = "/run/gpuprovider/nftables.lock"
MODES = ("host", "isolated", "none")
ROOT_MARK = 0xFFFFFFFF  # no uid is -1
NFT_TIMEOUT_S = 30.0
SONAME = "libnftables.so.1"


def rules(table: str) -> str:
    """The machine's table, made once."""
    return f"""
table inet {table} {{
  map connector {{ typeof meta skuid : ct mark; }}
  set isolated {{ typeof meta skuid; }}
  set offline {{ typeof meta skuid; }}
  set offline_marks {{ typeof ct mark; }}
  set self {{ typeof ct mark . meta skuid; }}
  set ports {{ typeof th dport; }}
  set port_owner {{ typeof th dport . meta skuid; }}
  set peers4 {{ typeof ip daddr; }}
  set peers6 {{ typeof ip6 daddr; }}
  chain output {{
    type filter hook output priority filter; policy accept;
    ct state new fib daddr type local ct mark set meta skuid map @connector
    ct state new fib daddr type local meta l4proto {{ tcp, udp }} th dport @ports jump port
    ct direction reply meta skuid @isolated jump answer
    ct direction reply ct mark @offline_marks jump offline_answer
    ct direction original meta skuid @offline fib daddr type != local \
      reject with icmpx admin-prohibited
  }}
  chain port {{
    meta skuid 0 return
    th dport . meta skuid @port_owner return
    meta l4proto tcp reject with tcp reset
    reject with icmpx port-unreachable
  }}
  chain answer {{
    fib daddr type local ct mark {ROOT_MARK:#x} accept
    fib daddr type local ct mark . meta skuid @self accept
    fib daddr type != local ip daddr @peers4 accept
    fib daddr type != local ip6 daddr @peers6 accept
    drop
  }}
  chain offline_answer {{
    ct mark . meta skuid @self accept
    drop
  }}
}}
"""


class NetworkError(OSError):
    """The table could not be changed; the message says why."""


class _Library:
    """libnftables (what `nft` is made of), called in this process: no program started
    per task. One context per process (a forked runner makes its own), used by one
    thread at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = 0
        self.ctx: int | None = None
        self.lib: ctypes.CDLL | None = None
        # By its soname: find_library would run ldconfig, ~90 ms, in every runner.
        for name in (SONAME, ctypes.util.find_library("nftables")):
            with contextlib.suppress(OSError, TypeError):
                self.lib = ctypes.CDLL(name)
                break
        if self.lib is None:
            return
        self.lib.nft_ctx_new.restype = ctypes.c_void_p
        self.lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        self.lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        self.lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        self.lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        self.lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        self.lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self.lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]

    def run(self, script: str) -> str | None:
        """None when it went through; else why not."""
        assert self.lib is not None
        with self.lock:
            if self.ctx is None or self.pid != os.getpid():
                self.ctx = self.lib.nft_ctx_new(0)
                self.lib.nft_ctx_buffer_output(self.ctx)
                self.lib.nft_ctx_buffer_error(self.ctx)
                self.pid = os.getpid()
            if self.lib.nft_run_cmd_from_buffer(self.ctx, script.encode()) == 0:
                return None
            return (self.lib.nft_ctx_get_error_buffer(self.ctx) or b"").decode().strip()


_library: _Library | None = None


def load() -> bool:
    """Load libnftables now (the runner server does, before it forks runners, so that
    each runner's clean-up finds it loaded); whether there is one."""
    global _library
    if _library is None:
        _library = _Library()
    return _library.lib is not None


def _nft(script: str) -> None:
    load()
    assert _library is not None
    if _library.lib is not None:
        why = _library.run(script)
        if why is not None:
            raise NetworkError(f"nftables: {why or 'refused'}")
        return
    try:  # no library: the program
        done = subprocess.run(
            ["nft", "-f", "-"],
            input=script,
            capture_output=True,
            text=True,
            timeout=NFT_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise NetworkError(f"nft: {exc}") from None
    if done.returncode != 0:
        raise NetworkError(f"nft: {done.stderr.strip() or done.returncode}")


@contextlib.contextmanager
def _locked():
    os.makedirs(os.path.dirname(LOCK), mode=0o700, exist_ok=True)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ready() -> str:
    """Make the machine's table if there is none; why it cannot be ("" when it is)."""
    if os.geteuid() != 0:
        return "the daemon does not run as root"
    if not load() and not shutil.which("nft"):
        return "nftables is not installed (the nft program, libnftables)"
    with _locked():
        try:
            _nft(f"list table inet {TABLE}\n")
            return ""  # made by this or another provider on the machine
        except NetworkError:
            pass
        try:
            _nft(rules(TABLE) + f"add element inet {TABLE} connector {{ 0 : {ROOT_MARK:#x} }}\n")
        except NetworkError as exc:
            return str(exc)
    return ""


def _elements(uid: int, ports: list[int], mode: str) -> list[tuple[str, str]]:
    """(set, element) for an attempt of `uid` in `mode` with its declared `ports`."""
    found = [
        ("connector", f"{uid} : {uid}"),
        ("isolated", str(uid)),
        ("self", f"{uid} . {uid}"),
    ]
    found += [("ports", str(port)) for port in ports]
    found += [("port_owner", f"{port} . {uid}") for port in ports]
    if mode == "none":
        found += [("offline", str(uid)), ("offline_marks", str(uid))]
    return found


def guard(uid: int, ports: list[int], mode: str) -> None:
    """Keep what `uid` listens on (and, for "none", where it connects) as `mode` says."""
    if mode == "host":
        return
    lines = [f"add element inet {TABLE} {n} {{ {e} }}" for n, e in _elements(uid, ports, mode)]
    try:
        _nft("\n".join(lines) + "\n")
    except NetworkError:
        # The table went (someone flushed the machine's ruleset): made again, then the
        # attempt is guarded; attempts running meanwhile are not, until they end.
        if why := ready():
            raise NetworkError(why) from None
        _nft("\n".join(lines) + "\n")


def release(uid: int, ports: list[int], mode: str) -> None:
    """Undo `guard` (the attempt's processes are gone); what is missing already is
    no matter."""
    if mode == "host":
        return
    lines = [f"delete element inet {TABLE} {n} {{ {e} }}" for n, e in _elements(uid, ports, mode)]
    try:
        _nft("\n".join(lines) + "\n")  # one transaction: all of it, usually
    except NetworkError:
        for line in lines:  # something was gone already: the rest, one at a time
            with contextlib.suppress(NetworkError):
                _nft(line + "\n")


def add_peers(addresses: list[str]) -> None:
    """Let these hosts (the provider's machine, for a Ray node) reach guarded ports."""
    lines = []
    for text in addresses:
        address = ipaddress.ip_address(text)
        family = "peers4" if address.version == 4 else "peers6"
        lines.append(f"add element inet {TABLE} {family} {{ {address} }}")
    if lines:
        _nft("\n".join(lines) + "\n")


def listed(name: str) -> list[str]:
    """The elements of one of the table's sets, as nft writes them (for `node` facts
    and tests)."""
    done = subprocess.run(
        ["nft", "-j", "list", "set", "inet", TABLE, name],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=NFT_TIMEOUT_S,
    )
    if done.returncode != 0:
        return []
    found: list[str] = []
    for item in json.loads(done.stdout).get("nftables", []):
        for element in item.get("set", {}).get("elem", []):
            plain = isinstance(element, (str, int))
            found.append(str(element) if plain else json.dumps(element))
    return found
