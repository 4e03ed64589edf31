"""A task's files on the node that runs it: an upload checked and unpacked into its work
folder, and what it wrote there listed and read, never past that folder.

Everything here reads what a tenant made (an archive it sent, files its task wrote) as
hostile: an archive entry that would land outside the folder, a link out of it, a
device file or more bytes than allowed is refused by name; a file is reached one
component at a time without following any link, so a task cannot swap a link under the
daemon (which reads as root) to make it read another file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from gpuprovider.isolation import users

MAX_ENTRY_NAME = 4096
MAX_LISTED = 10_000  # entries of one folder in one answer
UPLOAD_MARK = "upload.done"  # in the run folder: the upload is unpacked (once per task)


class BadArchive(ValueError):
    """The archive cannot be accepted; the message names the entry."""


class NotInWorkdir(LookupError):
    """No such file in the task's work folder (or one that may not be read)."""


@dataclass(frozen=True)
class ArchiveSummary:
    entries: int
    unpacked_bytes: int


def _entry_name(name: str) -> str:
    """`name` as a relative path inside the folder; BadArchive when it is not one."""
    if not name or len(name) > MAX_ENTRY_NAME:
        raise BadArchive(f"entry {name[:80]!r}: empty or longer than {MAX_ENTRY_NAME}")
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        raise BadArchive(f"entry {name[:80]!r}: its name holds control characters")
    if name.startswith("/") or posixpath.isabs(name):
        raise BadArchive(f"entry {name!r}: an absolute path; entries are relative")
    if ".." in name.split("/"):
        raise BadArchive(f"entry {name!r}: '..' would leave the task's folder")
    return posixpath.normpath(name)


def check_archive(path: str | Path, max_unpacked_bytes: int, max_entries: int) -> ArchiveSummary:
    """Read a gzip-compressed tar through, without unpacking it: every entry a file, a
    folder or a link that stays inside; at most `max_entries` entries and
    `max_unpacked_bytes` in all (a compression bomb stops at the first header past it,
    before its bytes are inflated). BadArchive naming the entry otherwise."""
    entries = unpacked = 0
    try:
        with tarfile.open(path, mode="r|gz") as archive:
            for member in archive:
                name = _entry_name(member.name)
                entries += 1
                if entries > max_entries:
                    raise BadArchive(f"more than {max_entries} entries (at {name!r})")
                if member.isdev() or member.isfifo():
                    raise BadArchive(f"entry {name!r}: a device file or pipe; send files only")
                if member.islnk():
                    raise BadArchive(f"entry {name!r}: a hard link; send the file itself")
                if member.issym():
                    target = member.linkname
                    joined = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
                    if not target or posixpath.isabs(target) or joined.split("/")[0] == "..":
                        raise BadArchive(
                            f"entry {name!r}: a link to {target!r}, outside the task's folder"
                        )
                elif not (member.isfile() or member.isdir()):
                    raise BadArchive(f"entry {name!r}: not a file, folder or link")
                unpacked += member.size
                if unpacked > max_unpacked_bytes:
                    raise BadArchive(
                        f"entry {name!r}: the archive unpacks to more than "
                        f"{max_unpacked_bytes >> 20} MiB"
                    )
    except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as exc:
        if isinstance(exc, BadArchive):
            raise
        raise BadArchive(f"not a gzip-compressed tar archive: {exc}") from None
    return ArchiveSummary(entries, unpacked)


def unpack(archive: str | Path, workdir: str, uid: int | None, gid: int | None) -> int:
    """Unpack a checked archive into `workdir` (fresh: the task's first start), with
    tarfile's `data` filter as a second guard (no entry, link or permission bit that
    reaches out), every entry then given to the task's user. How many entries."""
    with tarfile.open(archive, mode="r:gz") as tar:
        members = tar.getmembers()
        tar.extractall(workdir, filter="data")
    if uid is not None and gid is not None:
        for member in members:
            with contextlib.suppress(FileNotFoundError):
                os.lchown(os.path.join(workdir, member.name), uid, gid)
    return len(members)


