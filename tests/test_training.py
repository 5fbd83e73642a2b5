import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from triaccel_rl.config import ConfigError, MemoryBudget
from triaccel_rl.tasks import FRESH_HELD_OUT_TASKS, HELD_OUT_TASKS, TRAINING_TASKS, get_task, task_names
from triaccel_rl.training import TrainingRun, evaluate_accuracy, probe_count, schedule_gain
from triaccel_rl.types import Precision

SMALL = {"n_train": 2048, "n_test": 256}
BENCHMARK_TASKS = sorted(set(task_names()) - {*TRAINING_TASKS, *HELD_OUT_TASKS, *FRESH_HELD_OUT_TASKS})
_LINEAR = torch.nn.Linear(3, 2)  # a model for evaluate_accuracy's argument checks


def test_task_suite_split():
    assert len(TRAINING_TASKS) + len(HELD_OUT_TASKS) >= 6
    assert not set(TRAINING_TASKS) & set(HELD_OUT_TASKS)
    assert not set(FRESH_HELD_OUT_TASKS) & {*TRAINING_TASKS, *HELD_OUT_TASKS}
    assert {get_task(name).optimizer for name in FRESH_HELD_OUT_TASKS} == {"sgd", "adamw"}
    assert set(BENCHMARK_TASKS) == {"resnet18-fmnist", "effnet-b0-fmnist"}


@pytest.mark.parametrize("name", TRAINING_TASKS + HELD_OUT_TASKS + FRESH_HELD_OUT_TASKS)
def test_every_task_trains(name):
    task = get_task(name, **SMALL)
    run = TrainingRun(task, seed=0, device="cpu", batch_size=64)
    before = run.probe_loss()
    losses = [run.step().loss for _ in range(12)]
    after = run.probe_loss()
    assert all(math.isfinite(v) for v in losses)
    assert after < before, f"{name}: probe loss {before:.4f} -> {after:.4f} did not fall"


@pytest.mark.parametrize("name", BENCHMARK_TASKS)
def test_benchmark_tasks_step_on_cpu(name):
    """The GPU benchmark models are too slow to train on a CPU here: three small steps must run and move every
    parameter (a layer left out of the optimizer or cut from the graph would stay as built)."""
    run = TrainingRun(get_task(name, n_train=256, n_test=64), seed=0, device="cpu", batch_size=8, n_probe=16)
    before = {key: p.detach().clone() for key, p in run.model.named_parameters()}
    losses = [run.step().loss for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    unmoved = [key for key, p in run.model.named_parameters() if torch.equal(before[key], p)]
    assert not unmoved, f"{name}: {len(unmoved)} of {len(before)} parameters did not move: {unmoved[:5]}"


def test_mixed_precision_run_trains_and_reports_per_layer_stats():
    run = TrainingRun("synthetic", seed=0, device="cpu")
    run.set_precisions(["bf16", "fp16", "fp32"])
    assert run.engine.grad_scaler is not None  # fp16 layer: loss scaling on
    before = run.probe_loss()
    for _ in range(20):
        stats = run.step()
    assert run.probe_loss() < before
    assert stats.grad_sq_sum.shape == (3,) and np.all(stats.grad_sq_sum > 0)
    assert np.all(stats.grad_nonfinite == 0)


def test_batch_size_and_lr_scale_knobs():
    """The LR the update applies, not only the one reported: the group's own LR is put back after each step, so it
    read the base 0.05 whatever was applied (and 0.05 × 0.5 × 2 was that base too)."""
    runs = {}
    for scale in (0.25, 1.0):
        run = TrainingRun("synthetic", seed=0, device="cpu")
        run.batch_size = 128
        run.lr_scale = scale
        before = [p.detach().clone() for p in run.model.parameters()]
        assert run.engine.group_lrs()[0] == pytest.approx(0.05 * scale * 2)
        stats = run.step()
        assert stats.batch_size == 128
        # SGD: linear batch rule. 0.05 (base) * scale * 128/64 (batch gain)
        assert stats.lr == pytest.approx(0.05 * scale * 2)
        assert run.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # the group's own, put back
        runs[scale] = [p.detach() - b for p, b in zip(run.model.parameters(), before, strict=True)]
    for quarter, whole in zip(runs[0.25], runs[1.0], strict=True):  # the first update is linear in the LR
        torch.testing.assert_close(quarter, 0.25 * whole, rtol=1e-5, atol=1e-8)
    # And its size: torch.optim.SGD at 0.05 × 0.25 × 2 on the gradients the step took.
    run = TrainingRun("synthetic", seed=0, device="cpu")
    run.batch_size, run.lr_scale = 128, 0.25
    params = list(run.model.parameters())
    twins = [p.detach().clone().requires_grad_() for p in params]
    grads: dict[int, torch.Tensor] = {}
    for i, p in enumerate(params):
        p.register_post_accumulate_grad_hook(lambda q, i=i: grads.__setitem__(i, q.grad.detach().clone()))
    run.step()
    group = {k: v for k, v in run.optimizer.param_groups[0].items() if k not in ("params", "lr", "layer")}
    reference = torch.optim.SGD(twins, lr=0.025, **{k: group[k] for k in ("momentum", "weight_decay", "nesterov")})
    for i, twin in enumerate(twins):
        twin.grad = grads[i]
    reference.step()
    for p, twin in zip(params, twins, strict=True):
        torch.testing.assert_close(p.detach(), twin.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "64"])
def test_bad_batch_size_is_rejected(bad):
    run = TrainingRun("synthetic", seed=0, device="cpu")
    with pytest.raises(ValueError, match=f"batch_size={bad!r} must be a positive integer"):
        run.batch_size = bad


@pytest.mark.parametrize("bad", [True, "0.5", None, 0.0, math.nan])
def test_bad_lr_scale_is_rejected_by_name(bad):
    """A bool was taken as 1.0; text and None raised math's bare "must be real number"."""
    run = TrainingRun("synthetic", seed=0, device="cpu")
    with pytest.raises(ValueError, match=re.escape(f"lr_scale={bad!r} must be a positive finite number")):
        run.lr_scale = bad
    assert run.lr_scale == 1.0


