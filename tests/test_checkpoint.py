"""Checkpoints of a run in the user's own loop: ``Controller.state_dict()`` resumes the same run.

On the CPU's reference path, and on the fused step under Triton's interpreter, where the ``torch.optim`` object the
user built holds no moments at all (the fused step keeps them): saving ``optimizer.state_dict()`` there loses them.
"""

import copy
import io
import itertools
import math
import os

import pytest
import torch
from torch import nn

import triaccel_rl as ta
from triaccel_rl import controller as controller_module
from triaccel_rl.config import ControllerConfig, CostMode, HeuristicConfig
from triaccel_rl.engine import StepEngine
from triaccel_rl.tasks import get_task
from triaccel_rl.types import Precision

BATCH = 16
DATA = (torch.randn(96, 8, generator=torch.Generator().manual_seed(0)), torch.arange(96) % 3)  # 6 steps an epoch


def build(policy="fp32", config=None, width=16):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer, ta.Controller(model, optimizer, policy=policy, config=config or ControllerConfig())


def train(model, ctl, epochs=2, stop_after=None, on_stop=None):
    """Trains through ``ctl.loader``, calling ``on_stop()`` after ``stop_after`` steps; returns the steps taken."""
    steps = 0
    for x, y in ctl.loader(DATA, batch_size=BATCH, epochs=epochs):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss)
        steps += 1
        if steps == stop_after:
            on_stop()
    return steps


def checkpoint(model, ctl):
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "controller": ctl.state_dict()}, buffer)
    buffer.seek(0)
    return buffer


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def restore(model, ctl, state):
    """Loads a checkpoint's model and controller state, as a user's resume does."""
    model.load_state_dict(state["model"])
    ctl.load_state_dict(state["controller"])


def assert_same_weights(expected, model):
    """Bit-for-bit: ``expected`` (a list of tensors) against ``model``'s parameters."""
    for a, b in zip(expected, weights(model), strict=True):
        assert torch.equal(a, b), f"differ by {(a - b).abs().max():.3g}"


def resume_matches_an_uninterrupted_run(policy="fp32", config=None):
    """Trains 12 steps with a checkpoint after 7 (mid-epoch); resumes it in a new process-like setup."""
    model, _, ctl = build(policy, config)
    saved = []
    assert train(model, ctl, stop_after=7, on_stop=lambda: saved.append(checkpoint(model, ctl))) == 12
    uninterrupted = weights(model)

    model2, _, ctl2 = build(policy, config)
    state = torch.load(saved[0])  # weights_only: the state holds tensors, numbers, strings, lists and dicts
    restore(model2, ctl2, state)
    assert train(model2, ctl2) == 5  # the rest of the second epoch, no sample twice
    assert ctl2.steps == 12
    assert_same_weights(uninterrupted, model2)
    return state, ctl2


def test_a_pretrained_run_resumes_as_the_uninterrupted_run():
    """``policy="pretrained"``'s FallbackPolicy had no setter for the precisions a checkpoint restores: the load raised
    after the engine and the step count were in, and the next loader() started the data over."""
    _, resumed = resume_matches_an_uninterrupted_run("pretrained")
    assert resumed.policy.initial_precision is resumed.policy.fallback.initial_precision


def test_a_checkpoint_between_a_batch_and_its_step_resumes_with_that_batch():
    """Saved at the top of the loop body (or on a Ctrl-C in the forward): the loader's state counted the batch as
    served, and the resumed run never trained it (80 of 96 samples in that epoch)."""
    model, _, ctl = build()
    uninterrupted_model, _, uninterrupted = build()
    assert train(uninterrupted_model, uninterrupted, epochs=1) == 6
    saved = None
    for x, y in ctl.loader(DATA, batch_size=BATCH, epochs=1):
        if ctl.steps == 2 and saved is None:
            saved = checkpoint(model, ctl)  # the third batch is served, not yet stepped on
            break
        ctl.step(nn.functional.cross_entropy(model(x), y))
    model2, _, ctl2 = build()
    state = torch.load(saved)
    restore(model2, ctl2, state)
    assert train(model2, ctl2, epochs=1) == 4 and ctl2.steps == 6
    assert_same_weights(weights(uninterrupted_model), model2)


def test_a_checkpoint_saved_again_before_the_next_loader_call_keeps_the_datas_place():
    """A preempted job saving again right after it restarted: the pending place in the data was not saved (loader
    None, batch size 0), and a run resumed from that second checkpoint trained an extra epoch."""
    model, _, ctl = build()
    saved = []
    train(model, ctl, stop_after=7, on_stop=lambda: saved.append(checkpoint(model, ctl)))
    first = torch.load(saved[0])
    model2, _, ctl2 = build()
    restore(model2, ctl2, first)
    assert ctl2.batch_size == BATCH
    again = torch.load(checkpoint(model2, ctl2))["controller"]
    for key in ("loader", "lr_coupler", "batch_size", "base_batch_size"):
        assert again[key] == first["controller"][key], key
    model3, _, ctl3 = build()
    model3.load_state_dict(first["model"])
    ctl3.load_state_dict(again)
    assert train(model3, ctl3) == 5 and ctl3.steps == 12


def test_a_batch_size_set_between_the_load_and_the_next_loader_call_is_the_resumed_runs():
    """Set after ``load_state_dict()`` and before the next ``loader()`` call, the batch size was dropped: it read back
    16 and the resumed run served 16. Now the resumed run is the uninterrupted one that changed it at the same step:
    ×2 under the linear rule, warmed up from the gain in force (1.0, then 1.1, 1.2, 1.3 over the ramp's 10 steps)."""
    model, _, ctl = build()
    saved, gains = [], []

    def save_and_double():
        saved.append(checkpoint(model, ctl))
        ctl.batch_size = 2 * BATCH
        gains.append(ctl.engine.batch_lr_gain)

    assert train(model, ctl, stop_after=7, on_stop=save_and_double) == 10  # the epoch's last 80 samples: 32, 32, 16
    model2, _, ctl2 = build()
    restore(model2, ctl2, torch.load(saved[0]))
    with pytest.raises(ValueError, match="batch_size=97 is more than the 96 training samples"):
        ctl2.batch_size = 97
    ctl2.batch_size = 2 * BATCH
    assert ctl2.batch_size == 2 * BATCH and ctl2.engine.batch_lr_gain == gains[0] == 1.0
    sizes, lr_gains = [], []
    for x, y in ctl2.loader(DATA, batch_size=BATCH, epochs=2):
        sizes.append(len(y))
        lr_gains.append(ctl2.engine.batch_lr_gain)
        ctl2.step(nn.functional.cross_entropy(model2(x), y))
    assert sizes == [32, 32, 16] and lr_gains == pytest.approx([1.0, 1.1, 1.2], abs=1e-12) and ctl2.steps == 10
    assert ctl2.lr_coupler.state_dict() == ctl.lr_coupler.state_dict() and ctl2.engine.batch_lr_gain == 1.3
    assert_same_weights(weights(model), model2)


