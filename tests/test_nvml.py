"""NVML's memory reading: this process's entry, the device-wide fallback, no reading where NVML cannot say."""

import logging
import sys
import types
from collections import namedtuple

import pytest
import torch

from triaccel_rl import memory
from triaccel_rl.compare import NvmlPeak
from triaccel_rl.memory import nvml_used_bytes

Process = namedtuple("Process", "pid usedGpuMemory")
UUID = "5f2b6a1c-0000-4000-8000-000000000000"


@pytest.fixture
def fake_nvml(monkeypatch):
    """A pynvml stand-in for one device (UUID above) whose process list and memory a test sets."""
    state = {"processes": [], "used": 7 * 2**30, "fail": None, "handles": []}

    class NVMLError(Exception):
        pass

    def handle_by_uuid(uuid):
        state["handles"].append(uuid)
        return "handle"

    def processes(handle):
        if state["fail"]:
            raise NVMLError(state["fail"])
        return state["processes"]

    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByUUID=handle_by_uuid,
        nvmlDeviceGetHandleByIndex=lambda index: pytest.fail("matched by index, not UUID"),
        nvmlDeviceGetComputeRunningProcesses=processes,
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(used=state["used"]),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(uuid=UUID))
    memory._nvml.cache_clear()
    memory._nvml_handle.cache_clear()
    yield state
    memory._nvml.cache_clear()
    memory._nvml_handle.cache_clear()


def test_this_process_entry_is_read(fake_nvml, monkeypatch):
    monkeypatch.setattr(memory.os, "getpid", lambda: 4242)
    fake_nvml["processes"] = [Process(17, 5 * 2**30), Process(4242, 1536 * 2**20)]
    assert nvml_used_bytes(torch.device("cuda", 0)) == (1536 * 2**20, "process")
    assert fake_nvml["handles"] == [f"GPU-{UUID}"]  # NVML's UUID spelling of torch's device


def test_without_this_process_entry_the_device_wide_use_is_read(fake_nvml, monkeypatch):
    monkeypatch.setattr(memory.os, "getpid", lambda: 4242)
    fake_nvml["processes"] = [Process(17, 5 * 2**30), Process(4242, None)]  # None: NVML could not attribute it
    assert nvml_used_bytes(torch.device("cuda", 0)) == (7 * 2**30, "device")


def test_an_nvml_error_gives_no_reading_and_says_so(fake_nvml, caplog):
    fake_nvml["fail"] = "NVML_ERROR_GPU_IS_LOST"
    with caplog.at_level(logging.WARNING, logger="triaccel_rl.memory"):
        assert nvml_used_bytes(torch.device("cuda", 0)) is None
    assert "NVML could not read device cuda:0: NVML_ERROR_GPU_IS_LOST" in caplog.text


@pytest.mark.parametrize("visible", [None, "2"], ids=["all-devices-visible", "cuda-visible-devices"])
def test_a_mig_slice_is_matched_by_its_uuid_and_an_unmatched_device_is_not_read_by_index(
    fake_nvml, monkeypatch, caplog, visible
):
    """NVML spells a MIG slice's UUID ``MIG-...``; only ``GPU-...`` was tried, and then torch's index was taken as
    NVML's, which ``CUDA_VISIBLE_DEVICES`` renumbers: another GPU's memory was read (and its handle cached)."""
    monkeypatch.setattr(memory.os, "getpid", lambda: 4242)
    fake_nvml["processes"] = [Process(4242, 2**30)]
    monkeypatch.setattr(
        sys.modules["pynvml"],
        "nvmlDeviceGetHandleByUUID",
        lambda uuid: "mig" if uuid == f"MIG-{UUID}" else _not_found(uuid),
    )
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert nvml_used_bytes(torch.device("cuda", 0)) == (2**30, "process")  # the MIG slice's handle

    memory._nvml_handle.cache_clear()
    monkeypatch.setattr(sys.modules["pynvml"], "nvmlDeviceGetHandleByUUID", _not_found)  # no UUID matches
    monkeypatch.setattr(sys.modules["pynvml"], "nvmlDeviceGetHandleByIndex", lambda index: f"index {index}")
    lookups = []
    monkeypatch.setattr(
        sys.modules["pynvml"], "nvmlDeviceGetHandleByUUID", lambda uuid: lookups.append(uuid) or _not_found(uuid)
    )
    with caplog.at_level(logging.WARNING, logger="triaccel_rl.memory"):
        readings = [nvml_used_bytes(torch.device("cuda", 0)) for _ in range(3)]
    if visible is None:  # torch's index is NVML's
        assert readings == [(2**30, "process")] * 3
    else:  # no reading, said once (a compare reads at every evaluation), the lookups not repeated
        assert readings == [None] * 3
        assert caplog.text.count("CUDA_VISIBLE_DEVICES renumbers the devices: no NVML reading") == 1
    assert lookups == [f"GPU-{UUID}", f"MIG-{UUID}"]


def _not_found(uuid):
    raise LookupError(f"NVML_ERROR_NOT_FOUND: {uuid}")


def test_no_reading_on_a_cpu_or_without_nvml(monkeypatch):
    assert nvml_used_bytes(torch.device("cpu")) is None

    def no_library():
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=no_library))
    memory._nvml.cache_clear()
    try:
        assert nvml_used_bytes(torch.device("cuda", 0)) is None
    finally:
        memory._nvml.cache_clear()


def test_the_peak_keeps_the_largest_reading(monkeypatch):
    readings = iter([(100, "process"), (300, "process"), None, (200, "process")])
    monkeypatch.setattr("triaccel_rl.compare.nvml_used_bytes", lambda device: next(readings))
    peak = NvmlPeak(torch.device("cuda", 0))
    assert (peak.bytes, peak.scope) == (None, "")
    for _ in range(4):
        peak.read()
    assert (peak.bytes, peak.scope) == (300, "process")
