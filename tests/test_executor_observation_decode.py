"""A tied head owning no parameter; the executor's overflow messages and LR bound; decode's wrapped bools."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from triaccel_rl.actions import decode
from triaccel_rl.config import ControllerConfig
from triaccel_rl.executor import Executor
from triaccel_rl.loop import DecisionLoop
from triaccel_rl.observation import (
    LayerGrouper,
    ObservationLayout,
    build_observation,
    sensitivity,
)
from triaccel_rl.signals.config import Schedule, SignalConfig
from triaccel_rl.tasks import Task, TaskData, synthetic_data
from triaccel_rl.training import TrainingRun
from triaccel_rl.types import Action, BatchMove, Precision, Signals

# ---------------------------------------------------------------- a layer owning no parameter element


class _TiedLM(nn.Module):
    """An embedding, three linear layers, and a bias-free head computing with the embedding's weight."""

    def __init__(self, vocab: int = 50, width: int = 16) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.l1, self.l2, self.l3 = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embedding.weight  # owned by the embedding, which comes first

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(tokens).mean(1)
        for layer in (self.l1, self.l2, self.l3):
            hidden = torch.relu(layer(hidden))
        return self.head(hidden)


def _tokens(n_train: int, n_test: int, seed: int) -> TaskData:
    g = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randint(0, 50, shape, generator=g)  # noqa: E731
    return TaskData(draw(512, 8), draw(512), draw(64, 8), draw(64))


def _tied_signals(measured_scores: list[float]) -> Signals:
    """Embedding (not controllable, score 0), three linear layers scoring ``measured_scores``, then the tied head.

    A score ``s`` is put in the curvature (``10**s``) with unit gradient variance; the head reads what the collector
    gives a layer owning nothing: curvature and variance 0 (the floor's score, -60), at the 800 elements it computes
    with.
    """
    return Signals(
        loss=1.0,
        loss_trend=0.0,
        probe_loss=1.0,
        curvature=np.array([1.0] + [10.0**s for s in measured_scores] + [0.0]),
        grad_variance=np.array([1.0, 1.0, 1.0, 1.0, 0.0]),
        grad_norm=np.array([1.0, 1.0, 1.0, 1.0, 0.0]),
        snr=np.ones(5),
        noise_scale=64.0,
        memory_bytes=512,
        memory_budget_bytes=1024,
        step_time_ms=10.0,
        step_time_trend=0.0,
        overflow_rate=0.0,
        batch_size=64,
        lr_scale=1.0,
        precisions=np.zeros(5, dtype=np.int64),
        n_params=np.array([800.0, 272.0, 272.0, 272.0, 800.0]),  # the head computes with the 800-element weight
        controllable=np.array([False, True, True, True, True]),
    )


_TIED_OWNED = [800, 272, 272, 272, 0]  # the engine's layer_param_counts for _TiedLM


def test_a_layer_owning_no_parameter_is_held_at_the_median_not_read_as_the_least_sensitive() -> None:
    """The head's statistics read 0 (it owns none of the weight it computes with): its score was -60, the lowest there
    is, its group read rel_sensitivity -10, and a policy lowered it first for the rest of the run."""
    signals = _tied_signals([1.0, 2.0, 3.0])
    assert sensitivity(signals)[4] == -60.0  # what the signals alone say
    grouper = LayerGrouper(signals.controllable, n_groups=4, param_counts=_TIED_OWNED)
    assert grouper.measured.tolist() == [True, True, True, True, False]
    # Scores of the controllable layers [1, 2, 3] and the head at their median, 2: a tie ranked after layer 2.
    assert grouper.update(signals).tolist() == [3, 1, 0, 2]
    assert grouper._score is not None and grouper._score.tolist() == [1.0, 2.0, 3.0, 2.0]
    # It follows the median of each update (smoothed as any layer), not the first one's.
    assert grouper.update(_tied_signals([3.0, 6.0, 9.0])).tolist() == [3, 1, 0, 2]
    assert grouper._score.tolist() == [2.0, 4.0, 6.0, 4.0]

    layout = ObservationLayout(4)
    obs = build_observation(signals, grouper, base_batch_size=64, layout=layout)
    feature = lambda group, name: float(obs[layout.group(group, name)])  # noqa: E731
    # The median of the measured layers' scores, 2 (with the head's -60 it was 1.5): groups 3 (layer 1), 1 (layer 2),
    # 0 (layer 3) read -1, 0, +1, and the head's group reads the median layer: 0.
    assert [feature(group, "rel_sensitivity") for group in range(4)] == [1.0, 0.0, 0.0, -1.0]
    # Its curvature and variance those of the median layer too (100 and 1), not the floor's (log10(1e-30) / 5 = -6).
    assert feature(2, "log_curvature") == pytest.approx(0.4, rel=1e-6)
    assert feature(2, "log_variance") == 0.0
    assert feature(2, "param_share") == pytest.approx(800 / 1616, rel=1e-6)  # it still computes with 800 elements
    # The mean curvature over the layers measured: (800 * 1 + 272 * (10 + 100 + 1000)) / 1616, not over 2416.
    expected = math.log10((800 + 272 * 1110) / 1616) / 5
    assert float(obs[layout.globals("log_curvature")]) == pytest.approx(expected, rel=1e-6)


