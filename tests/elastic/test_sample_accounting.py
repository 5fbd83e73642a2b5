"""Sample accounting under random batch sequences and injected out-of-memory errors (TrainingRun).

Every sample must be applied exactly once per epoch, in the seed's order, whatever the sequence of
effective batches and whatever OOMs hit the forward or backward passes; no gradient may be applied twice,
so the parameters must equal, bit for bit, those of a fault-free twin that splits each batch the same way.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict

import pytest
import torch
from elastic_helpers import max_abs_difference, parameters_of, small_task
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from triaccel_rl.config import ElasticConfig
from triaccel_rl.elastic import FaultPoint, UnrecoverableOOMError, inject_oom
from triaccel_rl.models import MLP
from triaccel_rl.tasks import Task, TaskData
from triaccel_rl.training import TrainingRun

N_EPOCHS = 2
# Splitting a batch changes only the order of floating-point sums: a few ulps per step (see
# test_accumulation.py for the split-versus-unsplit bound over a few steps).
PARAMETER_ATOL = 1e-5

batch_sequences = st.lists(st.integers(min_value=8, max_value=64), min_size=1, max_size=8)
device_limits = st.integers(min_value=4, max_value=80)  # the largest micro-batch the "device" holds
one_off_faults = st.sets(
    st.tuples(
        st.integers(min_value=0, max_value=30),  # step
        st.integers(min_value=0, max_value=3),  # micro-batch index
        st.sampled_from(["forward", "backward"]),
    ),
    max_size=6,
)


@settings(max_examples=25, deadline=None)
@given(sizes=batch_sequences, limit=device_limits, faults=one_off_faults, seed=st.integers(0, 3))
def test_every_sample_once_per_epoch_and_no_update_twice_under_ooms(
    sizes: list[int], limit: int, faults: set[tuple[int, int, str]], seed: int
) -> None:
    """A run with OOMs and a fault-free twin stepped in lockstep with the same micro-batch plan.

    The twin splits each batch exactly as the faulty run's successful attempt did, so the two sum the same
    numbers in the same order: any lost sample, sample counted twice, or gradient applied twice would show
    as a difference, and there must be none at all (bitwise).
    """
    raised: list[FaultPoint] = []

    def fault(point: FaultPoint) -> None:
        if point.micro_batch_size > limit or (
            point.attempt == 0 and (point.step, point.micro_index, point.phase) in faults
        ):
            raised.append(point)
            inject_oom(lambda _: True)(point)

    faulty = TrainingRun(small_task(), seed=seed, device="cpu", fault=fault)
    twin = TrainingRun(small_task(), seed=seed, device="cpu")
    applied: dict[int, list[int]] = defaultdict(list)
    total = N_EPOCHS * len(faulty.loader)
    i = 0
    while faulty.samples_seen < total:
        faulty.batch_size = twin.batch_size = sizes[i % len(sizes)]
        i += 1
        stats = faulty.step()
        twin.micro_batch_cap = faulty.last_micro_batches[0]
        twin_stats = twin.step()
        assert faulty.last_batch is not None and twin.last_batch is not None
        assert torch.equal(faulty.last_batch.indices, twin.last_batch.indices)  # the seed's order, untouched
        assert faulty.last_micro_batches == twin.last_micro_batches
        assert stats.batch_size == twin_stats.batch_size == sum(faulty.last_micro_batches)
        assert stats.loss == twin_stats.loss and stats.lr == twin_stats.lr
        applied[faulty.last_batch.epoch].extend(faulty.last_batch.indices.tolist())

    n = len(faulty.loader)
    assert sorted(applied) == list(range(N_EPOCHS))
    for epoch, order in applied.items():
        assert sorted(order) == list(range(n)), f"epoch {epoch}: a sample was lost or applied twice"
    assert faulty.samples_seen == twin.samples_seen == N_EPOCHS * n
    assert faulty.steps == twin.steps
    assert faulty.oom_events == len(raised) == len(faulty.oom_log)
    for a, b in zip(parameters_of(faulty), parameters_of(twin), strict=True):
        assert torch.equal(a, b), f"parameters differ by {float((a - b).abs().max()):.3g} from the fault-free twin"
    # Each OOM lowers the budget below what that micro-batch needs, so no later step plans one as large: the sizes
    # that ran out of memory only fall (without the lowering, every later step ran out at its first size again).
    over_limit = [p.micro_batch_size for p in raised if p.micro_batch_size > limit]
    assert over_limit == sorted(set(over_limit), reverse=True), f"over-limit OOMs at {over_limit}"


def test_oom_in_a_late_backward_pass_discards_the_partial_sum() -> None:
    """Three micro-batches accumulate, then the third's backward fails: the retry must start from zero."""

    def fault(point: FaultPoint) -> None:
        if point.step == 0 and point.attempt == 0 and point.micro_index == 2 and point.phase == "backward":
            inject_oom(lambda _: True)(point)

    faulty = TrainingRun(small_task(), seed=0, device="cpu", fault=fault)
    faulty.micro_batch_cap = 16
    twin = TrainingRun(small_task(), seed=0, device="cpu")
    faulty_stats = faulty.step()
    assert faulty_stats.oom_events == 1 and faulty.oom_events == 1
    assert faulty.oom_log[0].micro_batch_size == 16
    assert faulty.last_micro_batches[0] <= 8  # split: at most half of the micro-batch that failed
    twin.micro_batch_cap = faulty.last_micro_batches[0]
    assert twin.step().loss == faulty_stats.loss
    for a, b in zip(parameters_of(faulty), parameters_of(twin), strict=True):
        assert torch.equal(a, b)
    unsplit = TrainingRun(small_task(), seed=0, device="cpu")
    assert unsplit.step().loss == pytest.approx(faulty_stats.loss, rel=1e-6)
    assert max_abs_difference(parameters_of(faulty), parameters_of(unsplit)) <= PARAMETER_ATOL


