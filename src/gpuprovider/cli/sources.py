"""Where `--upload` takes code from besides a folder: `git:URL@REV` and an http(s)
tar archive with its checksum (`https://…/code.tar.gz#sha256=HEX`).

The CLI fetches them on the user's machine and sends them as any folder: the provider
never reaches out to a URL a tenant names, and every check an upload gets still applies.
A source that cannot change (a full commit id, a checksum) is remembered: sent again
unchanged, it is neither fetched nor packed.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

import httpx

GIT_TIMEOUT_S = 600.0
COMMIT = re.compile(r"^[0-9a-f]{40}$")
CHECKSUM = re.compile(r"#sha256=([0-9a-fA-F]{64})$")
MAX_DOWNLOAD_BYTES = 8 << 30


class SourceError(ValueError):
    """The source cannot be had; the message says why."""


def is_remote(text: str) -> bool:
    return text.startswith(("git:", "http://", "https://"))


def immutable_key(text: str) -> str | None:
    """A cache key for a source that cannot change, else None."""
    if text.startswith("git:"):
        _, _, rev = text[4:].rpartition("@")
        return hashlib.sha256(f"git\0{text}".encode()).hexdigest() if COMMIT.match(rev) else None
    if CHECKSUM.search(text):
        return hashlib.sha256(f"url\0{text}".encode()).hexdigest()
    return None


def _git(*args: str, cwd: Path | None = None) -> None:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    done = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=GIT_TIMEOUT_S
    )
    if done.returncode != 0:
        raise SourceError(f"git {args[0]}: {done.stderr.strip()[-300:] or done.returncode}")


def fetch_git(text: str, into: Path) -> None:
    """`git:URL@REV` checked out into `into` (its .git is never sent)."""
    url, sep, rev = text[4:].rpartition("@")
    if not sep or not url or not rev:
        raise SourceError(f"{text!r}: write git:URL@REV (a branch, tag or commit)")
    try:
        _git("init", "-q", str(into))
        try:  # one commit only, where the server allows it
            _git("fetch", "-q", "--depth", "1", url, rev, cwd=into)
            _git("checkout", "-q", "FETCH_HEAD", cwd=into)
        except SourceError:
            _git("fetch", "-q", url, cwd=into)
            _git("checkout", "-q", rev, cwd=into)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SourceError(f"{text}: {exc}") from None


def fetch_archive(text: str, into: Path) -> None:
    """An http(s) tar archive, its SHA-256 checked, unpacked into `into`."""
    found = CHECKSUM.search(text)
    if not found:
        raise SourceError(f"{text}: add the archive's checksum: {text}#sha256=<64 hex digits>")
    url, wanted = text[: found.start()], found.group(1).lower()
    digest, size = hashlib.sha256(), 0
    with tempfile.NamedTemporaryFile(suffix=".tar") as raw:
        try:
            with httpx.stream("GET", url, follow_redirects=True, timeout=60) as answer:
                if answer.status_code != 200:
                    raise SourceError(f"{url}: answered {answer.status_code}")
                for chunk in answer.iter_bytes():
                    size += len(chunk)
                    if size > MAX_DOWNLOAD_BYTES:
                        raise SourceError(f"{url}: larger than {MAX_DOWNLOAD_BYTES >> 30} GiB")
                    digest.update(chunk)
                    raw.write(chunk)
        except httpx.HTTPError as exc:
            raise SourceError(f"{url}: {exc.__class__.__name__}: {exc}") from None
        if digest.hexdigest() != wanted:
            raise SourceError(f"{url}: its bytes hash to sha256={digest.hexdigest()}, not {wanted}")
        raw.flush()
        try:
            with tarfile.open(raw.name) as archive:
                archive.extractall(into, filter="data")
        except (tarfile.TarError, OSError, ValueError) as exc:
            raise SourceError(f"{url}: not a tar archive that unpacks here: {exc}") from None