def folder_bytes(path: str) -> int:
    """Bytes a folder's files take (links not followed)."""
    total = 0
    for root, _, files in os.walk(path, followlinks=False):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def settle_volume(folder: str, uid: int | None, gid: int | None) -> int:
    """One walk of a volume's folder before an attempt mounts it: the bytes its files
    take, and (with a user) every entry a pool user owns handed to `uid`, as
    `users.hand_over` does for a work folder (links never followed; a file with other
    hard links stays as it is)."""
    total = 0
    pool: dict[int, bool] = {}
    if uid is not None and gid is not None:
        os.chown(folder, uid, gid)
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                try:
                    found = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(found.st_mode):
                    stack.append(entry.path)
                elif stat.S_ISREG(found.st_mode):
                    total += found.st_size
                if uid is None or gid is None or found.st_uid == uid:
                    continue
                if found.st_uid not in pool:
                    pool[found.st_uid] = users.pool_uid(found.st_uid)
                if pool[found.st_uid] and not (stat.S_ISREG(found.st_mode) and found.st_nlink > 1):
                    os.lchown(entry.path, uid, gid)
    return total


def _parts(path: str) -> list[str]:
    """The components of a path inside the work folder; NotInWorkdir for `..`."""
    if "\x00" in path or len(path) > MAX_ENTRY_NAME:
        raise NotInWorkdir(path[:80])
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise NotInWorkdir(path)
    return parts


def _open_beneath(workdir: str, path: str) -> tuple[int, os.stat_result]:
    """An fd for `path` inside `workdir`, opened component by component with no link
    followed anywhere (the work folder itself included), and its stat."""
    try:
        fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        raise NotInWorkdir(path) from None
    try:
        for part in _parts(path):
            try:
                # O_NONBLOCK: a pipe the task made must never stall the daemon
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                nxt = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                    raise NotInWorkdir(path) from None
                raise
            os.close(fd)
            fd = nxt
            found = os.fstat(fd)
            if not (stat.S_ISDIR(found.st_mode) or stat.S_ISREG(found.st_mode)):
                raise NotInWorkdir(path)
        found = os.fstat(fd)
        # a hard link to a file that is not the task's (whoever owns the folder)
        shared = stat.S_ISREG(found.st_mode) and found.st_nlink > 1
        if shared and found.st_uid != os.stat(workdir).st_uid:
            raise NotInWorkdir(path)
        return fd, found
    except BaseException:
        os.close(fd)
        raise


def list_files(workdir: str, path: str) -> list[dict]:
    """The entries of folder `path` in the work folder (or `path` itself, a file): name,
    type (file, dir, link, other), size and modification time, sorted by name."""
    fd, found = _open_beneath(workdir, path)
    try:
        if stat.S_ISREG(found.st_mode):
            name = _parts(path)[-1]
            return [{"name": name, "type": "file", "size": found.st_size, "mtime": found.st_mtime}]
        names = sorted(os.listdir(fd))[:MAX_LISTED]
        out = []
        for name in names:
            try:
                entry = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            kind = (
                "dir"
                if stat.S_ISDIR(entry.st_mode)
                else "file"
                if stat.S_ISREG(entry.st_mode)
                else "link"
                if stat.S_ISLNK(entry.st_mode)
                else "other"
            )
            out.append({"name": name, "type": kind, "size": entry.st_size, "mtime": entry.st_mtime})
        return out
    finally:
        os.close(fd)


def read_file(workdir: str, path: str, offset: int, limit: int) -> tuple[int, bytes]:
    """Up to `limit` bytes of file `path` in the work folder from `offset`, and its size."""
    fd, found = _open_beneath(workdir, path)
    try:
        if not stat.S_ISREG(found.st_mode):
            raise NotInWorkdir(f"{path} is a folder; list it, or name a file")
        return found.st_size, os.pread(fd, limit, offset)
    finally:
        os.close(fd)
