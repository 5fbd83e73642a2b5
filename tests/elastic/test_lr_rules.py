"""LR coupling to the effective batch: the rules' exact values, warm-up after large rises, and their use."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from elastic_helpers import small_task
from torch import nn

from triaccel_rl.config import ConfigError, ControllerConfig, ElasticConfig, LRRule
from triaccel_rl.controller import Controller
from triaccel_rl.elastic import BatchLRCoupler, lr_gain, resolve_lr_rule
from triaccel_rl.training import TrainingRun


@pytest.mark.parametrize(
    ("rule", "batch", "base", "noise", "expected"),
    [
        (LRRule.LINEAR, 256, 64, None, 4.0),
        (LRRule.LINEAR, 16, 64, None, 0.25),
        (LRRule.SQRT, 256, 64, None, 2.0),
        (LRRule.SQRT, 16, 64, None, 0.5),
        (LRRule.NONE, 256, 64, None, 1.0),
        # AdaScale: (1 + B_noise / B0) / (1 + B_noise / B)
        (LRRule.ADASCALE, 256, 64, 64.0, (1 + 1) / (1 + 0.25)),  # 1.6
        (LRRule.ADASCALE, 256, 64, 0.0, 1.0),  # noise-free gradient: no gain from a bigger batch
        (LRRule.ADASCALE, 256, 64, None, 1.0),  # unknown noise scale counts as 0
        (LRRule.ADASCALE, 32, 64, 64.0, (1 + 1) / (1 + 2)),  # a smaller batch lowers the LR
        (LRRule.ADASCALE, 64, 64, 123.0, 1.0),  # the base batch has gain 1 whatever the noise
    ],
)
def test_gain_values(rule: LRRule, batch: int, base: int, noise: float | None, expected: float) -> None:
    assert lr_gain(rule, batch, base, noise) == pytest.approx(expected, rel=1e-12)


def test_adascale_lies_between_one_and_linear() -> None:
    assert lr_gain(LRRule.ADASCALE, 256, 64, 1e12) == pytest.approx(4.0, rel=1e-9)  # noise-dominated: linear
    for noise in (1.0, 30.0, 500.0):
        for batch in (64, 128, 1024):
            gain = lr_gain(LRRule.ADASCALE, batch, 64, noise)
            assert 1.0 <= gain <= batch / 64 + 1e-12


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: lr_gain(LRRule.LINEAR, 0, 64), "batch sizes must be whole numbers of samples >= 1; got 0 and base 64"),
        # NaN passed `< 1` and gave a NaN gain; fractions were used as they were, or cut by int() in the coupler
        (lambda: lr_gain(LRRule.LINEAR, float("nan"), 64), "got nan and base 64"),
        (lambda: lr_gain(LRRule.SQRT, 32.5, 64), "got 32.5 and base 64"),
        (lambda: BatchLRCoupler(LRRule.LINEAR, 64.9, 64), "got 64 and base 64.9"),
        (lambda: BatchLRCoupler(LRRule.LINEAR, 64, 64).change(32.5), "got 32.5 and base 64"),
        (lambda: lr_gain(LRRule.ADASCALE, 64, 64, -1.0), "noise_scale=-1.0 must be >= 0"),
        # A string raised a bare TypeError, and True was read as one sample
        (lambda: lr_gain(LRRule.ADASCALE, 64, 64, "5"), r"noise_scale='5' must be a number of samples >= 0, or None"),
        (lambda: lr_gain(LRRule.ADASCALE, 64, 64, True), r"noise_scale=True must be a number of samples"),
        (lambda: BatchLRCoupler(LRRule.LINEAR, 64, 64, warmup_above="2"), r"need warmup_above a number > 1 .* got '2'"),
        (lambda: lr_gain(LRRule.AUTO, 64, 64), "must be resolved first"),
    ],
)
def test_gain_bad_input(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_auto_resolves_by_optimizer() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    assert resolve_lr_rule(LRRule.AUTO, torch.optim.SGD(params, lr=0.1)) is LRRule.LINEAR
    assert resolve_lr_rule(LRRule.AUTO, torch.optim.AdamW(params)) is LRRule.SQRT
    assert resolve_lr_rule(LRRule.AUTO, torch.optim.Adam(params)) is LRRule.SQRT
    assert resolve_lr_rule(LRRule.ADASCALE, torch.optim.AdamW(params)) is LRRule.ADASCALE


def test_lr_rule_parsing_and_config_errors() -> None:
    assert LRRule.parse("SQRT") is LRRule.SQRT
    assert ElasticConfig(lr_rule="adascale").lr_rule is LRRule.ADASCALE  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="lr_rule='cubic'; allowed: linear, sqrt, none, adascale, auto"):
        LRRule.parse("cubic")
    for kwargs, message in [
        ({"warmup_above": 1.0}, "warmup_above=1.0 must be a ratio > 1"),
        ({"warmup_steps": -1}, "warmup_steps=-1 must be >= 0"),
        ({"fill_frac": 0.0}, r"fill_frac=0.0 must be in \(0, 1\]"),
        ({"oom_budget_factor": 1.5}, r"oom_budget_factor=1.5 must be in \(0, 1\]"),
        ({"max_oom_retries": 0}, "max_oom_retries=0 must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            ElasticConfig(**kwargs)  # type: ignore[arg-type]


def test_warmup_ramps_linearly_after_a_large_rise() -> None:
    coupler = BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=64, warmup_above=1.5, warmup_steps=4)
    assert coupler.advance() == 1.0
    assert coupler.change(256) == 1.0  # in force until the next step
    assert coupler.warming_up
    assert [coupler.advance() for _ in range(5)] == [1.75, 2.5, 3.25, 4.0, 4.0]
    assert not coupler.warming_up


def test_lower_gain_and_small_rises_apply_at_once() -> None:
    coupler = BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=256, warmup_above=1.5, warmup_steps=4)
    coupler.advance()
    assert coupler.change(128) == 2.0  # a drop: at once
    assert coupler.change(160) == 2.5  # ×1.25 < 1.5: at once
    assert coupler.advance() == 2.5
    sqrt = BatchLRCoupler(LRRule.SQRT, base_batch_size=64, batch_size=64, warmup_above=1.5, warmup_steps=4)
    sqrt.advance()
    assert sqrt.change(128) == pytest.approx(math.sqrt(2))  # a doubling under sqrt is ×1.41: no warm-up


def test_changes_before_the_first_step_apply_at_once() -> None:
    coupler = BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=64, warmup_steps=4)
    assert coupler.change(1024) == 16.0
    assert coupler.advance() == 16.0


def test_interrupted_warmup_restarts_from_the_gain_in_force() -> None:
    coupler = BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=64, warmup_above=1.5, warmup_steps=4)
    coupler.advance()
    coupler.change(256)
    assert coupler.advance() == 1.75
    assert coupler.change(1024) == 1.75  # ×16 from 1.75 over 4 steps
    assert [coupler.advance() for _ in range(4)] == pytest.approx([5.3125, 8.875, 12.4375, 16.0])
    assert coupler.change(1024) == 16.0  # the same batch again changes nothing


def test_the_same_batch_again_mid_ramp_lets_the_ramp_carry_on() -> None:
    coupler = BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=64, warmup_above=1.5, warmup_steps=4)
    coupler.advance()
    coupler.change(1024)  # ×16 from 1.0 over 4 steps: 1 + 15 * k / 4
    assert coupler.advance() == 4.75
    assert coupler.change(1024) == 4.75  # no change: not a new ramp from 4.75 (7.5625, 10.375, 13.1875, 16.0)
    assert coupler.warming_up
    assert [coupler.advance() for _ in range(3)] == [8.5, 12.25, 16.0]


def test_run_applies_the_rule_with_warmup_to_the_optimizer() -> None:
    run = TrainingRun(small_task(), seed=0, device="cpu", elastic=ElasticConfig(warmup_steps=2))
    assert run.lr_rule is LRRule.LINEAR  # AUTO with SGD
    base = run.task.base_lr
    assert run.step().lr == pytest.approx(base)
    run.batch_size = 128  # ×2 ≥ 1.5: warmed up over 2 steps
    lrs = [run.step().lr for _ in range(3)]
    assert lrs == pytest.approx([base * 1.5, base * 2.0, base * 2.0])
    assert run.engine.group_lrs()[0] == pytest.approx(base * 2.0)
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(base)  # the group keeps its own (scheduler's) LR
    run.batch_size = 32  # a drop applies at once
    assert run.step().lr == pytest.approx(base * 0.5)


def test_run_sqrt_rule_for_adamw_and_explicit_override() -> None:
    task = small_task(optimizer="adamw", base_lr=1e-3, n_train=512)  # a batch of 256 needs as many samples
    run = TrainingRun(task, seed=0, device="cpu", batch_size=256)
    assert run.lr_rule is LRRule.SQRT
    assert run.lr == pytest.approx(1e-3 * math.sqrt(256 / 64))
    run.lr_rule = "linear"  # type: ignore[assignment]
    assert run.lr == pytest.approx(1e-3 * 4)


def test_run_adascale_uses_its_own_noise_estimate() -> None:
    run = TrainingRun(small_task(), seed=0, device="cpu", elastic=ElasticConfig(lr_rule=LRRule.ADASCALE))
    assert run.noise_scale is None  # nothing measured yet
    for _ in range(5):
        run.step()
    noise = run.noise_scale
    assert noise is not None and noise > 0 and np.isfinite(noise)
    run.batch_size = 96  # ×1.5 in batch: the AdaScale gain rises by less than 1.5, so no warm-up
    expected = lr_gain(LRRule.ADASCALE, 96, 64, run.noise_scale)
    assert run.engine.batch_lr_gain == pytest.approx(expected, rel=1e-6)
    assert 1.0 <= expected < 1.5


def _controller(rule: str | None, optimizer: str = "sgd") -> tuple[Controller, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if optimizer == "sgd" else torch.optim.AdamW(model.parameters())
    return Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=1000), lr_rule=rule), opt


def test_controller_uses_the_same_rules() -> None:
    ctl, _ = _controller(None, "adamw")
    assert ctl.lr_rule is LRRule.SQRT  # AUTO, as in TrainingRun
    ctl, opt = _controller("linear")
    data = (torch.randn(256, 8), torch.randint(0, 2, (256,)))
    loader = ctl.loader(data, batch_size=16)
    x, y = next(loader)
    ctl.step(nn.functional.cross_entropy(ctl.model(x), y))
    ctl.batch_size = 64  # ×4 after the first step: warmed up over config.elastic.warmup_steps (10)
    x, y = next(loader)
    ctl.step(nn.functional.cross_entropy(ctl.model(x), y))
    assert ctl.engine.batch_lr_gain == pytest.approx(1 + 3 / 10)  # the step just taken
    assert ctl.lr == pytest.approx(0.1 * 1.6)  # the next update's, the ramp's second step (it read 0.13, one behind)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="lr_rule='cubic'; allowed: linear, sqrt, none"):
        _controller("cubic")


@pytest.mark.parametrize("bad", [1.0, 0.5, float("nan")])
def test_the_coupler_refuses_a_warmup_threshold_that_is_no_ratio_above_one(bad: float) -> None:
    """NaN passed the check (every comparison with it is false) and then no rise was ever warmed up."""
    with pytest.raises(
        ValueError, match=rf"need warmup_above a number > 1 and warmup_steps a whole number >= 0; got {bad}, 4"
    ):
        BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=64, warmup_above=bad, warmup_steps=4)


@pytest.mark.parametrize("bad", [2.5, float("nan"), True, -1])
def test_the_coupler_refuses_a_warmup_that_is_no_whole_number_of_steps(bad: float) -> None:
    """2.5 never met the ramp's end (step == warmup_steps): the gain went on to 4.6 against a target of 4.0 and stayed
    there; NaN skipped the warm-up."""
    with pytest.raises(ValueError, match=rf"warmup_steps a whole number >= 0; got 1.5, {bad!r}"):
        BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=64, warmup_steps=bad)


def test_an_infinite_noise_scale_gives_the_linear_gain() -> None:
    """Before the fix, an infinite noise scale counted as 0 (a noise-free gradient), so the gain was 1: the opposite
    end of AdaScale's range from its limit, ``B / B0`` for a noise-dominated gradient."""
    assert lr_gain(LRRule.ADASCALE, 256, 64, math.inf) == 4.0
    assert lr_gain(LRRule.ADASCALE, 16, 64, math.inf) == 0.25
    assert lr_gain(LRRule.ADASCALE, 256, 64, math.nan) == 1.0  # unknown: counts as 0, as None does
    with pytest.raises(ValueError, match="noise_scale=-inf must be >= 0"):
        lr_gain(LRRule.ADASCALE, 256, 64, -math.inf)