@pytest.mark.parametrize("bad", [[True] * 3, ["a", "b", "c"], "abc", [1.0, 1.0], [1.0, 0.0, 1.0]])
def test_bad_lr_factors_are_rejected_by_name(bad):
    run = TrainingRun("synthetic", seed=0, device="cpu")
    assert run.n_layers == 3
    with pytest.raises(ValueError, match="lr_factors must be 3 positive finite numbers; got"):
        run.lr_factors = bad
    assert run.lr_factors.tolist() == [1.0, 1.0, 1.0]
    run.lr_factors = np.array([0.5, 1.0, 2.0])  # an array, as the collector gives them
    assert run.lr_factors.tolist() == [0.5, 1.0, 2.0]


def test_an_lr_schedule_over_no_finite_number_of_epochs_is_refused():
    """inf passed "> 0" and held the LR at the warm-up's 2% of the base for good."""
    for bad in (math.inf, 0.0, -1.0):
        with pytest.raises(ValueError, match=f"schedule_epochs={bad} must be a positive finite number"):
            TrainingRun("synthetic", seed=0, device="cpu", schedule_epochs=bad)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"memory": 2**30}, TypeError, r"^memory=1073741824 must be a MemoryBudget"),
        ({"elastic": {"fill_frac": 0.5}}, TypeError, r"^elastic=\{'fill_frac': 0\.5\} must be an ElasticConfig"),
        ({"n_probe": 2.5}, ValueError, r"^n_probe=2\.5 must be a whole number >= 2"),
        ({"n_probe": -5}, ValueError, r"^n_probe=-5 must be a whole number >= 2"),
    ],
)
def test_a_run_refuses_settings_of_the_wrong_kind_by_name(arguments, error, message):
    """Before: AttributeErrors ('int' object has no attribute 'resolve'), a slice's TypeError, and n_probe=-5 taken."""
    with pytest.raises(error, match=message):
        TrainingRun("synthetic", seed=0, device="cpu", **arguments)


def test_a_run_on_a_single_training_sample_is_refused_by_name():
    """Before: the loader's "cannot load batches from an empty dataset", naming neither the task nor n_train."""
    with pytest.raises(ValueError, match=r"^task 'synthetic' has 1 training sample\(s\).*needs n_train >= 2"):
        TrainingRun(get_task("synthetic", n_train=1, n_test=8), seed=0, device="cpu")
    run = TrainingRun(get_task("synthetic", n_train=2, n_test=8), seed=0, device="cpu", batch_size=1)
    assert len(run.loader) == 1 and run.probe_batch[0].shape[0] == 1  # one trains, one is the probe
    run.train_interval(2)  # and it trains


def test_the_noise_estimates_of_an_interval_are_at_the_batch_it_served():
    """An epoch's short last batch (3584 = 8 x 400 + 384): train_interval folded the interval's gradient in at the
    configured 400, step() at the 384 served, and the two paths' noise scales differed (1336 against 1353)."""
    runs = [TrainingRun("synthetic", seed=0, device="cpu", batch_size=400) for _ in range(2)]
    for _ in range(9):
        runs[0].step()
        runs[1].train_interval(1)
    assert runs[0].noise_estimates == pytest.approx(runs[1].noise_estimates, rel=1e-6)


def test_unknown_precision_and_wrong_count():
    run = TrainingRun("synthetic", seed=0, device="cpu")
    with pytest.raises(ValueError, match="unknown precision 'fp8'; allowed: fp32, bf16, fp16"):
        run.set_precisions(["fp8", "fp32", "fp32"])
    with pytest.raises(ValueError, match="got 2 precisions; expected 3"):
        run.set_precisions([Precision.FP32, Precision.BF16])


def test_cuda_device_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # so that it runs on a GPU machine too
    with pytest.raises(ValueError, match="device='cuda' asked for, but this machine has no CUDA GPU; use 'cpu'"):
        TrainingRun("synthetic", device="cuda")
    with pytest.raises(ValueError, match=r"device='gpu0' is not a device: use cpu, cuda or cuda:N$"):
        TrainingRun("synthetic", device="gpu0")


def test_a_cuda_index_the_machine_does_not_have_is_refused_with_the_ones_it_has(monkeypatch):
    """Before the fix ``cuda:3`` on a one-GPU machine passed ``resolve_device`` and failed at the run's first
    ``.to(device)`` with torch's "invalid device ordinal" (emulated: CUDA stubbed to one GPU, then four)."""
    from triaccel_rl.training import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda")  # the current device: not an index to check
    with pytest.raises(ValueError, match=r"^device='cuda:3' asked for, but this machine's CUDA GPUs are cuda:0$"):
        resolve_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device(torch.device("cuda", 3)) == torch.device("cuda", 3)
    with pytest.raises(ValueError, match=r"^device='cuda:4' asked for, .* are cuda:0 to cuda:3$"):
        TrainingRun("synthetic", device="cuda:4")


@pytest.mark.parametrize("device", [Path("cpu"), 0, b"cpu"])
def test_a_device_of_another_type_is_refused_naming_it(device):
    """A ``Path("cpu")`` raised torch's raw "device() received an invalid combination of arguments"."""
    from triaccel_rl.training import resolve_device

    with pytest.raises(
        TypeError, match=rf"^device={re.escape(repr(device))} \({type(device).__name__}\) is not a device: use a string"
    ):
        resolve_device(device)
    with pytest.raises(TypeError, match=r"^device=.* use a string \(cpu, cuda or cuda:N\), a torch.device or None$"):
        TrainingRun("synthetic", device=device)


def test_budget_below_model_state_is_rejected():
    with pytest.raises(ConfigError, match="below the model's fixed"):
        TrainingRun("synthetic", device="cpu", memory=MemoryBudget(bytes=1000))


def test_profile_cost_mode_charges_less_for_bf16():
    run = TrainingRun(get_task("synthetic"), seed=0, device="cpu", cost_mode="profile", include_fixed_cost=False)
    fp32 = run.modelled_step_ms()
    run.set_precisions(["bf16"] * 3)
    bf16 = run.modelled_step_ms()
    assert bf16 == pytest.approx(fp32 * run.profile.time(Precision.BF16))
    assert run.step().modelled_time_ms == pytest.approx(bf16)


