"""The one GPU model catalogue that inventory, constraints and checks all read."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources


@dataclass(frozen=True)
class GpuModel:
    id: str
    family: str
    memory_gb: int
    nvml_names: tuple[str, ...]
    pci_ids: tuple[int, ...]  # PCI device ids (vendor 0x10de)
    source: str
    peak: dict[str, float]  # dense TFLOPS per dtype (int8: TOPS); absent: no tensor path
    bandwidth_gbs: float
    perf_source: str


def _key(text: str) -> str:
    """Fold a model name for matching: `NVIDIA GeForce RTX-4090` -> `rtx4090`."""
    folded = text.lower()
    for noise in ("nvidia", "geforce", "tesla"):
        folded = folded.replace(noise, "")
    return re.sub(r"[^a-z0-9]", "", folded)


@cache
def models() -> dict[str, GpuModel]:
    raw = tomllib.loads(resources.files(__package__).joinpath("gpu_catalogue.toml").read_text())
    return {
        entry["id"]: GpuModel(
            id=entry["id"],
            family=entry["family"],
            memory_gb=int(entry["memory_gb"]),
            nvml_names=tuple(entry["nvml_names"]),
            pci_ids=tuple(int(i, 16) for i in entry.get("pci_ids", [])),
            source=entry["source"],
            peak={dtype: float(value) for dtype, value in entry["peak"].items()},
            bandwidth_gbs=float(entry["bandwidth_gbs"]),
            perf_source=entry["perf_source"],
        )
        for entry in raw["gpu"]
    }


@cache
def _by_key() -> dict[str, frozenset[str]]:
    """Every name a user may write (family or id) -> the model ids it stands for."""
    index: dict[str, set[str]] = {}
    for model in models().values():
        index.setdefault(_key(model.family), set()).add(model.id)
        index.setdefault(_key(model.id), set()).add(model.id)
    return {name: frozenset(ids) for name, ids in index.items()}


class UnknownGpuModel(ValueError):
    pass


def known_names() -> list[str]:
    return sorted({m.family.upper() for m in models().values()})


def resolve(name: str) -> frozenset[str]:
    """The model ids a constraint name matches: `H100` -> every H100 variant."""
    ids = _by_key().get(_key(name))
    if not ids:
        raise UnknownGpuModel(
            f"unknown GPU model {name!r}; known models: {', '.join(known_names())}"
        )
    return ids


def from_device_name(
    device_name: str, memory_mib: int, pci_device_id: int | None = None
) -> tuple[str, int]:
    """Normalise an NVML device to (model id, marketed memory in GB): by its PCI device
    id first (a board maker's or driver's own name still maps), then by NVML's name.

    A device the catalogue does not know keeps a slug of its own name and memory
    (`rtx-a5000-24gb`), so it is still shown, offered and schedulable by exact name;
    `known` says it is not in the catalogue.
    """
    if pci_device_id is not None:
        by_id = [m for m in models().values() if pci_device_id in m.pci_ids]
        if by_id:  # several entries share an id only if memory tells them apart
            model = min(by_id, key=lambda m: abs(m.memory_gb * 1024 - memory_mib))
            return model.id, model.memory_gb
    for model in models().values():
        if device_name in model.nvml_names:
            return model.id, model.memory_gb
    memory_gb = round(memory_mib / 1024)
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower().replace("nvidia", "")).strip("-")
    return f"{slug or 'gpu'}-{memory_gb}gb", memory_gb


def names_a_model(name: str) -> bool:
    """Whether `name` is a catalogue model id or family (else a device's own name)."""
    return _key(name) in _by_key()


def known(model_id: str) -> bool:
    """Whether a model id is the catalogue's (else a device's own name, as reported)."""
    return model_id in models()