def _mid_ramp(warmup_steps: int, steps_into_ramp: int) -> BatchLRCoupler:
    coupler = BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=64, warmup_steps=warmup_steps)
    coupler.advance()
    coupler.change(256)  # x4 from 1.0
    for _ in range(steps_into_ramp):
        coupler.advance()
    return coupler


def test_coupler_state_resumes_mid_ramp_exactly() -> None:
    saved = _mid_ramp(warmup_steps=8, steps_into_ramp=3)
    resumed = BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=64, warmup_steps=8)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.state_dict() == saved.state_dict() and resumed.warming_up
    assert [resumed.advance() for _ in range(6)] == [saved.advance() for _ in range(6)]
    assert resumed.gain == 4.0


def test_the_last_ramp_step_lands_on_the_target_exactly() -> None:
    """``start + (target - start) * 1.0`` can miss the target by an ulp; the ramp's end is the target itself."""
    coupler = BatchLRCoupler(LRRule.SQRT, base_batch_size=64, batch_size=67, warmup_steps=3)
    coupler.advance()
    coupler.change(586)  # sqrt(67/64) + (sqrt(586/64) - sqrt(67/64)) * 1.0 is sqrt(586/64) + 4.4e-16
    assert [coupler.advance() for _ in range(3)][-1] == coupler.target == math.sqrt(586 / 64)