def test_nonfinite_loss_skips_update_and_keeps_parameters(monkeypatch):
    run = TrainingRun("synthetic", seed=0, device="cpu")
    run.step()
    before = [p.detach().clone() for p in run.model.parameters()]
    state_before = {k: v["momentum_buffer"].clone() for k, v in run.optimizer.state.items()}
    original = type(run.task).loss_fn
    monkeypatch.setattr(type(run.task), "loss_fn", lambda self, logits, y: original(self, logits, y) * float("nan"))
    stats = run.step()
    assert stats.skipped and run.skipped_steps == 1
    for a, b in zip(before, run.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for k, v in run.optimizer.state.items():
        assert torch.equal(state_before[k], v["momentum_buffer"])


def test_train_interval_takes_the_same_steps_as_step():
    """Same seed, same updates: n steps through train_interval equal n calls of step()."""
    stepped, deferred = TrainingRun("synthetic", seed=3, device="cpu"), TrainingRun("synthetic", seed=3, device="cpu")
    stats = [stepped.step() for _ in range(4)]
    interval = deferred.train_interval(4)
    for a, b in zip(stepped.model.parameters(), deferred.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert (interval.steps, interval.samples, interval.skipped) == (4, 4 * 64, 0)
    assert interval.moments.n_finite == 4
    assert interval.moments.loss == pytest.approx(np.mean([s.loss for s in stats]), rel=1e-6)
    np.testing.assert_allclose(interval.moments.sq_norm, np.mean([s.grad_sq_sum for s in stats], 0), rtol=1e-5)
    assert deferred.steps == stepped.steps == 4 and deferred.samples_seen == stepped.samples_seen
    assert interval.peak_bytes == max(s.memory_bytes for s in stats)


def test_train_interval_counts_skipped_steps_it_did_not_record(monkeypatch):
    """With a budget for the per-step statistics (on by default on a GPU in measured mode; forced here), most steps
    go unrecorded; the skipped ones are still counted, from the optimizer's applied updates."""
    run = TrainingRun("synthetic", seed=0, device="cpu")
    assert run.observe_budget_frac is None  # a CPU records every step: observations repeat for a seed
    run.observe_budget_frac = 1e-9  # no recording fits: after the first interval, one step in 64
    run.train_interval(2)
    original = type(run.task).loss_fn
    monkeypatch.setattr(type(run.task), "loss_fn", lambda self, logits, y: original(self, logits, y) * float("inf"))
    interval = run.train_interval(5)
    assert interval.moments.n_observed == 0  # not one of the five was recorded
    assert (interval.skipped, run.skipped_steps) == (5, 5)


def test_train_interval_counts_and_skips_non_finite_steps(monkeypatch):
    run = TrainingRun("synthetic", seed=0, device="cpu")
    run.train_interval(1)
    before = [p.detach().clone() for p in run.model.parameters()]
    original = type(run.task).loss_fn
    monkeypatch.setattr(type(run.task), "loss_fn", lambda self, logits, y: original(self, logits, y) * float("inf"))
    interval = run.train_interval(3)
    assert (interval.skipped, interval.moments.n_finite, run.skipped_steps) == (3, 0, 3)
    assert math.isnan(interval.moments.loss)
    for a, b in zip(before, run.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert run.train_interval(0).steps == 0
    with pytest.raises(ValueError, match="n_steps=-1"):
        run.train_interval(-1)


class _AttentionNet(torch.nn.Module):
    """A Linear, an attention layer (batch-first or sequence-first) and a LayerNorm over 5 tokens of width 8."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.fc = torch.nn.Linear(3, 8)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.ln = torch.nn.LayerNorm(8)

    def forward(self, x):
        h = self.fc(x) if self.batch_first else self.fc(x).transpose(0, 1)  # [1, 5, 8] or [5, 1, 8]
        return self.ln(self.attn(h, h, h)[0])


@pytest.mark.parametrize("batch_first", [True, False])
def test_the_cost_model_counts_each_layer_of_one_sample_exactly(batch_first):
    """FLOPs and saved bytes by hand, whatever dimension holds the sequence. A sequence-first layer's output,
    ``[length, 1, ...]``, was cut to its first token (``out[:1]``): its costs came out 5x too small here."""
    from triaccel_rl.config import HardwareProfile
    from triaccel_rl.costs import CostModel
    from triaccel_rl.precision import find_layers

    model = _AttentionNet(batch_first)
    layers = [info for _, _, info in find_layers(model)]
    costs = CostModel.measure(model, layers, torch.zeros(1, 5, 3), optimizer_states=1)
    tokens, width, heads_width = 5, 8, 8
    assert [info.name for info in layers] == ["fc", "attn", "ln"]
    assert costs.flops_per_sample.tolist() == [
        2 * 3 * tokens * width,  # Linear(3, 8) on 5 tokens: 240
        # q, k, v and out projections (4 E x E a token), then Q K^T and A V (E a token pair each): 2560 + 800
        2 * 4 * heads_width * tokens * width + 2 * 2 * tokens * tokens * width,
        tokens * width,  # a LayerNorm counts its outputs: 40
    ]
    # What autograd keeps, fp32 (outputs alone came to 160 bytes a layer): the Linear its input, 5 x 3; attention
    # its input (5 x 8), the q/k/v projection (one storage of 3 x 5 x 8), the scaled queries (5 x 8), both heads'
    # softmax weights (2 x 5 x 5) and the heads' output (5 x 8); the LayerNorm its input and each token's mean and
    # reciprocal deviation (5 x 8 + 2 x 5), and its output is the model's, held for the loss (5 x 8).
    assert costs.activation_bytes_per_sample.tolist() == [
        4 * tokens * 3,
        4 * (tokens * width + 3 * tokens * width + tokens * width + 2 * tokens * tokens + tokens * width),
        4 * (tokens * width + 2 * tokens + tokens * width),
    ]
    n_params = (3 * 8 + 8) + (3 * 8 * 8 + 3 * 8 + 8 * 8 + 8) + (8 + 8)  # 32 + 288 + 16
    assert costs.static_bytes == n_params * 4 * (2 + 1)  # weights, gradients and one momentum, fp32
    profile = HardwareProfile.load()
    precisions = [Precision.BF16, Precision.FP16, Precision.FP32]
    flops = 240 * profile.time(Precision.BF16) + 3360 * profile.time(Precision.FP16) + 40
    assert costs.step_ms(16, precisions, profile) == pytest.approx(
        16 * 3 * flops / 1e6 * profile.throughput_scale + profile.fixed_ms, rel=1e-12
    )
    per_sample = 60 * profile.memory(Precision.BF16) + 1160 * profile.memory(Precision.FP16) + 360
    copies = 2 * (32 + 288)  # the two 16-bit layers' weight copies
    assert costs.memory_bytes(16, precisions, profile) == int(costs.static_bytes + copies + 16 * per_sample)


def test_the_probe_loss_leaves_the_runs_random_stream_where_it_was():
    """A model drawing in its own forward (stochastic depth) took the probe's draws from the run's stream."""
    from dataclasses import replace as replace_task

    from torch import nn

    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(32, 8), nn.Linear(8, 10)

        def forward(self, x):
            h = self.first(x)
            return self.second(h * torch.rand_like(h) if self.training else h)

    task = replace_task(get_task("synthetic"), build_model=Noisy)
    run = TrainingRun(task, seed=0, device="cpu")
    state = torch.get_rng_state()
    first = run.probe_loss()
    assert torch.equal(torch.get_rng_state(), state)
    assert run.probe_loss() == first  # the same draws: a fork from the same state


def test_lr_factors_read_back_cannot_be_written_past_the_check():
    """The getter handed out the engine's own array: ``run.lr_factors[0] = -3`` was applied (an LR of -0.15), and
    NaN turned the parameters NaN without a skipped step."""
    run = TrainingRun("synthetic", seed=0, device="cpu")
    with pytest.raises(ValueError, match="read-only"):
        run.lr_factors[0] = -3.0
    assert run.engine.lr_factors.tolist() == [1.0, 1.0, 1.0]
    run.lr_factors = run.lr_factors * 2  # through the setter, checked
    assert run.engine.lr_factors.tolist() == [2.0, 2.0, 2.0]


def test_a_buffer_the_forward_rebinds_is_put_back_after_an_oom_retry_and_an_abandoned_step():
    """``self.seen = self.seen + n`` binds a new tensor: the saved values went back into the old one, no longer the
    module's, so a retried step counted its failed attempt's samples (80 against 64) and an abandoned step its own."""
    from torch import nn

    from triaccel_rl.elastic import inject_oom
    from triaccel_rl.tasks import Task, synthetic_data

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 10)
            self.register_buffer("seen", torch.zeros(()))

        def forward(self, x):
            if self.training:
                self.seen = self.seen + x.shape[0]
            return self.fc(x)

    task = Task(
        name="counting", description="", build_model=Counting, load_data=synthetic_data, optimizer="sgd",
        base_lr=0.05, base_batch_size=64, target_metric=0.5,
    )  # fmt: skip
    once = inject_oom(lambda p: p.step == 0 and p.attempt == 0 and p.micro_index == 1 and p.phase == "forward")
    retried = TrainingRun(task, seed=0, device="cpu", fault=once)
    retried.micro_batch_cap = 16
    retried.step()
    assert retried.oom_events == 1 and retried.model.seen.item() == 64

    raised = []

    def fails_once(point):
        if not raised and point.step == 1 and point.micro_index == 1 and point.phase == "backward":
            raised.append(point)
            raise RuntimeError("a user's model failed")

    abandoned = TrainingRun(task, seed=0, device="cpu", fault=fails_once)
    abandoned.micro_batch_cap = 16
    abandoned.step()
    with pytest.raises(RuntimeError, match="a user's model failed"):
        abandoned.step()
    assert abandoned.model.seen.item() == 64  # as before the step that raised
    abandoned.step()
    assert abandoned.model.seen.item() == 128


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"channels_last": "no"}, TypeError, r"channels_last='no' must be True or False"),
        ({"include_fixed_cost": "no"}, TypeError, r"include_fixed_cost='no' must be True or False"),
        ({"schedule_epochs": True}, ValueError, r"schedule_epochs=True must be a positive finite number"),
        ({"schedule_epochs": "5"}, ValueError, r"schedule_epochs='5' must be a positive finite number"),
        ({"warmup_frac": "0.1"}, ValueError, r"warmup_frac='0.1' must be a number in \[0, 1\)"),
        ({"fault": 3}, TypeError, r"fault=3 must be a callable"),
        ({"seed": 2**64}, ValueError, r"TrainingRun: seed=18446744073709551616 must be a whole number"),
        ({"seed": True}, ValueError, r"TrainingRun: seed=True must be a whole number"),
        ({"task": 5}, TypeError, r"^task=5 must be a Task or a registered task name"),
        ({"task": None}, TypeError, r"^task=None must be a Task or a registered task name"),
    ],
)
def test_bad_constructor_arguments_are_refused_by_name(kwargs, error, message):
    """Taken silently ("no" as True, True as a 1-epoch schedule), or failing later with errors naming no argument
    (``task=5``: "'int' object has no attribute 'build_model'", after the process's RNG had been seeded)."""
    state = torch.random.get_rng_state()
    with pytest.raises(error, match=message):
        TrainingRun(**{"task": "synthetic", "device": "cpu", **kwargs})
    assert torch.equal(torch.random.get_rng_state(), state)  # refused before the RNG was seeded


def test_step_time_and_memory_queries_refuse_bad_batch_sizes_and_parse_precisions():
    """-5 samples were priced below 0 samples, 2.5 priced, and ``modelled_step_ms(64, "bf16")`` an AttributeError."""
    run = TrainingRun("synthetic", seed=0, device="cpu", cost_mode="profile")
    for query, least in ((run.modelled_step_ms, 0), (run.memory_bytes, 0), (run.micro_batch_size, 1)):
        for bad in (-5, 2.5, True, "64"):
            with pytest.raises(ValueError, match=rf"batch_size={bad!r} must be a whole number >= {least}"):
                query(bad)
    with pytest.raises(ValueError, match=r"batch_size=0 must be a whole number >= 1"):
        run.planned_step_ms(0)
    assert run.modelled_step_ms(64, "bf16") == run.modelled_step_ms(64, Precision.BF16)
    assert run.modelled_step_ms(0) < run.modelled_step_ms(1)


def test_step_plans_refuse_a_batch_above_the_training_samples_as_the_batch_size_setter_does():
    """``planned_step_ms(10**30)`` raised a bare OverflowError from the micro-batch plan, and ``10**9`` (memory
    elastic, micro-batches of one) built a list of a billion; ``micro_batch_size`` took any batch. Now both refuse a
    batch above the data with the setter's message, and plan the whole dataset's batch."""
    run = TrainingRun("synthetic", seed=0, device="cpu", cost_mode="profile")
    n = len(run.loader)
    for query in (run.planned_step_ms, run.micro_batch_size):
        for big in (n + 1, 10**9, 10**30):
            with pytest.raises(ValueError) as refused:
                query(big)
            assert str(refused.value) == (
                f"batch_size={big} is more than the {n} training samples: a step serves at most an epoch"
            )
    with pytest.raises(ValueError) as refused:
        run.batch_size = n + 1
    assert (
        str(refused.value)
        == f"batch_size={n + 1} is more than the {n} training samples: a step serves at most an epoch"
    )
    assert run.micro_batch_size(n) == n and run.planned_step_ms(n) == run.modelled_step_ms(n)


def test_the_fused_steps_state_is_not_counted_again_over_the_allocators_readings(monkeypatch):
    """The fused optimizer allocates its moments when it is built, so every allocator reading holds them; the accounted
    state was added on top while the ``torch.optim`` object's ``state`` stayed empty (every GPU run until a
    checkpoint asked for it), and micro-batches came out too small."""
    from triaccel_rl.engine import StepEngine

    run = TrainingRun("synthetic", seed=0, device="cpu")
    monkeypatch.setattr(TrainingRun, "measures_memory", property(lambda self: True))  # as on a GPU, measured mode
    monkeypatch.setattr(type(run.memory_model), "n_measurements", property(lambda self: 2))
    assert not run.optimizer.state
    assert run._unallocated_state_bytes() == run._accounted_state_bytes > 0  # the reference path: not allocated yet
    monkeypatch.setattr(StepEngine, "fused", property(lambda self: True))
    assert run._unallocated_state_bytes() == 0


def test_interval_timer_records_on_the_runs_device_not_the_current_one(monkeypatch):
    """``Event.record()`` without a stream takes the *current* device's: a run on cuda:1 timed an idle cuda:0 and its
    ``stop()`` waited for nothing (emulated: no GPU here)."""
    from triaccel_rl.training import IntervalTimer

    recorded = []

    class Stream:
        def __init__(self, index):
            self.device = torch.device("cuda", index)

    class Event:
        def __init__(self, **kwargs):
            pass

        def record(self, stream=None):
            recorded.append(str((stream or torch.cuda.current_stream()).device))

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 1.5

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda device=None: Stream(0 if device is None else torch.device(device).index)
    )
    monkeypatch.setattr(torch.cuda, "Event", Event)
    timer = IntervalTimer(torch.device("cuda", 1))
    timer.start()
    assert timer.stop() == 1.5 and recorded == ["cuda:1", "cuda:1"]


def test_trial_passes_refuse_a_bad_batch_size_before_any_pass(monkeypatch):
    """Before the fix ``trial_peak_bytes(-5)`` ran a forward and backward over all but 5 training samples (``x[:-5]``)
    before the memory model refused the size, ``fits_in_budget(-5)`` answered False where that pass ran out of memory,
    and ``calibrate_memory`` failed on ``[]`` in ``min()`` and on ``[2.5]`` in a slice, naming no argument. The GPU's
    measured path on a CPU: the allocator's calls stubbed."""

    run = TrainingRun(get_task("synthetic", n_train=256, n_test=32), seed=0, device="cpu")
    _measure_as_on_a_gpu(monkeypatch)
    passes = []
    monkeypatch.setattr(TrainingRun, "_trial_pass", lambda self, n: passes.append(n))
    for query in (run.trial_peak_bytes, run.fits_in_budget):
        for bad in (-5, 0, 2.5, True):
            with pytest.raises(ValueError, match=rf"^batch_size={bad!r} must be a whole number >= 1$"):
                query(bad)
    for sizes, message in (
        ([-3], r"^sizes\[0\]=-3 must be a whole number >= 1$"),
        ([16, 2.5], r"^sizes\[1\]=2\.5 must be a whole number >= 1$"),
        ([], r"^sizes=\[\] must hold at least one micro-batch size"),
    ):
        with pytest.raises(ValueError, match=message):
            run.calibrate_memory(sizes)
    for bad in (16, np.array(8)):  # a 0-d array raised "len() of unsized object"
        with pytest.raises(TypeError, match=rf"^{re.escape(f'sizes={bad!r}')} must be a sequence of whole numbers"):
            run.calibrate_memory(bad)
    assert passes == []  # not one pass ran
    assert run.trial_peak_bytes(np.int64(8)) == 50_000 + run._unallocated_state_bytes() and passes == [8]
    run.calibrate_memory([4, 16])
    assert passes == [8, 4, 4, 16]  # an unmeasured pass at the smallest size first
    run.calibrate_memory(np.array([4, 16]))  # an array's truth value was asked for in the first version of the check
    assert passes == [8, 4, 4, 16, 4, 4, 16]


def _measure_as_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's measured-memory path on a CPU: ``measures_memory`` on, the allocator's and CUDA's calls stubbed."""
    import triaccel_rl.training as training

    monkeypatch.setattr(TrainingRun, "measures_memory", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *args, **kwargs: None)
    monkeypatch.setattr(training, "allocated_bytes", lambda device: (10_000, 50_000))
    monkeypatch.setattr(training, "release_memory", lambda device: None)


@pytest.mark.parametrize(("batch_size", "expected"), [(1, [1, 1]), (2, [2, 2]), (6, [2, 2, 6]), (12, [3, 3, 12])])
def test_calibrate_memory_tries_no_micro_batch_below_2_by_default(monkeypatch, batch_size, expected):
    """Before the fix the default sizes were ``max(1, s // 4)`` and ``s``: a batch of 4 to 7 tried one sample, on
    which a batch norm in training mode raises. Now not below 2 where the batch allows (a batch of 1 stays 1). The
    GPU's measured path on a CPU: the allocator's calls stubbed, the passes recorded (an unmeasured one first)."""

    run = TrainingRun(get_task("synthetic", n_train=256, n_test=32), seed=0, device="cpu", batch_size=batch_size)
    _measure_as_on_a_gpu(monkeypatch)
    passes: list[int] = []
    monkeypatch.setattr(TrainingRun, "_trial_pass", lambda self, n: passes.append(n))
    run.calibrate_memory()
    assert passes == expected


def test_calibrate_memory_tries_no_single_sample_where_the_weights_fill_half_the_budget(monkeypatch):
    """A budget holding two samples in ``fill_frac`` of it, but where two are more than half of it: the halving of the
    default sizes went down to 1, and the batch norm model's pass raised (the run could not be built on a GPU). The
    passes run for real here, the allocator's calls stubbed."""

    run = TrainingRun(_bn_task(n_train=256, n_test=16, base_batch_size=8), seed=0, device="cpu")
    run.memory_budget_bytes = 2 * run.costs.memory_bytes(2, run.precisions, run.profile) - 2
    assert run.micro_batch_size() >= 2
    _measure_as_on_a_gpu(monkeypatch)
    passes: list[int] = []
    trial_pass = TrainingRun._trial_pass
    monkeypatch.setattr(TrainingRun, "_trial_pass", lambda self, n: (passes.append(n), trial_pass(self, n))[1])
    run.calibrate_memory()
    assert passes == [2, 2]  # the unmeasured pass, then the one size


def test_the_lr_read_ahead_of_a_step_is_the_lr_it_applies_on_a_folded_last_batch():
    """An epoch of 4 x 16 + 1 samples ends on a batch of 17: ``run.lr`` read the schedule at 16 samples on, one short
    of where the step takes it."""
    n_train = next(n for n in range(60, 120) if n - probe_count(n) == 65)
    run = TrainingRun(
        get_task("synthetic", n_train=n_train, n_test=16), seed=0, device="cpu", batch_size=16, schedule_epochs=2.0
    )
    sizes = []
    for _ in range(8):
        predicted = run.lr
        stats = run.step()
        sizes.append(stats.batch_size)
        assert predicted == stats.lr
    assert sizes == [16, 16, 16, 17] * 2


def test_calibrate_memory_halves_an_out_of_memory_size_down_to_2(monkeypatch):
    """A size out of memory is halved: 3 went to 1 before the fix, which a batch norm refuses; now to 2, then stops."""
    run = TrainingRun(get_task("synthetic", n_train=256, n_test=32), seed=0, device="cpu")
    monkeypatch.setattr(TrainingRun, "measures_memory", property(lambda self: True))
    monkeypatch.setattr(TrainingRun, "_unmeasured_pass", lambda self, n: None)
    tried: list[int] = []
    monkeypatch.setattr(TrainingRun, "trial_peak_bytes", lambda self, n: tried.append(n))  # every size out of memory
    run.calibrate_memory([3, 9])
    assert tried == [3, 2, 9, 4, 2]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: schedule_gain(10.0, 10.0, 1.0), r"^warmup_frac=1\.0 must be a number in \[0, 1\)$"),
        (lambda: schedule_gain(5.0, 10.0, -0.5), r"^warmup_frac=-0\.5 must be a number in \[0, 1\)$"),
        (lambda: schedule_gain(5.0, 0.0, 0.2), r"^schedule_epochs=0\.0 must be a finite number > 0$"),
        (lambda: schedule_gain(5.0, -10.0, 0.2), r"^schedule_epochs=-10\.0 must be a finite number > 0$"),
        (lambda: schedule_gain(5.0, math.inf, 0.2), r"^schedule_epochs=inf must be a finite number > 0$"),
        (lambda: schedule_gain(math.nan, 10.0, 0.2), r"^epoch=nan must be a finite number >= 0$"),
        (lambda: schedule_gain(-1.0, 10.0, 0.2), r"^epoch=-1\.0 must be a finite number >= 0$"),
        (lambda: probe_count(1), r"^n_train=1 must be a whole number >= 2: the probe holds out at least one sample"),
        (lambda: probe_count(0), r"^n_train=0 must be a whole number >= 2"),
        (lambda: probe_count(100.0), r"^n_train=100\.0 must be a whole number >= 2"),
        (lambda: probe_count(100, -5), r"^n_probe=-5 must be a whole number >= 2"),
        (lambda: probe_count(100, 2.5), r"^n_probe=2\.5 must be a whole number >= 2"),
        (lambda: evaluate_accuracy(_LINEAR, torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), r"^len\(x\)=0 and"),
        (lambda: evaluate_accuracy(_LINEAR, torch.randn(4, 3), torch.zeros(8, dtype=torch.long)), r"^len\(x\)=4 and"),
        (lambda: evaluate_accuracy(_LINEAR, torch.randn(8, 3), torch.zeros(4, dtype=torch.long)), r"len\(y\)=4 must"),
    ],
)
def test_the_public_helpers_refuse_bad_input_by_name(call, message):
    """Before the fix they took it or failed bare: ``schedule_gain`` divided by zero (``warmup_frac=1``,
    ``schedule_epochs=0``), gave 0.02 for a negative schedule, a warm-up gain past the warm-up for 1.5 and NaN for a
    NaN epoch; ``probe_count(1)`` held out the only sample, ``n_probe=-5`` was 1 and 2.5 returned 2.5;
    ``evaluate_accuracy`` divided by zero on no sample and scored 4 inputs against the first 4 of 8 labels."""
    with pytest.raises(ValueError, match=message):
        call()