@pytest.mark.parametrize("policy", ["fp32", "fp16"])  # fp16: the reference path's GradScaler state too
def test_a_resumed_run_is_the_uninterrupted_run(policy):
    state, resumed = resume_matches_an_uninterrupted_run(policy)
    scaler = state["controller"]["engine"]["scaler"]
    if policy == "fp32":
        assert scaler is None and resumed.engine.grad_scaler is None
    else:
        # GradScaler's defaults: scale 2**16, kept through 7 finite steps (it grows after 2000), 7 counted towards
        # the growth. The resumed scaler counts on from them: 12 after the 5 steps more (a fresh one would say 5).
        assert (scaler["scale"], scaler["_growth_tracker"]) == (2.0**16, 7)
        assert resumed.engine.grad_scaler.state_dict() == {**scaler, "_growth_tracker": 12}
    assert state["controller"]["loader"] == {"n": 96, "seed": 0, "epoch": 1, "cursor": 16, "samples_served": 112}


def test_without_the_controllers_state_the_resumed_run_differs():
    """The check above can fail: the model's weights alone lose the momentum and the data's place."""
    model, _, ctl = build()
    saved = []
    train(model, ctl, stop_after=7, on_stop=lambda: saved.append(checkpoint(model, ctl)))
    model2, _, ctl2 = build()
    model2.load_state_dict(torch.load(saved[0])["model"])
    train(model2, ctl2, epochs=1)
    assert not all(torch.equal(a, b) for a, b in zip(weights(model), weights(model2), strict=True))


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)",
)
@pytest.mark.parametrize("policy", ["fp32", "fp16"])
def test_on_the_fused_step_the_checkpoint_and_the_users_optimizer_hold_the_moments(monkeypatch, policy):
    class FusedEngine(StepEngine):  # the Controller picks the fused path only on CUDA by itself
        def __init__(self, model, optimizer, device, fused=None):
            super().__init__(model, optimizer, device, fused=True)

    monkeypatch.setattr(controller_module, "StepEngine", FusedEngine)
    state, resumed = resume_matches_an_uninterrupted_run(policy)
    engine_state = state["controller"]["engine"]
    assert engine_state["fused"] and engine_state["optimizer"]["kind"] == "sgd"
    assert engine_state["precisions"] == [int(Precision.parse(policy))] * 2
    # The loss scaler's state comes back too (here forced off its default, which these runs never leave).
    engine_state["scaler"] = {"scale": torch.tensor(1024.0), "clean_steps": torch.tensor(7, dtype=torch.int32)}
    _, _, other = build(policy)
    other.load_state_dict(state["controller"])
    assert (other.engine._scale.item(), other.engine._clean_steps.item()) == (1024.0, 7)
    flat = engine_state["optimizer"]["momentum_buffer"]
    assert flat.abs().sum() > 0  # 7 steps of momentum, saved
    # The user's optimizer (it never steps), saved the usual way, holds the fused moments in torch.optim's layout.
    optimizer, store = resumed.engine.optimizer, resumed.engine.store
    users = optimizer.state_dict()["state"]
    assert sorted(users) == list(range(len(optimizer.param_groups[0]["params"]))), users.keys()
    live = resumed.engine.fused_optimizer.momentum_buffer
    views = [view for layer in range(store.n_layers) for view in store.param_views(live, layer)]
    assert len(views) == len(users)
    for i, view in enumerate(views):
        assert torch.equal(users[i]["momentum_buffer"], view)


def test_the_knobs_come_back_as_they_were():
    """Precisions, LR multiplier, a grown batch and its LR warm-up, as the policy left them."""
    model, _, ctl = build("heuristic", ControllerConfig(interval_steps=50))
    stream = iter(ctl.loader(DATA, batch_size=BATCH, epochs=3))
    for _ in range(3):
        x, y = next(stream)
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss)
    lowered = [Precision.BF16, Precision.FP32]
    ctl.engine.set_precisions(lowered)
    ctl.engine.lr_scale = 0.75
    ctl.batch_size = 32  # x2: the linear rule's LR gain warms up from 1 to 2 over the next steps
    assert ctl.lr_coupler.warming_up
    state = torch.load(checkpoint(model, ctl))

    model2, _, ctl2 = build("heuristic", ControllerConfig(interval_steps=50))
    restore(model2, ctl2, state)
    assert ctl2.engine.precision.precisions == lowered and ctl2.engine.lr_scale == 0.75
    x, _ = next(iter(ctl2.loader(DATA, batch_size=BATCH, epochs=3)))
    assert len(x) == 32 and ctl2.batch_size == 32
    assert ctl2.lr_coupler.state_dict() == ctl.lr_coupler.state_dict()  # mid-ramp, where it was


def test_a_finished_speed_trial_is_not_run_again():
    config = ControllerConfig(
        interval_steps=4, cost_mode=CostMode.MEASURED, heuristic=HeuristicConfig(speed_trial=True, speed_trial_steps=1)
    )
    model, _, ctl = build("heuristic", config)
    train(model, ctl, epochs=2)  # 12 steps: the trial took the first 6
    assert ctl.speed_trial and ctl._trial is None
    state = torch.load(checkpoint(model, ctl))
    _, _, ctl2 = build("heuristic", config)
    assert ctl2._trial is not None  # a new controller would start one
    ctl2.load_state_dict(state["controller"])
    assert ctl2._trial is None and ctl2.speed_trial == ctl.speed_trial
    assert ctl2.policy.low_precision is ctl.policy.low_precision
    assert ctl2.engine.precision.precisions == ctl.engine.precision.precisions


def _steps(model, ctl, n):
    for step, (x, y) in enumerate(ctl.loader(DATA, batch_size=BATCH, epochs=3), start=1):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss)
        if step == n:
            return