def test_oom_lowers_the_budget_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    run = TrainingRun(small_task(), seed=0, device="cpu", fault=inject_oom(lambda p: p.micro_batch_size > 20))
    before = run.memory_budget_bytes
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        stats = run.step()
    assert stats.oom_events >= 1
    event = run.oom_log[0]
    assert event.budget_before_bytes == before
    assert run.memory_budget_bytes == run.oom_log[-1].budget_after_bytes < before
    assert event.budget_after_bytes == run.predicted_memory_bytes(event.micro_batch_size)  # factor 1.0
    assert "out of memory (injected)" in event.message
    assert "retrying with micro-batch" in caplog.text
    # Later steps plan within the lowered budget from the start: no new OOM.
    assert run.step().oom_events == 0


def test_an_oom_in_the_shorter_last_micro_batch_logs_its_size_and_lowers_the_budget_from_the_split() -> None:
    """64 samples split [27, 27, 10], the 10-sample one fails: the event said 27 failed. The budget and the retry
    still come from the split's 27 (the 27-sample micro-batches of the same attempt had fitted)."""
    fault = inject_oom(lambda p: p.step == 0 and p.attempt == 0 and p.micro_index == 2)
    run = TrainingRun(small_task(), seed=0, device="cpu", fault=fault)
    run.micro_batch_cap = 27
    assert run.step().oom_events == 1
    event = run.oom_log[0]
    assert (event.micro_batch_size, event.split_micro_batch_size) == (10, 27)
    # oom_budget_factor 1.0 x predicted(27), or room in fill_frac (0.9) of it for half of 27, whichever is more
    halved = math.ceil(run.predicted_memory_bytes(13) / 0.9)
    assert event.budget_after_bytes == max(run.predicted_memory_bytes(27), halved)
    # Retried halved (13), which that budget's fill_frac holds: the later steps plan it too.
    assert event.retry_micro_batch_size == run.micro_batch_size(64) == 13 == run.last_micro_batches[0]