def test_the_public_helpers_keep_their_values_on_good_input():
    """The checks change no value their callers (``TrainingRun``, ``run_plain``, ``compare``) pass."""
    assert [round(schedule_gain(e, 10.0, 0.2), 3) for e in (0.0, 1.0, 2.0, 6.0, 10.0, 12.0)] == [
        0.02, 0.5, 1.0, 0.5, 0.0, 0.0
    ]  # fmt: skip
    assert schedule_gain(np.float64(0.0), 4, 0.0) == 1.0  # no warm-up; NumPy's numbers and whole ones taken
    assert [probe_count(n) for n in (2, 3, 15, 16, 1024, 60_000)] == [1, 2, 2, 2, 128, 512]
    assert probe_count(np.int64(4096), np.int64(64)) == 64
    model = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3)
    assert evaluate_accuracy(model, x, model(x).argmax(1)) == 1.0


def test_a_cpu_run_seeds_the_cpu_generator_as_before_and_no_cuda_generator(monkeypatch):
    """Before the fix ``torch.manual_seed`` seeded every CUDA device's generator too (queued for CUDA's start on a
    machine where it had not started), so a CPU run, or the environment's reset, re-seeded CUDA streams its caller
    owned. The CPU's is seeded as before: the same initial weights as ``torch.manual_seed(seed)`` gave."""
    import triaccel_rl.training as training

    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(("manual_seed_all", seed)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(("manual_seed", seed)))
    run = TrainingRun("synthetic", seed=7, device="cpu")
    assert calls == []
    with torch.random.fork_rng():
        torch.manual_seed(7)  # as the run seeded before the fix (calls the spy)
        reference = get_task("synthetic").build_model()
    calls.clear()
    for a, b in zip(run.model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)

    class Generator:  # on a GPU: the run's own device's generator alone (emulated)
        def __init__(self):
            self.seeds = []

        def manual_seed(self, seed):
            self.seeds.append(seed)

    generators = (Generator(), Generator())
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "default_generators", generators)
    with torch.random.fork_rng():
        training.seed_run_generators(3, torch.device("cuda", 1))
        training.seed_run_generators(4, torch.device("cuda"))  # the current device
        assert torch.equal(torch.get_rng_state(), torch.Generator().manual_seed(4).get_state())
    assert [g.seeds for g in generators] == [[4], [3]] and calls == []