@pytest.mark.parametrize("rewound_after", [2, 9], ids=["mid-trial", "after-the-trial"])
def test_a_running_speed_trial_starts_over_when_loaded_into_the_controller_that_saved_it(rewound_after):
    """Rewound within one process, the controller carried its own trial on (its format and the timings taken after the
    checkpoint), or, its trial over since, never ran one again and kept the format chosen after the checkpoint."""
    config = ControllerConfig(
        interval_steps=4, cost_mode=CostMode.MEASURED, heuristic=HeuristicConfig(speed_trial=True, speed_trial_steps=1)
    )
    model, _, ctl = build("heuristic", config)
    _steps(model, ctl, 1)
    state = torch.load(checkpoint(model, ctl))
    assert state["controller"]["trial_running"]
    _, _, fresh = build("heuristic", config)
    fresh.load_state_dict(state["controller"])  # a new controller: the trial from its first format
    expected = (fresh._trial.candidate, fresh._trial.index, fresh._trial.steps_done, fresh._trial.step_ms)
    _steps(model, ctl, rewound_after)  # on to the second format, or past the trial's end (6 steps)
    assert (ctl._trial is None) == (rewound_after == 9)
    assert (ctl._trial.index, ctl._trial.steps_done) != expected[1:3] if ctl._trial else ctl.speed_trial
    restore(model, ctl, state)
    assert ctl._trial is not None
    assert (ctl._trial.candidate, ctl._trial.index, ctl._trial.steps_done, ctl._trial.step_ms) == expected
    assert ctl.speed_trial == {} and ctl.policy.low_precision is fresh.policy.low_precision
    assert ctl.engine.precision.precisions == fresh.engine.precision.precisions


def test_bad_checkpoints_and_resumes_are_refused_clearly():
    model, _, ctl = build()
    train(model, ctl, epochs=1)
    state = ctl.state_dict()
    with pytest.raises(ValueError, match=r"checkpoint format None is not this version's \(2\) or 1"):
        build()[2].load_state_dict({"engine": state["engine"]})
    fresh = build()[2]
    with pytest.raises(ValueError, match=r"the checkpoint lacks steps, loader: pass the dict Controller.state_dict"):
        fresh.load_state_dict({k: v for k, v in state.items() if k not in ("steps", "loader")})
    assert fresh.steps == 0 and fresh._resume is None  # nothing of it was loaded (it raised a KeyError half-way)
    with pytest.raises(ValueError, match=r"is the dict Controller\.state_dict"):
        fresh.load_state_dict([("format", 1)])
    # optional: rollbacks_in_a_row reads 0 if absent, a checkpoint without its policy loads unchecked, and one without
    # the policy's run state starts the policy's run afresh
    optional = {"format", "rollbacks_in_a_row", "policy", "policy_run_state"}
    assert set(state) == {*optional, *controller_module._CHECKPOINT_KEYS}
    assert state["policy_run_state"] is None  # a static policy carries nothing between decisions
    with pytest.raises(ValueError, match="made with the fused step, before its state was also saved"):
        build()[2].engine.load_state_dict({**state["engine"], "fused": True})
    with pytest.raises(ValueError, match="the checkpoint has 2 layers; this model has 3"):
        torch.manual_seed(0)
        deeper = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        other = ta.Controller(deeper, torch.optim.SGD(deeper.parameters(), lr=0.1, momentum=0.9), policy="fp32")
        other.load_state_dict(state)
    torch.manual_seed(0)
    same = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    adamw = ta.Controller(same, torch.optim.AdamW(same.parameters(), lr=0.1), policy="fp32")
    with pytest.raises(ValueError, match="the checkpoint's optimizer is SGD; this controller's is AdamW"):
        adamw.load_state_dict(state)  # once torch's own KeyError: 'step', from inside the load
    assert adamw.steps == 0 and not adamw.engine.optimizer.state
    with pytest.raises(ValueError, match=r"state 'momentum_buffer' of parameter 0 has shape \(16, 8\); this model's "
                       r"parameter has \(32, 8\): it was saved for another model"):  # fmt: skip
        build(width=32)[2].load_state_dict(state)  # as many layers, other widths
    _, _, resumed = build()
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match=r"loader\(batch_size=32\) after a resume; .* started at batch_size=16"):
        next(iter(resumed.loader(DATA, batch_size=32, epochs=2)))
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="the loader state is of 96 samples with seed 0; this loader has 48 samples"):
        next(iter(resumed.loader((DATA[0][:48], DATA[1][:48]), batch_size=BATCH, epochs=2)))


def _adaptive_run(lr=0.5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return model, ta.Controller(model, optimizer, policy="heuristic", config=ControllerConfig(interval_steps=2))


def _resumed(saved, signals=True):
    """A new run from the checkpoint in ``saved``; without ``signals``, as a format-1 checkpoint (none saved)."""
    saved.seek(0)
    state = torch.load(saved)
    if not signals:
        del state["controller"]["signals"]
        state["controller"]["format"] = 1
    model, ctl = _adaptive_run()
    restore(model, ctl, state)
    assert ctl.engine.precision.precisions == [Precision(p) for p in state["controller"]["engine"]["precisions"]]
    return model, ctl


@pytest.mark.parametrize("fused", [False, True])
def test_an_adaptive_run_resumed_mid_interval_decides_as_the_uninterrupted_run(monkeypatch, fused):
    """The heuristic checkpointed 7 steps in (mid-interval: decisions every 2 steps), resumed into new objects: the
    same decisions at the same steps, and the same weights, as the run never interrupted. The signals' running
    estimates, the open interval's statistics and the cadence come back with it. On the fused step (Triton's
    interpreter here) the interval's applied updates are read from the device counter the checkpoint restores."""
    if fused:
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs a GPU or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)")

        class FusedEngine(StepEngine):
            def __init__(self, model, optimizer, device, fused=None):
                super().__init__(model, optimizer, device, fused=True)

        monkeypatch.setattr(controller_module, "StepEngine", FusedEngine)
    model, ctl = _adaptive_run()
    assert ctl.engine.fused is fused
    saved = []
    assert train(model, ctl, epochs=4, stop_after=7, on_stop=lambda: saved.append(checkpoint(model, ctl))) == 24
    decided = [(d.lr_scale, d.batch_size, d.precisions) for d in ctl.decisions]
    assert len(decided) == 12

    model2, ctl2 = _resumed(saved[0])
    assert train(model2, ctl2, epochs=4) == 24 - 7
    assert [(d.lr_scale, d.batch_size, d.precisions) for d in ctl2.decisions] == decided[3:]  # at steps 8, 10, ...
    assert_same_weights(weights(model), model2)


