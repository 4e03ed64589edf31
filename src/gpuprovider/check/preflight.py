"""Preflight: is this machine set up to sell GPU work? Fast, read-only, no GPU load."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import shutil
import socket
from pathlib import Path

import httpx
import psutil

from gpuprovider.backends.container import container_engine
from gpuprovider.check.context import CheckContext
from gpuprovider.check.registry import check
from gpuprovider.check.result import Result, Status, graded

MIN_DRIVER = 470
MIN_KERNEL = (4, 15)
DISK_PASS_GIB, DISK_WARN_GIB = 100, 20
GIB = 2**30


def _no_nvml(ctx: CheckContext) -> Result | None:
    if ctx.report.driver_version:
        return None
    return Result(Status.SKIP, advice=ctx.report.unavailable_reason or "no NVIDIA driver found")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("-")[0].split(".") if p.isdigit())


@check("preflight", "os", "OS and kernel")
def os_and_kernel(ctx: CheckContext) -> Result:
    if platform.system() != "Linux":
        return Result(
            Status.WARN,
            platform.platform(),
            advice="GPU work is sold from Linux; other systems run for trials only",
        )
    kernel = platform.release()
    ok = _version_tuple(kernel)[:2] >= MIN_KERNEL
    return Result.judged(
        ok,
        Status.WARN,
        f"{_distro()} / kernel {kernel}",
        threshold=f"kernel >= {'.'.join(map(str, MIN_KERNEL))}",
        advice="upgrade the kernel: current NVIDIA drivers need 4.15 or later",
    )


def _distro() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", "Linux")
    except OSError:
        return "Linux"


@check("preflight", "driver", "NVIDIA driver and CUDA", gpu=True)
def driver(ctx: CheckContext) -> Result:
    if skipped := _no_nvml(ctx):
        return skipped
    version = ctx.report.driver_version
    major = (_version_tuple(version) or (0,))[0]
    ok = major >= MIN_DRIVER
    return Result.judged(
        ok,
        Status.FAIL,
        f"{version} (CUDA {ctx.report.cuda_version})",
        threshold=f"driver >= {MIN_DRIVER}",
        advice=f"install NVIDIA driver {MIN_DRIVER} or newer",
    )


@check("preflight", "container-engine", "Container engine")
def engine(ctx: CheckContext) -> Result:
    found = container_engine()
    if found:
        return Result(Status.PASS, found)
    return Result(
        Status.WARN,
        "none",
        threshold="docker or podman answering",
        advice="tasks with `image:` cannot run; install docker or podman (and the NVIDIA "
        "container toolkit) or run only command tasks",
    )


@check("preflight", "ram-vs-vram", "RAM at least total VRAM", gpu=True)
def ram_vs_vram(ctx: CheckContext) -> Result:
    if not ctx.gpus:
        return Result(Status.SKIP, advice="no NVIDIA GPU to compare against")
    ram = psutil.virtual_memory().total / GIB
    vram = sum(g.memory_mib for g in ctx.gpus) / 1024
    ok = ram >= vram
    return Result.judged(
        ok,
        Status.FAIL,
        round(ram, 1),
        "GiB",
        threshold=f">= {vram:.0f} GiB (total VRAM)",
        advice=f"add {vram - ram:.0f} GiB of RAM: work that loads a model into every GPU "
        "stages it in host memory first",
    )


@check("preflight", "disk", "Free disk for tasks and caches")
def disk(ctx: CheckContext) -> Result:
    free = shutil.disk_usage(ctx.data_dir).free / GIB
    status = graded(free, pass_at=DISK_PASS_GIB, warn_at=DISK_WARN_GIB)
    return Result(
        status,
        round(free, 1),
        "GiB",
        threshold=f">= {DISK_PASS_GIB} GiB ({DISK_WARN_GIB} to warn)",
        advice=""
        if status is Status.PASS
        else f"free space in {ctx.data_dir}: models, images and outputs land there",
        data={"path": str(ctx.data_dir)},
    )


class _Timex(ctypes.Structure):
    # struct timex begins with `unsigned int modes`; the kernel writes the rest. Room
    # for the whole struct (208 bytes on 64-bit Linux) with margin.
    _fields_ = [("modes", ctypes.c_uint), ("rest", ctypes.c_byte * 508)]


TIME_ERROR = 5  # adjtimex(2): the clock is not synchronised


@check("preflight", "clock", "Clock synchronised")
def clock(ctx: CheckContext) -> Result:
    libc_name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or not libc_name:
        return Result(Status.SKIP, advice="clock state is read with adjtimex(2), Linux only")
    libc = ctypes.CDLL(libc_name, use_errno=True)
    state = libc.adjtimex(ctypes.byref(_Timex()))  # modes = 0: read only
    if state < 0:
        return Result(Status.SKIP, advice=f"adjtimex failed: {os.strerror(ctypes.get_errno())}")
    if state == TIME_ERROR:
        return Result(
            Status.WARN,
            "not synchronised",
            threshold="kernel clock synchronised (NTP)",
            advice="enable NTP (systemd-timesyncd or chrony): leases, proofs and logs carry "
            "timestamps",
        )
    return Result(Status.PASS, "synchronised", threshold="kernel clock synchronised (NTP)")


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@check("preflight", "ports", "Configured ports free")
def ports(ctx: CheckContext) -> Result:
    api = ctx.config.api
    lo, hi = ctx.config.executor.port_range
    # on the API's address: a port taken there is taken for a service bound anywhere
    busy = [p for p in range(lo, hi + 1) if not _port_free(api.host, p)]
    problems = []
    if not _port_free(api.host, api.port) and not _is_gpuprovider(api.host, api.port):
        problems.append(f"API port {api.port} is taken by another program")
    share = len(busy) / (hi - lo + 1)
    if share > 0.1:
        problems.append(f"{len(busy)} of the task ports {lo}-{hi} are taken")
    return Result(
        Status.FAIL if problems else Status.PASS,
        f"api {api.port}, {hi - lo + 1 - len(busy)}/{hi - lo + 1} task ports free",
        threshold="API port free (or ours); <= 10 % of task ports taken",
        advice="; ".join(problems)
        + ("; change [api] port or [executor] port_range" if problems else ""),
    )


def _is_gpuprovider(host: str, port: int) -> bool:
    """The API port is taken: by this provider's own daemon (fine) or by something else?"""
    try:
        answer = httpx.get(f"http://{host}:{port}/api/v1/version", timeout=2)
        return answer.status_code == 200 and "gpuprovider" in answer.text
    except httpx.HTTPError:
        return False