def test_the_budget_after_an_oom_keeps_room_for_half_the_micro_batch() -> None:
    """``oom_budget_factor`` 0.5 at micro-batches of 2: the retry's floor is two samples, and the budget keeps
    fill_frac's room for them (documented in ElasticConfig: the retried micro-batch must still be planned)."""
    fault = inject_oom(lambda p: p.step == 0 and p.attempt == 0)
    run = TrainingRun(small_task(), seed=0, device="cpu", elastic=ElasticConfig(oom_budget_factor=0.5), fault=fault)
    run.micro_batch_cap = 2
    run.step()
    event = run.oom_log[0]
    assert 0.5 * run.predicted_memory_bytes(2) < run.predicted_memory_bytes(1)
    assert event.budget_after_bytes == math.ceil(run.predicted_memory_bytes(2) / 0.9)
    assert (event.micro_batch_size, event.retry_micro_batch_size) == (2, 2) and run.micro_batch_size(64) == 2


def test_an_oom_where_the_weights_outweigh_the_activations_halves_the_micro_batch_not_to_one() -> None:
    """A model whose weights and optimizer state are most of its memory: the budget lowered to what the failed
    micro-batch was predicted to need left fill_frac (0.9) of it below the weights alone, nothing fitted, and every
    later step ran one-sample micro-batches (64 for a batch of 64). Now the micro-batch halves, and stays there."""
    task = small_task(build_model=functools.partial(MLP, 32, (1024, 1024), 10))  # weights: MBs; a sample's: KBs
    fault = inject_oom(lambda p: p.step == 0 and p.attempt == 0)
    run = TrainingRun(task, seed=0, device="cpu", fault=fault)
    fixed = run.predicted_memory_bytes(0)
    assert run.predicted_memory_bytes(64) - fixed < 0.1 * fixed  # the case: activations under a tenth
    run.step()
    event = run.oom_log[0]
    assert (event.micro_batch_size, event.retry_micro_batch_size) == (64, 32)
    run.step()
    assert run.last_micro_batches == [32, 32] and run.steps == 2


def test_the_budget_after_an_oom_holds_half_the_micro_batch_to_the_byte() -> None:
    """``ceil(predicted(32) / 0.7)`` as the budget, read back as ``int(0.7 x budget)``, came out one byte short of
    predicted(32) (float rounding): the retry was 31 and the next steps split 64 as 31, 31, 2."""
    task = small_task(build_model=functools.partial(MLP, 32, (1087, 1087), 10))
    run = TrainingRun(task, seed=0, device="cpu", fault=inject_oom(lambda p: p.step == 0 and p.attempt == 0),
                      elastic=ElasticConfig(fill_frac=0.7))  # fmt: skip
    run.step()
    event = run.oom_log[0]
    assert (event.micro_batch_size, event.retry_micro_batch_size) == (64, 32)
    assert int(0.7 * event.budget_after_bytes) >= run.predicted_memory_bytes(32)
    run.step()
    assert run.last_micro_batches == [32, 32]


def test_with_fill_frac_1_no_step_after_an_oom_plans_the_size_that_failed_again() -> None:
    """``fill_frac=1`` and the default ``oom_budget_factor=1``: the lowered budget was exactly what the failed
    micro-batch was predicted to need, planning took all of it, and every later step ran out of memory at that size
    again (at 32, 32, 32, ...). Now each budget plans less than the size that failed: the failing sizes fall, as with
    fill_frac 0.9 (by fill_frac × factor of the memory that failed: here by one sample a step, as documented)."""
    failed: list[int] = []

    def fault(point: FaultPoint) -> None:
        if point.micro_batch_size > 20:
            failed.append(point.micro_batch_size)
            inject_oom(lambda _: True)(point)

    run = TrainingRun(small_task(), seed=0, device="cpu", fault=fault, elastic=ElasticConfig(fill_frac=1.0))
    for _ in range(5):
        run.step()
    assert failed == [64, 32, 31, 30, 29, 28]
    for event in run.oom_log:  # each lowered budget plans less than the size that failed
        assert event.budget_after_bytes < run.predicted_memory_bytes(event.micro_batch_size)