def _bn_task(**overrides):
    """A small task whose model normalises with ``BatchNorm1d`` (which refuses a one-sample batch in train mode)."""
    from torch import nn

    from triaccel_rl.tasks import Task, synthetic_data

    class BNNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.bn, self.l2 = nn.Linear(32, 64), nn.BatchNorm1d(64), nn.Linear(64, 10)

        def forward(self, x):
            return self.l2(torch.relu(self.bn(self.l1(x))))

    settings = {
        "name": "bn-synthetic", "description": "", "build_model": BNNet, "load_data": synthetic_data,
        "optimizer": "sgd", "base_lr": 0.05, "base_batch_size": 64, "target_metric": 0.5,
    }  # fmt: skip
    return Task(**{**settings, **overrides})


def test_an_interrupt_or_giving_up_in_oom_recovery_hands_the_batch_back_once(monkeypatch):
    """The recovery ran outside the step's try: a Ctrl-C in its memory release left the batch taken from the loader
    (the loader moved on 64 samples, no step taken). Its giving up hands the batch back once, not twice."""
    import triaccel_rl.training as training
    from triaccel_rl.elastic import UnrecoverableOOMError, inject_oom, release_memory

    run = TrainingRun("synthetic", seed=0, device="cpu", fault=inject_oom(lambda p: p.step == 0 and p.attempt == 0))
    before = run.loader.state_dict()

    def interrupted_release(device):
        release_memory(device)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "release_memory", interrupted_release)
    with pytest.raises(KeyboardInterrupt):
        run.step()
    assert run.loader.state_dict() == before and run.steps == 0
    assert all(p.grad is None or not p.grad.any() for p in run.model.parameters())

    monkeypatch.setattr(training, "release_memory", release_memory)
    gives_up = TrainingRun("synthetic", seed=0, device="cpu", fault=inject_oom(lambda p: p.step == 1))
    gives_up.step()  # one step served: a second take-back would move the loader back past it
    after_one = gives_up.loader.state_dict()
    with pytest.raises(UnrecoverableOOMError):
        gives_up.step()
    assert gives_up.loader.state_dict() == after_one and gives_up.steps == 1


