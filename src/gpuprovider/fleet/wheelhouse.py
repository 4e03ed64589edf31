"""The wheels a node is installed from: exactly what this provider runs.

A node must run the provider's own gpuprovider and Ray versions, and a GPU server often
has no index to install from. So the wheels come from this process's own environment:
gpuprovider's wheel is built from its source (an editable install) or repacked from its
installed files, and every distribution of its dependency closure (with the `ray`
extra) is repacked from the files its RECORD lists, with the tags of its own WHEEL file.
The result is byte for byte what runs here, at the same versions, cached by file name
under the provider's home. Repacked wheels carry the platform tags they were installed
with, so a host must have this Python's version and this machine's architecture (the
host check says so before anything is copied)."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = "gpuprovider"
EXTRAS = ("ray",)  # a node joins the provider's Ray cluster


class WheelhouseError(RuntimeError):
    """A wheel could not be made from this environment; the message says which and why."""


@dataclass(frozen=True)
class Wanted:
    name: str  # canonical
    version: str


def closure(root: str = ROOT, extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """{canonical name: installed version} of `root[extras]` and everything it needs here."""
    found: dict[str, set[str]] = {}
    versions: dict[str, str] = {}
    todo = [(root, set(extras))]
    while todo:
        name, wanted = todo.pop()
        key = canonicalize_name(name)
        if key in found and wanted <= found[key]:
            continue
        found.setdefault(key, set()).update(wanted)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise WheelhouseError(
                f"{name} is needed by a node but not installed here; install "
                f"'gpuprovider[{','.join(extras)}]' in the provider's environment"
            ) from None
        versions[key] = dist.version
        for text in dist.requires or []:
            requirement = Requirement(text)
            environments = [{"extra": e} for e in found[key]] or [{"extra": ""}]
            if requirement.marker is None or any(
                requirement.marker.evaluate(env) for env in environments
            ):
                todo.append((requirement.name, set(requirement.extras)))
    return versions


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def _tags(wheel_text: str, name: str) -> str:
    tags = [
        line.split(":", 1)[1].strip() for line in wheel_text.splitlines() if line.startswith("Tag:")
    ]
    if not tags:
        raise WheelhouseError(f"{name}: its WHEEL file names no tag; reinstall it with pip")
    parts = [sorted({t.split("-")[i] for t in tags}) for i in range(3)]
    return "-".join(".".join(p) for p in parts)


def _entry_point_scripts(dist: metadata.Distribution) -> set[str]:
    return {ep.name for ep in dist.entry_points if ep.group in ("console_scripts", "gui_scripts")}


def repack(dist: metadata.Distribution, into: Path) -> Path:
    """A wheel of an installed distribution, from the files its RECORD lists."""
    name = canonicalize_name(dist.metadata["Name"]).replace("-", "_")
    info = next(
        (Path(str(f)).parts[0] for f in dist.files or [] if str(f).endswith(".dist-info/METADATA")),
        None,
    )
    if info is None or not dist.files:
        raise WheelhouseError(f"{name}: installed without a RECORD; reinstall it with pip")
    base = Path(str(dist.locate_file("")))
    wheel_text = (base / info / "WHEEL").read_text() if (base / info / "WHEEL").exists() else ""
    target = into / f"{name}-{dist.version}-{_tags(wheel_text, name)}.whl"
    if target.exists():
        return target
    scripts = _entry_point_scripts(dist)
    data_dir = f"{name}-{dist.version}.data"
    prefix = Path(sys.prefix).resolve()
    records: list[str] = []
    fd, partial = tempfile.mkstemp(dir=into, suffix=".partial")
    os.close(fd)
    try:
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for entry in dist.files:
                relative = str(entry)
                if "__pycache__" in relative or relative.endswith(".pyc"):
                    continue  # pip compiles them on the host
                if relative.startswith(f"{info}/") and relative.split("/", 1)[1] in (
                    "RECORD",
                    "INSTALLER",
                    "REQUESTED",
                    "direct_url.json",
                ):
                    continue
                source = (base / relative).resolve()
                if not source.is_file():
                    continue
                data = source.read_bytes()
                if relative.startswith(".."):  # outside site-packages: scripts, headers
                    try:
                        inside = source.relative_to(prefix)
                    except ValueError:
                        continue
                    if inside.parts[0] == "bin":
                        if inside.name in scripts:
                            continue  # pip makes it again from entry_points.txt
                        if data.startswith(b"#!") and b"python" in data.split(b"\n", 1)[0]:
                            data = b"#!python\n" + data.split(b"\n", 1)[1]
                        arcname = f"{data_dir}/scripts/{inside.name}"
                    else:
                        arcname = f"{data_dir}/data/{inside}"
                else:
                    arcname = relative
                info_zip = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
                info_zip.external_attr = (source.stat().st_mode & 0o777 | 0o100000) << 16
                info_zip.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info_zip, data, compresslevel=1)
                records.append(f"{arcname},{_record_hash(data)},{len(data)}")
            if not wheel_text:
                raise WheelhouseError(f"{name}: no WHEEL file; reinstall it with pip")
            records.append(f"{info}/RECORD,,")
            zf.writestr(f"{info}/RECORD", "\n".join(records) + "\n")
        os.chmod(partial, 0o644)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def own_wheel(into: Path) -> Path:
    """gpuprovider's own wheel: built from its source when it runs from one (an editable
    install), repacked from its installed files otherwise."""
    dist = metadata.distribution(ROOT)
    direct = dist.read_text("direct_url.json") or ""
    match = re.search(r'"url":\s*"file://([^"]+)"', direct)
    if '"editable": true' not in direct or not match:
        return repack(dist, into)
    source = match.group(1)
    with tempfile.TemporaryDirectory(dir=into) as scratch:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "-q",
                "-w",
                scratch,
                source,
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise WheelhouseError(
                f"building gpuprovider's wheel from {source} failed:\n"
                f"{(done.stderr or done.stdout).strip()[-2000:]}"
            )
        made = next(Path(scratch).glob("gpuprovider-*.whl"))
        target = into / "own" / made.name
        target.parent.mkdir(exist_ok=True)
        shutil.move(made, target)
    return target


def wheels_for(names: list[str], into: Path) -> list[Path]:
    """Repacked wheels of these installed distributions (cached in `into`)."""
    into.mkdir(parents=True, exist_ok=True)
    return [repack(metadata.distribution(name), into) for name in names]