def test_param_counts_of_another_length_or_negative_are_refused() -> None:
    controllable = np.array([False, True, True])
    for counts in ([1, 2], [1, -2, 3], [1, 2.5, 3]):
        with pytest.raises(ValueError, match=r"param_counts=.* must be 3 whole numbers >= 0, one per layer"):
            LayerGrouper(controllable, n_groups=2, param_counts=counts)


def test_a_tied_head_in_a_training_loop_is_held_at_the_median() -> None:
    """The loop's grouper knows which layers own parameters (the engine's counts), as its collector does."""
    task = Task("tied-lm", "", _TiedLM, _tokens, base_batch_size=16)
    loop = DecisionLoop(
        TrainingRun(task, device="cpu", cost_mode="profile", n_probe=32),
        ControllerConfig(interval_steps=2, min_batch_size=4),
        rollback=False,
    )
    assert loop.run.engine.layer_param_counts == _TIED_OWNED
    assert loop.grouper.measured.tolist() == [True, True, True, True, False]
    loop.train_interval()
    loop.snapshot(progress=0.1)
    score = loop.grouper._score
    assert score is not None and score[3] == np.median(score[:3])  # not -60
    head_group = int(loop.grouper.assignment[3])
    assert loop.observation()[loop.layout.group(head_group, "rel_sensitivity")] == 0.0


def test_a_tied_head_under_the_controller_is_held_at_the_median() -> None:
    from triaccel_rl.controller import Controller

    model = _TiedLM()
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), config=ControllerConfig(interval_steps=1000))
    assert ctl.grouper.measured.tolist() == [True, True, True, True, False]
    ctl.close()


def _old_build_observation(signals: Signals, grouper: LayerGrouper, base: int, layout: ObservationLayout) -> np.ndarray:
    """``build_observation`` as it was before layers owning nothing were told apart: the shipped policy's input."""
    obs = np.zeros(layout.size, dtype=np.float64)
    g = layout.globals
    weights = signals.n_params / max(signals.n_params.sum(), 1.0)
    obs[g("log_loss")] = math.log10(max(signals.loss, 1e-6))
    obs[g("loss_trend")] = np.clip(signals.loss_trend, -1, 1)
    obs[g("log_noise_over_batch")] = math.log10(max(signals.noise_scale / max(signals.batch_size, 1), 1e-6))
    obs[g("headroom")] = signals.headroom_frac
    obs[g("memory_use")] = np.clip(signals.memory_bytes / max(signals.memory_budget_bytes, 1), 0, 2)
    obs[g("log2_batch")] = math.log2(max(signals.batch_size, 1) / base)
    obs[g("log2_lr_scale")] = math.log2(max(signals.lr_scale, 1e-6))
    obs[g("overflow_rate")] = signals.overflow_rate
    obs[g("step_time_trend")] = np.clip(signals.step_time_trend, -1, 1)
    obs[g("progress")] = signals.progress
    obs[g("log_curvature")] = math.log10(max(float(np.dot(weights, signals.curvature)), 1e-30)) / 5
    scores = sensitivity(signals)
    median = float(np.median(scores[grouper.indices]))
    one_sided = signals.extra.get("curvature_source") == "fisher"
    controllable_params = max(signals.n_params[grouper.indices].sum(), 1.0)
    for group in range(layout.n_groups):
        members = grouper.layers_of(group)
        assert len(members), "an MLP of 5 controllable layers fills 4 groups"
        w = signals.n_params[members]
        mean = lambda values, w=w: float(np.dot(w, values) / max(w.sum(), 1.0))  # noqa: E731
        relative = mean(scores[members]) - median
        obs[layout.group(group, "rel_sensitivity")] = min(relative, 0.0) if one_sided else relative
        obs[layout.group(group, "log_curvature")] = math.log10(max(mean(signals.curvature[members]), 1e-30)) / 5
        obs[layout.group(group, "log_variance")] = math.log10(max(mean(signals.grad_variance[members]), 1e-30)) / 5
        obs[layout.group(group, "log_snr")] = math.log10(max(mean(signals.snr[members]), 1e-6))
        obs[layout.group(group, "param_share")] = signals.n_params[grouper.layers_of(group)].sum() / controllable_params
        counts = np.bincount(signals.precisions[members], weights=w, minlength=len(Precision))
        obs[layout.group(group, "is_fp32") + int(np.argmax(counts))] = 1.0
    return np.clip(np.nan_to_num(obs, nan=0.0), -10.0, 10.0).astype(np.float32)


