"""`task run --upload DIR`: a folder packed as a gzip-compressed tar, named by its SHA-256.

What `.gitignore` and `.gpuproviderignore` files leave out is not sent (`.git/` never
is). The archive is the same bytes for the same files (sorted entries, no owners, no
time in the gzip header), so an unchanged folder has the same name: the CLI remembers
which name a folder's listing (paths, sizes, modification times) packed to and, when the
provider already has it, sends nothing and packs nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

IGNORE_FILES = (".gitignore", ".gpuproviderignore")
ALWAYS_LEFT_OUT = (".git",)
FORMAT = "1"  # of the listing cache's key: a change of packing changes it
COMPRESS_LEVEL = 1  # code packs small at the fastest level; the bytes are sent once


class PackError(ValueError):
    """The folder cannot be sent as it is; the message names the entry."""


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool


def _translate(pattern: str) -> str:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 1)) > i:
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            if body.startswith("!"):
                body = "^" + body[1:]
            out, i = out + f"[{body}]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def _rule(line: str) -> _Rule | None:
    """One line of an ignore file, as git reads it."""
    line = line.rstrip("\n").rstrip("\r")
    if not line.endswith("\\ "):
        line = line.rstrip(" ")
    if not line or line.startswith("#"):
        return None
    negate = line.startswith("!")
    if negate:
        line = line[1:]
    if line.startswith("\\"):
        line = line[1:]
    dir_only = line.endswith("/")
    line = line.rstrip("/")
    if not line:
        return None
    anchored = "/" in line
    regex = _translate(line.lstrip("/"))
    if not anchored:
        regex = "(?:.*/)?" + regex
    return _Rule(re.compile(f"^{regex}$"), negate, dir_only)


def _rules_in(folder: Path) -> list[_Rule]:
    rules = []
    for name in IGNORE_FILES:
        try:
            text = (folder / name).read_text(errors="replace")
        except OSError:
            continue
        rules += [r for line in text.splitlines() if (r := _rule(line))]
    return rules


def _ignored(layers: list[tuple[str, list[_Rule]]], rel: str, is_dir: bool) -> bool:
    """Whether `rel` (relative to the root) is left out: the last rule that matches it,
    of the ignore files above it, decides (deeper files last)."""
    verdict = False
    for base, rules in layers:
        sub = rel[len(base) + 1 :] if base else rel
        for rule in rules:
            if rule.dir_only and not is_dir:
                continue
            if rule.regex.match(sub):
                verdict = not rule.negate
    return verdict


@dataclass(frozen=True)
class Entry:
    rel: str
    path: str
    info: os.stat_result
    link: str = ""


def listing(root: Path) -> list[Entry]:
    """What of `root` is sent, sorted; PackError for what cannot be (a link out of the
    folder, a device file, a pipe or socket)."""
    found: list[Entry] = []

    def walk(folder: str, rel: str, layers: list[tuple[str, list[_Rule]]]) -> None:
        rules = _rules_in(Path(folder))
        if rules:
            layers = [*layers, (rel, rules)]
        with os.scandir(folder) as listed:
            entries = sorted(listed, key=lambda e: e.name)
        for entry in entries:
            name = entry.name
            sub = f"{rel}/{name}" if rel else name
            info = entry.stat(follow_symlinks=False)
            is_dir = stat.S_ISDIR(info.st_mode)
            if name in ALWAYS_LEFT_OUT or (layers and _ignored(layers, sub, is_dir)):
                continue
            if stat.S_ISLNK(info.st_mode):
                target = os.readlink(entry.path)
                inside = os.path.normpath(os.path.join(os.path.dirname(sub), target))
                if os.path.isabs(target) or inside.split("/")[0] == "..":
                    raise PackError(
                        f"{sub} links to {target}, outside the folder; copy the file in, or "
                        "leave it out (.gpuproviderignore)"
                    )
                found.append(Entry(sub, entry.path, info, target))
            elif is_dir:
                found.append(Entry(sub, entry.path, info))
                walk(entry.path, sub, layers)
            elif stat.S_ISREG(info.st_mode):
                found.append(Entry(sub, entry.path, info))
            else:
                raise PackError(
                    f"{sub} is not a file, folder or link (a device, pipe or socket); "
                    "leave it out (.gpuproviderignore)"
                )

    if not root.is_dir():
        raise PackError(f"{root} is not a folder")
    walk(str(root), "", [])
    return found


def listing_key(root: Path, entries: list[Entry]) -> str:
    """What identifies the folder's content cheaply: its entries' names, sizes, modes,
    modification times and link targets."""
    digest = hashlib.sha256(f"{FORMAT}\0{root.resolve()}\0".encode())
    for e in entries:
        line = f"{e.rel}\0{e.info.st_size}\0{e.info.st_mode}\0{e.info.st_mtime_ns}\0{e.link}\n"
        digest.update(line.encode(errors="surrogateescape"))
    return digest.hexdigest()


def pack(entries: list[Entry], into: Path) -> str:
    """Write the archive of `entries` to `into`; its SHA-256 (hex)."""
    with open(into, "wb") as raw:
        gz = gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=COMPRESS_LEVEL
        )
        with gz, tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for e in entries:
                info = tarfile.TarInfo(e.rel)
                info.mtime = int(e.info.st_mtime)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if e.link:
                    info.type, info.linkname, info.mode = tarfile.SYMTYPE, e.link, 0o777
                    tar.addfile(info)
                elif stat.S_ISDIR(e.info.st_mode):
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                else:
                    info.size = e.info.st_size
                    info.mode = 0o755 if e.info.st_mode & 0o111 else 0o644
                    with open(e.path, "rb") as data:
                        tar.addfile(info, data)
    digest = hashlib.sha256()
    with open(into, "rb") as done:
        while chunk := done.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "gpuprovider" / "uploads"


def remembered(key: str) -> str | None:
    try:
        return json.loads((cache_dir() / key).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember(key: str, sha: str) -> None:
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.tmp"
        tmp.write_text(json.dumps({"sha256": sha}))
        os.replace(tmp, folder / key)
    except OSError:
        pass  # only a cache: the next upload packs again


def temporary_archive() -> Path:
    handle, name = tempfile.mkstemp(prefix="gpuprovider-upload-", suffix=".tar.gz")
    os.close(handle)
    return Path(name)