def test_without_the_signals_a_resumed_adaptive_run_decides_otherwise():
    """The control for the test above: a format-1 checkpoint (no signals) still loads, but the resumed run starts
    its loss trend afresh, reads the first interval's loss against nothing, cuts the LR the uninterrupted run never
    cut, and trains to other weights."""
    model, ctl = _adaptive_run()
    saved = []
    train(model, ctl, epochs=4, stop_after=7, on_stop=lambda: saved.append(checkpoint(model, ctl)))
    assert {d.lr_scale for d in ctl.decisions} == {1.0}
    model2, ctl2 = _resumed(saved[0], signals=False)
    train(model2, ctl2, epochs=4)
    assert len(ctl2.decisions) == (24 - 7) // 2  # counted from the resume: its interval starts anew
    assert 0.75 in {d.lr_scale for d in ctl2.decisions}
    assert not all(torch.equal(a, b) for a, b in zip(weights(model), weights(model2), strict=True))


def test_a_format_1_checkpoint_loaded_into_a_controller_that_trained_on_resumes_as_into_a_new_one():
    """A format-1 checkpoint holds no signals: they start afresh. Before the fix a controller that had trained past it
    and was rewound to it kept its own estimates, groups and cadence (its collector's step count, loss EMA, ...), and
    decided otherwise than a new controller loading the same checkpoint."""
    model, ctl = _adaptive_run()
    saved = []
    train(model, ctl, epochs=4, stop_after=7, on_stop=lambda: saved.append(checkpoint(model, ctl)))
    runs = []
    for rewound in (False, True):
        saved[0].seek(0)
        state = torch.load(saved[0])
        del state["controller"]["signals"]
        state["controller"]["format"] = 1
        if not rewound:
            model, ctl = _adaptive_run()
        restore(model, ctl, state)
        train(model, ctl, epochs=4)
        runs.append(([(d.lr_scale, d.batch_size, d.precisions) for d in list(ctl.decisions)[-8:]], weights(model)))
    (fresh, fresh_weights), (rewound_decisions, _) = runs
    assert rewound_decisions == fresh
    assert_same_weights(fresh_weights, model)


def test_after_a_resume_the_rollback_copy_is_the_loaded_state():
    """A rollback right after ``load_state_dict`` goes back to the resumed state, not to the freshly built model; the
    copy waits for an update to confirm it, as one taken at a configuration change does."""
    model, _, ctl = build()
    saved = []
    train(model, ctl, stop_after=7, on_stop=lambda: saved.append(checkpoint(model, ctl)))
    model2, _, ctl2 = build()
    state = torch.load(saved[0])
    restore(model2, ctl2, state)
    assert not ctl2.guard.has_confirmed
    copy = ctl2.guard._unconfirmed.model.tree()
    for name, value in model2.state_dict().items():
        assert torch.equal(copy[name], value), name