def test_unrecoverable_oom_returns_the_batch_and_changes_nothing() -> None:
    run = TrainingRun(small_task(), seed=0, device="cpu", fault=inject_oom(lambda p: True))
    before = parameters_of(run)
    with pytest.raises(UnrecoverableOOMError, match=r"out of memory 9 times in one step .* of 2 samples") as info:
        run.step()
    assert f"one sample is predicted to need {run.predicted_memory_bytes(1)} bytes" in str(info.value)
    assert [e.micro_batch_size for e in run.oom_log][-2:] == [2, 2]  # split down to two samples, then retried
    assert run.samples_seen == 0 and run.steps == 0
    assert run.lr_coupler.steps == 0  # no step of an LR warm-up either (it once advanced)
    assert max_abs_difference(parameters_of(run), before) == 0.0
    assert all(p.grad is None for p in run.model.parameters())


def test_too_many_ooms_in_one_step_gives_up() -> None:
    from triaccel_rl.config import ElasticConfig

    calls = iter(range(1000))
    run = TrainingRun(
        small_task(),
        seed=0,
        device="cpu",
        elastic=ElasticConfig(max_oom_retries=2),
        fault=inject_oom(lambda p: next(calls) < 3),  # three OOMs in a row, at any size
    )
    with pytest.raises(UnrecoverableOOMError, match="3 times in one step"):
        run.step()
    assert run.samples_seen == 0


def test_non_oom_errors_are_not_swallowed() -> None:
    def fault(point: FaultPoint) -> None:
        raise ValueError("a bug, not a memory problem")

    run = TrainingRun(small_task(), seed=0, device="cpu", fault=fault)
    with pytest.raises(ValueError, match="a bug"):
        run.step()
    assert run.oom_events == 0


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory"),
        RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
    ],
)
def test_out_of_memory_errors_are_recognised(error: BaseException) -> None:
    from triaccel_rl.elastic import is_out_of_memory

    assert is_out_of_memory(error)
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not a RuntimeError: a bug's message


def _optimizer_tensors(run: TrainingRun) -> list[torch.Tensor]:
    state = run.engine.state_holder.state_dict()["state"]
    return [value for key in sorted(state) for _, value in sorted(state[key].items()) if torch.is_tensor(value)]


def test_adamw_state_after_ooms_across_batch_changes_and_an_epochs_end_equals_the_fault_free_twins() -> None:
    """Moments, step counts and parameters of an AdamW run hit by OOMs (forward and backward, first and later
    micro-batches, the epoch's short last batch) equal, bit for bit, those of a twin split the same way."""
    faults = {(1, 0, "forward"), (2, 1, "backward"), (3, 0, "backward"), (5, 2, "forward"), (6, 0, "forward")}

    def fault(point: FaultPoint) -> None:
        if point.attempt == 0 and (point.step, point.micro_index, point.phase) in faults:
            inject_oom(lambda _: True)(point)

    task = small_task(optimizer="adamw", base_lr=2e-3)
    faulty = TrainingRun(task, seed=0, device="cpu", fault=fault)
    twin = TrainingRun(task, seed=0, device="cpu")
    faulty.micro_batch_cap = 16  # micro-batches to fail in; the OOMs lower the budget, and later steps split more
    sizes = [64, 40, 64, 48, 33, 64, 24, 50]  # 158 samples an epoch: steps 0-2 end it on a short batch of 54
    epochs = []
    for step, size in enumerate(sizes):
        faulty.batch_size = twin.batch_size = size
        stats = faulty.step()
        twin.micro_batch_cap = faulty.last_micro_batches[0]
        twin_stats = twin.step()
        assert torch.equal(faulty.last_batch.indices, twin.last_batch.indices), f"step {step}"  # type: ignore[union-attr]
        assert stats.loss == twin_stats.loss and stats.lr == twin_stats.lr
        epochs.append((faulty.last_batch.epoch, len(faulty.last_batch.y)))  # type: ignore[union-attr]
    assert epochs[2] == (0, 54) and epochs[3][0] == 1  # the short last batch was hit (step 2), then a new epoch
    assert faulty.oom_events == len(faults) and faulty.steps == twin.steps == len(sizes)
    assert faulty.samples_seen == twin.samples_seen == sum(n for _, n in epochs)
    for a, b in zip(parameters_of(faulty), parameters_of(twin), strict=True):
        assert torch.equal(a, b)
    moments, twin_moments = _optimizer_tensors(faulty), _optimizer_tensors(twin)
    assert len(moments) == 3 * len(list(faulty.model.parameters()))  # exp_avg, exp_avg_sq and step, per parameter
    for a, b in zip(moments, twin_moments, strict=True):
        assert torch.equal(a, b)


