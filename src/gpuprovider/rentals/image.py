"""The rental image made on this machine from its Debian packages: busybox-static
(a shell and the usual tools) and dropbear (the SSH server every rental runs, with the
libraries it links), imported into the container engine. No registry is needed; an
operator's own image works too if it has `/usr/sbin/dropbear`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

DEFAULT_IMAGE = "localhost/gpuprovider-rental:1"
TOOLS = (
    "sh",
    "ls",
    "cat",
    "echo",
    "id",
    "touch",
    "mkdir",
    "sleep",
    "env",
    "grep",
    "dd",
    "df",
    "rm",
    "cp",
    "mv",
    "head",
    "tail",
    "wc",
    "sha256sum",
    "nc",
    "ps",
    "uname",
    "stat",
    "sync",
    "true",
    "false",
    "vi",
    "which",
    "ln",
    "chmod",
    "find",
    "du",
)
_LIB = re.compile(r"(/\S+\.so[.\d]*)")


class ImageError(RuntimeError):
    """The image could not be made; the message says why and what to install."""


def missing() -> str:
    """What making the image needs and this machine lacks ("" when nothing)."""
    needs = {"/bin/busybox": "busybox-static", "/usr/sbin/dropbear": "dropbear-bin"}
    lacking = [pkg for path, pkg in needs.items() if not os.path.exists(path)]
    if shutil.which("ldd") is None:
        lacking.append("libc-bin")
    return " ".join(lacking)


def _libraries(binary: str) -> list[str]:
    done = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise ImageError(f"ldd {binary}: {done.stderr.strip()}")
    return sorted({m.group(1) for m in _LIB.finditer(done.stdout)})


def rootfs(root: Path) -> None:
    """The image's files under `root`."""
    for folder in ("bin", "usr/sbin", "etc", "home", "data", "tmp", "proc", "dev", "sys"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for tool in TOOLS:
        (root / "bin" / tool).symlink_to("busybox")
    shutil.copy("/usr/sbin/dropbear", root / "usr/sbin/dropbear")
    for lib in _libraries("/usr/sbin/dropbear"):
        target = root / lib.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.realpath(lib), target)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    (root / "etc/shells").write_text("/bin/sh\n")
    os.chmod(root / "tmp", 0o1777)


def build(engine: str = "podman", tag: str = DEFAULT_IMAGE) -> str:
    """Make the image and import it as `tag`; the tag."""
    if lacking := missing():
        raise ImageError(f"making the rental image needs: apt-get install {lacking}")
    with tempfile.TemporaryDirectory(prefix="gpp-rental-image-") as tmp:
        root = Path(tmp) / "root"
        rootfs(root)
        archive = Path(tmp) / "rootfs.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(root, arcname=".")
        done = subprocess.run(
            [engine, "import", str(archive), tag], capture_output=True, text=True, timeout=300
        )
    if done.returncode != 0:
        raise ImageError(f"{engine} import: {done.stderr.strip()[-300:]}")
    return tag