def test_a_checkpoint_of_more_layer_groups_is_refused_naming_n_groups():
    """It was refused with only "the layer grouper's state has groups outside 0..1: [...]", no word of the config."""

    def four_layers(n_groups):
        torch.manual_seed(0)
        widths = [8, 16, 16, 16]
        layers = [m for a, b in itertools.pairwise(widths) for m in (nn.Linear(a, b), nn.ReLU())]
        model = nn.Sequential(*layers, nn.Linear(16, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, ta.Controller(
            model, optimizer, policy="heuristic", config=ControllerConfig(n_groups=n_groups, interval_steps=2)
        )

    model, ctl = four_layers(4)
    saved = []
    train(model, ctl, stop_after=7, on_stop=lambda: saved.append(checkpoint(model, ctl)))
    state = torch.load(saved[0])
    assert max(state["controller"]["signals"]["grouper"]["assignment"]) >= 2  # layers in groups the other lacks
    model2, ctl2 = four_layers(2)
    steps = ctl2.steps
    with pytest.raises(ValueError, match=r"saved with more groups than n_groups=2 \(ControllerConfig\.n_groups"):
        restore(model2, ctl2, state)
    assert ctl2.steps == steps


BLOW_UP_STEP = 9  # its loss is finite, x 1e30: the update sends the weights to inf, every later loss NaN


def _blow_up_run(save_at=None, blow_up=True):
    """A run whose 9th update breaks the model (intervals of 2 steps, a copy at each; ``blow_up=False``: a healthy
    run): the losses it trained on, or with ``save_at`` the checkpoint after that many steps."""
    model, _, ctl = build(config=ControllerConfig(interval_steps=2, snapshot_every=1))
    losses = []
    for x, y in ctl.loader(DATA, batch_size=BATCH, epochs=3):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        if ctl.steps + 1 == BLOW_UP_STEP and blow_up:
            loss = loss * 1e30
        ctl.step(loss)
        losses.append(float(loss.detach()))
        if ctl.steps == save_at:
            return model, ctl, torch.load(checkpoint(model, ctl))
    return model, ctl, losses


@pytest.mark.parametrize("save_at", [9, 10, 11])
def test_a_checkpoint_of_a_broken_state_raises_where_it_rolled_back_to_itself_forever(save_at):
    """Saved between the update that broke the model and the rollback it would have brought (here after steps 9-11):
    the resumed run took the loaded state as good, restored it at every rollback (13 of them) and trained on NaN
    losses to its end, with a warning a rollback. Now the loaded state waits for an update to confirm it, and two
    failures from it raise. The uninterrupted run, with its earlier copy, recovers."""
    _, ctl, losses = _blow_up_run()
    assert ctl.rollbacks == 1 and math.isfinite(losses[-1])  # the uninterrupted run
    _, _, state = _blow_up_run(save_at=save_at)
    model2, _, ctl2 = build(config=ControllerConfig(interval_steps=2, snapshot_every=1))
    restore(model2, ctl2, state)
    with pytest.raises(
        ta.NoGoodStateError, match=r"non-finite loss in two intervals after the resume.*earlier checkpoint"
    ):
        train(model2, ctl2, epochs=3)
    assert ctl2.rollbacks == 1  # the loaded state, restored once


def test_a_checkpoint_of_a_model_with_non_finite_running_statistics_is_refused_at_load():
    """A NaN batch at step 9 wrote NaN batch-norm statistics (its step skipped), and the checkpoint came right after:
    the resumed run confirmed that copy at its first interval end (updates went in) and restored it, NaN statistics
    included, at every interval after (11 rollbacks, no weight moved, no error). No rollback can repair a model loaded
    broken: the load refuses it, before anything of the controller's loads."""

    def build_bn():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        config = ControllerConfig(interval_steps=2, snapshot_every=1)
        return model, ta.Controller(model, optimizer, policy="fp32", config=config)

    model, ctl = build_bn()
    for x, y in ctl.loader(DATA, batch_size=BATCH, epochs=2):
        if ctl.steps + 1 == 9:
            x = x * float("nan")
        ctl.step(nn.functional.cross_entropy(model(x), y))
        if ctl.steps == 9:
            state = torch.load(checkpoint(model, ctl))
            break
    assert not torch.isfinite(state["model"]["1.running_mean"]).all()
    model2, ctl2 = build_bn()
    with pytest.raises(ta.NoGoodStateError, match=r"^the model's 1\.running_mean, 1\.running_var hold NaN or infinite"):
        restore(model2, ctl2, state)
    assert ctl2.steps == 0 and ctl2._resume is None  # nothing of the controller's loaded


def test_a_checkpoint_of_a_model_with_an_infinite_trained_weight_is_refused_but_a_frozen_one_is_not():
    """Weights are checked as buffers are; a frozen parameter may hold -inf by design (an additive mask), in every
    checkpoint of the run: "resume from an earlier checkpoint" could not help there."""
    model, _, ctl = build()
    train(model, ctl)
    state = torch.load(checkpoint(model, ctl))
    state["model"]["2.weight"][0, 0] = float("inf")
    model2, _, ctl2 = build()
    with pytest.raises(ta.NoGoodStateError, match=r"^the model's 2\.weight hold NaN or infinite"):
        restore(model2, ctl2, state)
    model3, _, ctl3 = build()
    model3[2].weight.requires_grad_(False)  # frozen: the check passes it by
    restore(model3, ctl3, state)
    assert ctl3.steps == state["controller"]["steps"] == 12  # loaded


def test_a_resumed_run_rolls_back_to_the_loaded_state_and_trains_on():
    """A healthy checkpoint whose next interval is non-finite (bad data, not a bad state): restored once, then it trains
    on, and an update confirms the copy."""
    _, _, state = _blow_up_run(save_at=4, blow_up=False)
    model, _, ctl = build(config=ControllerConfig(interval_steps=2, snapshot_every=1))
    restore(model, ctl, state)
    losses = []
    for x, y in ctl.loader(DATA, batch_size=BATCH, epochs=3):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        if ctl.steps in (4, 5):  # the first interval after the resume
            loss = loss * float("nan")
        ctl.step(loss)
        losses.append(float(loss.detach()))
    assert ctl.rollbacks == 1 and ctl.steps == 18 and ctl.guard.has_confirmed
    assert all(math.isfinite(value) for value in losses[2:])


def test_a_resumed_runs_rollback_warning_counts_on_from_the_checkpoints_rollbacks(caplog):
    """The guard's count, which its warning prints, was not restored: "(rollback 1)" while ``ctl.rollbacks`` was 3."""
    _, _, state = _blow_up_run(save_at=4, blow_up=False)
    state["controller"]["rollbacks"] = 2  # as a run that rolled back twice saves it
    model, _, ctl = build(config=ControllerConfig(interval_steps=2, snapshot_every=1))
    restore(model, ctl, state)
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        for x, y in ctl.loader(DATA, batch_size=BATCH, epochs=1):
            loss = nn.functional.cross_entropy(model(x), y)
            ctl.step(loss * float("nan"))  # steps 5 and 6: the first interval after the resume
    assert ctl.rollbacks == ctl.guard.rollbacks == 3
    assert "rolled back to the last good state (rollback 3)" in caplog.text


def test_loading_a_checkpoint_inside_the_loop_stops_the_open_iterator():
    """A loop that reloads its last checkpoint on a loss spike: the open iterator went on from its own place (the
    checkpoint's batches at cursor 32-64 never trained), the resume stayed pending, a later state_dict() saved the
    stale place, and the next loader() call trained about 2.7 epochs where 1 was asked."""
    model, _, ctl = build()
    saved = []
    steps = 0
    with pytest.raises(RuntimeError, match=r"load_state_dict\(\) was called while this loader\(\) iterator was open"):
        for x, y in ctl.loader(DATA, batch_size=BATCH, epochs=2):
            ctl.step(nn.functional.cross_entropy(model(x), y))
            steps += 1
            if steps == 2:
                saved.append(checkpoint(model, ctl))
            if steps == 4:
                restore(model, ctl, torch.load(saved[0]))
    assert steps == 4 and ctl.steps == 2
    assert train(model, ctl, epochs=2) == 10  # from the checkpoint's place: the rest of the two epochs
    assert ctl.steps == 12


def _equal(a, b):
    """Deep equality of nested checkpoint values, tensors compared exactly, NaN equal to NaN."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):  # an estimate not made yet
        return isinstance(b, float) and math.isnan(b)
    return a == b


def _kept(model, ctl):
    """A copy of everything the controller keeps, less the clock (the open interval's training time so far)."""
    state = torch.load(checkpoint(model, ctl))["controller"]
    del state["signals"]["interval_ms"]
    return state


def _set(state, path, value):
    for key in path[:-1]:
        state = state[key]
    state[path[-1]] = value


def _two_steps_in():
    """An fp16 run two steps in, and the rest of its batches."""
    model, _, ctl = build("fp16")
    stream = iter(ctl.loader(DATA, batch_size=BATCH, epochs=2))
    for x, y in itertools.islice(stream, 2):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss)
    return model, ctl, stream


def _train_on(model, ctl, stream):
    for x, y in stream:
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss)


@pytest.fixture(scope="module")
def fp16_checkpoint_and_control():
    """A checkpoint 7 steps into an fp16 run, and the weights of a run trained on from two steps in, never given it."""
    model, _, ctl = build("fp16")
    train(model, ctl, stop_after=7, on_stop=lambda: None)
    state = torch.load(checkpoint(model, ctl))["controller"]
    model, ctl, stream = _two_steps_in()
    _train_on(model, ctl, stream)
    assert ctl.steps == 12
    return state, weights(model)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        # Before the fix these raised from int() or dict() after the engine (optimizer, precisions, scaler) had loaded.
        (("steps",), "seven", r"the checkpoint's steps 'seven' is not a whole number >= 0"),
        (("skipped_steps",), None, r"skipped_steps None is not a whole number >= 0"),
        (("rollbacks",), [1], r"rollbacks \[1\] is not a whole number >= 0"),
        (("speed_trial",), 5, r"the checkpoint's speed_trial 5 is not a dict of timings"),
        # Before the fix these loaded: int() truncated or took them, or a string counted as True.
        (("steps",), 7.5, r"steps 7\.5 is not a whole number >= 0"),
        (("steps",), -3, r"steps -3 is not a whole number >= 0"),
        (("batch_size",), "16", r"batch_size '16' is not a whole number >= 1"),
        (("trial_running",), "no", r"trial_running 'no' is not a bool"),
        (("low_precision",), 9, r"low_precision 9 is not a precision code \(1, 2\) or None"),
        (("initial_precision",), 9, r"initial_precision 9 is not a precision code \(0, 1, 2\) or None"),
        # Before the fix these loaded: fp32 as the heuristic's 16-bit format (it never lowered a layer again), more
        # skipped steps than steps, and a batch larger than the dataset (the batch_size setter refuses it).
        (("low_precision",), 0, r"low_precision 0 is not a precision code \(1, 2\) or None"),
        (("skipped_steps",), 13, r"the checkpoint's skipped_steps 13 is more than its steps 12"),
        (("batch_size",), 10**6, r"the checkpoint's batch_size 1000000 is more than its dataset's \d+ samples"),
        (("base_batch_size",), 10**6, r"the checkpoint's base_batch_size 1000000 is more than its dataset's"),
        (("speed_trial",), {"bf16": "fast"}, r"speed_trial \{'bf16': 'fast'\} is not a dict of timings"),
        # Before the fix the loader's and LR coupler's states were first read at the next loader() call: a bare
        # TypeError, KeyError or AttributeError there, with the engine loaded long before; some loaded silently.
        (("batch_size",), 0, r"batch_size 0 is not a whole number >= 1"),
        (("base_batch_size",), None, r"base_batch_size None is not a whole number >= 1"),
        (("loader",), "x", r"a loader state is the dict ElasticLoader.state_dict\(\) returned; got str"),
        (("loader", "cursor"), 16.7, r"the loader state's 'cursor' is 16\.7, not a whole number"),
        (("loader", "epoch"), -1, r"the loader state's epoch -1 is negative"),
        (("lr_coupler",), "x", r"the LR coupler's state is the dict BatchLRCoupler.state_dict\(\) returned"),
        (("lr_coupler", "gain"), "1", r"the LR coupler's state has gain '1', not a finite number > 0"),
        (("lr_coupler", "rule"), "sqrt", r"the LR coupler's state is for rule 'sqrt' at base batch 16; this one is "),
        # The signals (since format 2): each part checked before anything is loaded.
        (("signals",), "x", r"the checkpoint's signals must be the dict its state_dict\(\) returned; got str"),
        (("signals", "collector", "sq_ema"), [1.0], r"collector's state has sq_ema \[1\.0\], not a list of 2 numbers"),
        (("signals", "collector", "loss_ema"), math.inf, r"collector's state has loss_ema inf, not a finite number or"),
        # Before the fix these raised a bare OverflowError (an int past float's range)
        (("signals", "collector", "loss_ema"), 10**400, r"collector's state has loss_ema 10+, not a finite number"),
        (("signals", "collector", "sq_ema"), [10**400, 1.0], r"collector's state has sq_ema with a value that is not"),
        (("signals", "collector", "interval_skipped"), 99, r"interval_skipped 99 > interval_steps 0"),
        (("signals", "grouper", "assignment"), [5, 0], r"grouper's state has groups outside 0\.\.3: \[5\.0, 0\.0\]"),
        (("signals", "cadence", "expedite"), 3, r"the cadence's state has expedite 3, not 0, 1 or 2"),
        (("signals", "cadence", "costs"), [-1.0], r"the cadence's state has costs with a negative value"),
        (("signals", "moments", "layer_rows"), torch.zeros(1, 5), r"layer_rows \(1, 5\), not None or a float tensor"),
        (
            ("signals", "moments", "observed"),
            1,
            r"12 rows, observed 1 and calls 12: expected rows <= observed <= calls",
        ),
        (("signals", "interval_applied"), 13, r"interval_applied 13 > interval_steps 12"),
        (("signals", "noise_scale"), -1.0, r"noise_scale -1\.0, not a finite number >= 0\.0"),
        # Refused by the engine before and after: the control that its checks still run first.
        (("engine", "scaler", "scale"), "x", r"the checkpoint's scaler has scale 'x', not a normal float32 > 0"),
        (("engine", "optimizer", "state", 0, "momentum_buffer"), "x", r"'momentum_buffer' of parameter 0 is str"),
    ],
)
def test_a_corrupt_field_is_refused_by_name_before_anything_is_loaded(
    fp16_checkpoint_and_control, path, value, message
):
    """A checkpoint with one field of the wrong type or range: refused with the field named, and the controller, its
    engine, optimizer and loss scaler left as they were: the run trains on exactly as one never given it."""
    good, control = fp16_checkpoint_and_control
    state = copy.deepcopy(good)
    _set(state, path, value)
    model, ctl, stream = _two_steps_in()
    saved = _kept(model, ctl)
    with pytest.raises(ValueError, match=message):
        ctl.load_state_dict(state)
    assert _equal(_kept(model, ctl), saved)
    assert ctl._resume is None
    _train_on(model, ctl, stream)
    assert ctl.steps == 12
    for a, b in zip(weights(model), control, strict=True):
        assert torch.equal(a, b)