@pytest.mark.parametrize(
    ("saved_steps", "into", "resumed_steps", "expected"),
    [
        # A finished ramp read against a longer warm-up restarted from its old start: the gain fell from 4.0 to 2.875.
        (4, 6, 8, [4.0, 4.0, 4.0]),
        # A ramp 5 steps into 8 read against a warm-up of 4 had outrun it: the gain stayed at 2.875 for good.
        (8, 5, 4, [2.875 + 1.125 * k / 4 for k in (1, 2, 3, 4)]),
        # The same without warm-up: the target from the load on.
        (8, 5, 0, [4.0, 4.0]),
    ],
)
def test_coupler_state_loaded_with_other_warmup_steps_never_lowers_or_strands_the_gain(
    saved_steps: int, into: int, resumed_steps: int, expected: list[float]
) -> None:
    """Before the fix, both first cases went wrong as the comments say: the ramp's step count was read against the
    new warm-up length. A ramp in progress now restarts from the gain in force; a finished one stays finished."""
    saved = _mid_ramp(warmup_steps=saved_steps, steps_into_ramp=into)
    resumed = BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=64, warmup_steps=resumed_steps)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.gain == (saved.gain if resumed_steps else 4.0) and resumed.target == 4.0
    assert [resumed.advance() for _ in expected] == pytest.approx(expected, rel=1e-12)
    assert not resumed.warming_up and resumed.gain == 4.0