def test_oom_recovery_halves_a_batch_norm_models_micro_batch_down_to_two_samples_not_one():
    """Halving went down to one sample, which batch norm refuses (its ValueError, not UnrecoverableOOMError), and the
    budget, floored at one sample's need, left every later step at one-sample micro-batches that all raised. Now a
    micro-batch of two is retried as it is until the step gives up, and the run steps again once memory is back."""
    from triaccel_rl.elastic import UnrecoverableOOMError

    short = [True]

    def fault(point):  # out of memory in every backward pass while memory is short
        if short[0] and point.phase == "backward":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    run = TrainingRun(_bn_task(), seed=0, device="cpu", fault=fault)
    with pytest.raises(UnrecoverableOOMError, match=r"out of memory 9 times in one step .* of 2 samples"):
        run.step()
    assert [(e.micro_batch_size, e.retry_micro_batch_size) for e in run.oom_log] == [
        (64, 32), (32, 16), (16, 8), (8, 4), (4, 2), (2, 2), (2, 2), (2, 2),
    ]  # fmt: skip
    assert run.samples_seen == 0 and run.steps == 0 and run.micro_batch_size() >= 2
    assert run.memory_budget_bytes >= math.ceil(run.predicted_memory_bytes(2) / run.elastic.fill_frac)
    short[0] = False
    run.step()
    assert run.steps == 1 and min(run.last_micro_batches) >= 2 and sum(run.last_micro_batches) == 64