def test_a_step_given_up_at_the_epochs_short_last_batch_loses_and_repeats_no_sample() -> None:
    """The epoch's last 30 samples fail for good; the run carries on (a smaller batch, the fault gone) and trains on
    exactly those 30, in the seed's order, before the next epoch begins: the updates equal a fault-free run's that
    splits its batches the same way (the given-up step left the budget at two samples)."""
    run = TrainingRun(small_task(), seed=0, device="cpu")
    reference = TrainingRun(small_task(), seed=0, device="cpu")
    n = len(run.loader)  # 158: 64 + 64 + 30
    for _ in range(2):
        run.step()
        reference.step()
    run.fault = inject_oom(lambda point: True)
    with pytest.raises(UnrecoverableOOMError):
        run.step()
    assert run.samples_seen == 128 and run.steps == 2 and run.loader.epoch == 0
    run.fault = None
    applied = []
    for size in (16, 16, 64):  # 16 + 14 finish the epoch; then the next epoch's first 64
        run.batch_size = reference.batch_size = size
        run.step()
        reference.micro_batch_cap = run.last_micro_batches[0]
        reference.step()
        assert run.last_micro_batches == reference.last_micro_batches == [2] * (len(run.last_batch.y) // 2)  # type: ignore[union-attr]
        assert torch.equal(run.last_batch.indices, reference.last_batch.indices)  # type: ignore[union-attr]
        applied.append((run.last_batch.epoch, len(run.last_batch.y)))  # type: ignore[union-attr]
    assert applied == [(0, 16), (0, 14), (1, 64)]
    assert run.samples_seen == reference.samples_seen == n + 64 and run.steps == reference.steps == 5
    for a, b in zip(parameters_of(run), parameters_of(reference), strict=True):
        assert torch.equal(a, b)


def _batch_norm_task() -> Task:
    def data(n_train: int | None, n_test: int | None, seed: int) -> TaskData:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(300, 8, generator=g)
        return TaskData(x, (x[:, 0] > 0).long(), x[:32], (x[:32, 0] > 0).long())

    return Task(
        "bn-mlp",
        "an MLP with batch norm",
        build_model=lambda: nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2)),
        load_data=data,
        base_batch_size=64,
    )


def test_an_oom_retry_leaves_the_batch_norm_running_statistics_as_a_fault_free_run_has_them() -> None:
    """Micro-batch 0 runs its forward pass (updating the running mean, variance and batch count), micro-batch 1 runs
    out of memory, and the step is retried: the fault-free twin's buffers saw each sample once.

    Before the fix the parameters agreed and the buffers did not: the failed attempt's forward passes had updated
    them, and the retry updated them again for the same samples."""

    def fault(point: FaultPoint) -> None:
        if point.step == 0 and point.attempt == 0 and point.micro_index == 1 and point.phase == "forward":
            inject_oom(lambda _: True)(point)

    faulty = TrainingRun(_batch_norm_task(), seed=0, device="cpu", fault=fault)
    faulty.micro_batch_cap = 32
    faulty.step()
    twin = TrainingRun(_batch_norm_task(), seed=0, device="cpu")
    twin.micro_batch_cap = faulty.last_micro_batches[0]
    twin.step()
    assert faulty.last_micro_batches == twin.last_micro_batches == [16] * 4
    for a, b in zip(parameters_of(faulty), parameters_of(twin), strict=True):
        assert torch.equal(a, b)
    for (name, a), (_, b) in zip(faulty.model.named_buffers(), twin.model.named_buffers(), strict=True):
        assert torch.equal(a, b), f"{name} differs from the fault-free twin's"


_INJECTED_IN_BACKWARD = r"^out of memory \(injected\) at step 1, attempt 0, micro-batch 1 of 16 samples, backward$"