def _sysctl(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


@check("preflight", "ip-forward", "IP forwarding (Kubernetes)")
def ip_forward(ctx: CheckContext) -> Result:
    value = _sysctl("/proc/sys/net/ipv4/ip_forward")
    if value is None:
        return Result(Status.SKIP, advice="/proc/sys/net/ipv4/ip_forward not readable")
    ok = value == "1"
    return Result.judged(
        ok,
        Status.WARN,
        value,
        threshold="1 to join a Kubernetes cluster",
        advice="sysctl -w net.ipv4.ip_forward=1 (needed only to join Kubernetes)",
    )


@check("preflight", "br-netfilter", "Bridge netfilter (Kubernetes)")
def br_netfilter(ctx: CheckContext) -> Result:
    value = _sysctl("/proc/sys/net/bridge/bridge-nf-call-iptables")
    ok = value == "1"
    return Result.judged(
        ok,
        Status.WARN,
        "module not loaded" if value is None else value,
        threshold="br_netfilter loaded, bridge-nf-call-iptables = 1 to join Kubernetes",
        advice="modprobe br_netfilter; sysctl -w net.bridge.bridge-nf-call-iptables=1 "
        "(needed only to join Kubernetes)",
    )


@check("preflight", "virtualisation", "KVM, IOMMU and VFIO (whole-VM rentals)")
def virtualisation(ctx: CheckContext) -> Result:
    kvm = Path("/dev/kvm").exists()
    groups = Path("/sys/kernel/iommu_groups")
    iommu = groups.is_dir() and any(groups.iterdir())
    vfio = Path("/sys/module/vfio_pci").exists() or Path("/dev/vfio").exists()
    found = {"kvm": kvm, "iommu": iommu, "vfio": vfio}
    missing = [name for name, ok in found.items() if not ok]
    fixes = {
        "kvm": "enable VT-x/AMD-V in the BIOS and load kvm",
        "iommu": "enable VT-d/AMD-Vi in the BIOS and boot with intel_iommu=on or amd_iommu=on",
        "vfio": "modprobe vfio-pci",
    }
    return Result(
        Status.WARN if missing else Status.PASS,
        ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in found.items()),
        threshold="all three to rent whole VMs with GPU passthrough",
        advice="; ".join(fixes[m] for m in missing) + " (needed only for VM rentals)"
        if missing
        else "",
        data=found,
    )
