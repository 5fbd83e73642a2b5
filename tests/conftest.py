"""Shared fixtures; GPU tests are skipped on machines without CUDA."""

from __future__ import annotations

import gc
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# The kernel tests run the Triton kernels on CPU tensors through Triton's interpreter, which reads this
# variable when triton is first imported: set it here, before any test module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gpu_without_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulates a GPU without native bf16 (a V100 or T4): bf16 refused, as ``check_precision_supported`` does there."""
    import triaccel_rl.engine
    import triaccel_rl.executor
    from triaccel_rl.types import Precision

    def refuse_bf16(precision: Precision, device: torch.device) -> None:
        if precision is Precision.BF16:
            raise ValueError("precision bf16 is not supported on Tesla T4; allowed: fp32, fp16")

    for module in (triaccel_rl.engine, triaccel_rl.executor):
        monkeypatch.setattr(module, "check_precision_supported", refuse_bf16)


@pytest.fixture(autouse=True)
def no_autocast_left_open():
    """Fails a test that leaves an autocast region open: every later test ran inside it (a recompute's region left open
    by the precision hooks once failed 50 unrelated tests downstream with dtype mismatches, 2026-12-06)."""
    yield
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    open_on = [device for device in devices if torch.is_autocast_enabled(device)]
    if open_on:
        for device in open_on:  # closed for the tests after this one
            torch.set_autocast_enabled(device, False)
        pytest.fail(f"the test left autocast enabled on {open_on}")


@pytest.fixture(scope="module")
def frozen_gc():
    """Leaves what is alive when the module starts (torch, triton, SB3, the collected tests) out of full collections.

    Every environment reset calls ``gc.collect()`` (``release_memory`` when it drops the last run): in the test process,
    with ~200k objects alive, each took ~1 s on the shared CI cores, the bulk of every tiny PPO run's time. Frozen
    objects are skipped by the collector, not freed: the module's own garbage is collected as before.
    """
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def first_run(tmp_path_factory):
    """Copies a ``train_policy`` run from scratch into a test's folder, training each set of arguments once a session.

    ``first_run(tasks, out=..., **kwargs)`` leaves in ``out``'s folder what ``train_policy(tasks, out=out, **kwargs)``
    leaves there and returns ``Path(out)``: the test may resume into its copy, set its files aside or damage them. Not
    for runs with ``log_dir``: their zips record the absolute path of their TensorBoard run.
    """
    from triaccel_rl.rl import train_policy

    trained: dict[str, Path] = {}

    def copy_of_run(tasks: list[str], *, out: str | os.PathLike[str], **kwargs: Any) -> Path:
        if kwargs.get("log_dir") is not None:
            raise ValueError("first_run: a run with log_dir records its TensorBoard run's absolute path")
        key = repr((tasks, Path(out).name, sorted({"seed": 0, **kwargs}.items())))
        if key not in trained:
            folder = tmp_path_factory.mktemp("first_run")
            train_policy(tasks, out=folder / Path(out).name, **kwargs)
            trained[key] = folder  # only once whole: a failed run is trained again by the next test that asks
        shutil.copytree(trained[key], Path(out).parent, dirs_exist_ok=True)
        return Path(out)

    return copy_of_run


@pytest.fixture
def one_torch_thread():
    """Runs the test on one intra-op thread, as ``train_policy(torch_threads=1)`` runs its environments.

    Two threads of tiny ops wait on each other whenever the shared CI cores are busy: the imitation of 1500 passes in
    tests/test_rl.py took 5 s alone and 300 to 500 s beside other jobs.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures ``triaccel_rl.plots`` saves, by file name, kept open to read their data (each is still written)."""
    pytest.importorskip("matplotlib")
    import triaccel_rl.plots as plots

    figures = {}
    real_save = plots._save

    def keep(fig, path):
        figures[path.name] = fig
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


@pytest.fixture
def collections() -> Iterator[list[int]]:
    """Turns the automatic collector off (restored after) and lists the generation of every collection run meanwhile.

    With it off, an object in a reference cycle outlives its last reference, and only an explicit ``gc.collect()``
    (which the tests count) frees it. Dynamo is imported before: the first optimizer imports it, and the cycles its
    import leaves (``torch.fx.wrap``'s frame refers to itself) hold the frames live then until a collection.
    """
    import torch._dynamo  # noqa: F401

    seen: list[int] = []

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            seen.append(info["generation"])

    enabled = gc.isenabled()
    gc.disable()
    gc.callbacks.append(record)
    try:
        yield seen
    finally:
        gc.callbacks.remove(record)
        if enabled:
            gc.enable()
