"""Code in and results out: a tenant's uploads (content-addressed archives under a quota)
and volumes (named, size-limited folders that outlive attempts and tasks).

Both live in the provider's home, one folder per tenant (named by a hash of the tenant,
never by the tenant's own text). An upload is written to a partial file, checked (its
hash, every entry of the archive, its unpacked size) and only then renamed into place:
nothing half-sent or refused is ever kept, and the tenant's quota counts what is
kept plus what is being sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuprovider.backends.workfiles import BadArchive, check_archive, folder_bytes
from gpuprovider.domain.spec import NAME_PATTERN
from gpuprovider.service.errors import Conflict, NotFound, Rejected, ServiceError

SHA256 = re.compile(r"^[0-9a-f]{64}$")
PARTIAL = ".partial-"
ARCHIVE = ".tar.gz"


class TooLarge(ServiceError):
    status = 413


def tenant_folder(root: Path, tenant: str) -> Path:
    return root / hashlib.sha256(tenant.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class FileLimits:
    upload_quota_bytes: int = 2 << 30
    max_unpacked_bytes: int = 8 << 30
    max_entries: int = 200_000
    volume_quota_bytes: int = 100 << 30  # a tenant's volumes, their sizes together
    max_volume_bytes: int = 100 << 30


class PartialUpload:
    """One upload being received: its bytes go to a partial file, hashed on the way."""

    def __init__(self, uploads: Uploads, tenant: str, sha: str, path: Path, length: int):
        self.uploads, self.tenant, self.sha, self.path = uploads, tenant, sha, path
        self.length, self.received = length, 0
        self.hash = hashlib.sha256()
        self.file = open(path, "wb")  # noqa: SIM115 - closed by finish or abort

    def write(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.length:
            raise Rejected(f"upload: more bytes than its Content-Length ({self.length})")
        self.hash.update(chunk)
        self.file.write(chunk)

    def finish(self) -> dict[str, Any]:
        """Check what came and keep it; Rejected (naming the entry) otherwise."""
        self.file.close()
        if self.received != self.length:
            raise Rejected(
                f"upload: {self.received} bytes came of the {self.length} announced; send it again"
            )
        got = self.hash.hexdigest()
        if got != self.sha:
            raise Rejected(f"upload: its bytes hash to sha256:{got}, not sha256:{self.sha}")
        limits = self.uploads.limits
        try:
            summary = check_archive(self.path, limits.max_unpacked_bytes, limits.max_entries)
        except BadArchive as exc:
            raise Rejected(f"upload: {exc}; nothing was kept") from None
        os.replace(self.path, self.uploads.path(self.tenant, self.sha))
        return {
            "sha256": f"sha256:{self.sha}",
            "size": self.length,
            "entries": summary.entries,
            "unpacked_bytes": summary.unpacked_bytes,
        }

    def abort(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Uploads:
    """Each tenant's uploads. `in_use(tenant)` names the uploads its live tasks still
    need: the only ones never made room from."""

    def __init__(self, root: Path, limits: FileLimits, in_use: Callable[[str], set[str]]):
        self.root, self.limits, self.in_use = root, limits, in_use
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)
        for partial in root.glob(f"*/{PARTIAL}*"):  # a daemon that died mid-upload
            partial.unlink(missing_ok=True)
        self._lock = threading.Lock()
        self._sending: dict[str, int] = {}  # tenant -> bytes being received now

    @staticmethod
    def _sha(ref: str) -> str:
        sha = ref.removeprefix("sha256:")
        if not SHA256.match(sha):
            raise Rejected(f"upload: {ref[:80]!r} is not sha256:<64 hex digits>")
        return sha

    def path(self, tenant: str, sha: str) -> Path:
        return tenant_folder(self.root, tenant) / f"{self._sha(sha)}{ARCHIVE}"

    def have(self, tenant: str, ref: str) -> bool:
        """Whether the tenant has this upload (and it counts as used now)."""
        path = self.path(tenant, ref)
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        return True

    def _kept(self, tenant: str) -> list[os.DirEntry]:
        folder = tenant_folder(self.root, tenant)
        if not folder.is_dir():
            return []
        return [e for e in os.scandir(folder) if e.name.endswith(ARCHIVE)]

    def used(self, tenant: str) -> int:
        return sum(e.stat().st_size for e in self._kept(tenant))

    def begin(self, tenant: str, ref: str, length: int | None) -> PartialUpload:
        """Make room for an upload of `length` bytes (the oldest unused uploads go first)
        and start receiving it; TooLarge when the quota cannot hold it."""
        sha = self._sha(ref)
        if length is None:
            raise Rejected("upload: send a Content-Length (the quota is checked before)")
        quota = self.limits.upload_quota_bytes
        if length > quota:
            raise TooLarge(
                f"upload: {length} bytes is more than the quota of {quota >> 20} MiB per "
                "tenant; leave big data out (.gpuproviderignore) or use a volume"
            )
        folder = tenant_folder(self.root, tenant)
        folder.mkdir(mode=0o700, exist_ok=True)
        with self._lock:
            needed = self.used(tenant) + self._sending.get(tenant, 0) + length - quota
            if needed > 0:
                needed -= self._make_room(tenant, needed)
            if needed > 0:
                raise TooLarge(
                    f"upload: the tenant's uploads would take {needed} bytes more than its "
                    f"quota of {quota >> 20} MiB (those of live tasks are kept); cancel "
                    "tasks or delete uploads (gpuprovider upload list)"
                )
            self._sending[tenant] = self._sending.get(tenant, 0) + length
        path = folder / f"{PARTIAL}{sha}-{secrets.token_hex(4)}"
        try:
            return PartialUpload(self, tenant, sha, path, length)
        except OSError:
            self.done(tenant, length)
            raise

    def done(self, tenant: str, length: int) -> None:
        with self._lock:
            self._sending[tenant] = self._sending.get(tenant, 0) - length

    def _make_room(self, tenant: str, needed: int) -> int:
        """Delete the tenant's least recently used uploads no live task needs, until
        `needed` bytes are free; the bytes freed."""
        keep = self.in_use(tenant)
        freed = 0
        for entry in sorted(self._kept(tenant), key=lambda e: e.stat().st_mtime):
            if freed >= needed:
                break
            if f"sha256:{entry.name.removesuffix(ARCHIVE)}" in keep:
                continue
            size = entry.stat().st_size
            Path(entry.path).unlink(missing_ok=True)
            freed += size
        return freed

    def list(self, tenant: str) -> list[dict[str, Any]]:
        rows = []
        for e in self._kept(tenant):
            info = e.stat()
            sha = e.name.removesuffix(ARCHIVE)
            rows.append({"sha256": f"sha256:{sha}", "size": info.st_size, "used_at": info.st_mtime})
        return sorted(rows, key=lambda r: -r["used_at"])

    def delete(self, tenant: str, ref: str) -> None:
        if f"sha256:{self._sha(ref)}" in self.in_use(tenant):
            raise Conflict(f"upload {ref} is needed by a live task; cancel it first")
        try:
            self.path(tenant, ref).unlink()
        except FileNotFoundError:
            raise NotFound(f"no upload {ref}") from None


VOLUME_NAME = re.compile(NAME_PATTERN)
META = "volume.json"
DATA = "data"


class Volumes:
    """Each tenant's volumes. `mounted_by(tenant, name)` names the live task that
    mounts a volume, if any."""

    def __init__(
        self, root: Path, limits: FileLimits, mounted_by: Callable[[str, str], str | None]
    ):
        self.root, self.limits, self.mounted_by = root, limits, mounted_by
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)  # a task reaches its volume by a bind mount, never by this path
        self._lock = threading.Lock()

    @staticmethod
    def _name(name: str) -> str:
        if not VOLUME_NAME.match(name):
            raise Rejected(
                f"name: {name[:80]!r} is not a volume name (letters, digits, '.', '_' and "
                "'-', up to 63, no '/')"
            )
        return name

    def folder(self, tenant: str, name: str) -> Path:
        return tenant_folder(self.root, tenant) / self._name(name)

    def data(self, tenant: str, name: str) -> Path:
        return self.folder(tenant, name) / DATA

    def size_bytes(self, tenant: str, name: str) -> int | None:
        try:
            return int(json.loads((self.folder(tenant, name) / META).read_text())["size_bytes"])
        except (OSError, ValueError, KeyError):
            return None

    def _view(self, folder: Path, with_use: bool = True) -> dict[str, Any]:
        meta = json.loads((folder / META).read_text())
        view = {"name": meta["name"], "size_bytes": meta["size_bytes"]}
        view["created_at"] = meta["created_at"]
        if with_use:
            view["used_bytes"] = folder_bytes(str(folder / DATA))
        return view

    def list(self, tenant: str) -> list[dict[str, Any]]:
        folder = tenant_folder(self.root, tenant)
        if not folder.is_dir():
            return []
        found = []
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                continue
            with contextlib.suppress(OSError, ValueError, KeyError):
                found.append(self._view(entry))
        return found

    def create(self, tenant: str, name: str, size_bytes: int) -> dict[str, Any]:
        limits = self.limits
        if not 1 << 20 <= size_bytes <= limits.max_volume_bytes:
            raise Rejected(
                f"size: {size_bytes} bytes; a volume holds 1 MiB to "
                f"{limits.max_volume_bytes >> 20} MiB"
            )
        folder = self.folder(tenant, name)
        with self._lock:
            if folder.exists():
                raise Conflict(f"volume {name} exists; delete it first or choose another name")
            others = sum(v["size_bytes"] for v in self.list(tenant))
            if others + size_bytes > limits.volume_quota_bytes:
                raise TooLarge(
                    f"size: the tenant's volumes would hold {(others + size_bytes) >> 20} MiB, "
                    f"over its quota of {limits.volume_quota_bytes >> 20} MiB"
                )
            tenant_folder(self.root, tenant).mkdir(mode=0o700, exist_ok=True)
            partial = folder.with_name(f"{PARTIAL}{name}")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(mode=0o700)
            (partial / DATA).mkdir(mode=0o700)
            meta = {"name": name, "size_bytes": size_bytes, "created_at": time.time()}
            (partial / META).write_text(json.dumps(meta))
            partial.rename(folder)
        return self._view(folder)

    def delete(self, tenant: str, name: str) -> None:
        folder = self.folder(tenant, name)
        with self._lock:
            if not (folder / META).exists():
                raise NotFound(f"no volume {name}")
            if holder := self.mounted_by(tenant, name):
                raise Conflict(f"volume {name} is mounted by live task {holder}; cancel it first")
            gone = folder.with_name(f"{PARTIAL}gone-{name}-{secrets.token_hex(4)}")
            folder.rename(gone)  # out of sight at once; its files go after
        shutil.rmtree(gone, ignore_errors=True)