def test_a_synthetic_task_run_resumed_mid_epoch_is_the_uninterrupted_run_step_for_step(tmp_path):
    """The ``synthetic`` task in a user's loop with AdamW, a OneCycleLR stepped by the loop, clipping and fp16 loss
    scaling; checkpointed mid-epoch and mid-interval to a file, resumed into new objects: every step's samples, LR,
    batch size and precisions, and the final weights, are the uninterrupted run's (a short last batch included)."""
    task = get_task("synthetic", optimizer="adamw", base_lr=3e-3)
    data = task.data(seed=0)
    x_all, y_all = data.train_x[:200], data.train_y[:200]  # batches of 32: 6 full and one of 8 an epoch
    row = {bytes(x.numpy()): i for i, x in enumerate(x_all)}
    epochs, stop = 3, 10

    def build():
        torch.manual_seed(0)
        model = task.build_model()
        optimizer = task.make_optimizer(model.parameters())
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=7 * epochs)
        ctl = ta.Controller(
            model, optimizer, policy="fp16", max_grad_norm=1.0, config=ControllerConfig(interval_steps=4)
        )
        return model, optimizer, schedule, ctl

    def run(model, optimizer, schedule, ctl, log, stop_after=None):
        for x, y in ctl.loader((x_all, y_all), batch_size=32, epochs=epochs):
            with ctl.autocast():
                loss = task.loss_fn(model(x), y)
            ctl.step(loss)
            schedule.step()
            log.append(([row[bytes(r.numpy())] for r in x], ctl.lr, ctl.batch_size, ctl.precisions))
            if ctl.steps == stop_after:
                parts = {"model": model, "optimizer": optimizer, "schedule": schedule, "controller": ctl}
                torch.save({name: part.state_dict() for name, part in parts.items()}, tmp_path / "run.pt")
                return

    uninterrupted: list = []
    model, *rest = build()
    run(model, *rest, uninterrupted)
    first: list = []
    run(*build(), first, stop_after=stop)
    state = torch.load(tmp_path / "run.pt")
    resumed_model, optimizer, schedule, ctl = build()
    resumed_model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    ctl.load_state_dict(state["controller"])
    second: list = []
    run(resumed_model, optimizer, schedule, ctl, second)

    assert len(first) == stop and first + second == uninterrupted  # samples, LRs, batch sizes, precisions
    order = [i for indices, *_ in uninterrupted for i in indices]
    assert all(sorted(order[e * 200 : (e + 1) * 200]) == list(range(200)) for e in range(epochs))
    assert len({lr for _, lr, *_ in uninterrupted}) > 10  # the schedule moved the LR at every step
    assert_same_weights(weights(model), resumed_model)