@pytest.mark.parametrize(
    ("memory_elastic", "interrupt", "error", "message"),
    [
        (True, False, RuntimeError, "^a user's model failed$"),
        (False, False, torch.OutOfMemoryError, _INJECTED_IN_BACKWARD),
        (True, True, KeyboardInterrupt, "^$"),
    ],
)
def test_a_step_that_raises_leaves_the_run_as_before_it(
    memory_elastic: bool, interrupt: bool, error: type[BaseException], message: str
) -> None:
    """An error the step does not recover from (any error with memory-elastic batching off, as the batch finder runs;
    a non-OOM error with it on) leaves no gradients, the buffers as they were and the batch with the loader: a caller
    who catches it and steps on trains exactly as a run that never saw it.

    Before the fix the batch was lost to the loader (the next step took the samples after it), the failed forward's
    running statistics stayed and its partial gradients were summed into the next update. A Ctrl-C
    (``KeyboardInterrupt``, no ``Exception``) in the middle of a step did all of that until it was undone too.
    """

    raised: list[FaultPoint] = []

    def fault(point: FaultPoint) -> None:
        if not raised and point.step == 1 and point.micro_index == 1 and point.phase == "backward":
            raised.append(point)
            if interrupt:
                raise KeyboardInterrupt
            if memory_elastic:
                raise RuntimeError("a user's model failed")
            inject_oom(lambda _: True)(point)

    faulty = TrainingRun(_batch_norm_task(), seed=0, device="cpu", fault=fault)
    twin = TrainingRun(_batch_norm_task(), seed=0, device="cpu")
    for run in (faulty, twin):
        run.memory_elastic = memory_elastic
        run.micro_batch_cap = 16
        run.step()
    with pytest.raises(error, match=message) as caught:
        faulty.step()
    assert type(caught.value) is error  # an OutOfMemoryError is a RuntimeError too
    assert all(p.grad is not None and not p.grad.any() for p in faulty.model.parameters())  # zeroed, as measured
    assert faulty.loader.state_dict() == twin.loader.state_dict()
    for _ in range(3):
        faulty.step()
        twin.step()
    assert faulty.steps == twin.steps == 4
    for a, b in zip(parameters_of(faulty), parameters_of(twin), strict=True):
        assert torch.equal(a, b)
    for (name, a), (_, b) in zip(faulty.model.named_buffers(), twin.model.named_buffers(), strict=True):
        assert torch.equal(a, b), f"{name} differs from the fault-free twin's"


def test_the_lr_after_a_batch_change_carries_the_schedule() -> None:
    """``run.lr`` right after the batch changes is the LR the next step uses (schedule factor included).

    Before the fix the setter left the engine's gain without the schedule's factor until the next step: mid-warm-up
    ``run.lr`` read the LR as if the schedule were at 1.
    """
    run = TrainingRun(_batch_norm_task(), seed=0, device="cpu", schedule_epochs=4.0)
    for _ in range(2):
        run.step()
    assert 0.0 < run.schedule_gain < 1.0  # inside the warm-up
    for change in (lambda: setattr(run, "batch_size", 128), lambda: setattr(run, "lr_rule", "sqrt")):
        change()
        expected = run.lr
        assert run.step().lr == pytest.approx(expected, rel=1e-12)


def test_run_lr_is_the_next_step_s_lr_through_a_batch_warm_up_and_the_schedule() -> None:
    """``run.lr`` read the last step's batch gain and the schedule where the loader stood: during a warm-up ramp or
    the schedule's warm-up it was the step before's LR (and ``compare``'s trace recorded that)."""
    run = TrainingRun(
        small_task(n_train=1200),
        seed=0,
        device="cpu",
        schedule_epochs=2.0,
        elastic=ElasticConfig(lr_rule="linear", warmup_steps=4),
    )
    run.step()
    run.batch_size = 4 * run.batch_size  # a 4-step ramp
    seen = []
    while run.epoch < 2.0:
        expected = run.lr
        stats = run.step()
        seen.append(stats.lr)
        assert stats.lr == pytest.approx(expected, rel=1e-12)
    assert len(set(seen)) == len(seen)  # every step's LR differed: the check compared moving values