@pytest.mark.parametrize(("batch", "plan"), [(3, [2, 1]), (5, [2, 2, 1])])
def test_an_odd_batch_steps_where_memory_holds_two_samples(batch: int, plan: list[int]) -> None:
    """Memory holds micro-batches of two: an odd batch steps on the cap's plan, its last micro-batch one sample (a model
    without batch norm trains on it). An audit found the first version of the two-sample floor planned 2, 3 there
    and retried the 3 that failed until the step gave up."""

    def fault(point):
        if point.phase == "forward" and point.micro_batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    run = TrainingRun("synthetic", seed=0, device="cpu", fault=fault, batch_size=batch)
    run.step()
    assert run.steps == 1 and run.last_micro_batches == plan


def test_a_small_training_set_holds_out_a_probe_a_batch_norm_can_run():
    """An eighth of under 16 samples is one: a batch-norm model's probe of one sample raised "Expected more than 1
    value per channel when training". Two are held out."""
    run = TrainingRun(_bn_task(n_train=12, base_batch_size=4), seed=0, device="cpu")
    assert len(run.probe_batch[0]) == 2 and math.isfinite(run.probe_loss())


def test_a_probe_of_one_sample_is_refused_by_name():
    """``n_probe=1`` was taken, and the probe loss of a batch-norm model then raised batch norm's "Expected more than
    1 value per channel when training" (the probe runs the model in training mode)."""
    with pytest.raises(ValueError, match=r"^n_probe=1 must be a whole number >= 2"):
        TrainingRun(_bn_task(), seed=0, device="cpu", n_probe=1)
    with pytest.raises(ValueError, match=r"^n_probe=1 must be a whole number >= 2"):
        probe_count(4096, 1)
    run = TrainingRun(_bn_task(), seed=0, device="cpu", n_probe=2)
    assert len(run.probe_batch[0]) == 2 and math.isfinite(run.probe_loss())


