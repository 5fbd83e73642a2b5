"""The round scheduler: fixed schedule, the budget kept by the adaptive one, round sizing, config checks."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from triaccel_rl.signals import (
    BudgetRefusal,
    RoundCost,
    RoundPlan,
    RoundScheduler,
    Schedule,
    SignalConfig,
    SignalMode,
)
from triaccel_rl.signals.scheduler import LADDER


def simulate(
    config: SignalConfig, step_ms: float, noise_ms: float, probe_ms: float, n_steps: int, interval: int = 20
) -> tuple[RoundScheduler, list[RoundPlan]]:
    """Runs the scheduler against a cost model: a round of (m, p) costs ``m * noise_ms + p * probe_ms``."""
    scheduler = RoundScheduler(config)
    plans = []
    for _ in range(n_steps // interval):
        scheduler.add_train(step_ms * interval, n_steps=interval)
        plan = scheduler.plan()
        if plan is not None:
            plans.append(plan)
            scheduler.record(plan, RoundCost(plan.n_microbatches * noise_ms, plan.n_probes * probe_ms, 0.0))
    return scheduler, plans


def test_fixed_schedule_every_k_steps() -> None:
    config = SignalConfig(schedule=Schedule.FIXED, fixed_interval_steps=60, fixed_microbatches=3, fixed_probes=5)
    _scheduler, plans = simulate(config, step_ms=1.0, noise_ms=100.0, probe_ms=100.0, n_steps=600)
    # First decision (step 20), then whenever 60 steps have passed since the last round: 80, 140, ...
    assert len(plans) == 1 + (600 - 20) // 60
    assert {(p.n_microbatches, p.n_probes) for p in plans} == {(3, 5)}


def test_adaptive_first_round_is_smallest_and_never_refused() -> None:
    scheduler = RoundScheduler(SignalConfig())
    scheduler.add_train(1.0)
    assert scheduler.plan() == RoundPlan(*LADDER[0])


def test_adaptive_stays_within_budget_after_repaying_the_first_round() -> None:
    config = SignalConfig(budget_frac=0.02, expensive_share=0.75)
    step_ms, noise_ms, probe_ms = 9.0, 7.0, 35.0  # ResNet-18 on an H200: 9 ms a step, ~40 ms a probe
    scheduler, plans = simulate(config, step_ms, noise_ms, probe_ms, n_steps=200_000)
    allowance = config.budget_frac * config.expensive_share
    first = plans[0].n_microbatches * noise_ms + plans[0].n_probes * probe_ms
    # Never more than the allowance plus the one borrowed (first) round; and it spends most of it.
    assert scheduler.charged_round_ms <= allowance * scheduler.charged_train_ms + first
    assert scheduler.round_overhead_frac == pytest.approx(allowance, rel=1e-4)  # measured: 0.0149994
    # Rounds are sized to fit the allowance over target_interval_steps: 0.015 * 9 * 200 = 27 ms → (2, 1)'s 49 ms
    # does not fit, so the smallest rung, every 49 / (0.015 * 9) = 363 steps: 200_000 / 363 ≈ 551 rounds.
    assert {(p.n_microbatches, p.n_probes) for p in plans} == {LADDER[0]}
    assert scheduler.steps == 200_000 and len(plans) == 551


def test_adaptive_grows_rounds_when_steps_are_expensive() -> None:
    config = SignalConfig(target_interval_steps=100)
    scheduler, plans = simulate(config, step_ms=1000.0, noise_ms=7.0, probe_ms=35.0, n_steps=20_000)
    # Allowance per target interval: 0.015 * 1000 * 100 = 1500 ms ≥ (16, 8): 16 * 7 + 8 * 35 = 392 ms, the largest
    # round the default limits allow (max_probes 8).
    assert (plans[-1].n_microbatches, plans[-1].n_probes) == (16, 8) == LADDER[-2]
    # 511 rounds at 0.99985% of the training time, just inside the rounds' 1% (a deterministic simulation)
    assert len(plans) == 511 and 0.0099 < scheduler.round_overhead_frac <= config.budget_frac * config.expensive_share
    thorough = SignalConfig.preset("thorough")  # max_probes 16: the last rung, 16 * 7 + 16 * 35 = 672 ms
    _, plans = simulate(thorough, step_ms=1000.0, noise_ms=7.0, probe_ms=35.0, n_steps=20_000)
    assert (plans[-1].n_microbatches, plans[-1].n_probes) == (16, 16) == LADDER[-1]


def test_ladder_respects_limits() -> None:
    scheduler = RoundScheduler(SignalConfig(max_microbatches=4, max_probes=1))
    assert scheduler.ladder == [(2, 1), (4, 1)]
    # Rungs are capped, not left out: 8 and 16 micro-batches came only with more probes, so max_probes=1 capped the
    # micro-batches at 4 whatever max_microbatches said.
    assert RoundScheduler(SignalConfig(max_microbatches=16, max_probes=1)).ladder == [(2, 1), (4, 1), (8, 1), (16, 1)]
    assert RoundScheduler(SignalConfig()).ladder == [
        rung for rung in LADDER if rung != (16, 16)
    ]  # the defaults: as before


def test_no_round_before_costs_are_known_except_the_first() -> None:
    scheduler = RoundScheduler(SignalConfig())
    assert math.isnan(scheduler.predict_ms(2, 1))
    assert scheduler.credit_ms == 0.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"budget_frac": 0.0}, "budget_frac=0.0"),
        ({"expensive_share": 1.5}, "expensive_share=1.5"),
        (
            {"observe_budget_frac": 0.0},
            r"observe_budget_frac=0.0 must be in \(0, budget_frac=0.02\), or None",
        ),
        (
            {"observe_budget_frac": 0.001, "cheap_budget_frac": 0.001},
            r"cheap_budget_frac=0.001 must be in \(observe_budget_frac=0.001, budget_frac",
        ),
        ({"cheap_budget_frac": 0.03}, r"cheap_budget_frac=0.03 must be in .*budget_frac=0.02\]"),
        ({"max_microbatches": 1}, "max_microbatches=1 must be >= 2"),
        ({"fixed_probes": 0}, "fixed_probes=0"),
        ({"round_ema_decay": 1.0}, "round_ema_decay=1.0"),
        ({"lr_factor_min": 0.0}, "lr_factor_min=0.0"),
        ({"mode": "fast"}, "unknown signal mode 'fast'; allowed: cheap, all"),
        ({"schedule": "often"}, "unknown schedule 'often'; allowed: adaptive, fixed"),
        # Before the type checks: NaN and fractional counts passed (NaN < 1 is False) and failed mid-run in the
        # rounds' slicing; a string number raised a TypeError from a comparison; any truthy value turned switches on.
        ({"micro_batch_size": math.nan}, "micro_batch_size=nan must be a whole number"),
        ({"fixed_interval_steps": 2.5}, "fixed_interval_steps=2.5 must be a whole number"),
        ({"max_probes": True}, "max_probes=True must be a whole number"),
        ({"seed": 1.5}, "seed=1.5 must be a whole number"),
        ({"budget_frac": "0.1"}, "budget_frac='0.1' must be a number"),
        ({"cheap_budget_frac": "0.004"}, "cheap_budget_frac='0.004' must be a number"),
        ({"lr_factors": "yes"}, "lr_factors='yes' must be True or False"),
        ({"budget_frac": math.nan}, r"budget_frac=nan must be in \(0, 1\)"),
        ({"lr_factor_max": math.inf}, r"lr_factor_max=inf < inf"),
    ],
)
def test_config_validation(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(SignalConfig(), **overrides)


def test_presets() -> None:
    assert SignalConfig.preset("cheap").mode is SignalMode.CHEAP
    assert SignalConfig.preset("fixed").schedule is Schedule.FIXED
    assert SignalConfig.preset("default") == SignalConfig()
    assert SignalConfig.preset("default", budget_frac=0.05).budget_frac == 0.05
    with pytest.raises(ValueError, match="unknown signal preset 'fast'"):
        SignalConfig.preset("fast")


# ------------------------------------------------- the first round against the whole run's budget


def seeded_scheduler(charged_train_ms: float, cost: RoundCost) -> RoundScheduler:
    """A default scheduler (budget 0.02 * 0.5 = 1%) that trained ``charged_train_ms``, with the rates of ``cost``."""
    scheduler = RoundScheduler(SignalConfig())
    scheduler.add_train(charged_train_ms, n_steps=10)
    scheduler.seed_rates(RoundPlan(*LADDER[0]), cost)
    return scheduler


def test_first_round_runs_only_if_it_fits_the_projected_run() -> None:
    # 1000 ms trained at progress 0.25: the run is projected at 4000 ms, 1% of it is 40 ms.
    # (2, 1) at noise 4 (2 a micro-batch), Hutchinson 30, other 6: predicted 2 * 2 + 30 + 6 = 40 ms.
    fits = seeded_scheduler(1000.0, RoundCost(noise_ms=4.0, hutchinson_ms=30.0, other_ms=6.0))
    assert fits.allowance_ms(0.25) == 40.0
    assert fits.plan(progress=0.25) == RoundPlan(2, 1, 40.0)  # exactly the allowance: runs
    assert fits.last_refusal is None
    # One ms more than the allowance: refused, and the refusal says by how much.
    too_costly = seeded_scheduler(1000.0, RoundCost(noise_ms=4.0, hutchinson_ms=31.0, other_ms=6.0))
    assert too_costly.plan(progress=0.25) is None
    assert too_costly.last_refusal == BudgetRefusal(predicted_ms=41.0, allowance_ms=40.0, progress=0.25)
    assert too_costly.rounds == 0 and too_costly.charged_round_ms == 0.0  # nothing charged
    # Training at the same pace projects the same run: still refused at 0.5 (2000 ms trained).
    too_costly.add_train(1000.0, n_steps=10)
    assert too_costly.plan(progress=0.5) is None
    assert too_costly.last_refusal == BudgetRefusal(predicted_ms=41.0, allowance_ms=40.0, progress=0.5)


def test_first_round_still_borrowed_when_progress_or_costs_are_unknown() -> None:
    unknown_costs = RoundScheduler(SignalConfig())
    unknown_costs.add_train(1.0)
    for progress in (None, 0.0, 0.5):  # nothing to predict: today's rule, whatever the progress
        assert unknown_costs.plan(progress=progress) == RoundPlan(*LADDER[0])
    # Costs known (41 ms) but progress unknown (None, or 0 at a run's start): borrowed, with its prediction.
    known_costs = seeded_scheduler(1000.0, RoundCost(noise_ms=4.0, hutchinson_ms=31.0, other_ms=6.0))
    assert known_costs.plan() == RoundPlan(2, 1, 41.0)
    assert known_costs.plan(progress=0.0) == RoundPlan(2, 1, 41.0)
    assert known_costs.last_refusal is None


def test_seeded_rates_charge_nothing_and_the_first_measurement_replaces_them() -> None:
    scheduler = seeded_scheduler(1000.0, RoundCost(noise_ms=400.0, hutchinson_ms=300.0, other_ms=100.0))
    assert scheduler.rates_known and scheduler.predict_ms(4, 2) == 4 * 200.0 + 2 * 300.0 + 100.0
    assert scheduler.rounds == 0 and scheduler.charged_round_ms == 0.0 and scheduler.credit_ms == 10.0
    # The first charged round (4 micro-batches at 2 ms, 2 probes at 3 ms, 1 ms other) replaces the seed...
    scheduler.record(RoundPlan(4, 2), RoundCost(noise_ms=8.0, hutchinson_ms=6.0, other_ms=1.0))
    assert scheduler.predict_ms(2, 1) == 2 * 2.0 + 3.0 + 1.0
    assert scheduler.charged_round_ms == 15.0
    # ...and later ones are smoothed with it (rates 4, 5, 3 → halfway: 3, 4, 2).
    scheduler.record(RoundPlan(2, 1), RoundCost(noise_ms=8.0, hutchinson_ms=5.0, other_ms=3.0))
    assert scheduler.predict_ms(2, 1) == 2 * 3.0 + 4.0 + 2.0


def test_a_charged_warmup_is_repaid_before_the_first_round_runs() -> None:
    # 1000 ms trained at progress 0.25: 1% of the projected 4000-ms run is 40 ms; the round is predicted at 40 ms.
    scheduler = seeded_scheduler(1000.0, RoundCost(noise_ms=4.0, hutchinson_ms=30.0, other_ms=6.0))
    scheduler.charge(25.0)  # the warm-up
    assert scheduler.rounds == 0 and scheduler.charged_round_ms == 25.0
    assert scheduler.allowance_ms(0.25) == 15.0
    assert scheduler.plan(progress=0.25) is None
    assert scheduler.last_refusal == BudgetRefusal(predicted_ms=40.0, allowance_ms=15.0, progress=0.25)
    # A longer run (projected 6500 ms, 65 ms of rounds) repays the warm-up and holds the round: exactly.
    assert scheduler.plan(progress=1000.0 / 6500.0) == RoundPlan(2, 1, 40.0)
    # After the round, the next waits for the credit: 1% of the training against warm-up and round (65 ms).
    scheduler.record(RoundPlan(2, 1), RoundCost(noise_ms=4.0, hutchinson_ms=30.0, other_ms=6.0))
    assert scheduler.rounds == 1 and scheduler.credit_ms == 10.0 - 65.0
    scheduler.add_train(5500.0, n_steps=10)
    assert scheduler.credit_ms == 0.0 and scheduler.plan(progress=0.5) is None  # 40 ms predicted, 0 credit


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 0.0])
def test_charge_ignores_a_broken_or_empty_reading(bad: float) -> None:
    scheduler = RoundScheduler(SignalConfig())
    scheduler.charge(3.0)
    scheduler.charge(bad)
    assert scheduler.charged_round_ms == 3.0 and scheduler.rounds == 0


def test_fixed_schedule_ignores_the_whole_run_budget() -> None:
    scheduler = RoundScheduler(SignalConfig(schedule=Schedule.FIXED))
    scheduler.add_train(1.0)
    scheduler.seed_rates(RoundPlan(2, 1), RoundCost(1e6, 1e6, 1e6))
    assert scheduler.plan(progress=0.5) == RoundPlan(4, 2)  # whatever it costs, as documented


def test_an_empty_interval_counts_no_step_and_leaves_the_step_time_alone() -> None:
    """Before the fix, the collector passed an empty interval (0 steps, 0 ms) as one step: the fixed schedule ran a
    round early, and the smoothed step time took a 0-ms step (10% lower each time), so rounds were sized smaller."""
    scheduler = RoundScheduler(SignalConfig(schedule=Schedule.FIXED, fixed_interval_steps=3))
    scheduler.add_train(20.0, n_steps=2)
    plan = scheduler.plan()
    assert plan is not None
    scheduler.record(plan, RoundCost(1.0, 1.0, 0.0))
    for _ in range(3):
        scheduler.add_train(0.0, n_steps=0)
    scheduler.add_train(20.0, n_steps=2)
    assert scheduler.steps == 4 and scheduler.charged_train_ms == 40.0
    assert scheduler._step_ms == 10.0
    assert scheduler.plan() is None  # 2 steps since the round, not 5
    # A broken timer reading: the step counts, its time does not.
    scheduler.add_train(math.nan, n_steps=1)
    assert scheduler.steps == 5 and scheduler.charged_train_ms == 40.0 and scheduler._step_ms == 10.0
    assert scheduler.plan() == RoundPlan(4, 2)  # 3 steps since the round
    with pytest.raises(ValueError, match="n_steps=-1 must be >= 0"):
        scheduler.add_train(1.0, n_steps=-1)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
@pytest.mark.parametrize("broken_round", [0, 1])
def test_a_broken_round_cost_is_not_charged_and_rounds_go_on(bad: float, broken_round: int) -> None:
    """A NaN part made the credit and every prediction NaN: no round ran again for the rest of the run. Broken on the
    first round (no rates yet), the next plan is a first round again; on a later one, the round counts uncharged."""
    scheduler = RoundScheduler(SignalConfig())
    ran = []
    for _ in range(400):
        scheduler.add_train(20.0, n_steps=20)
        plan = scheduler.plan()
        if plan is None:
            continue
        ran.append(plan)
        other = bad if len(ran) == broken_round + 1 else 0.0
        charged_before = scheduler.charged_round_ms
        scheduler.record(plan, RoundCost(2.0 * plan.n_microbatches, 3.0 * plan.n_probes, other))
        if other is bad:
            assert scheduler.charged_round_ms == charged_before and math.isfinite(scheduler.credit_ms)
            assert scheduler.rounds == (0 if broken_round == 0 else 2)  # a first one, unread, does not count
    assert len(ran) > 3  # rounds went on
    assert math.isfinite(scheduler.predict_ms(2, 1))