def test_an_interval_given_up_leaves_no_statistics_to_the_next_and_counts_its_events() -> None:
    """Step 1 of an interval ran out of memory for good: steps 0's loss and norms stayed in the device moments and the
    next interval reported them as its own (3 observed for 2 steps); the events recovered from before it gave up were
    logged but not counted in ``oom_events``."""
    failing = [True]
    fault = inject_oom(lambda point: failing[0] and point.step == 1)
    run = TrainingRun(small_task(), seed=0, device="cpu", fault=fault)
    with pytest.raises(UnrecoverableOOMError):
        run.train_interval(3)
    assert run.oom_events == len(run.oom_log) > 0
    failing[0] = False
    interval = run.train_interval(2)
    assert (interval.steps, interval.moments.n_observed) == (2, 2)
    twin = TrainingRun(small_task(), seed=0, device="cpu")  # the same two steps after the same first one
    twin.step()
    assert twin.train_interval(2).moments.loss == pytest.approx(interval.moments.loss, rel=1e-6)


@pytest.mark.parametrize("bad", [True, 2.0, -1])
def test_an_interval_of_no_whole_number_of_steps_is_refused(bad: object) -> None:
    run = TrainingRun(small_task(), seed=0, device="cpu")
    with pytest.raises(ValueError, match=rf"n_steps={bad!r} must be a whole number >= 0"):
        run.train_interval(bad)  # type: ignore[arg-type]
    assert run.steps == 0


def test_a_batch_larger_than_the_training_set_is_refused_and_evaluation_needs_samples() -> None:
    """10**6 was taken: the LR followed it (x3906 at base batch 256), each step served an epoch, the run diverged."""
    run = TrainingRun(small_task(), seed=0, device="cpu")
    n = len(run.loader)
    with pytest.raises(ValueError, match=rf"batch_size=1000000 is more than the {n} training samples"):
        run.batch_size = 10**6
    run.batch_size = n  # a whole epoch a step: served
    assert run.step().batch_size == n
    for bad in (0, -5, 2.5):  # 0 divided by zero; -5 gave an accuracy of -0.0
        with pytest.raises(ValueError, match=rf"max_samples={bad!r} must be a whole number >= 1"):
            run.evaluate(bad)  # type: ignore[arg-type]