def test_an_evaluation_leaves_a_module_the_model_keeps_in_eval_mode_frozen():
    """``evaluate()`` put the whole model in eval mode and the next step's ``model.train()`` every module in training
    mode: a batch norm frozen for fine-tuning was unfrozen by an evaluation (its running statistics then moved and the
    weights parted from an unevaluated twin's)."""

    def frozen_bn_net():
        model = _bn_task().build_model()
        model.bn.eval()  # frozen: normalises with its running statistics, never updates them
        return model

    task = _bn_task(name="frozen-bn", build_model=frozen_bn_net)
    evaluated, twin = TrainingRun(task, seed=0, device="cpu"), TrainingRun(task, seed=0, device="cpu")
    for i in range(4):
        evaluated.step()
        twin.step()
        if i == 1:
            assert 0.0 <= evaluated.evaluate() <= 1.0
            assert evaluated.model.training and not evaluated.model.bn.training
    assert not evaluated.model.bn.training
    assert torch.equal(evaluated.model.bn.running_mean, torch.zeros(64))
    for a, b in zip(evaluated.model.state_dict().values(), twin.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_an_unmeasured_trial_pass_releases_memory_after_the_failed_pass_is_gone(monkeypatch):
    """``release_memory`` ran inside the ``except`` block, while the traceback's frames held the failed pass's
    activations: on a GPU ``empty_cache`` could not hand their blocks back."""
    import weakref

    import triaccel_rl.training as training
    from triaccel_rl.elastic import release_memory

    run = TrainingRun("synthetic", seed=0, device="cpu")
    activations = []

    def failing_pass(n):
        activation = torch.empty(1024)  # an activation of the failed forward pass
        activations.append(weakref.ref(activation))
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    alive_at_release = []

    def recording_release(device):
        alive_at_release.append(activations[-1]() is not None)
        release_memory(device)

    monkeypatch.setattr(run, "_trial_pass", failing_pass)
    monkeypatch.setattr(training, "release_memory", recording_release)
    run._unmeasured_pass(8)
    assert alive_at_release == [False]


def test_a_batch_larger_than_the_training_set_leaves_the_callers_random_state_alone():
    """The size is known only once the data is loaded, after the seeding: the refusal left the caller's CPU
    generator seeded with the run's seed (ARCHITECTURE.md: constructor arguments are checked before the seeding)."""
    with torch.random.fork_rng():
        torch.manual_seed(123)
        state = torch.get_rng_state()
        with pytest.raises(ValueError, match=r"^batch_size=1000000 is more than the \d+ training samples"):
            TrainingRun("synthetic", seed=0, device="cpu", batch_size=10**6)
        assert torch.equal(torch.get_rng_state(), state)


def test_an_epoch_of_k_batches_and_one_sample_trains_a_batch_norm_model_through():
    """Before the fix an epoch of ``k * 8 + 1`` training samples ended on a one-sample batch: the batch norm raised,
    the step handed the batch back, and every later step served the same sample and raised again. Now the sample
    joins the epoch's last batch (9 samples), and the run goes on into the next epoch, every sample seen once."""
    n_train = next(n for n in range(40, 80) if (n - probe_count(n)) % 8 == 1)
    run = TrainingRun(_bn_task(n_train=n_train, n_test=16, base_batch_size=8), seed=0, device="cpu")
    n = len(run.loader)
    assert n % 8 == 1
    sizes = []
    for _ in range(n // 8 + 1):
        run.step()
        sizes.append(run.last_micro_batches)
    assert [sum(s) for s in sizes] == [8] * (n // 8 - 1) + [9, 8]
    assert run.loader.epoch == 1 and run.samples_seen == n + 8


def test_a_closed_run_refuses_to_train_and_still_evaluates():
    """A closed run's step() raised a KeyError (reference path) or a buffer-size ValueError (fused step), naming
    neither the close nor the way on; its probe loss and evaluation go on, eagerly (its CUDA graphs read parameters
    where the fused step's flat buffer, freed at close, held them)."""
    run = TrainingRun("synthetic", seed=0, device="cpu")
    run.train_interval(3)
    probe, metric = run.probe_loss(), run.evaluate()
    run.close()
    assert run.graphs is None
    for train in (run.step, lambda: run.train_interval(2)):
        with pytest.raises(RuntimeError, match=r"^this TrainingRun is closed: .* Build a new run to train on$"):
            train()
    assert (run.probe_loss(), run.evaluate()) == (probe, metric)
    run.close()  # twice: harmless
