"""Backends by kind: what `[backend] kind` names, made from its own section. A new
backend is a factory here and a config model beside the others in config.py."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

from gpuprovider.backends.base import Backend
from gpuprovider.backends.local import LocalBackend, LocalNode
from gpuprovider.backends.ray.driver import RayBackend
from gpuprovider.config import IsolationConfig, ProviderConfig, RayBackendConfig
from gpuprovider.isolation.policy import Settings

log = logging.getLogger("gpuprovider")


@dataclass(frozen=True)
class BackendContext:
    """What a backend is made from besides its section."""

    config: ProviderConfig
    home_root: Path
    home_tasks: Path  # the home's tasks folder
    node_id: str  # this machine's node (the local backend's one node)
    public_key: str
    on_exit: Callable[..., None]  # a task process ended (the executor wakes)


def isolation_settings(isolation: IsolationConfig) -> Settings:
    """[isolation] as the node that runs a task applies it."""
    return Settings(
        users=isolation.users,
        cgroups=isolation.cgroups,
        memory_margin_pct=isolation.memory_margin_pct,
        memory_margin_mib=isolation.memory_margin_mib,
        pids_max=isolation.pids_max,
        cpu_quota=isolation.cpu_quota,
        devices=isolation.devices,
        log_max_bytes=isolation.log_max_mib << 20,
        network=isolation.network,
    )


def machine_addresses() -> tuple[str, ...]:
    """This machine's own addresses off loopback: where a Ray node sees the provider's
    gateway come from."""
    found = set()
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            address = ipaddress.ip_address(entry.address.split("%")[0])
            if not address.is_loopback and not address.is_link_local:
                found.add(str(address))
    return tuple(sorted(found))


def tasks_dir(config: ProviderConfig, home_tasks: Path) -> Path:
    """Where tasks' folders are (their logs, exit records, work folders): in the home,
    or on a Ray node, `[backend] node_dir` of each node if set."""
    backend = config.backend
    if isinstance(backend, RayBackendConfig) and backend.node_dir:
        return Path(backend.node_dir)
    return home_tasks


def _local(context: BackendContext) -> Backend:
    config = context.config
    node = LocalNode(
        node_id=context.node_id,
        name=config.inventory.node_name,
        public_key=context.public_key,
        home=context.home_root,
        simulated_gpus=tuple(config.inventory.simulated_gpus),
        labels=tuple(sorted(config.inventory.labels.items())),
        nvml=config.inventory.nvml,
    )
    backend = LocalBackend(
        node,
        context.home_tasks,
        on_exit=context.on_exit,
        isolation=isolation_settings(config.isolation),
    )
    for what, how in backend.isolation.describe().items():
        if how.startswith("none"):
            log.warning("ISOLATION %s %s: tasks are not kept apart this way", what, how)
    return backend


def _ray(context: BackendContext) -> Backend:
    config = context.config
    section = config.backend
    assert isinstance(section, RayBackendConfig)
    return RayBackend(
        section.address,
        tasks_dir(config, context.home_tasks),
        context.home_root / "ray.credential",
        replace(isolation_settings(config.isolation), network_peers=machine_addresses()),
        section.lease_s,
        section.lease_grace_s,
        config.telemetry.kernel_log,
        section.restart_grace_s,
        context.home_root / "ray.grants.json",
    )


BACKENDS: dict[str, Callable[[BackendContext], Backend]] = {"local": _local, "ray": _ray}


def make_backend(context: BackendContext) -> Backend:
    return BACKENDS[context.config.backend.kind](context)