def test_coupler_state_of_another_rule_or_with_missing_keys_is_refused() -> None:
    coupler = BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=64)
    state = BatchLRCoupler(LRRule.SQRT, base_batch_size=64, batch_size=64).state_dict()
    with pytest.raises(ValueError, match="state is for rule 'sqrt' at base batch 64; this one is 'linear'"):
        coupler.load_state_dict(state)
    state = coupler.state_dict()
    del state["gain"], state["ramp_step"]
    with pytest.raises(ValueError, match=r"state lacks gain, ramp_step; expected BatchLRCoupler.state_dict\(\)"):
        coupler.load_state_dict(state)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gain": "2.0"}, r"the LR coupler's state has gain '2\.0', not a finite number > 0"),
        ({"target": math.nan}, r"gain nan|target nan"),
        ({"ramp_start": None}, r"ramp_start None"),
        ({"steps": 3.5}, r"steps 3\.5, not a whole number >= 0"),
        ({"ramp_step": "1"}, r"ramp_step '1', not a whole number >= 0"),
        ({"batch_size": 0}, r"batch_size 0, not a whole number >= 1"),
        ({"warmup_steps": True}, r"warmup_steps True, not a whole number >= 0"),
        ({"base_batch_size": "64"}, r"base_batch_size '64', not a whole number >= 1"),
    ],
)
def test_a_coupler_state_with_a_wrong_value_is_refused_and_changes_nothing(change: dict, message: str) -> None:
    """Once a float() or int() raised half-way through the load (the batch and step count already replaced), or took
    a string for a number."""
    coupler = _mid_ramp(warmup_steps=8, steps_into_ramp=2)
    before = coupler.state_dict()
    state = {**_mid_ramp(warmup_steps=8, steps_into_ramp=5).state_dict(), "batch_size": 512, **change}
    with pytest.raises(ValueError, match=message):
        coupler.load_state_dict(state)
    assert coupler.state_dict() == before


