"""`gpuprovider init`: a home with config, store, admin token and node key.

Never overwrites what exists; reports what it created and what it kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpuprovider.config import SimulatedGpu, load_config, render_default_config
from gpuprovider.home import Home, make_private, private_files, write_secret
from gpuprovider.identity.keys import (
    create_node_key,
    hash_token,
    load_node_key,
    new_token,
    node_id_for,
)
from gpuprovider.inventory.local import read_nvml
from gpuprovider.store import migrate
from gpuprovider.store.store import Store

ADMIN = "admin"
DEFAULT_SIMULATED = [SimulatedGpu(model="h100-80gb-sxm", count=2)]


@dataclass
class InitReport:
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    admin_token: str | None = None  # shown once, when newly created
    node_id: str = ""
    simulated_note: str = ""


def init_home(home: Home, simulate: bool | None = None) -> InitReport:
    """Set up `home`. `simulate`: declare simulated GPUs (None: only if NVML finds none).
    Everything it makes is its owner's alone (0600 files, 0700 folders)."""
    with private_files():
        report = _init_home(home, simulate)
    make_private(home)
    return report


def _init_home(home: Home, simulate: bool | None) -> InitReport:
    report = InitReport()
    home.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    home.tasks.mkdir(exist_ok=True)

    if home.config.exists():
        report.kept.append(f"config {home.config}")
    else:
        declared: list[SimulatedGpu] = []
        if simulate or (simulate is None and not read_nvml("probe").gpus):
            declared = DEFAULT_SIMULATED
            report.simulated_note = (
                "no NVIDIA GPU found: declared 2 simulated h100-80gb-sxm GPUs in provider.toml "
                "so work can be tried; they are marked simulated everywhere"
            )
        home.config.write_text(render_default_config(declared))
        report.created.append(f"config {home.config}")
    config = load_config(home.config)

    store = Store(home.store_url(config.store.url))
    try:
        upgrade = migrate.upgrade(store)
        if upgrade.before is None:
            report.created.append(f"store {store.url}")
        elif upgrade.changed:
            report.created.append(
                f"store {store.url} upgraded from schema {upgrade.before} to {upgrade.after}"
            )
        else:
            report.kept.append(f"store {store.url}")

        if home.node_key.exists():
            key = load_node_key(home.node_key)
            report.kept.append(f"node key {home.node_key}")
        else:
            key = create_node_key(home.node_key)
            report.created.append(
                f"node key {home.node_key} (back it up: it is this node's identity)"
            )
        report.node_id = node_id_for(key)

        with store.tx() as tx:
            if ADMIN in {t.name for t in tx.tokens.all()}:
                report.kept.append(f"admin token (in {home.token}; not shown again)")
            elif home.token.exists():
                # A new store beside an existing token file: register that token again.
                secret = home.token.read_text().strip()
                tx.tokens.add(ADMIN, hash_token(secret), [ADMIN], ADMIN)
                report.kept.append(f"admin token from {home.token}, registered in the new store")
            else:
                token = new_token()
                tx.tokens.add(ADMIN, hash_token(token), [ADMIN], ADMIN)
                write_secret(home.token, token.encode())
                report.admin_token = token
                report.created.append(f"admin token (saved for this machine's CLI in {home.token})")
    finally:
        store.close()
    return report
