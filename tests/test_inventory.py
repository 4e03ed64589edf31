"""Inventory of this machine. No NVIDIA driver runs here, so the NVML path is driven
through a stand-in for the pynvml module with two GPUs, one of them unreadable."""

from types import SimpleNamespace

import pynvml
import pytest

from gpuprovider.config import SimulatedGpu
from gpuprovider.inventory import local


class FakeNvml:
    NVMLError = pynvml.NVMLError

    def __init__(self, broken_index=None, init_fails=False):
        self.broken_index, self.init_fails, self.shut = broken_index, init_fails, False

    def nvmlInit(self):
        if self.init_fails:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    def nvmlShutdown(self):
        self.shut = True

    def nvmlSystemGetDriverVersion(self):
        return b"550.54.15"

    def nvmlSystemGetCudaDriverVersion_v2(self):
        return 12040

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        if index == self.broken_index:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return index

    def nvmlDeviceGetName(self, handle):
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=81559 * 2**20)

    def nvmlDeviceGetUUID(self, handle):
        return f"GPU-{handle:08d}"


def test_nvml_devices_are_normalised_through_the_catalogue(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setattr(local, "nvml_library", lambda: fake)
    report = local.read_nvml("n-1")
    assert [g.model for g in report.gpus] == ["h100-80gb-sxm", "h100-80gb-sxm"]
    assert report.gpus[0].memory_gb == 80 and report.cuda_version == "12.4"
    assert report.driver_version == "550.54.15" and not report.gpus[0].simulated
    assert fake.shut


def test_a_lost_gpu_is_reported_and_the_others_kept(monkeypatch):
    monkeypatch.setattr(local, "nvml_library", lambda: FakeNvml(broken_index=0))
    report = local.read_nvml("n-1")
    assert [g.idx for g in report.gpus] == [1]
    assert "GPU 0" in report.unavailable_reason


def test_no_driver_leaves_declared_gpus_only(monkeypatch, tmp_path):
    monkeypatch.setattr(local, "nvml_library", lambda: FakeNvml(init_fails=True))
    node = local.read_local_node(
        "n-1", "box", "", tmp_path, [SimulatedGpu(model="l4-24gb", count=2)]
    )
    assert [g.simulated for g in node.gpus] == [True, True]
    assert node.facts["nvml"].startswith("NVML unavailable")
    assert node.cpu_count >= 1 and node.memory_mib > 0 and node.disk_mib > 0


@pytest.mark.parametrize("name", ["NVIDIA A10G", "Tesla T4"])
def test_real_and_declared_gpus_number_on(monkeypatch, tmp_path, name):
    fake = FakeNvml()
    monkeypatch.setattr(fake, "nvmlDeviceGetName", lambda handle: name)
    monkeypatch.setattr(local, "nvml_library", lambda: fake)
    node = local.read_local_node("n-1", "box", "", tmp_path, [SimulatedGpu(model="l4-24gb")])
    assert [g.idx for g in node.gpus] == [0, 1, 2] and node.gpus[2].simulated