def test_a_truncated_checkpoint_file_fails_to_load_before_it_reaches_the_controller(tmp_path):
    model, _, ctl = build()
    train(model, ctl, epochs=1)
    path = tmp_path / "run.pt"
    torch.save({"model": model.state_dict(), "controller": ctl.state_dict()}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(RuntimeError, match="failed finding central directory"):
        torch.load(path)


def test_a_checkpoint_from_before_any_loader_call_starts_the_data_afresh():
    """Loaded into a controller that had trained since, it rewound the steps to 0 but kept the loader's place: the
    next loader() call refused ("has trained 2 epochs") or carried on mid-data. Now the run is the fresh one's."""
    model, _, ctl = build()
    start = torch.load(checkpoint(model, ctl))
    assert start["controller"]["loader"] is None
    train(model, ctl, epochs=2)
    fresh_model, _, fresh = build()
    train(fresh_model, fresh, epochs=2)
    restore(model, ctl, start)
    assert train(model, ctl, epochs=2) == 12 and ctl.steps == 12
    assert_same_weights(weights(model), fresh_model)


def test_a_resumed_loader_refuses_epochs_the_run_has_trained_as_the_same_process_does():
    """After a resume, loader(epochs=1) on a run that had trained 2 served nothing, silently (as the same process
    would not: it raises)."""
    data = torch.randn(40, 4), torch.randint(0, 2, (40,))

    def make():
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        return model, ta.Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="fp32")

    model, ctl = make()
    for x, y in ctl.loader(data, batch_size=8, epochs=2):
        ctl.step(nn.functional.cross_entropy(model(x), y))
    state = ctl.state_dict()
    _, ctl2 = make()
    ctl2.load_state_dict(state)
    with pytest.raises(ValueError, match=r"loader\(epochs=1\): the checkpoint.s run has trained 2 epochs .* epochs=3"):
        next(ctl2.loader(data, batch_size=8, epochs=1))
    served = sum(1 for _ in ctl2.loader(data, batch_size=8, epochs=3))  # the refusal consumed nothing
    assert served == 5


def test_a_checkpoint_taken_after_an_epochs_last_step_counts_that_epoch_as_trained():
    """Inside the loop after the last step the loader sits at the epoch's end (epoch 0, cursor 40), not at epoch 1:
    loader(epochs=1) on it served nothing, silently, resumed or in the same process."""
    data = torch.randn(40, 4), torch.randint(0, 2, (40,))
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    ctl = ta.Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="fp32")
    for x, y in ctl.loader(data, batch_size=8, epochs=1):
        ctl.step(nn.functional.cross_entropy(model(x), y))
        state = ctl.state_dict()
        if ctl.steps == 5:
            break
    assert {k: state["loader"][k] for k in ("epoch", "cursor")} == {"epoch": 0, "cursor": 40}
    with pytest.raises(ValueError, match=r"the run has trained 1 epochs .* pass epochs=2"):
        next(ctl.loader(data, batch_size=8, epochs=1))
    ctl.close()  # a second Controller over the same model is refused while the first is open
    resumed = ta.Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="fp32")
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match=r"the checkpoint's run has trained 1 epochs .* pass epochs=2"):
        next(resumed.loader(data, batch_size=8, epochs=1))


def test_a_resumed_controller_saves_what_it_loaded():
    """The rollback count and the noise scale (the adascale rule reads it at the next batch change) were not
    checked on resume: dropping either assignment in load_state_dict went unnoticed."""
    config = ControllerConfig(interval_steps=4)
    model, _, ctl = build(policy="heuristic", config=config)
    train(model, ctl, epochs=1)
    state = copy.deepcopy(ctl.state_dict())
    state["rollbacks"] = 2  # as a run that rolled back twice saves it
    state["signals"]["noise_scale"] = 123.0
    model2, _, ctl2 = build(policy="heuristic", config=config)
    model2.load_state_dict(model.state_dict())
    ctl2.load_state_dict(state)
    again = ctl2.state_dict()
    assert again["rollbacks"] == ctl2.rollbacks == 2
    assert again["signals"]["noise_scale"] == 123.0