_EVERY_STEP = SignalConfig(schedule=Schedule.FIXED, fixed_interval_steps=1, fixed_microbatches=4, fixed_probes=2)


@pytest.mark.parametrize(("signal_config", "source"), [(SignalConfig(), "fisher"), (_EVERY_STEP, "hutchinson")])
def test_an_ordinary_mlp_observes_bit_for_bit_as_before(signal_config: SignalConfig, source: str) -> None:
    """The shipped pretrained policy reads the observation: a model whose every layer owns its parameters sees the
    same vector as before, to the bit, from the cheap tier's curvature and from an estimator round's."""

    def mlp() -> nn.Module:  # 5 controllable layers
        hidden = [m for _ in range(3) for m in (nn.Linear(16, 16), nn.ReLU())]
        return nn.Sequential(nn.Linear(32, 16), nn.ReLU(), *hidden, nn.Linear(16, 10))

    task = Task("mlp", "", mlp, lambda a, b, seed: synthetic_data(512, 64, seed), base_batch_size=16)
    run = TrainingRun(task, device="cpu", cost_mode="profile", n_probe=32)
    config = ControllerConfig(interval_steps=2, n_groups=4, min_batch_size=4, signals=signal_config)
    loop = DecisionLoop(run, config, rollback=False)
    counts = run.engine.layer_param_counts
    assert all(n > 0 for n in counts)
    grouper = LayerGrouper(loop.collector.controllable, 4, param_counts=counts)
    for i in range(3):
        loop.train_interval()
        loop.snapshot(progress=0.1 * (i + 1))
        signals = loop.signals
        assert signals is not None and signals.extra["curvature_source"] == source
        grouper.update(signals)
        new = build_observation(signals, grouper, task.base_batch_size, loop.layout)
        old = _old_build_observation(signals, grouper, task.base_batch_size, loop.layout)
        assert new.tobytes() == old.tobytes(), (new - old).tolist()


# ---------------------------------------------------------------- the executor


class _UsersLoop:
    """The Controller's view of a user's loop (it cannot split a step): 4 bytes a sample in fp16, 8 in fp32."""

    splits_batches = False
    memory_budget_bytes = 1000
    usable_memory_bytes = 900
    batch_size = 64
    max_batch_size = 512

    def __init__(self, precisions: list[Precision]) -> None:
        self.engine = SimpleNamespace(
            precision=SimpleNamespace(precisions=list(precisions)),
            device=torch.device("cpu"),
            lr_scale=1.0,
            set_precisions=lambda p: setattr(self.engine.precision, "precisions", list(p)),
        )

    def predicted_memory_bytes(self, batch_size: int, precisions: list[Precision] | None = None) -> int:
        precisions = self.engine.precision.precisions if precisions is None else precisions
        return sum(batch_size * (8 if p is Precision.FP32 else 4) for p in precisions)


@pytest.mark.parametrize("asked", [Precision.FP32, Precision.FP16])
@pytest.mark.usefixtures("gpu_without_bf16")
def test_an_fp16_layer_leaving_fp16_over_the_budget_is_reported_as_moved_by_the_overflow_rule(
    asked: Precision,
) -> None:
    """Without bf16, an overflowing fp16 layer goes to fp32 over the memory budget (asked for fp32, or kept in fp16).
    The report said "kept 0 layers at their precision" and, asked for fp32, did not count it as moved out of fp16."""
    target = _UsersLoop([Precision.FP16, Precision.FP32])  # 768 bytes; [FP32, FP32] 1024 > 900 usable
    grouper = LayerGrouper(np.array([True, True]), 2)
    grouper.assignment = np.array([0, 1])
    action = Action((asked, Precision.FP32), 1.0, BatchMove.KEEP)
    report = Executor(ControllerConfig(n_groups=2), grouper).apply(action, target, overflow_rate=0.5)
    assert report.precisions == [Precision.FP32, Precision.FP32]
    assert report.refused == [
        "moved 1 layers out of fp16 (to fp32): overflow rate 0.5 > 0.05; the overflow rule overrides the memory "
        "check: batch 64 at the new precisions is predicted 1024 bytes > 900 usable of the 1000-byte budget, and this "
        "loop cannot split a step"
    ]


