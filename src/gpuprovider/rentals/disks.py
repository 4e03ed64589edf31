"""A rental's disk: an ext4 image file of the size asked for, mounted (loop, nosuid,
nodev) on the node while the rental runs and bound into its container at /data.

The image is sparse: it takes the room its files do. A filesystem of its own is what
bounds it (a tenant who fills it gets ENOSPC, never the host's disk full), and what
keeps hard links from reaching anything outside it. Deleting the image wipes it: the
file's blocks go back to the host filesystem, which gives a later file's unwritten
blocks back as zeros, so the next tenant of that space reads nothing of this one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

GIB = 2**30


class DiskError(OSError):
    """The disk could not be made, mounted or wiped; the message says why."""


def _run(argv: list[str], what: str, timeout: float = 120) -> None:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DiskError(f"{what}: {exc}") from None
    if done.returncode != 0:
        raise DiskError(f"{what}: {(done.stderr or done.stdout).strip()[-300:]}")


def unavailable() -> str:
    """Why disks cannot be made here ("" when they can)."""
    if shutil.which("mkfs.ext4") is None:
        return "mkfs.ext4 is not installed (Debian: e2fsprogs)"
    if os.geteuid() != 0:
        return "mounting a rental's disk needs the daemon to run as root"
    return ""


def create(image: Path, size_gib: float) -> None:
    """A new sparse ext4 image of `size_gib`; nothing is left behind when it fails."""
    image.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        with open(image, "xb") as out:
            out.truncate(int(size_gib * GIB))
        _run(
            ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "root_owner=0:0", str(image)],
            f"cannot make a filesystem on {image}",
        )
    except BaseException:
        image.unlink(missing_ok=True)
        raise
    os.chmod(image, 0o600)


def mounted(mount_dir: Path) -> bool:
    return os.path.ismount(mount_dir)


def mount(image: Path, mount_dir: Path) -> None:
    """Mount `image` at `mount_dir` unless it already is (a daemon restart keeps it)."""
    mount_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if mounted(mount_dir):
        return
    if not image.exists():
        raise DiskError(f"the disk {image} is gone")
    _run(
        ["mount", "-o", "loop,nosuid,nodev", str(image), str(mount_dir)],
        f"cannot mount the disk {image}",
    )
    lost = mount_dir / "lost+found"  # mkfs's, root's: nothing a tenant needs
    if lost.is_dir() and not lost.is_symlink() and not any(lost.iterdir()):
        lost.rmdir()


def unmount(mount_dir: Path) -> None:
    if mounted(mount_dir):
        _run(["umount", str(mount_dir)], f"cannot unmount {mount_dir}")


def wipe(folder: Path, image: Path, mount_dir: Path) -> None:
    """Unmount the disk and delete it and the rental's folder (see the module's note)."""
    unmount(mount_dir)
    image.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


class RentalFolder:
    """Where a rental's files live on its node: `<disks_dir>/<rental id>/`."""

    def __init__(self, disks_dir: Path, rental_id: str):
        self.root = Path(disks_dir) / rental_id
        self.image = self.root / "disk.img"
        self.mount = self.root / "disk"
        self.home = self.root / "home"
        self.host_key = self.root / "ssh_host_key"

    def wipe(self) -> None:
        wipe(self.root, self.image, self.mount)