def test_setting_the_lr_rule_mid_run_carries_the_warm_up_on() -> None:
    """The setter built a fresh coupler, which had counted no steps: re-setting the same rule jumped a ramp in progress
    to its end, and a rule whose gain rose ×4 applied it at once instead of warming it up."""

    def ramping() -> TrainingRun:
        elastic = ElasticConfig(lr_rule="linear", warmup_steps=4)
        run = TrainingRun(small_task(n_train=600), seed=0, device="cpu", elastic=elastic)
        run.step()
        run.batch_size = 4 * run.batch_size
        run.step()  # one step into the ramp
        return run

    run, twin = ramping(), ramping()
    run.lr_rule = "linear"  # the same rule: the ramp carries on
    assert [run.step().lr for _ in range(4)] == [twin.step().lr for _ in range(4)]

    run = TrainingRun(
        small_task(n_train=2400), seed=0, device="cpu", elastic=ElasticConfig(lr_rule="sqrt", warmup_steps=4)
    )
    run.step()
    run.batch_size = 16 * run.batch_size  # sqrt: ×4, warmed up; then linear asks ×16 of the ×4 in force...
    for _ in range(4):
        run.step()
    base = run.task.base_lr * run.lr_scale
    assert run.lr == pytest.approx(4 * base)
    run.lr_rule = "linear"
    lrs = [run.step().lr / base for _ in range(5)]
    assert lrs == pytest.approx([7.0, 10.0, 13.0, 16.0, 16.0])  # ... ramped from 4 over the 4 warm-up steps


def test_a_rise_of_exactly_warmup_above_is_warmed_up() -> None:
    """The docstring: a rise "at or above" warmup_above is ramped (x1.5 exactly: batch 64 to 96)."""
    coupler = BatchLRCoupler(LRRule.LINEAR, base_batch_size=64, batch_size=64, warmup_above=1.5, warmup_steps=4)
    coupler.advance()  # after the first step
    assert coupler.change(96) == 1.0 and coupler.warming_up
    assert [coupler.advance() for _ in range(4)] == [1.125, 1.25, 1.375, 1.5]


def test_numpy_warm_up_settings_and_batch_sizes_leave_a_state_torch_load_reads() -> None:
    """A NumPy ``warmup_steps`` (and a NumPy batch size under the linear rule) was stored as given and copied into the
    state (``ramp_step``, ``target``): a checkpoint holding it failed ``torch.load(weights_only=True)``."""
    import io

    coupler = BatchLRCoupler(LRRule.LINEAR, 64, np.int64(64), warmup_above=np.float64(1.5), warmup_steps=np.int64(4))
    coupler.advance()
    assert coupler.change(np.int64(256)) == 1.0 and lr_gain(LRRule.LINEAR, np.int64(128), 64) == 2.0
    assert type(lr_gain(LRRule.LINEAR, np.int64(128), 64)) is float
    coupler.advance()
    state = coupler.state_dict()
    assert {key: type(state[key]) for key in ("warmup_steps", "ramp_step", "target", "gain", "batch_size")} == {
        "warmup_steps": int, "ramp_step": int, "target": float, "gain": float, "batch_size": int,
    }  # fmt: skip
    assert (type(coupler.warmup_above), type(coupler.warmup_steps)) == (float, int)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == state == {**state, "gain": 1.75, "ramp_step": 1, "target": 4.0}