def test_a_checkpoint_whose_layers_run_bf16_resumes_in_fp16_on_a_gpu_without_bf16(request, caplog):
    """The engine's check refused the checkpoint's bf16 layers on a V100 or T4 (the move to fp16 touched only the
    policy): a checkpoint of a heuristic run (its layers start in bf16) could not be resumed there."""
    config = ControllerConfig(interval_steps=4)
    model, _, ctl = build("heuristic", config)
    saved: list = []
    train(model, ctl, epochs=1, stop_after=2, on_stop=lambda: saved.append(torch.load(checkpoint(model, ctl))))
    state = saved[0]
    assert state["controller"]["engine"]["precisions"] == [int(Precision.BF16)] * 2
    request.getfixturevalue("gpu_without_bf16")
    model2, _, resumed = build("heuristic", config)
    with caplog.at_level("INFO", logger="triaccel_rl"):
        restore(model2, resumed, state)
    assert resumed.precisions == [Precision.FP16] * 2
    assert "the checkpoint's layers in bf16 run in fp16 instead" in caplog.text
    assert state["controller"]["engine"]["precisions"] == [int(Precision.BF16)] * 2  # the checkpoint is not touched
    assert train(model2, resumed, epochs=1) == 4  # the rest of the epoch, in fp16 or fp32
    assert all(Precision.BF16 not in d.precisions for d in resumed.decisions)


def test_a_checkpoint_taken_mid_trial_resumed_where_no_trial_runs_starts_where_the_trials_end_would():
    """Resumed where no trial runs (a GPU checkpoint on the CPU), the layers stayed in the trial's candidate format
    (fp16 here) the whole run, the policy lowering to bf16 beside them."""
    trial = ControllerConfig(
        interval_steps=4, cost_mode=CostMode.MEASURED, heuristic=HeuristicConfig(speed_trial=True, speed_trial_steps=1)
    )
    model, _, ctl = build("heuristic", trial)
    _steps(model, ctl, 4)
    assert ctl._trial is not None and ctl._trial.candidate is Precision.FP16
    state = torch.load(checkpoint(model, ctl))
    assert state["controller"]["engine"]["precisions"] == [int(Precision.FP16)] * 2
    model2, _, resumed = build("heuristic", ControllerConfig(interval_steps=4))  # the CPU's default: no trial
    assert resumed._trial is None
    restore(model2, resumed, state)
    assert resumed._trial is None and resumed.policy.initial_precision is Precision.BF16
    assert resumed.precisions == [Precision.BF16] * 2


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)",
)
@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        # Before the fix a NaN count loaded (then "cannot convert float NaN to integer", the controller half loaded);
        # negative or fractional counts loaded (AdamW's weights went non-finite).
        ("steps", torch.full((3,), math.nan, dtype=torch.float64), r"steps holds \[nan, nan, nan\]: step counts are"),
        ("steps", torch.full((3,), -1.0, dtype=torch.float64), r"steps holds \[-1\.0, -1\.0, -1\.0\]: step counts"),
        ("steps", torch.tensor([3.0, 2.5, 3.0], dtype=torch.float64), r"steps holds \[3\.0, 2\.5, 3\.0\]: step counts"),
        ("steps_before_momentum", torch.tensor([-1.0, 0.0], dtype=torch.float64), r"steps_before_momentum holds \[-1"),
        # Before the fix these raised a TypeError, SyntaxError or AttributeError naming no field (some after loading).
        ("steps", "abc", r"checkpoint's steps 'abc' is not numbers"),
        ("steps_before_momentum", "x", r"checkpoint's steps_before_momentum 'x' is not numbers"),
        ("param_layout", "((1,2", r"checkpoint's param_layout '\(\(1,2' is not the text of a parameter layout"),
        ("param_layout", "foo", r"checkpoint's param_layout 'foo' is not the text of a parameter layout"),
        ("layer_numels", 5, r"checkpoint's layer_numels 5 are not this store's \[144, 51\]"),
        ("options", "x", r"checkpoint's options 'x' are not SGDOptions's: a str, not a dict"),
        ("momentum_buffer", [0.0] * 195, r"checkpoint's momentum_buffer is a list, not a floating-point tensor"),
        ("momentum_buffer", torch.zeros(195, dtype=torch.int64), r"momentum_buffer is a torch.Tensor of torch.int64"),
        # Before the fix this loaded, the missing options taking their defaults (a weight decay of 0, silently).
        (
            "options",
            {"momentum": 0.9},
            r"are not SGDOptions's: it needs exactly momentum, dampening, weight_decay, nes",
        ),
    ],
)
def test_a_corrupt_fused_optimizer_field_is_refused_by_name_before_anything_is_loaded(
    monkeypatch, path, value, message
):
    """On the fused step, the fused optimizer's own state was checked by its load, after the controller's state had
    loaded, and its counts' values not at all. Now each damaged field is refused by name, and the controller, its
    engine and the fused optimizer are left exactly as they were."""

    class FusedEngine(StepEngine):
        def __init__(self, model, optimizer, device, fused=None):
            super().__init__(model, optimizer, device, fused=True)

    monkeypatch.setattr(controller_module, "StepEngine", FusedEngine)
    model, ctl, stream = _two_steps_in()
    _train_on(model, ctl, itertools.islice(stream, 1))  # a checkpoint three steps in, where this run is two in
    state = torch.load(checkpoint(model, ctl))["controller"]
    _set(state, ("engine", "optimizer", path), value)
    model, ctl, _ = _two_steps_in()
    saved = _kept(model, ctl)
    with pytest.raises(ValueError, match=message):
        ctl.load_state_dict(state)
    assert _equal(_kept(model, ctl), saved)
    assert ctl.engine.fused_optimizer.layer_step_counts.tolist() == [2.0, 2.0]


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)",
)
def test_a_fused_checkpoint_taken_after_adopting_an_earlier_runs_state_loads_again():
    """``optimizer.load_state_dict()`` on a fused engine brings the earlier run's layer counts (3) and leaves the
    model's (this run's updates) alone, so a layer's count is above the model's in the engine's own checkpoint. The
    count checks' first version refused that checkpoint: the run could not resume from its own state."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).to(device)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    earlier, earlier_optimizer = build()
    for _ in range(3):
        earlier_optimizer.zero_grad()
        earlier(torch.randn(8, 4, device=device)).square().mean().backward()
        earlier_optimizer.step()
    model, optimizer = build()
    engine = StepEngine(model, optimizer, device, fused=True)
    optimizer.load_state_dict(copy.deepcopy(earlier_optimizer.state_dict()))
    engine.backward_and_step(model(torch.randn(8, 4, device=device)).square().mean())
    state = copy.deepcopy(engine.state_dict())
    assert state["optimizer"]["steps"].tolist() == [1.0, 4.0, 4.0]
    resumed_model, resumed_optimizer = build()
    resumed = StepEngine(resumed_model, resumed_optimizer, device, fused=True)
    resumed.load_state_dict(state)
    assert resumed.fused_optimizer.state_dict()["steps"].tolist() == [1.0, 4.0, 4.0]
