"""On a CUDA GPU: the memory model fitted to the allocator, and a real out-of-memory error recovered."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from triaccel_rl.config import MemoryBudget
from triaccel_rl.tasks import Task, TaskData
from triaccel_rl.training import TrainingRun

pytestmark = pytest.mark.gpu

N_TRAIN = 8192 + 64


def _wide_task(dropout: float = 0.0) -> Task:
    """An MLP whose activations dominate: about 70 KB per sample against 34 MB of weights (``dropout``: after each
    ReLU, whose masks the calibration's measured steps hold too)."""

    def data(n_train: int | None, n_test: int | None, seed: int) -> TaskData:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(N_TRAIN, 512, generator=g)
        y = torch.randint(0, 10, (N_TRAIN,), generator=g)
        return TaskData(x, y, x[:256], y[:256])

    def drop() -> list[nn.Module]:
        return [nn.Dropout(dropout)] if dropout else []

    return Task(
        "wide-mlp",
        "a wide MLP",
        build_model=lambda: nn.Sequential(
            *[nn.Linear(512, 8192), nn.ReLU(), *drop()], *[nn.Linear(8192, 512), nn.ReLU(), *drop()], nn.Linear(512, 10)
        ),
        load_data=data,
        base_batch_size=4096,
    )


@pytest.fixture
def memory_fraction() -> Iterator[None]:
    yield
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()


def _occupy_all_but(left: int) -> list[torch.Tensor]:
    """Tensors that take all the memory a new allocation could get but ``left`` bytes.

    First the free space inside the allocator's cached segments (which ``mem_get_info`` counts as used), in
    blocks of 512 MiB down to 1 MiB that fit without growing the reserve, then the device's free memory.
    """
    torch.cuda.empty_cache()
    held: list[torch.Tensor] = []
    size = 512 << 20
    while size >= 1 << 20:
        reserved = torch.cuda.memory_reserved()
        block = torch.empty(size, dtype=torch.uint8, device="cuda")
        if torch.cuda.memory_reserved() > reserved:  # no cached block was free for it: a new segment
            del block
            torch.cuda.empty_cache()
            size //= 2
        else:
            held.append(block)
    free, _ = torch.cuda.mem_get_info()
    held.append(torch.empty(max(free - left, 0), dtype=torch.uint8, device="cuda"))
    return held


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_memory_model_predicts_the_allocator_peak(dropout: float) -> None:
    run = TrainingRun(_wide_task(dropout), seed=0, device="cuda", n_probe=64)
    assert run.measures_memory and run.memory_model.n_measurements >= 2  # calibrated at construction
    run.micro_batch_cap = 1536  # a size the calibration did not try
    predicted = run.predicted_memory_bytes(1536)
    peak = run.step().memory_bytes
    print(f"memory model: predicted {predicted} bytes, allocator peak {peak} ({(predicted - peak) / peak:+.2%})")
    assert abs(predicted - peak) / peak < 0.10, f"predicted {predicted} bytes, allocator peak {peak}"


def test_captured_steps_do_not_steepen_the_memory_model() -> None:
    # A captured graph's memory stays allocated. Fitted in as the captured batch's need, it made the wide MLP's
    # model predict 2.71 GB for a batch of 4096 whose trial peaked at 0.78 GB (H200, 2026-12-04); it now moves the
    # baseline only. Extrapolating 16x beyond the calibration's sizes stays a little low for this MLP (13% eager).
    allocated_before = torch.cuda.memory_allocated()
    run = TrainingRun(
        _wide_task(), seed=0, device="cuda", n_probe=64, memory=MemoryBudget(fraction=1.0), batch_size=256
    )
    readings = [repr(run.memory_model)]
    run.step()
    run.step()
    assert run.graphs is not None and run.graphs.captures == 1 and run.graphs.replays == 2
    readings.append(repr(run.memory_model))
    predicted = run.predicted_memory_bytes(4096)
    measured = run.trial_peak_bytes(4096)
    assert measured is not None
    # Failed once in three runs of the GPU tests' order on the H200 (2026-12-04: 459 MB predicted against 777 MB),
    # never alone: the readings below say where the prediction went low if it does again.
    assert 0.75 * measured <= predicted <= 1.1 * measured, (
        f"predicted {predicted} bytes, trial peak {measured}; allocated before the run {allocated_before}; the model "
        f"after calibration, after the two steps, after the trial: {[*readings, repr(run.memory_model)]}"
    )


def test_out_of_memory_while_capturing_a_step_is_recovered(memory_fraction: None) -> None:
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    state = (f"before the run: {free} of {total} bytes free, {torch.cuda.memory_reserved()} reserved, "
             f"{torch.cuda.memory_allocated()} allocated")  # fmt: skip
    run = TrainingRun(
        _wide_task(), seed=0, device="cuda", n_probe=64, memory=MemoryBudget(fraction=1.0), batch_size=256
    )
    run.step()  # optimizer state allocated, a graph captured at batch 256
    assert run.graphs is not None and run.graphs.captures == 1, f"{state}; OOM log: {run.oom_log}"
    peak = run.trial_peak_bytes(4096)  # an unsplit step's real need (the memory model's can be far above it)
    assert peak is not None, f"{state}; the trial at batch 4096 ran out of memory"
    torch.cuda.empty_cache()  # the cache would otherwise hold room for the larger batch under the limit below
    held = torch.cuda.memory_reserved()
    total = torch.cuda.get_device_properties(0).total_memory
    room = peak - torch.cuda.memory_allocated()
    torch.cuda.set_per_process_memory_fraction((held + room // 3) / total)
    run.batch_size = 4096  # a new shape: its capture's eager warm-up pass runs out of memory
    served = run.samples_seen
    stats = run.step()
    assert stats.oom_events >= 1 and len(run.last_micro_batches) >= 2, (  # recovered by splitting, eagerly
        f"{state}; limit {held + room // 3} bytes ({held} held, {room} measured for the batch), step peak "
        f"{stats.memory_bytes}, max reserved {torch.cuda.max_memory_reserved()}, micro-batches "
        f"{run.last_micro_batches}, captures {run.graphs.captures if run.graphs else None}"
    )
    assert run.samples_seen - served == 4096
    assert run.graphs is not None  # graphs stay on for steps that fit in one micro-batch


def test_real_out_of_memory_is_recovered() -> None:
    # Allocation stacks from here on, for the next test's report should the reserve stay (it stops the recording).
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=100_000)
    # Eager steps: a captured step reserves its memory at capture, so later scarcity would not bite.
    run = TrainingRun(
        _wide_task(), seed=0, device="cuda", n_probe=64, memory=MemoryBudget(fraction=1.0), cuda_graphs=False
    )
    run.step()  # optimizer state allocated
    torch.cuda.empty_cache()
    room = run.predicted_memory_bytes(4096) - run.predicted_memory_bytes(0)  # activations of the full batch
    # The device itself runs short: fillers take all memory but a third of the batch's activations, so the
    # step's cudaMalloc fails for real (set_per_process_memory_fraction did not bite on torch 2.11).
    filler = _occupy_all_but(room // 3)
    total = torch.cuda.get_device_properties(0).total_memory
    try:
        served = run.samples_seen
        stats = run.step()
        assert stats.oom_events >= 1 and run.oom_log, (
            f"no OOM: {sum(t.numel() for t in filler)} bytes of fillers left {room // 3} free; step peak "
            f"{stats.memory_bytes}, allocated {torch.cuda.memory_allocated()}, reserved "
            f"{torch.cuda.memory_reserved()}, micro-batches {run.last_micro_batches}"
        )
        assert "CUDA out of memory" in run.oom_log[0].message or "out of memory" in run.oom_log[0].message.lower()
        assert stats.batch_size == 4096 and len(run.last_micro_batches) >= 2
        assert run.samples_seen - served == 4096
        assert run.memory_budget_bytes < total
        # Each OOM lowers the budget to what the failed micro-batch needed: the plan converges from above
        # within a few steps, then holds.
        later = [run.step().oom_events for _ in range(6)]
        assert later[-2:] == [0, 0], f"OOMs per later step: {later}"
    finally:
        filler.clear()
        del filler
        gc.collect()  # an OOM error's traceback may keep frames (and their tensors) in a reference cycle
        torch.cuda.empty_cache()


# Failed for days in the gputests order, with 137 GiB reserved and free: an earlier file's failed CUDA graph capture had
# left the allocator routing to the capture's pool, so empty_cache() freed nothing (graphs.recover_from_failed_capture).
def test_memory_is_released_after_a_recovered_out_of_memory() -> None:
    try:
        gc.collect()
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved()
        report = _allocator_report() if reserved >= 8 << 30 else ""
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    assert reserved < 8 << 30, f"{reserved} bytes still reserved after the earlier tests' runs are gone:\n{report}"


def _allocator_report(min_bytes: int = 1 << 30) -> str:
    """What keeps the reserve: segments of ``min_bytes`` or more, their blocks not free with where each was
    allocated (when recorded), and the live CUDA tensors of 256 MiB or more with the types referring to them."""
    lines = []
    for segment in torch.cuda.memory._snapshot()["segments"]:
        if segment["total_size"] < min_bytes:
            continue
        by_state: dict[str, int] = {}
        for block in segment["blocks"]:
            by_state[block["state"]] = by_state.get(block["state"], 0) + block["size"]
        lines.append(f"segment {segment['total_size'] / 2**30:.2f} GiB, stream {segment['stream']}, "
                     f"pool {segment.get('segment_pool_id')}, GiB by state "
                     f"{ {k: round(v / 2**30, 3) for k, v in by_state.items()} }")  # fmt: skip
        for block in segment["blocks"]:
            if block["state"] != "inactive":
                ours = [f for f in block.get("frames", []) if "triaccel" in f["filename"] or "test" in f["filename"]]
                frames = [f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" for f in ours]
                lines.append(f"  {block['state']} {block['size'] / 2**20:.1f} MiB from {' < '.join(frames[:6]) or '?'}")
    for obj in gc.get_objects():
        try:
            big = isinstance(obj, torch.Tensor) and obj.is_cuda and obj.untyped_storage().nbytes() >= 1 << 28
        except Exception:  # objects that fail isinstance or is_cuda
            continue
        if big:
            referrers = sorted({type(r).__name__ for r in gc.get_referrers(obj)})
            lines.append(f"live tensor {tuple(obj.shape)} {obj.dtype}, referred to by {referrers}")
    return "\n".join(lines) or "no segment of 1 GiB or more, no live tensor of 256 MiB or more"