def _lr_target(lr_scale: float) -> SimpleNamespace:
    engine = SimpleNamespace(
        precision=SimpleNamespace(precisions=[Precision.FP32]),
        device=torch.device("cpu"),
        lr_scale=lr_scale,
        set_precisions=lambda p: None,
    )
    return SimpleNamespace(
        engine=engine,
        splits_batches=True,
        memory_budget_bytes=10**9,
        usable_memory_bytes=10**9,
        batch_size=64,
        max_batch_size=512,
        predicted_memory_bytes=lambda batch, precisions=None: 0,
    )


@pytest.mark.parametrize(
    ("current", "asked", "expected", "refused"),
    [
        (0.3, 0.45, 0.45, []),  # 0.3 * 1.5 is 0.44999999999999996: read as a clamp, off the ladder
        (0.2, 0.3, 0.3, []),
        (0.675, 0.45, 0.45, []),
        (0.3, 0.675, 0.45, ["LR scale 0.675 clamped to 0.45 (at most ×1.5 per decision)"]),
        (1.0, 0.45, 1.0 / 1.5, ["LR scale 0.45 clamped to 0.6667 (at most ×1.5 per decision)"]),
        (1.0, 1.5 * (1 + 1e-9), 1.5, [f"LR scale {1.5 * (1 + 1e-9)} clamped to 1.5 (at most ×1.5 per decision)"]),
    ],
    ids=["up-a-rung", "up-from-0.2", "down-a-rung", "up-two-rungs", "down-two-rungs", "just-past-the-bound"],
)
def test_a_one_rung_lr_move_exactly_max_lr_change_apart_is_taken_as_asked(
    current: float, asked: float, expected: float, refused: list[str]
) -> None:
    config = ControllerConfig(n_groups=1, lr_scales=(0.2, 0.3, 0.45, 0.675, 1.0), max_lr_change=1.5)
    executor = Executor(config, LayerGrouper(np.array([True]), 1))
    report = executor.apply(Action((Precision.FP32,), asked, BatchMove.KEEP), _lr_target(current))  # type: ignore[arg-type]
    assert (report.lr_scale, report.refused) == (expected, refused)


# ---------------------------------------------------------------- decode

_SPACE = "MultiDiscrete([3, 3, 3, 3, 5, 3])"
_BOOLS = "must hold integers; True and False are no action indices"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            [*torch.tensor([True, True, False, True]), 4, 2],
            f"action [tensor(True), tensor(True), tensor(False), tensor(True), 4, 2] {_BOOLS}",
        ),
        ([np.array(True), 1, 2, 0, 4, 2], f"action [array(True), 1, 2, 0, 4, 2] {_BOOLS}"),
        ((0, 1, 2, 0, 4, np.array([False])), f"action [0, 1, 2, 0, 4, array([False])] {_BOOLS}"),
        (
            [0, 1, 2, 0, 2**70, 2],
            f"action entry 4 = {2**70} is outside [0, 4] (LR-scale index into (0.5, 0.75, 1.0, 1.25, 1.5)); the "
            f"action space is {_SPACE}",
        ),
        (
            [-(2**70), 1, 2, 0, 4, 2],
            f"action entry 0 = {-(2**70)} is outside [0, 2] (precision of group 0: 0=fp32, 1=bf16, 2=fp16); the "
            f"action space is {_SPACE}",
        ),
        ([0, 1, 2, 0, [4], 2], f"action [0, 1, 2, 0, [4], 2] must be 6 integers, one per entry of {_SPACE}"),
    ],
    ids=["tensor-bools", "0d-array-bool", "1-element-bool-array", "past-int64", "below-int64", "ragged"],
)
def test_decode_refuses_wrapped_bools_huge_ints_and_ragged_lists_naming_the_action(raw: list, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        decode(raw, ControllerConfig())
    assert str(caught.value) == message


def test_decode_takes_integers_wrapped_in_0d_arrays_and_tensors() -> None:
    action = decode([torch.tensor(2), np.array(1), np.int64(0), 1, 4, 2], ControllerConfig())
    assert action == Action((Precision.FP16, Precision.BF16, Precision.FP32, Precision.BF16), 1.5, BatchMove.GROW)
