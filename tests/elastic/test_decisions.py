"""Decisions under a memory budget: refusals with their reason, the environment and heuristic under OOMs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from elastic_helpers import small_task
from triaccel_rl.envs.training_env import TriAccelEnv

from triaccel_rl.actions import encode
from triaccel_rl.config import ControllerConfig, MemoryBudget
from triaccel_rl.elastic import inject_oom
from triaccel_rl.executor import Executor
from triaccel_rl.loop import DecisionLoop
from triaccel_rl.training import TrainingRun
from triaccel_rl.types import Action, BatchMove, Precision


def _grow(config: ControllerConfig) -> Action:
    return Action((Precision.FP32,) * config.n_groups, 1.0, BatchMove.GROW)


def _loop(budget_bytes: int | None = None) -> DecisionLoop:
    config = ControllerConfig(interval_steps=2, memory=MemoryBudget(bytes=budget_bytes))
    return DecisionLoop(TrainingRun(small_task(n_train=1200), seed=0, device="cpu", memory=config.memory), config)


def test_growth_predicted_over_budget_is_refused_with_the_fitted_prediction() -> None:
    loop = _loop()
    run = loop.run
    # Measurements (as a GPU allocator would give them) that say each sample costs 1 MB over 10 MB fixed.
    precisions = run.precisions
    run.memory_model.observe(16, precisions, 10_000_000 + 16 * 1_000_000)
    run.memory_model.observe(32, precisions, 10_000_000 + 32 * 1_000_000)
    run.memory_budget_bytes = 100_000_000  # usable 90 MB: 80 samples
    assert run.predicted_memory_bytes(128) == 138_000_000  # the fitted line, not the accounting
    report = loop.executor.apply(_grow(loop.config), run)
    assert run.batch_size == 64
    assert report.batch_size == 64
    [reason] = report.refused
    assert "batch 128 refused: predicted 138000000 bytes > 90000000 usable of the 100000000-byte budget" == reason
    run.memory_budget_bytes = 200_000_000  # now 128 fits (usable 180 MB)
    assert loop.executor.apply(_grow(loop.config), run).batch_size == 128


def test_environment_reports_the_refusal_in_info() -> None:
    probe = TrainingRun(small_task(), seed=0, device="cpu")
    budget = int(probe.predicted_memory_bytes(100) / 0.9)  # the base batch (64) fits, 128 does not
    config = ControllerConfig(interval_steps=2, memory=MemoryBudget(bytes=budget))
    env = TriAccelEnv(task="synthetic", config=config, max_decisions=3, task_overrides={"n_train": 1200})
    env.reset(seed=0)
    action = encode(_grow(config), config)
    _, _, _, _, info = env.step(action)
    assert info["batch_size"] == 64
    assert any("batch 128 refused: predicted" in reason for reason in info["refused"])


def test_shrink_is_never_refused_for_memory() -> None:
    loop = _loop()
    shrink = Action((Precision.FP32,) * loop.config.n_groups, 1.0, BatchMove.SHRINK)
    report = loop.executor.apply(shrink, loop.run)
    assert report.batch_size == 32 and not report.refused and report.changed
    keep = Action((Precision.FP32,) * loop.config.n_groups, 1.0, BatchMove.KEEP)
    assert not loop.executor.apply(keep, loop.run).changed  # the same configuration again: nothing changed


def test_a_shrink_below_the_smallest_batch_keeps_the_batch() -> None:
    """A batch already under ``min_batch_size`` (a user's own batch of 8, default minimum 16): a shrink, asked for
    under memory pressure, once set it to the minimum, doubling it without a memory check."""
    loop = _loop()
    loop.run.batch_size = 8
    shrink = Action((Precision.FP32,) * loop.config.n_groups, 1.0, BatchMove.SHRINK)
    report = loop.executor.apply(shrink, loop.run)
    assert report.batch_size == loop.run.batch_size == 8 and not report.changed
    assert report.refused == ["batch 8 already at or below min_batch_size=16"]
    loop.run.batch_size = 24
    assert loop.executor.apply(shrink, loop.run).batch_size == 16  # halving stops at the minimum


def test_executor_uses_the_targets_usable_memory() -> None:
    loop = _loop()
    executor = Executor(loop.config, loop.grouper)
    loop.run.memory_budget_bytes = int(loop.run.predicted_memory_bytes(128) / 0.9) + 10  # 128 just fits
    assert executor.apply(_grow(loop.config), loop.run).batch_size == 128
    # Within the whole budget but over its usable share (fill_frac 0.9): refused, naming the usable bytes.
    loop.run.batch_size = 64
    predicted = loop.run.predicted_memory_bytes(128)
    loop.run.memory_budget_bytes = int(predicted / 0.95)
    usable = loop.run.usable_memory_bytes
    assert usable < predicted <= loop.run.memory_budget_bytes
    report = executor.apply(_grow(loop.config), loop.run)
    assert report.batch_size == 64 and report.refused == [
        f"batch 128 refused: predicted {predicted} bytes > {usable} usable of the {loop.run.memory_budget_bytes}-byte "
        "budget"
    ]


@pytest.mark.parametrize("policy_move", ["heuristic", "grow-always"])
def test_environment_runs_through_injected_ooms_without_losing_samples(policy_move: str) -> None:
    from triaccel_rl.policies import HeuristicPolicy

    config = ControllerConfig(interval_steps=3, min_batch_size=8)
    # 300 samples: the episode crosses two epoch boundaries, so at least one whole epoch is checked below.
    env = TriAccelEnv(task="synthetic", config=config, max_decisions=6, task_overrides={"n_train": 300})
    obs, _ = env.reset(seed=1)
    assert env.loop is not None
    run = env.loop.run
    run.fault = inject_oom(lambda point: point.micro_batch_size > 40)  # a device that holds 40 samples
    applied: dict[int, list[int]] = {}  # epoch -> indices applied, in order
    step = run._step

    def recording_step(deferred):  # wraps the one step both step() and train_interval() run
        outcome = step(deferred)
        assert run.last_batch is not None
        applied.setdefault(run.last_batch.epoch, []).extend(run.last_batch.indices.tolist())
        return outcome

    run._step = recording_step  # type: ignore[method-assign]
    policy = HeuristicPolicy(config)
    grow = encode(_grow(config), config)
    served = run.samples_seen
    truncated = terminated = False
    while not (truncated or terminated):
        action = policy.predict(obs)[0] if policy_move == "heuristic" else grow
        obs, reward, terminated, truncated, info = env.step(action)
        assert np.isfinite(reward)
        assert info["samples_seen"] == run.samples_seen
    assert run.samples_seen - served == sum(len(indices) for indices in applied.values())
    for indices in applied.values():
        assert len(set(indices)) == len(indices)  # no sample twice in an epoch
    assert len(applied) >= 3  # the run crossed two epoch boundaries (one whole epoch between)...
    for epoch in list(applied)[1:-1]:
        assert sorted(applied[epoch]) == list(range(len(run.loader)))  # ...and full epochs have every sample
    if policy_move == "grow-always":
        assert run.batch_size > 40  # the effective batch grew past what the device holds...
        assert run.oom_events >= 1  # ...an OOM taught the run so...
        assert max(run.last_micro_batches) <= 40  # ...and it accumulates micro-batches that fit


@pytest.mark.parametrize("lr_scale", [float("nan"), float("inf"), 0.0, -1.0])
def test_an_lr_scale_that_is_no_positive_number_is_refused_by_value(lr_scale: float) -> None:
    """Before the fix, NaN passed the clamp (every comparison with it is false) and became the engine's LR
    multiplier: every later update NaN. Infinite, zero and negative scales were clamped silently. ``Action`` refuses
    them itself since 2026-12-06; the executor still checks what it is handed (an action whose field was forced)."""
    loop = _loop()
    before = loop.run.lr_scale
    with pytest.raises(ValueError, match=r"must be a positive finite number \(a multiplier on the scheduled LR\)"):
        Action((Precision.FP32,) * loop.config.n_groups, lr_scale, BatchMove.KEEP)
    action = Action((Precision.FP32,) * loop.config.n_groups, 1.0, BatchMove.KEEP)
    object.__setattr__(action, "lr_scale", lr_scale)  # past the dataclass's check, as a hand-made object would be
    with pytest.raises(ValueError, match=rf"action lr_scale={lr_scale} must be a positive finite multiplier"):
        loop.executor.apply(action, loop.run)
    assert loop.run.lr_scale == before


@pytest.mark.parametrize("rate", [float("nan"), -0.1, 1.5])
def test_an_overflow_rate_outside_zero_one_is_refused(rate: float) -> None:
    """Before the fix, a NaN rate never exceeded ``max_overflow_rate``: the shield let fp16 layers be lowered."""
    loop = _loop()
    with pytest.raises(ValueError, match=rf"overflow_rate={rate} must be a share of steps in \[0, 1\]"):
        loop.executor.apply(_grow(loop.config), loop.run, overflow_rate=rate)


def test_the_lr_clamp_and_the_overflow_shield_at_their_bounds() -> None:
    loop = _loop()
    config = loop.config
    report = loop.executor.apply(Action((Precision.FP32,) * config.n_groups, 10.0, BatchMove.KEEP), loop.run)
    assert report.lr_scale == loop.run.lr_scale == config.max_lr_change  # x1.5 at most per decision
    assert report.refused == [f"LR scale 10.0 clamped to 1.5 (at most ×{config.max_lr_change} per decision)"]
    lower = Action((Precision.BF16,) * config.n_groups, 1.5, BatchMove.KEEP)
    report = loop.executor.apply(lower, loop.run, overflow_rate=1.0)
    assert report.precisions == [Precision.FP32] * loop.run.n_layers and report.changed_precision == 0
    assert report.refused == [f"kept {loop.run.n_layers} layers at their precision: overflow rate 1 > 0.05"]
    report = loop.executor.apply(lower, loop.run, overflow_rate=0.0)
    assert report.changed_precision == loop.run.n_layers


def test_growth_stops_at_the_configs_and_the_datas_largest_batch() -> None:
    config = ControllerConfig(interval_steps=2, max_batch_size=100)
    run = TrainingRun(small_task(n_train=1200), seed=0, device="cpu")  # loader 1054: the data allows 131
    loop = DecisionLoop(run, config)
    report = loop.executor.apply(_grow(config), run)
    assert report.batch_size == run.batch_size == 100 and not report.refused  # 128 capped at the config's 100
    report = loop.executor.apply(_grow(config), run)
    assert report.batch_size == 100 and not report.changed
    assert report.refused == ["batch 100 already at its largest allowed size 100"]
    run.batch_size = 512  # a batch set above both bounds is not grown, nor cut by a grow
    assert loop.executor.apply(_grow(config), run).refused == ["batch 512 is above max_batch_size=100"]
    assert run.batch_size == 512
    wide = DecisionLoop(TrainingRun(small_task(n_train=1200), seed=0, device="cpu"), ControllerConfig(interval_steps=2))
    wide.run.batch_size = 128
    assert wide.executor.apply(_grow(wide.config), wide.run).batch_size == wide.run.max_batch_size == 131


def test_a_grow_moves_the_lr_by_the_rule_through_the_warmup() -> None:
    loop = _loop()
    run = loop.run
    base = run.task.base_lr
    run.step()  # after the first step, a rise of x1.5 or more is warmed up (elastic.warmup_steps = 10)
    loop.executor.apply(_grow(loop.config), run)
    assert run.batch_size == 128
    assert [run.step().lr for _ in range(3)] == pytest.approx([base * 1.1, base * 1.2, base * 1.3])
    shrink = Action((Precision.FP32,) * loop.config.n_groups, 1.0, BatchMove.SHRINK)
    loop.executor.apply(shrink, run)  # a fall applies at once: linear in the batch (SGD)
    assert run.batch_size == 64 and run.step().lr == pytest.approx(base)


def test_a_precision_raise_over_budget_is_refused_where_the_loop_cannot_split_a_step() -> None:
    """A user's loop (``Controller``) has no micro-batches: a raise to fp32 that the memory model puts over the usable
    budget at the batch it runs would make a step that fitted run out of memory. Before, nothing checked it; now the
    raise is refused (and reported), and taken once the budget allows it. A ``TrainingRun`` that splits its steps
    takes it either way: it accumulates."""
    from torch import nn

    from triaccel_rl.controller import Controller

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 10))
    config = ControllerConfig(interval_steps=1000)
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="bf16", config=config)
    data = (torch.randn(256, 32), torch.randint(0, 10, (256,)))
    next(ctl.loader(data, batch_size=64))
    low, high = ctl.precisions, [Precision.FP32] * len(ctl.precisions)
    assert low == [Precision.BF16] * 2
    at_low, at_high = ctl.predicted_memory_bytes(64), ctl.predicted_memory_bytes(64, high)
    assert at_high > at_low  # the activations' bytes double
    fill = config.elastic.fill_frac
    raise_all = Action((Precision.FP32,) * config.n_groups, 1.0, BatchMove.KEEP)
    ctl.memory_budget_bytes = int((at_low + at_high) / 2 / fill)  # the bf16 step fits, the fp32 one would not
    report = ctl.executor.apply(raise_all, ctl)
    assert report.precisions == ctl.precisions == low and not report.changed
    assert report.refused == [
        f"kept 2 layers at their precision: batch 64 at the new precisions is predicted {at_high} bytes > "
        f"{ctl.usable_memory_bytes} usable of the {ctl.memory_budget_bytes}-byte budget, and this loop cannot split a "
        "step"
    ]
    ctl.memory_budget_bytes = int(at_high / fill) + 1
    report = ctl.executor.apply(raise_all, ctl)
    assert report.precisions == high and report.changed_precision == 2 and not report.refused
    ctl.close()

    loop = _loop()
    n_layers = len(loop.run.precisions)
    loop.run.set_precisions([Precision.BF16] * n_layers)
    one_fp32 = loop.run.predicted_memory_bytes(1, [Precision.FP32] * n_layers)
    assert loop.run.predicted_memory_bytes(loop.run.batch_size, [Precision.FP32] * n_layers) > one_fp32
    loop.run.memory_budget_bytes = int(one_fp32 / fill) + 1  # one fp32 sample fits, the whole batch does not
    report = loop.executor.apply(raise_all, loop.run)
    assert report.precisions == [Precision.FP32] * n_layers and not report.refused  # it accumulates
    # A lowering can raise memory: the 16-bit weight copies (2 bytes a parameter) outweigh one sample's activations
    # here. It was never checked: every step then ran one-sample micro-batches over the budget.
    loop.run.set_precisions([Precision.FP32] * n_layers)
    one_bf16 = loop.run.predicted_memory_bytes(1, [Precision.BF16] * n_layers)
    assert one_bf16 > one_fp32
    loop.run.memory_budget_bytes = int(one_fp32 / fill) + 1
    assert loop.run.usable_memory_bytes < one_bf16
    lower_all = Action((Precision.BF16,) * config.n_groups, 1.0, BatchMove.KEEP)
    report = loop.executor.apply(lower_all, loop.run)
    assert report.precisions == [Precision.FP32] * n_layers and not report.changed
    assert report.refused == [
        f"kept {n_layers} layers at their precision: one sample at the new precisions is predicted {one_bf16} bytes > "
        f"{loop.run.usable_memory_bytes} usable of the {loop.run.memory_budget_bytes}-byte budget"
    ]
    loop.run.memory_elastic = False  # as the batch finder's rows run: no splitting, so the raise is checked
    loop.run.set_precisions([Precision.BF16] * len(loop.run.precisions))
    assert loop.executor.apply(raise_all, loop.run).refused[0].startswith("kept ")


def test_a_raise_refused_for_memory_under_overflow_leaves_the_layer_in_bf16_not_fp16() -> None:
    """Under a high overflow rate the shield moves every fp16 layer to bf16. A layer whose raise to fp32 was refused for
    memory was put back at its current precision, fp16: the one format that overflows stayed on while it did."""
    from torch import nn

    from triaccel_rl.controller import Controller

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 10))
    config = ControllerConfig(interval_steps=1000)
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="fp16", config=config)
    next(ctl.loader((torch.randn(256, 32), torch.randint(0, 10, (256,))), batch_size=64))
    assert ctl.precisions == [Precision.FP16] * 2
    fp32 = ctl.predicted_memory_bytes(64, [Precision.FP32] * 2)
    ctl.memory_budget_bytes = int(fp32 / config.elastic.fill_frac) - 1  # an fp32 layer would not fit
    raise_all = Action((Precision.FP32,) * config.n_groups, 1.0, BatchMove.KEEP)
    overflowing = config.heuristic.max_overflow_rate + 0.1
    report = ctl.executor.apply(raise_all, ctl, overflow_rate=overflowing)
    # The messages say so (it read "kept 2 layers at their precision" for layers moved to bf16), each layer counted
    # once in each: the raises held back, and every layer moved out of fp16.
    assert report.refused[0].startswith(
        "kept 2 layers at their precision, the 2 in fp16 moved out of it as it overflows: batch 64 at the new "
        "precisions"
    )
    assert report.refused[1:] == ["moved 2 layers out of fp16 (to bf16): overflow rate 0.15 > 0.05"]
    assert report.precisions == [Precision.BF16] * 2  # out of fp16, as the shield puts every layer under overflow
    # One layer raised, one asked to stay in fp16: the raise held back, both moved out of fp16, each said once (the
    # fp16 message counted the layer asked for fp16, the memory one "moved 2 only out of fp16" both again).
    ctl.engine.set_precisions([Precision.FP16] * 2)
    ctl.grouper.assignment = np.arange(2)  # a group a layer (before any signals, all are in group 0)
    mixed = [Precision.FP32, Precision.BF16]
    ctl.memory_budget_bytes = int(ctl.predicted_memory_bytes(64, mixed) / config.elastic.fill_frac) - 1
    ask = Action((Precision.FP32,) + (Precision.FP16,) * (config.n_groups - 1), 1.0, BatchMove.KEEP)
    report = ctl.executor.apply(ask, ctl, overflow_rate=overflowing)
    assert report.refused[0].startswith(
        "kept 1 layers at their precision, the 1 in fp16 moved out of it as it overflows"
    )
    assert report.refused[1:] == ["moved 2 layers out of fp16 (to bf16): overflow rate 0.15 > 0.05"]
    assert report.precisions == [Precision.BF16] * 2
    ctl.close()


@pytest.mark.usefixtures("gpu_without_bf16")
def test_under_overflow_on_a_gpu_without_bf16_fp16_layers_go_to_fp32() -> None:
    """On a V100 or T4 (no bf16) the shield moved overflowing fp16 layers to bf16, which the engine refused: the whole
    precision action was dropped, a raise to fp32 with it, and every layer stayed fp16 while fp16 overflowed."""
    loop = _loop()
    layers = len(loop.run.precisions)
    ask = Action((Precision.FP16,) * loop.config.n_groups, 1.0, BatchMove.KEEP)
    for rate, expected in ((0.5, Precision.FP32), (0.0, Precision.FP16)):
        loop.run.engine.set_precisions([Precision.FP16] * layers)
        report = loop.executor.apply(ask, loop.run, overflow_rate=rate)
        assert report.precisions == [expected] * layers and not any("not applied" in r for r in report.refused)
    assert loop.executor.apply(ask, loop.run, overflow_rate=0.5).refused == [
        f"moved {layers} layers out of fp16 (to fp32): overflow rate 0.5 > 0.05"
    ]


@pytest.mark.parametrize("rate", [1.0, 0.0])
@pytest.mark.usefixtures("gpu_without_bf16")
def test_on_a_gpu_without_bf16_layers_asked_for_bf16_run_in_fp32_and_the_rest_of_the_action_applies(
    rate: float,
) -> None:
    """The heuristic asks bf16 for its fp16 groups under overflow (and lowers to bf16 by default). On a V100 or T4 the
    executor passed bf16 to the engine, which refused the whole map: a sensitive group's raise to fp32 was dropped with
    it, and every layer stayed in fp16 while every step overflowed."""
    loop = _loop()
    layers = len(loop.run.precisions)
    loop.run.engine.set_precisions([Precision.FP16] * layers)
    loop.grouper.assignment = np.arange(layers)  # a group a layer (before any signals, all are in group 0)
    ask = Action((Precision.FP32,) + (Precision.BF16,) * (loop.config.n_groups - 1), 1.0, BatchMove.KEEP)
    asked_bf16 = layers - 1  # every layer but the first, whose group is raised to fp32
    report = loop.executor.apply(ask, loop.run, overflow_rate=rate)
    assert report.precisions == loop.run.precisions == [Precision.FP32] * layers
    assert report.changed_precision == layers
    assert report.refused == [
        f"ran {asked_bf16} layers asked for bf16 in fp32: precision bf16 is not supported on Tesla T4; allowed: "
        "fp32, fp16"
    ]


def test_under_overflow_the_layers_moved_out_of_fp16_are_reported() -> None:
    """A layer asked for fp16 (or kept there) under overflow runs in bf16: every refusal is reported with its reason,
    but this one was not (layers [bf16, fp16] asked fp16 at a 0.5 overflow rate ran [bf16, bf16], nothing said)."""
    loop = _loop()
    loop.grouper.assignment = np.arange(3)  # a group a layer (before any signals, all are in group 0)
    ask = Action((Precision.FP16, Precision.FP16, Precision.FP16, Precision.FP32), 1.0, BatchMove.KEEP)
    for rate, expected, refused in (
        (
            0.5,
            [Precision.BF16, Precision.BF16, Precision.FP32],
            [
                "kept 1 layers at their precision: overflow rate 0.5 > 0.05",  # the fp32 layer asked for fp16
                "moved 2 layers out of fp16 (to bf16): overflow rate 0.5 > 0.05",
            ],
        ),
        (0.05, [Precision.FP16, Precision.FP16, Precision.FP16], []),  # at the bound: stable, applied as asked
        (  # 1 of 19 steps: read "0.05 > 0.05" at two decimals
            1 / 19,
            [Precision.BF16, Precision.BF16, Precision.FP32],
            [
                "kept 1 layers at their precision: overflow rate 0.0526 > 0.05",
                "moved 2 layers out of fp16 (to bf16): overflow rate 0.0526 > 0.05",
            ],
        ),
    ):
        loop.run.engine.set_precisions([Precision.BF16, Precision.FP16, Precision.FP32])
        report = loop.executor.apply(ask, loop.run, overflow_rate=rate)
        assert (report.precisions, report.refused) == (expected, refused)


def test_a_refused_shrink_leaves_the_lr_gain_alone() -> None:
    """A shrink refused at the smallest batch still wrote the batch size, whose setter re-targeted the AdaScale gain to
    the noise scale measured since: the refused move changed the LR while the report said nothing changed."""
    from triaccel_rl.config import ElasticConfig

    run = TrainingRun(small_task(n_train=1200), seed=0, device="cpu", elastic=ElasticConfig(lr_rule="adascale"))
    config = ControllerConfig(min_batch_size=32)
    executor = Executor(config, DecisionLoop(run, config).grouper)
    keep = (Precision.FP32,) * config.n_groups
    executor.apply(Action(keep, 1.0, BatchMove.SHRINK), run)  # 64 -> 32
    for _ in range(10):  # a new noise estimate since the gain was set
        run.step()
    before = run.engine.batch_lr_gain
    report = executor.apply(Action(keep, 1.0, BatchMove.SHRINK), run)
    assert report.refused == ["batch 32 already at or below min_batch_size=32"] and not report.changed
    assert run.engine.batch_lr_gain == before


def test_the_lr_clamp_holds_a_cut_too() -> None:
    """Only the upward clamp was tested: without the lower bound a policy's 0.01 cut the LR 100x in one decision."""
    loop = _loop()
    config = loop.config
    report = loop.executor.apply(Action((Precision.FP32,) * config.n_groups, 0.01, BatchMove.KEEP), loop.run)
    assert report.lr_scale == loop.run.lr_scale == 1 / config.max_lr_change  # /1.5 at most a decision
    assert report.refused == [f"LR scale 0.01 clamped to 0.6667 (at most ×{config.max_lr_change} per decision)"]


def test_a_change_that_lowers_a_prediction_already_over_the_budget_is_taken() -> None:
    """The executor's docstring: a controller over its budget may still drop to bf16 to save memory."""
    from torch import nn

    from triaccel_rl.controller import Controller

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 10))
    config = ControllerConfig(interval_steps=1000)
    with Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="fp32", config=config) as ctl:
        next(ctl.loader((torch.randn(256, 32), torch.randint(0, 10, (256,))), batch_size=64))
        low = [Precision.BF16] * len(ctl.precisions)
        at_low = ctl.predicted_memory_bytes(64, low)
        assert at_low < ctl.predicted_memory_bytes(64)
        ctl.memory_budget_bytes = at_low // 2  # over the budget either way: lowering still helps
        report = ctl.executor.apply(Action((Precision.BF16,) * config.n_groups, 1.0, BatchMove.KEEP), ctl)
        assert report.precisions == low and report.changed_precision == len(low) and not report.refused