def _nan_first_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes the run's first loss NaN (a diverged step, skipped) and every later one as it is."""
    calls = {"n": 0}
    loss_fn = Task.loss_fn

    def nan_first(self: Task, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = loss_fn(self, logits, labels)
        return loss * float("nan") if calls["n"] == 1 else loss

    monkeypatch.setattr(Task, "loss_fn", nan_first)


def test_an_interval_given_up_still_counts_its_finished_steps_skips_and_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 0 of the interval diverges (skipped), step 1 then fails for good: step 0's skip and the interval's time
    were lost from the run's totals, though its update was decided (here: skipped) and its time spent."""
    _nan_first_loss(monkeypatch)
    fault = inject_oom(lambda point: point.step == 1)
    run = TrainingRun(small_task(), seed=0, device="cpu", fault=fault)
    with pytest.raises(UnrecoverableOOMError):
        run.train_interval(3)
    assert run.steps == 1 and run.skipped_steps == 1 and run.train_time_ms > 0


def test_a_step_given_up_charges_its_time_as_a_given_up_interval_does() -> None:
    """``step()`` left a step given up after its out-of-memory retries out of ``train_time_ms``, though its time was
    spent, while ``train_interval`` charged it: the two paths' totals (the env's ``wall_time_ms``) disagreed."""
    run = TrainingRun(small_task(), seed=0, device="cpu", fault=inject_oom(lambda point: point.step == 0))
    with pytest.raises(UnrecoverableOOMError):
        run.step()
    assert run.steps == 0 and run.skipped_steps == 0 and run.train_time_ms > 0


def test_an_interval_stopped_by_a_post_hook_after_an_update_counts_the_skip_before_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Step 0 of the interval diverges (skipped), step 1's update goes in and then a user's post-hook raises: both
    steps finished, one was skipped. The given-up interval counted the steps that returned (one) against the updates
    applied (one), and lost step 0's skip."""
    _nan_first_loss(monkeypatch)
    run = TrainingRun(small_task(), seed=0, device="cpu")
    run.optimizer.register_step_post_hook(_raising_once("a post-hook fails"))  # runs at the first applied update
    with pytest.raises(RuntimeError, match="a post-hook fails"):
        run.train_interval(3)
    assert (run.steps, run.engine.applied_steps(), run.skipped_steps) == (2, 1, 1)


@pytest.mark.parametrize("fused", [False, True])
def test_a_step_stopped_by_a_post_hook_counts_its_skip_and_time(fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A diverged step whose post-hook raises: the fused path (a GPU's default) runs post-hooks after a step the device
    skipped too. ``step()`` counted the step but neither its skip nor its time: ``skipped_steps`` stayed 0."""
    import os

    from triaccel_rl import training
    from triaccel_rl.engine import StepEngine

    if fused and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the fused step needs a GPU or Triton's interpreter")

    class Engine(StepEngine):  # a TrainingRun picks the fused path only on CUDA by itself
        def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
            super().__init__(model, optimizer, device, fused=fused)

    monkeypatch.setattr(training, "StepEngine", Engine)
    loss_fn = Task.loss_fn
    monkeypatch.setattr(Task, "loss_fn", lambda self, logits, labels: loss_fn(self, logits, labels) * float("nan"))
    run = TrainingRun(small_task(), seed=0, device="cpu")
    run.optimizer.register_step_post_hook(_raising_once("a post-hook fails"))
    if fused:
        with pytest.raises(RuntimeError, match="a post-hook fails"):
            run.step()
        assert (run.steps, run.engine.applied_steps(), run.skipped_steps) == (1, 0, 1) and run.train_time_ms > 0
    else:  # the reference path runs no post-hook for a skipped update: the step returns
        assert run.step().skipped and (run.steps, run.skipped_steps) == (1, 1)
    run.train_time_ms = 0.0
    monkeypatch.setattr(Task, "loss_fn", loss_fn)  # a finite step next: its post-hook raises after the update
    run.optimizer.register_step_post_hook(_raising_once("a post-hook fails"))
    with pytest.raises(RuntimeError, match="a post-hook fails"):
        run.step()
    assert (run.steps, run.engine.applied_steps(), run.skipped_steps) == (2, 1, 1) and run.train_time_ms > 0


def _raising_once(message: str):
    """An optimizer step hook that raises ``RuntimeError(message)`` the first time it runs, then passes."""
    failing = [True]

    def hook(optimizer, args, kwargs):
        if failing[0]:
            failing[0] = False
            raise RuntimeError(message)

    return hook


def test_an_update_that_raises_before_applying_returns_the_batch_and_is_no_step_of_the_warm_up() -> None:
    """A user's step pre-hook raised once: the step's samples were lost and the LR warm-up moved a step on, though
    no update went in. Now the run is as if the step never was: the same samples, LRs and weights as a twin's."""
    elastic = ElasticConfig(lr_rule="linear", warmup_steps=4)
    run, twin = (TrainingRun(small_task(n_train=600), seed=0, device="cpu", elastic=elastic) for _ in range(2))
    for each in (run, twin):
        each.step()
        each.batch_size = 4 * each.batch_size
    run.optimizer.register_step_pre_hook(_raising_once("a transient failure before the update"))
    loader, coupler = run.loader.state_dict(), run.lr_coupler.state_dict()
    with pytest.raises(RuntimeError, match="a transient failure"):
        run.step()
    assert run.loader.state_dict() == loader and run.lr_coupler.state_dict() == coupler and run.steps == 1
    assert [run.step().lr for _ in range(5)] == [twin.step().lr for _ in range(5)]
    assert max_abs_difference(parameters_of(run), parameters_of(twin)) == 0.0


def test_a_post_hook_that_raises_after_the_update_counts_the_step() -> None:
    """The update went in before a user's post-hook raised: its batch was trained on, so the step counts (and the
    warm-up moves on), as the Controller counts it."""
    run = TrainingRun(small_task(), seed=0, device="cpu")
    run.optimizer.register_step_post_hook(_raising_once("a post-hook fails"))
    cursor = run.loader.cursor
    with pytest.raises(RuntimeError, match="a post-hook fails"):
        run.step()
    assert run.steps == 1 and run.lr_coupler.steps == 1 and run.loader.cursor == cursor + run.batch_size
