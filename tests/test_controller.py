import contextlib
import copy
import functools
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from users_loop import controlled_loop, controlled_step, either_step, plain_loop, users_data

from triaccel_rl.config import ControllerConfig, ElasticConfig, HeuristicConfig
from triaccel_rl.controller import Controller
from triaccel_rl.errors import NoGoodStateError
from triaccel_rl.loader import ElasticLoader
from triaccel_rl.types import Precision


def data(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return x, y


def model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def train(ctl, model, epochs=2, batch_size=16):
    seen = []
    losses = []
    for x, y in ctl.loader(data(), batch_size=batch_size, epochs=epochs):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss)
        seen.append(len(y))
        losses.append(float(loss.detach()))
    return seen, losses


def test_static_bf16_runs_every_layer_in_bf16_from_the_first_step():
    """Every layer bf16 from the first step: the run is a plain loop under ``torch.autocast`` in bf16 over the same
    batches (``ElasticLoader``'s order for seed 0), loss for loss and weight for weight, bit for bit."""
    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy="bf16", config=ControllerConfig(interval_steps=4))
    assert ctl.precisions == [Precision.BF16] * 3
    seen, losses = train(ctl, model)
    assert seen == [16] * (2 * 512 // 16)
    plain, optimizer = model_and_optimizer()
    loader, plain_losses = ElasticLoader(*data(), seed=0), []
    for _ in seen:
        batch = loader.next(16)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(plain(batch.x), batch.y)
        loss.backward()
        optimizer.step()
        plain_losses.append(float(loss.detach()))
    assert losses == plain_losses
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters(), strict=True))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_heuristic_controller_decides_and_logs(tmp_path):
    model, opt = model_and_optimizer()
    ctl = Controller(
        model, opt, policy="heuristic", config=ControllerConfig(interval_steps=4, min_batch_size=8), log_dir=tmp_path
    )
    seen, losses = train(ctl, model, epochs=3)
    ctl.close()
    assert sum(seen) == 3 * 512  # every sample once per epoch, whatever the batch sizes
    assert len(ctl.decisions) == ctl.steps // 4
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert list(tmp_path.glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    lrs = [event.value for event in events.Scalars("controller/lr")]
    scales = [event.value for event in events.Scalars("controller/lr_scale")]
    assert len(lrs) == len(ctl.decisions)
    assert lrs[-1] == pytest.approx(ctl.lr, rel=1e-6) and scales[-1] == pytest.approx(ctl.engine.lr_scale, rel=1e-6)


def test_a_run_resumed_into_its_log_dir_drops_the_replaced_runs_points_past_the_checkpoint(tmp_path):
    """Resumed from step 4 after the first run wrote to step 8, TensorBoard read train/loss at 2, 4, 6, 8, 6, 8, 10:
    the replaced run's 6 and 8 beside the resumed run's. The resume's purge mark (at step 5) drops the first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def build():
        model, opt = model_and_optimizer()
        return model, Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=2), log_dir=tmp_path)

    model, ctl = build()
    for x, y in ctl.loader(data(n=160), batch_size=16):
        with ctl.autocast():
            ctl.step(nn.functional.cross_entropy(model(x), y))
        if ctl.steps == 4:
            saved = copy.deepcopy({"model": model.state_dict(), "controller": ctl.state_dict()})
        if ctl.steps == 8:  # the run stops (a crash) past its last checkpoint
            break
    ctl.close()
    (first,) = tmp_path.glob("events.out.tfevents.*")  # named as written earlier: within one second the writers'
    first.rename(tmp_path / "events.out.tfevents.0000000000.first")  # counters order them as text (10 before 9)
    model, ctl = build()
    model.load_state_dict(saved["model"])
    ctl.load_state_dict(saved["controller"])
    resumed = {}
    for x, y in ctl.loader(data(n=160), batch_size=16):
        with ctl.autocast():
            ctl.step(nn.functional.cross_entropy(model(x), y))
        if ctl.steps % 2 == 0:
            resumed[ctl.steps] = ctl.signals.loss
    ctl.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    points = [(event.step, event.value) for event in events.Scalars("train/loss")]
    assert [step for step, _ in points] == [2, 4, 6, 8, 10]
    assert [value for step, value in points if step > 4] == pytest.approx([resumed[6], resumed[8], resumed[10]])


def test_batch_growth_scales_lr_linearly():
    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=1000))
    loader = ctl.loader(data(), batch_size=16)
    next(loader)
    ctl.batch_size = 64
    assert ctl.lr == ctl.engine.group_lrs()[0] == pytest.approx(0.1 * 64 / 16)
    assert opt.param_groups[0]["lr"] == 0.1  # the optimizer keeps its own LR; the controller multiplies it


def test_adascale_takes_the_noise_scale_as_unknown_where_the_optimizer_keeps_no_running_mean():
    """Plain SGD keeps no running mean: the snapshot's noise scale is then the neutral guess of the batch size, which
    the adascale rule must not take for a measurement (a batch of 16 grown to 64 would raise the LR 1.6 times); an
    unknown noise scale gives the gain of 1 it gave before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=4), lr_rule="adascale")
    for step, (x, y) in enumerate(ctl.loader(data(), batch_size=16)):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss)
        if step == 3:
            break
    assert ctl.signals is not None and ctl.signals.extra["grad_mean_unknown_layers"] == ["0", "2"]
    assert ctl.signals.noise_scale == 16.0  # the neutral guess: the batch
    ctl.batch_size = 64
    assert ctl.lr == 0.1


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the backward failed")


def test_a_backward_or_an_update_that_raises_is_no_step_of_the_lr_warm_up():
    """Before the fix ``step`` advanced the batch LR's warm-up before the backward: a backward that raised (and that
    the user's loop caught) still counted as a step of the ramp. A batch size that is not a whole number is refused
    (``2.5`` was truncated to 2)."""
    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=1000))
    x, y = next(ctl.loader(data(), batch_size=16))
    ctl.step(nn.functional.cross_entropy(model(x), y))  # a change before the first step applies at once
    ctl.batch_size = 64  # x4: past warmup_above, so the LR ramps up over warmup_steps
    assert ctl.lr_coupler is not None
    before = ctl.lr_coupler.state_dict()
    assert before["ramp_step"] == 0
    loss = _FailingBackward.apply(nn.functional.cross_entropy(model(x), y))
    with pytest.raises(RuntimeError, match="the backward failed"):
        ctl.step(loss)
    assert ctl.lr_coupler.state_dict() == before
    # Nor is an update that raises (an OOM in optimizer.step() the loop catches): it took a rung of the ramp
    failures = [torch.OutOfMemoryError("out of memory in the update")]

    def fail_once(*_: Any) -> None:
        if failures:
            raise failures.pop()

    hook = opt.register_step_pre_hook(fail_once)
    with pytest.raises(torch.OutOfMemoryError):
        ctl.step(nn.functional.cross_entropy(model(x), y))
    hook.remove()
    assert ctl.lr_coupler.state_dict() == before
    ctl.step(nn.functional.cross_entropy(model(x), y))
    assert ctl.lr_coupler.state_dict()["ramp_step"] == 1 and ctl.lr_coupler.steps == before["steps"] + 1
    for bad in (2.5, True, 0):
        with pytest.raises(ValueError, match=f"batch_size={bad!r} must be a positive integer"):
            ctl.batch_size = bad
    ctl.close()


def test_bad_inputs():
    model, opt = model_and_optimizer()
    with pytest.raises(ValueError, match="unknown policy 'magic'"):
        Controller(model, opt, policy="magic")
    ctl = Controller(model, opt, policy="fp32")
    with pytest.raises(ValueError, match="batch_size=0 must be a positive integer"):
        next(ctl.loader(data(), batch_size=0))
    for epochs in (0, 1.5, float("nan")):  # NaN once yielded no batch at all, silently; 1.5 ran 2 epochs
        with pytest.raises(ValueError, match=rf"epochs={epochs!r} must be a whole number >= 1"):
            next(ctl.loader(data(), batch_size=16, epochs=epochs))
    with pytest.raises(
        ValueError,
        match=r"loss must be a scalar tensor; got Tensor torch.Size\(\[2\]\): reduce it first \(loss.mean\(\), "
        r"loss.sum\(\)\), or loss.squeeze\(\) a one-element loss$",
    ):
        ctl.step(torch.ones(2, requires_grad=True))
    with pytest.raises(ValueError, match="lr_rule='cubic'; allowed: linear, sqrt, none"):
        Controller(model, opt, lr_rule="cubic")
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)  # once trained nothing, silently
    with pytest.raises(ValueError, match=r"the optimizer holds none of the \d+ trainable parameters of Sequential"):
        Controller(model, other)
    # Each of these once passed the constructor and failed later with an AttributeError (a policy: at step 20).
    with pytest.raises(TypeError, match=r"memory=0.9 must be a MemoryBudget, e.g. MemoryBudget\(fraction=0.9\)"):
        Controller(model, opt, memory=0.9)
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer over the model's .*; got None"):
        Controller(model, None)
    for policy in (None, object(), 0):
        with pytest.raises(TypeError, match=rf"policy={policy!r} is neither a name nor a path"):
            Controller(model, opt, policy=policy)
    for dataset, message in [
        (data()[0], "dataset must be a pair"),
        ((data()[0].numpy(), data()[1].numpy()), r"got a tuple of 2 items \(ndarray\)"),
        ((data()[0], data()[1][:10]), "dataset has 512 inputs and 10 labels"),
        ((data()[0], torch.tensor(3)), "dataset's labels must have a sample dimension first; got a 0-d tensor"),
    ]:
        with pytest.raises(ValueError, match=message):
            next(ctl.loader(dataset, batch_size=16))
    # A batch above the dataset, at the start or set by hand later (the LR followed 25000x, 64 samples were served)
    with pytest.raises(ValueError, match="batch_size=513 is more than the 512 training samples"):
        next(ctl.loader(data(), batch_size=513))
    next(ctl.loader(data(), batch_size=16))
    with pytest.raises(ValueError, match="batch_size=513 is more than the 512 training samples"):
        ctl.batch_size = 513
    assert ctl.batch_size == 16
    embedding = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"modules \['0'\] make sparse gradients \(sparse=True\)"):
        Controller(embedding, torch.optim.SGD(embedding.parameters(), lr=0.1))
    state = ctl.state_dict()
    ctl.close()
    ctl.close()  # twice: harmless
    # A load too (before, it loaded: the optimizer, the user's again after close(), was rewound to the checkpoint)
    for use in (
        lambda: next(ctl.loader(data(), batch_size=16)),
        ctl.autocast,
        lambda: ctl.step(torch.ones(())),
        lambda: ctl.load_state_dict(state),
    ):
        with pytest.raises(RuntimeError, match="this controller is closed"):
            use()


def test_non_finite_steps_are_skipped_and_counted_at_the_decision():
    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=3))
    batches = ctl.loader(data(), batch_size=16)
    x, y = next(batches)
    ctl.step(nn.functional.cross_entropy(model(x), y))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):  # steps 2 and 3 of the interval diverge
        x, y = next(batches)
        ctl.step(nn.functional.cross_entropy(model(x), y) * float("nan"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert ctl.skipped_steps == 2 and len(ctl.decisions) == 1
    assert ctl.signals is not None and ctl.signals.overflow_rate == pytest.approx(2 / 3)


def test_close_counts_the_open_intervals_skipped_steps():
    """A run that ends between decisions: its last interval's skipped updates are counted at close(), once."""
    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=4))
    batches = ctl.loader(data(), batch_size=16)
    for step in range(7):  # one decision (after step 4), then steps 5-7 open, step 6 diverges
        x, y = next(batches)
        loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss * float("nan") if step in (1, 5) else loss)
    assert (ctl.skipped_steps, len(ctl.decisions)) == (1, 1)
    ctl.close()
    assert ctl.skipped_steps == 2
    ctl.close()
    assert ctl.skipped_steps == 2
    # A checkpoint written after close() holds the decisions' count and the open interval (it was refused: the
    # interval's applied updates outnumbered its steps); a resumed run counts that interval's skip at its decision.
    state = ctl.state_dict()
    model2, opt2 = model_and_optimizer()
    resumed = Controller(model2, opt2, policy="fp32", config=ControllerConfig(interval_steps=4))
    resumed.load_state_dict(state)
    assert resumed.skipped_steps == 1
    batches = resumed.loader(data(), batch_size=16)
    x, y = next(batches)
    resumed.step(nn.functional.cross_entropy(model2(x), y))  # the interval's 4th step: its decision
    assert (resumed.skipped_steps, len(resumed.decisions)) == (2, 1)
    resumed.close()


def test_skipped_steps_are_counted_when_only_some_steps_are_recorded():
    """With a budget for the per-step statistics (on by default on a GPU; forced here) most steps go unrecorded,
    yet every skipped one is counted: from the optimizer's applied updates, not from the recorded rows."""
    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=4))
    assert ctl.observe_budget_frac is None  # a CPU records every step
    ctl.observe_budget_frac = 1e-9  # no recording fits: after the first interval, one step in 64
    batches = ctl.loader(data(), batch_size=16)
    for step in range(12):
        x, y = next(batches)
        loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss * float("nan") if step in (9, 10) else loss)  # steps 10 and 11, in the third interval
    assert ctl._moments is not None and ctl._moments.every_steps == 64
    assert ctl.skipped_steps == 2 and len(ctl.decisions) == 3
    assert ctl.signals is not None and ctl.signals.overflow_rate == pytest.approx(2 / 4)
    assert ctl.rollbacks == 0  # a mixed interval: neither copied nor restored


def decision_steps(ctl, model):
    """Trains one epoch of 480 samples at batch 16 (30 steps); returns the steps at which a decision was taken."""
    decided_at = []
    for x, y in ctl.loader(data(n=480), batch_size=16, epochs=1):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        before = len(ctl.decisions)
        ctl.step(loss)
        if len(ctl.decisions) > before:
            decided_at.append(ctl.steps)
    return decided_at


def test_expensive_decisions_stretch_the_controllers_interval():
    """The cadence is on by default on a GPU; forced on here, a slow policy's decisions spread out to the cap."""
    from triaccel_rl.policies import StaticPolicy

    class SlowPolicy(StaticPolicy):
        def predict(self, observation, state=None, episode_start=None, deterministic=False):
            ctl.collector.add_overhead(1e4)  # 10 s a decision, injected: 1% of training needs a million steps
            return super().predict(observation, state, episode_start, deterministic)

    model, opt = model_and_optimizer()
    ctl = Controller(
        model, opt, policy=SlowPolicy("fp32"), config=ControllerConfig(interval_steps=2, max_interval_factor=3)
    )
    assert not ctl.cadence.adaptive  # a CPU run decides every interval_steps
    ctl.cadence.adaptive = True
    decided_at = decision_steps(ctl, model)
    # The first decision is not measured (one-time costs); from the second on, every 2 x 3 steps.
    assert decided_at == [2, 4, 10, 16, 22, 28]
    ctl.close()


def test_a_decision_that_changes_the_lr_is_judged_after_the_shortest_interval():
    """After a change the controller's next interval is ``interval_steps``, then stretches again."""
    from triaccel_rl.policies import StaticPolicy

    from triaccel_rl.actions import encode
    from triaccel_rl.types import Action, BatchMove

    config = ControllerConfig(interval_steps=2, max_interval_factor=3)

    class LowersOnce(StaticPolicy):  # slow, and from its fourth decision on it asks for LR x0.75
        calls = 0

        def predict(self, observation, state=None, episode_start=None, deterministic=False):
            ctl.collector.add_overhead(1e4)  # a slow decision, injected (as above)
            LowersOnce.calls += 1
            action = Action((Precision.FP32,) * config.n_groups, 0.75 if self.calls >= 4 else 1.0, BatchMove.KEEP)
            return encode(action, config), state

    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy=LowersOnce("fp32"), config=config)
    ctl.cadence.adaptive = True
    decided_at = decision_steps(ctl, model)
    assert [report.lr_scale for report in ctl.decisions][3:] == [0.75] * (len(ctl.decisions) - 3)
    # As above ([2, 4, 10, 16, 22, 28]) until the change at step 16; the next decision comes 2 steps later.
    assert decided_at == [2, 4, 10, 16, 18, 24, 30]
    ctl.close()


class _Returns:
    """A custom policy whose ``predict`` returns ``out`` as it is."""

    def __init__(self, out):
        self.out = out

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        return self.out


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (([0, 0, 0, 0, True, 1], None), r"action \[0, 0, 0, 0, True, 1\] must hold integers; True and False are no"),
        (([np.True_, 0, 0, 0, 2, 1], None), "True and False are no action indices"),
        (
            np.array([0, 0, 0, 0, 2, 1]),
            r"policy _Returns.predict\(\) returned array\(\[0, 0, 0, 0, 2, 1\]\) \(a "
            r"ndarray\): it must return the pair \(action, state\)",
        ),
    ],
)
def test_a_policys_malformed_output_is_refused_by_name(out, message):
    """A list mixing bools into the indices was made an int64 array before ``decode``, whose bool check then never ran
    (True read as LR index 1, silently); a ``predict`` returning the action alone failed with "too many values to
    unpack", naming neither the policy nor what it must return."""
    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy=_Returns(out), config=ControllerConfig(interval_steps=2))
    with pytest.raises(ValueError, match=message):
        train(ctl, model, epochs=1)
    assert not ctl.decisions
    ctl.close()


def test_a_model_that_only_produces_non_finite_losses_is_rolled_back(caplog):
    """Each non-finite step is skipped; an interval with no finite step at all restores the last good state."""
    model, opt = model_and_optimizer()
    config = ControllerConfig(interval_steps=4, snapshot_every=1)
    ctl = Controller(model, opt, policy="fp32", config=config)
    copies, losses = {}, []
    for x, y in ctl.loader(data(n=480), batch_size=16, epochs=1):  # 30 steps
        if ctl.steps == 10:  # a diverged model: every loss from here on is non-finite
            with torch.no_grad():
                model[0].weight.fill_(float("inf"))
        with caplog.at_level("WARNING", logger="triaccel_rl"), ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        losses.append(float(loss.detach()))
        ctl.step(loss)
        if ctl.steps % 4 == 0:
            copies[ctl.steps] = [p.detach().clone() for p in model.parameters()]
    # Steps 11 to 16 ran on the broken model. The interval of steps 9-12 was mixed (neither copied nor restored);
    # that of 13-16 had no finite step: restored to the copy of step 8, the last wholly finite interval's end.
    assert ctl.rollbacks == 1 and "rolled back to the last good state" in caplog.text
    assert all(not np.isfinite(v) for v in losses[10:16]) and all(np.isfinite(v) for v in losses[16:])
    assert torch.equal(copies[16][0], copies[8][0])  # right after the restore: step 8's weights
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ctl.close()


class _CausalMask(nn.Module):
    """Attention over 4 positions with an additive causal mask kept as a buffer (-inf above the diagonal)."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(8, 8), nn.Linear(8, 2)
        self.register_buffer("mask", torch.full((4, 4), float("-inf")).triu(1))

    def forward(self, x):
        h = self.inp(x)
        h = (h @ h.transpose(1, 2) / 8**0.5 + self.mask).softmax(-1) @ h  # finite: the diagonal is always allowed
        return self.out(h[:, -1])


def test_a_model_keeping_an_infinite_mask_as_a_buffer_trains_as_the_plain_loop(caplog):
    """Before the fix the shield read the mask's -inf as a broken buffer: every interval was rolled back to the
    starting weights (12 rollbacks in 48 steps, no weight moved). Now the run is the plain loop's step for step."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 8, generator=g)
    y = (x[:, -1, 0] > 0).long()
    weights = []
    for controlled in (False, True):
        torch.manual_seed(0)
        model = _CausalMask()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if controlled:  # the user's own batches, in order
            ctl = Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=4))
            for _ in range(3):
                for i in range(0, 64, 16):
                    with ctl.autocast():
                        loss = nn.functional.cross_entropy(model(x[i : i + 16]), y[i : i + 16])
                    ctl.step(loss)
            assert ctl.steps == 12 and ctl.rollbacks == 0 and "rolled back" not in caplog.text
            ctl.close()
        else:
            for _ in range(3):
                for i in range(0, 64, 16):
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(x[i : i + 16]), y[i : i + 16]).backward()
                    opt.step()
        weights.append([p.detach().clone() for p in model.parameters()])
    for plain, controlled in zip(*weights, strict=True):
        torch.testing.assert_close(controlled, plain, rtol=0, atol=0)


def test_a_mask_buffer_whose_infinities_move_or_turn_nan_is_still_broken():
    """What the mask's excuse leaves to the check: a NaN in it, or an infinity where it was finite at the start."""
    from triaccel_rl.shield import infinite_buffers, nonfinite_buffers

    model = _CausalMask()
    expected = infinite_buffers(model)
    assert list(expected) == ["mask"] and nonfinite_buffers(model, expected) == []
    assert nonfinite_buffers(model) == ["mask"]  # without the excuse
    for where, value in (((3, 0), float("nan")), ((3, 0), float("inf")), ((0, 3), float("nan"))):
        broken = copy.deepcopy(model)
        with torch.no_grad():
            broken.mask[where] = value  # (0, 3) held -inf: a NaN there went unseen in the first version of the fix
        assert nonfinite_buffers(broken, expected) == ["mask"]
    healed = copy.deepcopy(model)
    with torch.no_grad():
        healed.mask[0, 3] = 0.0  # an infinity turned finite (an observer's first batch): no break
    assert nonfinite_buffers(healed, expected) == []


class _Observer(nn.Module):
    """Keeps the running min and max of its input, starting at +inf and -inf (as torch.ao's observers do)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def forward(self, x):
        with torch.no_grad():
            self.min_val.copy_(torch.minimum(self.min_val, x.min()))
            self.max_val.copy_(torch.maximum(self.max_val, x.max()))
        return x


class _LazyMask(_CausalMask):
    """The causal mask made at the first forward (``register_buffer("mask", None)`` filled in)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mask", None)

    def forward(self, x):
        if self.mask is None:
            self.mask = torch.full((4, 4), float("-inf")).triu(1)
        return super().forward(x)


class _WithExtraState(nn.Linear):
    def get_extra_state(self):
        return {"note": "not a tensor"}

    def set_extra_state(self, state):
        pass


@pytest.mark.parametrize("kind", ["observer", "lazy-mask", "extra-state"])
def test_models_with_infinite_observers_lazy_masks_or_extra_state_train_without_rollbacks(kind):
    """The first version of the mask fix refused an observer's min/max that turned finite at the first batch (a QAT
    model), counted a mask made at the first forward as broken, and read every state-dict entry's version, which a
    module's extra state (a dict) does not have: the Controller raised at construction."""
    torch.manual_seed(0)
    x = torch.randn(32, 4, 8)
    y = (x[:, -1, 0] > 0).long()
    if kind == "observer":
        model = nn.Sequential(_Observer(), nn.Flatten(), nn.Linear(32, 2))
    elif kind == "lazy-mask":
        model = _LazyMask()
    else:
        model = nn.Sequential(nn.Flatten(), _WithExtraState(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=2)) as ctl:
        for xb, yb in ctl.loader((x, y), batch_size=8, epochs=2):
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(xb), yb)
            ctl.step(loss)
        assert ctl.steps == 8 and ctl.rollbacks == 0


class _RebuiltMask(_CausalMask):
    """The mask rebuilt in the shape of each batch's sequence length (a rotary cache grown alike)."""

    def forward(self, x):
        if self.mask.shape[0] != x.shape[1]:
            self.mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)
        h = self.inp(x)
        h = (h @ h.transpose(1, 2) / 8**0.5 + self.mask).softmax(-1) @ h
        return self.out(h[:, -1])


def test_a_buffer_rebuilt_in_another_shape_is_no_break_and_a_rollback_across_it_restores_the_copys():
    """A mask rebuilt for another sequence length read as broken (its shape differed from the one excused), and the
    rollback that followed raised "size mismatch" / "size of tensor a (8) must match" in ``ctl.step``: the copy was
    loaded into the new buffer in place. Now the rebuilt buffer is read afresh, and a rollback leaves it as it is (its
    module's own attributes describe it: given the copy's shape, a rotary cache's next forward failed)."""
    torch.manual_seed(0)
    model = _RebuiltMask()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    long_, short = torch.randn(32, 4, 8), torch.randn(32, 6, 8)
    with Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=2)) as ctl:
        for step in range(8):  # a 4x4 mask, rebuilt 6x6 at step 2 in an interval that diverges, then again at 4
            x = (long_ if step < 2 else short)[step * 4 : step * 4 + 4]
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x), (x[:, -1, 0] > 0).long())
            ctl.step(loss * float("nan") if step in (2, 3) else loss)
            if step == 3:  # rolled back to a copy taken with the 4x4 mask: the rebuilt one stays
                assert ctl.rollbacks == 1 and model.mask.shape == (6, 6)
        assert ctl.rollbacks == 1 and ctl.steps == 8  # the healthy rebuild at step 4 is no break
    assert model.mask.shape == (6, 6)


class _Rotary(nn.Module):
    """A rotary cache grown for longer sequences, its length a plain attribute (transformers' Llama, up to 4.38)."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(8, 8), nn.Linear(8, 2)
        self._grow(4)

    def _grow(self, n):
        self.cached = n
        angles = torch.outer(torch.arange(n).float(), 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8))
        self.register_buffer("cos", torch.cat([angles, angles], -1).cos(), persistent=False)

    def forward(self, x):
        if x.shape[1] > self.cached:
            self._grow(x.shape[1])
        return self.out((self.inp(x) * self.cos[: x.shape[1]]).mean(1))


class _SharedMasks(nn.Module):
    """Two blocks sharing one mask tensor, rebuilt in both for another length."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_CausalMask(), _CausalMask()])
        self.blocks[1].mask = self.blocks[0].mask

    def forward(self, x):
        if self.blocks[0].mask.shape[0] != x.shape[1]:
            self.blocks[0].mask = self.blocks[1].mask = torch.full((x.shape[1],) * 2, float("-inf")).triu(1)
        return sum(block(x) for block in self.blocks)


class _LazyStatistic(nn.Module):
    """A non-persistent running statistic made at the first forward."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(8, 8), nn.Linear(8, 2)
        self.register_buffer("running", None, persistent=False)

    def forward(self, x):
        mean = x.detach().mean((0, 1))
        self.running = mean.clone() if self.running is None else self.running.mul_(0.9).add_(0.1 * mean)
        return self.out((self.inp(x) - self.running).mean(1))


@pytest.mark.parametrize("kind", ["rotary", "shared-masks", "lazy-statistic"])
def test_a_rollback_across_buffers_grown_shared_or_made_since_the_copy_lets_training_go_on(kind):
    """Found by the session's second audit of its own fixes. A rotary cache given back the copy's shape no longer
    matched its module's length attribute (the next forward raised); of two blocks sharing a rebuilt mask only the
    first was reshaped ("size mismatch"); a non-persistent statistic made at the first forward was in no copy, so one
    broken by a NaN sample was never repaired (a rollback at every interval). Now buffers rebuilt, made or dropped
    since the copy stay as they are, and the copy is taken again once the first forward has made its buffers."""
    torch.manual_seed(0)
    model = {"rotary": _Rotary, "shared-masks": _SharedMasks, "lazy-statistic": _LazyStatistic}[kind]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    short, long_ = torch.randn(32, 4, 8), torch.randn(32, 6, 8)
    with Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=2)) as ctl:
        for step in range(8):
            x = (long_ if 2 <= step and kind != "lazy-statistic" else short)[step * 4 : step * 4 + 4].clone()
            if kind == "lazy-statistic" and step == 2:
                x[0, 0, 0] = float("nan")  # the statistic turns NaN; the weights' update is skipped
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x), (x[:, -1, 1] > 0).long())
            ctl.step(loss * float("nan") if step in (2, 3) else loss)  # the interval of the rebuild diverges
        assert ctl.rollbacks == 1 and ctl.steps == 8
    if kind == "lazy-statistic":  # repaired by the rollback, and finite since
        assert bool(torch.isfinite(model.running).all())


def test_a_rollback_in_the_first_interval_brings_back_a_mask_made_at_the_first_forward():
    """The copy was taken at build, before the buffer existed: restoring it raised "Missing key(s) in state_dict"."""
    torch.manual_seed(0)
    model = _LazyMask()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(32, 4, 8)
    y = (x[:, -1, 0] > 0).long()
    with Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=2)) as ctl:
        for xb, yb in ctl.loader((x, y), batch_size=8, epochs=1):
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(xb), yb)
            ctl.step(loss * float("nan") if ctl.steps < 2 else loss)  # the first interval diverges
        assert ctl.rollbacks == 1 and ctl.steps == 4
    assert torch.equal(model.mask, torch.full((4, 4), float("-inf")).triu(1))


def test_a_batch_that_breaks_the_running_statistics_is_rolled_back(caplog):
    """An ``inf`` input: its update is skipped, but its forward already wrote the batch-norm's running statistics,
    and the losses after it stay finite (train mode normalises by the batch). Without the buffer check the model
    evaluated to NaN from then on; the interval's end restores the last good state, buffers included."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctl = Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=4, snapshot_every=1))
    stats = {}
    for x, y in ctl.loader(data(n=320), batch_size=16, epochs=1):  # 20 steps
        if ctl.steps == 9:
            x = x.clone()
            x[0, 0] = float("inf")
        with caplog.at_level("WARNING", logger="triaccel_rl"), ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss)
        stats[ctl.steps] = model[1].running_mean.clone()
    assert not torch.isfinite(stats[10]).all()  # step 10's forward broke them; its update was skipped
    assert ctl.skipped_steps == 1 and ctl.rollbacks == 1
    assert "non-finite values in buffers ['1.running_mean', '1.running_var']" in caplog.text
    assert torch.equal(stats[12], stats[8])  # restored at the end of steps 9-12 to the copy of step 8
    model.eval()
    assert torch.isfinite(model(data(n=32)[0])).all()
    ctl.close()


@pytest.mark.parametrize("use_backward", [False, True])
def test_a_first_batch_that_breaks_the_running_statistics_is_rolled_back_not_refused(caplog, use_backward):
    """The same ``inf`` input in the run's first batch: its forward's write to the running statistics was read as a
    load since the build's copy, and ``step`` (or ``backward``) raised ``NoGoodStateError`` "after they were loaded"
    though nothing was loaded. The copy from before that forward is restored at the interval's end, as later on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    start = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=2))
    for x, y in ctl.loader(data(n=64), batch_size=16, epochs=1):
        if ctl.steps == 0:
            x = x.clone()
            x[0, 0] = float("inf")
        with caplog.at_level("WARNING", logger="triaccel_rl"), ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        if use_backward:
            ctl.backward(loss / 2)
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x), y) / 2
        ctl.step(loss)
        if ctl.steps == 2:  # the first interval's end: the build's state, buffers included
            assert all(torch.equal(value, start[name]) for name, value in model.state_dict().items())
    assert ctl.steps == 4 and ctl.rollbacks == 1 and ctl.skipped_steps == 1
    assert "non-finite values in buffers ['1.running_mean', '1.running_var']" in caplog.text
    ctl.close()


def _pretrained_checkpoint() -> dict[str, Any]:
    model, opt = model_and_optimizer()
    x, y = data(n=64)
    for i in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[16 * i : 16 * i + 16]), y[16 * i : 16 * i + 16]).backward()
        opt.step()
    return copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})


@pytest.mark.parametrize(
    "order", ["loaded-after-build", "controller-state-first", "forward-outside-autocast", "evaluated-before-the-load"]
)
def test_a_rollback_before_any_update_restores_what_was_loaded_after_the_copy(order):
    """The rollback copy was taken when the Controller was built (or its state loaded): weights and optimizer state
    loaded after it (a fine-tune from pretrained weights, a checkpoint of the user's own loop, or the model loaded after
    the Controller's state) were not in it, and a first interval of skipped steps restored the random start instead."""
    pretrained = _pretrained_checkpoint()
    model, opt = model_and_optimizer()
    config = ControllerConfig(interval_steps=4)
    ctl = Controller(model, opt, policy="fp32", config=config)
    if order == "controller-state-first":
        saved = ctl.state_dict()
        ctl.close()
        ctl = Controller(model, opt, policy="fp32", config=config)
        ctl.load_state_dict(saved)
    if order == "evaluated-before-the-load":  # autocast() for an evaluation: the retake waits for training
        with torch.no_grad(), ctl.autocast():
            model(data(n=16)[0])
    model.load_state_dict(pretrained["model"])
    opt.load_state_dict(pretrained["optimizer"])
    for x, y in ctl.loader(data(n=64), batch_size=16, epochs=1):  # 4 steps: one interval, every loss non-finite
        if order == "forward-outside-autocast":
            loss = nn.functional.cross_entropy(model(x), y)
        else:
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss * float("nan"))
    assert ctl.skipped_steps == 4 and ctl.rollbacks == 1
    for name, value in model.state_dict().items():
        assert torch.equal(value, pretrained["model"][name]), name
    for index, state in opt.state_dict()["state"].items():
        assert torch.equal(state["momentum_buffer"], pretrained["optimizer"]["state"][index]["momentum_buffer"])
    ctl.close()


def test_a_rollback_keeps_a_frozen_backbone_loaded_after_the_build():
    """A fine-tune: the frozen backbone's pretrained weights are loaded after the Controller was built. Before the fix
    only the trained parameters' versions told a load, so the copy kept the random backbone and the rollback put it
    back, silently, for the rest of the run."""
    torch.manual_seed(1)
    pretrained = nn.Linear(8, 16).state_dict()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    model[0].requires_grad_(False)
    ctl = Controller(model, torch.optim.SGD(model[2].parameters(), lr=0.1), policy="fp32",
                     config=ControllerConfig(interval_steps=4))  # fmt: skip
    model[0].load_state_dict(pretrained)
    for x, y in ctl.loader(data(n=128), batch_size=16, epochs=1):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss * float("nan") if 4 <= ctl.steps < 8 else loss)  # the second interval diverges
    assert ctl.rollbacks == 1
    for name, value in pretrained.items():
        assert torch.equal(model[0].state_dict()[name], value), name
    ctl.close()


def test_a_no_good_state_error_at_an_intervals_end_counts_its_skipped_steps_once():
    """A resumed state that fails twice raises ``NoGoodStateError`` at an interval's end, after that interval's
    skipped steps were counted; before the fix the interval stayed open, and ``close()`` (leaving the ``with`` block
    on the error) counted them again: 12 skipped steps of 8 steps since the resume."""
    config = ControllerConfig(interval_steps=4)
    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy="fp32", config=config)
    for x, y in ctl.loader(data(), batch_size=16, epochs=1):
        with ctl.autocast():
            ctl.step(nn.functional.cross_entropy(model(x), y))
        if ctl.steps == 4:
            break
    saved = copy.deepcopy({"model": model.state_dict(), "controller": ctl.state_dict()})
    ctl.close()
    model, opt = model_and_optimizer()
    model.load_state_dict(saved["model"])
    with pytest.raises(NoGoodStateError), Controller(model, opt, policy="fp32", config=config) as resumed:
        resumed.load_state_dict(saved["controller"])
        for x, y in resumed.loader(data(), batch_size=16, epochs=1):
            with resumed.autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            resumed.step(loss * float("nan"))  # every step non-finite
    assert resumed.steps == 12 and resumed.skipped_steps == 8


@pytest.mark.parametrize("policy", ["bf16", "fp16", "mixed"])
def test_one_autocast_context_around_the_whole_loop_trains_as_one_a_step(policy):
    """autocast caches each weight's 16-bit cast until its region closes: with one ``with ctl.autocast():`` around the
    loop (supported: no warning), every forward after the first computed with the first step's weights (the loss went
    1.396 -> 1.365 in 16 steps, against 0.975 with a context a step). Now the cache is cleared after each step. And
    the backward ran inside that region: under a mixed map the fp32 layer's gradients came from bf16 matmuls."""
    runs = []
    for outer in ("ctl", "users-own", None):  # the user's own torch.autocast around the loop too (the second audit)
        model, opt = model_and_optimizer()
        if policy == "mixed":  # held: no decision in the run
            ctl = Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=1000))
            ctl.engine.set_precisions(["bf16", "fp32", "bf16"])
        else:
            ctl = Controller(model, opt, policy=policy, config=ControllerConfig(interval_steps=4))
        losses = []
        dtype = torch.float16 if policy == "fp16" else torch.bfloat16
        around = {"ctl": ctl.autocast, "users-own": functools.partial(torch.autocast, "cpu", dtype=dtype)}
        with around.get(outer, contextlib.nullcontext)():
            for x, y in ctl.loader(data(), batch_size=16, epochs=1):
                with contextlib.nullcontext() if outer == "ctl" else ctl.autocast():
                    loss = nn.functional.cross_entropy(model(x), y)
                ctl.step(loss)
                losses.append(float(loss.detach()))
        ctl.close()
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    _, (step_losses, step_weights) = runs[1:], runs[-1]
    assert len(set(step_losses)) == len(step_losses)
    for losses, weights in runs[:-1]:
        assert losses == step_losses
        for a, b in zip(weights, step_weights, strict=True):
            assert torch.equal(a, b)


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


class _Alternating:
    """Moves the batch and the LR at every decision, whatever it observes."""

    name = "alternating"

    def __init__(self):
        self.n = 0

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        self.n += 1
        return np.array([[0, 0, 0, 0, 3, 2], [0, 0, 0, 0, 2, 0]][self.n % 2]), state


@pytest.mark.parametrize("fail_at", [8, 9])
def test_a_step_post_hook_that_raises_after_the_update_loses_neither_its_statistics_nor_the_decision(fail_at):
    """A user's post-hook (an EMA) raised once after the update went in, and the loop carried on: the step was
    counted, but its loss and gradient norms never reached the interval's statistics, and at a decision step (9) the
    decision was skipped, every later one a step late (weights 0.159 apart at the end). Now the run is the
    uninterrupted one's."""
    runs = []
    for fail in (None, fail_at):
        model, opt = model_and_optimizer()
        ctl = Controller(model, opt, policy=_Alternating(), config=ControllerConfig(interval_steps=3, min_batch_size=4))
        calls = []

        def post(optimizer, args, kwargs, fail=fail, calls=calls):
            calls.append(1)
            if len(calls) == fail:
                raise RuntimeError("EMA hook failed")

        opt.register_step_post_hook(post)
        for _ in range(2):
            try:
                for x, y in ctl.loader(data(), batch_size=16, epochs=2):
                    with ctl.autocast():
                        loss = nn.functional.cross_entropy(model(x), y)
                    ctl.step(loss)
                break
            except RuntimeError:
                assert ctl.steps == fail
        runs.append(([(d.lr_scale, d.batch_size) for d in ctl.decisions], ctl.signals.loss, _weights(model)))
        ctl.close()
    (decisions, loss, final), (decisions_2, loss_2, final_2) = runs
    assert decisions_2 == decisions and loss_2 == loss
    for a, b in zip(final, final_2, strict=True):
        assert torch.equal(a, b)


def test_a_step_after_a_forward_outside_autocast_warns_once_while_a_layer_is_16_bit(caplog):
    """Such a forward runs in fp32 while ``precisions`` and the logs say bf16: a loop moved over without its
    ``with ctl.autocast():`` trained in fp32 silently."""
    for policy, warned in (("bf16", True), ("fp32", False)):
        model, opt = model_and_optimizer()
        ctl = Controller(model, opt, policy=policy, config=ControllerConfig(interval_steps=4))
        caplog.clear()
        with caplog.at_level("WARNING", logger="triaccel_rl"):
            for x, y in ctl.loader(data(n=64), batch_size=16, epochs=1):
                assert model(x).dtype is torch.float32  # outside the context: fp32 whatever the map
                ctl.step(nn.functional.cross_entropy(model(x), y))
        outside = [r for r in caplog.records if "forward outside ctl.autocast()" in r.getMessage()]
        assert len(outside) == int(warned), policy
        if warned:
            assert "not in the layers' precisions (bf16)" in outside[0].getMessage()
        ctl.close()
    model, opt = model_and_optimizer()  # the whole loop inside one context: no warning
    ctl = Controller(model, opt, policy="bf16", config=ControllerConfig(interval_steps=4))
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        caplog.clear()
        with ctl.autocast():
            for x, y in ctl.loader(data(n=64), batch_size=16, epochs=1):
                ctl.step(nn.functional.cross_entropy(model(x), y))
    assert "forward outside ctl.autocast()" not in caplog.text
    ctl.close()
    model, opt = model_and_optimizer()  # forwards inside the context, with gradient accumulation: no warning
    ctl = Controller(model, opt, policy="bf16", config=ControllerConfig(interval_steps=4))
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        caplog.clear()
        for x, y in ctl.loader(data(n=64), batch_size=16, epochs=1):
            for part, last in ((slice(0, 8), False), (slice(8, 16), True)):
                with ctl.autocast():
                    loss = nn.functional.cross_entropy(model(x[part]), y[part]) / 2
                ctl.step(loss) if last else ctl.backward(loss)
    assert "forward outside ctl.autocast()" not in caplog.text
    ctl.close()


@pytest.mark.parametrize("order", ["loaded-after-build", "controller-state-first"])
def test_a_model_loaded_broken_after_the_copy_is_refused_before_training(order):
    """Taken again as the confirmed copy, a NaN weight loaded after build was restored at every interval: the run went
    to its end with NaN weights, as ``load_state_dict`` refuses a model loaded broken before it."""
    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=4))
    if order == "controller-state-first":
        ctl.load_state_dict(ctl.state_dict())
    broken = copy.deepcopy(model.state_dict())
    broken["0.weight"][0, 0] = float("nan")
    model.load_state_dict(broken)
    x, y = data(n=16)
    with pytest.raises(NoGoodStateError, match=r"the model's 0\.weight hold NaN or infinite values after they were"):
        with ctl.autocast():
            nn.functional.cross_entropy(model(x), y)
    assert ctl.steps == 0
    for entry in ("step", "backward"):  # refused again, not used up, whichever call met it
        with pytest.raises(NoGoodStateError):
            getattr(ctl, entry)(nn.functional.cross_entropy(model(x), y))
    good = _pretrained_checkpoint()  # what the message says: load an earlier checkpoint
    model.load_state_dict(good["model"])
    for x, y in ctl.loader(data(n=64), batch_size=16, epochs=1):  # one interval, every loss non-finite
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        ctl.step(loss * float("nan"))
    assert ctl.rollbacks == 1
    for name, value in model.state_dict().items():  # the good checkpoint was copied, not the build's start
        assert torch.equal(value, good["model"][name]), name
    ctl.close()


def test_without_the_rollback_a_broken_model_stays_broken():
    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=4, rollback=False))
    assert ctl.guard is None
    losses = []
    for x, y in ctl.loader(data(n=320), batch_size=16, epochs=1):  # 20 steps
        if ctl.steps == 10:
            with torch.no_grad():
                model[0].weight.fill_(float("inf"))
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        losses.append(float(loss.detach()))
        ctl.step(loss)
    assert ctl.rollbacks == 0 and not any(np.isfinite(v) for v in losses[10:])
    assert ctl.skipped_steps == 10  # steps 11-20, each skipped and counted at its interval's decision
    ctl.close()


def trial_controller(policy):
    """A controller whose first steps are a speed trial (3 timed steps a format), and its model and batches."""
    from triaccel_rl.config import HeuristicConfig

    model, opt = model_and_optimizer()
    config = ControllerConfig(interval_steps=4, heuristic=HeuristicConfig(speed_trial=True, speed_trial_steps=3))
    ctl = Controller(model, opt, policy=policy, config=config)
    return ctl, model, ctl.loader(data(), batch_size=16, epochs=2)


def one_step(ctl, model, batches):
    """Trains one step; returns the precision its forward ran in (the first layer's)."""
    x, y = next(batches)
    precision = ctl.precisions[0]
    with ctl.autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    ctl.step(loss)
    return precision


def test_a_speed_trial_times_both_16_bit_formats_before_the_first_decision(caplog):
    ctl, model, batches = trial_controller("heuristic")
    seen = []
    with caplog.at_level("INFO", logger="triaccel_rl"):
        for step in range(14):
            seen.append(one_step(ctl, model, batches))
            if step < 9:
                assert not ctl.decisions, f"a decision at step {step}, inside the trial"
    # 2 warm-up and 3 timed steps in bf16, then in fp16; then the policy's start precision, the faster format.
    assert seen[:5] == [Precision.BF16] * 5 and seen[5:10] == [Precision.FP16] * 5
    trial = ctl.speed_trial
    assert set(trial) == {"bf16", "fp16", "chosen"} and trial["bf16"] > 0 and trial["fp16"] > 0
    faster = Precision.BF16 if trial["bf16"] <= trial["fp16"] else Precision.FP16
    assert trial["chosen"] == float(faster) and seen[10:] == [faster] * 4
    assert "speed trial: bf16" in caplog.text
    assert len(ctl.decisions) == 1  # the first decision came at the first interval end after the trial


def test_the_pretrained_policy_gets_the_speed_trial_in_a_users_loop():
    ctl, model, batches = trial_controller("pretrained")
    seen = [one_step(ctl, model, batches) for _ in range(14)]
    assert seen[:5] == [Precision.BF16] * 5 and seen[5:10] == [Precision.FP16] * 5
    faster = Precision(int(ctl.speed_trial["chosen"]))
    assert seen[10:] == [faster] * 4  # the policy's start precision followed the trial
    assert ctl.policy.policy.low_precision is faster and ctl.policy.fallback.low_precision is faster
    assert len(ctl.decisions) == 1  # an interval (4 steps) after the trial, whose steps it does not read
    assert set(ctl.precisions) <= {Precision.FP32, faster}  # its 16-bit groups run in the trial's format


@pytest.mark.parametrize("policy", ["heuristic", "pretrained"])
@pytest.mark.usefixtures("gpu_without_bf16")
def test_on_a_gpu_without_bf16_an_adaptive_policy_starts_and_lowers_in_fp16_without_a_trial(policy, caplog):
    """On a V100 or T4, ``Controller(model, opt)`` (the heuristic) and ``policy="pretrained"`` raised "precision bf16 is
    not supported" at construction: their start precision is bf16, and the speed trial's first format too."""
    model, opt = model_and_optimizer()
    with Controller(model, opt, policy=policy) as default:  # the default config builds, in fp16
        assert default.precisions == [Precision.FP16] * 3
    with caplog.at_level("INFO", logger="triaccel_rl"):
        ctl, model, batches = trial_controller(policy)  # a trial asked for: one format runs, nothing to choose
    assert "bf16 does not run on cpu: the policy starts and lowers to fp16 instead" in caplog.text
    seen = [one_step(ctl, model, batches) for _ in range(8)]
    assert seen[:4] == [Precision.FP16] * 4 and ctl.speed_trial == {}
    assert len(ctl.decisions) == 2  # at steps 4 and 8: no trial held them back
    assert ctl.policy.initial_precision is Precision.FP16 and ctl.policy.low_precision is Precision.FP16
    if policy == "pretrained":  # the learned policy and its heuristic fallback alike
        assert ctl.policy.policy.low_precision is ctl.policy.fallback.low_precision is Precision.FP16
    assert all(set(d.precisions) <= {Precision.FP32, Precision.FP16} for d in ctl.decisions)
    assert not any("not applied" in reason for d in ctl.decisions for reason in d.refused)


def test_a_checkpoint_saved_where_bf16_runs_resumes_in_fp16_on_a_gpu_without_bf16(monkeypatch, request):
    """Before the fix ``load_state_dict`` wrote the checkpoint's bf16 back into the policy, undoing the move to fp16
    made at construction: every lowering of the resumed run ran in fp32 on a V100 or T4."""
    config = ControllerConfig(interval_steps=4, heuristic=HeuristicConfig(start_precision="fp32"))
    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy="heuristic", config=config)  # here bf16 runs: the policy lowers to bf16
    assert ctl.policy.low_precision is Precision.BF16
    saved = copy.deepcopy({"model": model.state_dict(), "controller": ctl.state_dict()})
    request.getfixturevalue("gpu_without_bf16")
    model, opt = model_and_optimizer()
    resumed = Controller(model, opt, policy="heuristic", config=config)
    model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["controller"])
    assert resumed.policy.low_precision is Precision.FP16
    train(resumed, model, epochs=1)
    assert any(Precision.FP16 in d.precisions for d in resumed.decisions)  # it lowers, and in fp16
    assert all(Precision.BF16 not in d.precisions for d in resumed.decisions)


@pytest.mark.usefixtures("gpu_without_bf16")
def test_on_a_gpu_without_bf16_a_static_bf16_policy_runs_fp32_and_says_so(caplog):
    """A static policy's configuration holds the whole run: its layers asked for bf16 ran in fp32 with nothing said."""
    model, opt = model_and_optimizer()
    with caplog.at_level("WARNING", logger="triaccel_rl"), Controller(model, opt, policy="bf16") as ctl:
        assert ctl.precisions == [Precision.FP32] * 3
    assert "the static configuration does not run as asked: ran 3 layers asked for bf16 in fp32" in caplog.text


def test_no_speed_trial_in_a_users_loop_where_time_is_not_measured_on_a_gpu():
    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy="heuristic", config=ControllerConfig(interval_steps=4))  # CPU: no trial
    train(ctl, model, epochs=1)
    assert ctl.speed_trial == {}
    assert len(ctl.decisions) == ctl.steps // 4  # decisions from the first interval on: no trial held them back


def test_the_controller_is_a_context_manager_that_closes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    data = (torch.randn(64, 8), torch.arange(64) % 3)
    with Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="bf16") as ctl:
        assert ctl.engine.precision._handles  # the precision hooks are on while it runs
        for x, y in ctl.loader(data, batch_size=16):
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            ctl.step(loss)
    assert ctl.steps == 4 and not ctl.engine.precision._handles  # and off after the block


@pytest.mark.parametrize("policy", ["bf16", "heuristic"])
def test_a_model_saved_while_the_controller_runs_loads_as_a_plain_model_after_close(policy):
    """``torch.save(model)`` mid-run (a user's best-model checkpoint) raised "Can't pickle local object": the
    precision hooks were closures. Loaded after ``close()`` it holds the run's weights, computes and trains as a plain
    model."""
    import io

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))
    data = (torch.randn(64, 8), torch.arange(64) % 3)
    saved = io.BytesIO()
    with Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy=policy) as ctl:
        for x, y in ctl.loader(data, batch_size=16):
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            ctl.step(loss)
        torch.save(model, saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), name
    twins = [loaded, copy.deepcopy(model)]  # the model itself, unhooked by close(), as the reference
    x, y = data[0][:16], data[1][:16]
    for twin in twins:
        opt = torch.optim.SGD(twin.parameters(), lr=0.1)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the user's own autocast: no region of ours is left
            loss = nn.functional.cross_entropy(twin(x), y)
        loss.backward()
        opt.step()
    for a, b in zip(twins[0].parameters(), twins[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_users_lr_scheduler_keeps_working_in_a_controlled_loop():
    """Cosine annealing on the user's optimizer: a static fp32 controller's run is the plain loop's, bit for bit,
    and a heuristic controller's LR stays the schedule's value times its own multiplier."""
    x, y = data(64)
    finals = {}
    for controlled in (False, True):
        model, optimizer = model_and_optimizer()
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=8)
        ctl = Controller(model, optimizer, policy="fp32") if controlled else None
        for i in range(8):
            either_step(ctl, model, optimizer, x[8 * i : 8 * (i + 1)], y[8 * i : 8 * (i + 1)])
            scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the schedule's end: T_max steps
        finals[controlled] = [p.detach().clone() for p in model.parameters()]
    for plain, controlled in zip(finals[False], finals[True], strict=True):
        assert torch.equal(plain, controlled)
    model, optimizer = model_and_optimizer()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    ctl = Controller(model, optimizer, policy="heuristic", config=ControllerConfig(interval_steps=4))
    ctl.engine.lr_scale = 1.25  # as a decision would leave it
    for i in range(3):  # before the first decision (at step 4)
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x[8 * i : 8 * (i + 1)]), y[8 * i : 8 * (i + 1)])
        ctl.step(loss)
        scheduler.step()
    assert ctl.engine.lr_scale == 1.25
    assert ctl.lr == pytest.approx(optimizer.param_groups[0]["lr"] * 1.25 * ctl.engine.batch_lr_gain)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(scheduler.get_last_lr()[0])


def test_max_grad_norm_clips_as_a_plain_loop_would_and_refuses_bad_values():
    x, y = data(64)
    finals = {}
    for controlled in (False, True):
        model, optimizer = model_and_optimizer()
        ctl = Controller(model, optimizer, policy="fp32", max_grad_norm=0.1) if controlled else None
        for i in range(8):
            either_step(ctl, model, optimizer, x[8 * i : 8 * (i + 1)], y[8 * i : 8 * (i + 1)], model.parameters(), 0.1)
        finals[controlled] = [p.detach().clone() for p in model.parameters()]
    for plain, controlled in zip(finals[False], finals[True], strict=True):
        torch.testing.assert_close(controlled, plain, rtol=1e-6, atol=1e-7)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        model, optimizer = model_and_optimizer()
        with pytest.raises(ValueError, match=f"max_grad_norm={bad} must be a positive finite number"):
            Controller(model, optimizer, policy="fp32", max_grad_norm=bad)


def test_grad_transform_clamps_where_a_plain_loop_clamps_and_refuses_a_non_callable():
    """``grad_transform``: a plain loop's ``clip_grad_value_`` between backward and step, bit for bit in fp32."""
    x, y = data(64)
    finals = {}
    for controlled in (False, True):
        model, optimizer = model_and_optimizer()
        ctl = None
        if controlled:
            clamp = functools.partial(torch.nn.utils.clip_grad_value_, list(model.parameters()), 0.01)
            ctl = Controller(model, optimizer, policy="fp32", grad_transform=clamp)
        for i in range(8):
            xb, yb = x[8 * i : 8 * (i + 1)], y[8 * i : 8 * (i + 1)]
            if ctl is None:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                torch.nn.utils.clip_grad_value_(model.parameters(), 0.01)
                optimizer.step()
            else:
                controlled_step(ctl, model, xb, yb)
        finals[controlled] = [p.detach().clone() for p in model.parameters()]
    for plain, controlled in zip(finals[False], finals[True], strict=True):
        assert torch.equal(controlled, plain)
    model, optimizer = model_and_optimizer()
    with pytest.raises(TypeError, match=r"grad_transform=0\.01 must be a callable taking no arguments"):
        Controller(model, optimizer, policy="fp32", grad_transform=0.01)  # type: ignore[arg-type]


def test_a_model_with_tied_weights_trains_under_the_controller():
    """An embedding tied to the output projection (as GPT-2's): the shared weight is updated once, stays shared,
    and the layer that shares it (no parameters of its own) is decided for like any other."""

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid, self.out = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 50, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x):
            return self.out(torch.relu(self.mid(self.emb(x))))

    torch.manual_seed(0)
    model = TiedLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 50, (2048,))
    y = (x * 7) % 50
    losses = []
    with Controller(model, optimizer, policy="heuristic", config=ControllerConfig(interval_steps=8)) as ctl:
        for xb, yb in ctl.loader((x, y), batch_size=64, epochs=2):
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(xb), yb)
            ctl.step(loss)
            losses.append(float(loss.detach()))
    assert model.out.weight is model.emb.weight
    assert ctl.steps == 64 and len(ctl.decisions) >= 4
    assert np.mean(losses[-8:]) < 0.5 * np.mean(losses[:8])


def test_a_second_update_from_a_left_over_optimizer_step_is_refused():
    """A loop moved over to the controller with its own ``optimizer.step()`` left in would update twice a step (with
    the zeroed gradients' momentum on the CPU path, the fused step's gradients on a GPU). It is refused, by name; the
    optimizer is the user's again once the controller is closed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    ctl = Controller(model, optimizer, policy="fp32", config=ControllerConfig(interval_steps=4))
    with ctl.autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    ctl.step(loss)
    after_one = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"optimizer.step\(\) was called while the controller drives this optimizer"):
        optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(after_one, model.parameters(), strict=True))
    ctl.close()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()  # the user's own loop again
    assert not all(torch.equal(a, p) for a, p in zip(after_one, model.parameters(), strict=True))


@pytest.mark.parametrize("call", ["step", "backward"])
def test_a_left_over_loss_backward_is_named(call):
    """PyTorch's "Trying to backward through the graph a second time ... Specify retain_graph=True" pointed the wrong
    way: a loop moved over with its own ``loss.backward()`` left in."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="fp32")
    loss = nn.functional.cross_entropy(model(torch.randn(16, 4)), torch.randint(0, 2, (16,)))
    loss.backward()
    with pytest.raises(
        RuntimeError,
        match=r"^part of this loss's graph was already backpropagated: either a loss\.backward\(\) left in",
    ):
        getattr(ctl, call)(loss)
    ctl.close()


@pytest.mark.parametrize("given", ["list", "generator", "filter"])
def test_parameters_given_for_the_optimizer_are_named_without_their_values(given):
    """The message held the repr of every parameter tensor (3.5 KB on a small MLP)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    params = {
        "list": list(model.parameters()),
        "generator": model.parameters(),
        "filter": filter(lambda p: p.requires_grad, model.parameters()),  # fine-tuning's usual form
    }[given]
    with pytest.raises(TypeError) as info:
        Controller(model, params)
    message = str(info.value)
    assert message.startswith("optimizer must be a torch.optim.Optimizer over the model's parameters; got ")
    assert "build an optimizer on them, e.g. torch.optim.SGD(model.parameters(), lr=0.1)" in message
    assert "tensor" not in message and len(message) < 300
    with pytest.raises(TypeError, match=r"got the class SGD \(build one, e\.g\. torch\.optim\.SGD"):
        Controller(model, torch.optim.SGD)


def test_a_controlled_static_loop_is_the_users_own_loop_with_everything_it_keeps():
    """With a static fp32 policy, the controlled loop equals the user's plain loop bit for bit: param groups without
    decay on biases, a scheduler cycling the LR and beta1, clipping, an EMA hook, tied weights, zero_grad."""
    data = users_data()
    plain, plain_ema = plain_loop(data)
    model, _, ema = controlled_loop(data, Controller, ControllerConfig(interval_steps=5))
    assert all(torch.equal(a, b) for a, b in zip(plain, model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain_ema, ema, strict=True))
    assert model.out.weight is model.emb.weight


def test_an_optimizer_over_part_of_a_trainable_model_drives_only_that_part():
    """Fine-tuning a head with an optimizer over the head alone, the body left trainable: the controller updates and
    clips what the optimizer holds, as the plain loop with ``clip_grad_norm_`` over the optimizer's parameters does,
    past several decisions (the first decision once raised a bare ``KeyError``)."""
    x, y = data(128)
    finals = {}
    for controlled in (False, True):
        model, _ = model_and_optimizer()
        head = model[4]
        optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
        body = [p.detach().clone() for p in model[:4].parameters()]
        ctl = None
        if controlled:
            config = ControllerConfig(interval_steps=3)
            ctl = Controller(model, optimizer, policy="fp32", max_grad_norm=0.05, config=config)
        for i in range(16):
            either_step(ctl, model, optimizer, x[8 * i : 8 * (i + 1)], y[8 * i : 8 * (i + 1)], head.parameters(), 0.05)
        if ctl is not None:
            assert len(ctl.decisions) == 5
            assert ctl.engine.layer_params[:2] == [[], []]  # the body's layers hold nothing to update
        assert all(torch.equal(a, b) for a, b in zip(body, model[:4].parameters(), strict=True)), "the body moved"
        finals[controlled] = [p.detach().clone() for p in head.parameters()]
    for plain, controlled in zip(finals[False], finals[True], strict=True):
        torch.testing.assert_close(controlled, plain, rtol=1e-6, atol=1e-7)


def test_a_float64_model_with_a_layer_norm_trains_as_the_plain_loop():
    """The hook that casts a non-controllable layer's 16-bit inputs up to fp32 once cast float64 inputs down, and a
    LayerNorm of float64 weights then refused its float32 input."""
    finals = []
    for controlled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 2)).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        ctl = Controller(model, optimizer, policy="fp32") if controlled else None
        x, y = data(64)
        for i in range(4):
            either_step(ctl, model, optimizer, x[16 * i : 16 * (i + 1)].double(), y[16 * i : 16 * (i + 1)])
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals, strict=True))


def test_the_model_mode_is_the_users():
    """``autocast()`` once switched the model to train mode at every step: a model trained in eval mode on purpose
    (frozen batch-norm statistics) had its running statistics moved."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2)).eval()
    stats = model[1].running_mean.clone()
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="fp32")
    for xb, yb in ctl.loader(data(64), batch_size=16):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(xb), yb)
        ctl.step(loss)
    assert not model.training and torch.equal(model[1].running_mean, stats)
    ctl.close()


class _NoisyCounter(nn.Module):
    """Draws noise in its forward and counts its calls in a buffer; a batch size written into it fails on one sample."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        h = self.a(x)
        return self.b(h + 0.1 * torch.randn_like(h)).view(16, 2)


def test_the_cost_measurement_leaves_no_trace_and_a_forward_it_cannot_run_is_no_failure(caplog):
    """``loader()`` measures each layer's costs with one forward of one sample. That forward once drew from the
    generator and bumped the buffers (the run then differed from the plain loop), and one that fails on a batch of
    one stopped the loop. Now: the same draws and buffers as the plain loop, and a warning naming the error."""
    x, y = data(64)
    finals = []
    for controlled in (False, True):
        torch.manual_seed(0)
        model = _NoisyCounter()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(5)
        if controlled:
            ctl = Controller(model, optimizer, policy="fp32")
            with caplog.at_level("WARNING", logger="triaccel_rl"):
                for xb, yb in ctl.loader((x, y), batch_size=16):
                    with ctl.autocast():
                        loss = nn.functional.cross_entropy(model(xb), yb)
                    ctl.step(loss)
            assert "model(x[:1]), which raised" in caplog.text and ctl.costs.activation_bytes_per_sample.sum() == 0
            # the parameters' and optimizer's bytes, and the 4-byte ``calls`` buffer (until 2026-12-07 not counted)
            assert ctl.costs.buffer_bytes == 4 and ctl.predicted_memory_bytes(16) == ctl.costs.static_bytes + 4 > 4
        else:
            order = torch.randperm(64, generator=torch.Generator().manual_seed(0))  # ElasticLoader's epoch 0
            for i in range(4):
                index = order[16 * i : 16 * (i + 1)]
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[index]), y[index]).backward()
                optimizer.step()
        assert model.calls.item() == 4
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals, strict=True))


def test_a_loop_over_epochs_carries_on_the_run():
    """``loader()`` called once an epoch: each call once started a new loader at epoch 0 (the same order every epoch)
    and reset the batch size the policy had chosen. Now it carries on, and a call for epochs already trained says so."""
    x, y = data(64)
    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=100))
    firsts, sizes = [], []
    for epoch in range(3):
        batches = list(ctl.loader((x, y), batch_size=16, epochs=epoch + 1))
        firsts.append(batches[0][1][:16])
        sizes.append([len(b[1]) for b in batches])
        ctl.batch_size = 32  # as a policy's decision would
    assert sizes == [[16] * 4, [32] * 2, [32] * 2]  # the chosen batch size holds into the next call
    reference = ElasticLoader(x, y, seed=0)
    expected = [reference.next(64).y[:16] for _ in range(3)]  # the first 16 labels of epochs 0, 1 and 2
    assert all(torch.equal(a, b) for a, b in zip(firsts, expected, strict=True))
    assert not torch.equal(firsts[0], firsts[1])
    with pytest.raises(ValueError, match=r"loader\(epochs=3\): the run has trained 3 epochs .* pass epochs=4"):
        next(ctl.loader((x, y), batch_size=16, epochs=3))
    with pytest.raises(ValueError, match=r"loader\(batch_size=8\) carries on a run that started at batch_size=16"):
        next(ctl.loader((x, y), batch_size=8, epochs=4))
    moved = (x.clone(), y.clone())  # a loop that moves its data each epoch (x.to("cuda")) passes new tensors
    assert len(list(ctl.loader(moved, batch_size=16, epochs=4))) == 2  # the run goes on: one epoch at batch 32
    assert ctl._loader.epoch == 4 and ctl._loader.x.data_ptr() == moved[0].data_ptr()  # on the tensors given
    assert len(list(ctl.loader(data(32), batch_size=16))) == 2  # another dataset: a new loader, from epoch 0
    ctl.close()


@pytest.mark.parametrize("policy", ["fp32", "fp16"])
def test_gradient_accumulation_through_backward_is_one_step_of_the_whole_batch(policy):
    """Two micro-batches (``backward``, then ``step``) update as one step of both together. With ``loss.backward()``
    for the first, an fp16 map once divided its gradients by the loss scale (65536) at the unscale."""
    x, y = data(128)
    finals = []
    for accumulate in (False, True):
        model, opt = model_and_optimizer()
        ctl = Controller(model, opt, policy=policy, config=ControllerConfig(interval_steps=3))
        for i in range(8):
            controlled_step(ctl, model, x[16 * i : 16 * (i + 1)], y[16 * i : 16 * (i + 1)], 2 if accumulate else 1)
        assert ctl.steps == 8 and ctl.skipped_steps == 0
        finals.append([p.detach().clone() for p in model.parameters()])
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if policy == "fp32" else {"rtol": 2e-3, "atol": 1e-4}
    for whole, accumulated in zip(*finals, strict=True):
        torch.testing.assert_close(accumulated, whole, **tolerance)


def test_the_signals_read_an_accumulated_batch_s_summed_loss_as_the_whole_batch_s():
    """The loss the decision reads is the micro-batches' sum (each ``loss / k``), not the last one's share of it."""
    x, y = data(16)
    losses = []
    for micro_batches in (1, 2, 4):  # 4: three sums in ``backward`` before the step's
        model, opt = model_and_optimizer()
        ctl = Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=1))
        controlled_step(ctl, model, x, y, micro_batches)
        assert ctl.signals is not None
        losses.append(ctl.signals.loss)
        ctl.close()
    model, _ = model_and_optimizer()
    with torch.no_grad():
        whole = nn.functional.cross_entropy(model(x), y).item()  # the plain loop's loss, before the update
    assert losses == pytest.approx([whole] * 3, rel=1e-6)


def test_an_earlier_micro_batch_s_non_finite_loss_skips_the_update():
    """A non-finite loss over finite gradients (an overflowed term with no gradient) skips the update when it is the
    step's loss; as the first micro-batch's loss, passed to ``backward``, it went unseen and the update went in."""
    x, y = data(16)
    for accumulate in (False, True):
        model, opt = model_and_optimizer()
        before = [p.detach().clone() for p in model.parameters()]
        ctl = Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=100))
        losses = []
        for part in (slice(0, 8), slice(8, 16)) if accumulate else (slice(0, 16),):
            with ctl.autocast():
                losses.append(nn.functional.cross_entropy(model(x[part]), y[part]) / (2 if accumulate else 1))
        losses[0] = losses[0] + torch.tensor(float("inf"))
        if accumulate:
            ctl.backward(losses[0])
        ctl.step(losses[-1])
        ctl.close()
        assert ctl.skipped_steps == 1
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        assert ctl._micro_loss is None  # spent by the step: the next batch starts its own sum


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_batch_dropped_after_backward_leaves_its_loss_out_of_the_next_step(set_to_none):
    """A loop that drops a batch part-way (its first micro-batch's loss non-finite) and resets the gradients: that
    loss went into the next batch's step, whose healthy update was then skipped."""
    x, y = data(16)
    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=100))
    with ctl.autocast():
        bad = nn.functional.cross_entropy(model(x[:8]), y[:8]) / 2 + torch.tensor(float("inf"))
    ctl.backward(bad)
    opt.zero_grad(set_to_none=set_to_none)  # the loop drops the batch
    before = [p.detach().clone() for p in model.parameters()]
    with ctl.autocast():
        good = nn.functional.cross_entropy(model(x), y)
    ctl.step(good)
    ctl.close()
    assert ctl.skipped_steps == 0
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_progress_is_the_share_of_the_run_not_of_the_epoch():
    """The observation's progress (the heuristic's late-run rules read it) was the share of the current epoch: it
    went back to 0 at every epoch."""
    x, y = data(64)
    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=100))
    assert ctl.progress == 0.0  # no loader yet: the budget is unknown
    seen = []
    for xb, yb in ctl.loader((x, y), batch_size=np.int64(16), epochs=np.int64(2)):  # numpy integers count too
        controlled_step(ctl, model, xb, yb)
        seen.append(ctl.progress)
    assert seen == [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
    ctl.close()


def _hooks(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    forward = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    return forward + len(optimizer._optimizer_step_pre_hooks)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"policy": "heurstic"}, "heurstic"),  # a typo: refused before the engine hooks in
        ({"policy": "batch-finder"}, "searches its batch on a TrainingRun"),
        ({"log_dir": "FILE"}, "is a file; give a folder"),
        # "" wrote SummaryWriter's own ./runs/<date>_<host> folder, where None (no logging) was meant
        ({"log_dir": ""}, r"log_dir='' names no folder: give one for the TensorBoard logs, or None for none"),
        # 5 wrote the events under ./5, and b"/tmp/x" under ./b'/tmp/x'
        ({"log_dir": 5}, r"^log_dir=5 \(int\) names no folder: give a str or a Path$"),
        ({"log_dir": b"/tmp/x"}, r"^log_dir=b'/tmp/x' \(bytes\) names no folder: give a str or a Path$"),
        ({}, "injected"),  # the rollback copy's allocation fails after the engine is built
    ],
)
def test_a_refused_controller_leaves_the_model_and_optimizer_unhooked(kwargs, message, tmp_path, monkeypatch):
    import triaccel_rl.controller as controller_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if kwargs.get("log_dir") == "FILE":
        (tmp_path / "file").write_text("not a folder")
        kwargs = {"log_dir": tmp_path / "file"}
    if not kwargs:

        def out_of_memory(self):
            raise torch.OutOfMemoryError("injected: no room for the rollback copy")

        monkeypatch.setattr(controller_module.RollbackGuard, "reserve", out_of_memory)
    with pytest.raises((ValueError, TypeError, torch.OutOfMemoryError), match=message):
        Controller(model, optimizer, **kwargs)
    assert _hooks(model, optimizer) == 0
    model(torch.randn(3, 4)).square().mean().backward()
    optimizer.step()  # no "second update" guard left behind


def test_a_refused_controller_writes_no_events_file(tmp_path):
    """The policy's starting precision is checked after the TensorBoard writer was opened: the refused build left an
    empty events file in ``log_dir`` (beside a run's own, a second run in TensorBoard) and the writer open."""

    class StartsInFp8:
        initial_precision = "fp8"

        def predict(self, observation, state=None, episode_start=None, deterministic=False):
            return np.array([0, 0, 0, 0, 2, 1]), None

    model, optimizer = model_and_optimizer()
    with pytest.raises(ValueError, match="unknown precision 'fp8'; allowed: fp32, bf16, fp16"):
        Controller(model, optimizer, policy=StartsInFp8(), log_dir=tmp_path / "logs")
    assert not (tmp_path / "logs").exists()
    assert _hooks(model, optimizer) == 0


@pytest.mark.parametrize("entry", ["0.weight", "1.running_var"])
def test_a_model_built_on_with_nan_or_inf_is_refused_and_left_unhooked(entry):
    """The build's copy is taken as the confirmed good state without a look: a model holding a NaN weight (or a NaN
    in a batch norm's statistics) when the Controller was built was "rolled back" to itself at every interval, the run
    non-finite to its end, where the same state loaded after the build is refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model.state_dict()[entry].view(-1)[0] = float("nan")  # an inf in a buffer reads as a mask by design
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NoGoodStateError, match=rf"the model's {entry} hold NaN or infinite values when the Controller"):
        Controller(model, optimizer, policy="fp32")
    assert _hooks(model, optimizer) == 0
    ctl = Controller(model, optimizer, policy="fp32", config=ControllerConfig(rollback=False))  # no copy: no refusal
    ctl.close()


def test_a_later_loader_call_with_another_seed_is_refused_not_a_new_run():
    """A seed an epoch (a common pattern) started the run over at each call: 3 calls for 3 epochs trained 6."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="fp32")
    data = (torch.randn(64, 4), torch.randint(0, 2, (64,)))
    for x, y in ctl.loader(data, batch_size=8, epochs=1, seed=0):
        ctl.step(nn.functional.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match=r"loader\(seed=1\) carries on a run that started with seed=0: pass that"):
        next(iter(ctl.loader(data, batch_size=8, epochs=2, seed=1)))
    assert sum(1 for _ in ctl.loader(data, batch_size=8, epochs=2, seed=0)) == 8  # the second epoch, as asked
    ctl.close()


def test_a_second_controller_on_a_driven_optimizer_is_refused_until_the_first_is_closed():
    """Built again (a notebook cell run twice), the second was taken, and the first's guard refused its updates with
    advice about an optimizer.step() that the loop did not have."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = Controller(model, optimizer, policy="bf16")
    with pytest.raises(ValueError, match=r"this optimizer is driven by another open controller .*: close\(\) it first"):
        Controller(model, optimizer, policy="fp32")
    first.close()
    second = Controller(model, optimizer, policy="fp32")
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    second.step(nn.functional.cross_entropy(model(x), y))
    assert second.steps == 1
    second.close()


def test_a_config_that_is_no_controller_config_is_refused_by_name():
    model = nn.Linear(4, 2)
    with pytest.raises(TypeError, match=r"config=\{'interval_steps': 5\} must be a ControllerConfig"):
        Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), config={"interval_steps": 5})  # type: ignore[arg-type]


def test_ctl_lr_is_the_lr_the_next_update_applies_through_a_warm_up():
    """During the warm-up after a batch rise the coupler moves the gain at the step, before the update: ctl.lr (and
    TensorBoard's controller/lr) read the previous step's, one step behind (0.100 read, 0.130 applied, ...)."""
    applied = []

    class Recording(torch.optim.SGD):  # reads the LR inside step(): a user's step hooks see the groups' own LRs
        def step(self, closure=None):  # type: ignore[no-untyped-def, override]
            applied.append(self.param_groups[0]["lr"])
            return super().step(closure)

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = Recording(model.parameters(), lr=0.1)
    ctl = Controller(model, optimizer, policy="fp32")
    data = (torch.randn(256, 4), torch.randint(0, 2, (256,)))
    read = []
    for step, (x, y) in enumerate(ctl.loader(data, batch_size=8, epochs=1)):
        if step == 1:
            ctl.batch_size = 32  # as the executor grows it at a decision: x4, warmed up
        read.append(ctl.lr)
        ctl.step(nn.functional.cross_entropy(model(x), y))
        if step == 6:
            break
    assert read == pytest.approx(applied)
    assert len(set(round(lr, 9) for lr in read)) > 3  # the ramp moved it: the comparison is not of one value
    ctl.close()


def test_a_batch_served_but_never_stepped_on_is_served_again_by_the_next_loader_call():
    """A loop that raises between the batch and its step (an OOM the user catches outside the loop), then carries on
    with a smaller batch: every sample of the epoch is trained once. Before, that batch was lost to the epoch.
    A batch skipped inside the loop (``continue``) stays the user's choice: it is not served again."""
    n = 40
    dataset = (torch.arange(n).float().unsqueeze(1), torch.arange(n) % 2)
    torch.manual_seed(0)
    model = nn.Linear(1, 2)
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="fp32")
    trained: list[int] = []
    failures = [torch.OutOfMemoryError("out of memory (in the user's forward)")]
    while True:
        try:
            for x, y in ctl.loader(dataset, batch_size=8):
                if ctl.steps == 2 and failures:
                    raise failures.pop()
                if ctl.steps == 4 and len(trained) == 24:  # skipped on purpose: the user's own choice
                    trained += [-1] * len(y)
                    continue
                ctl.step(nn.functional.cross_entropy(model(x), y))
                trained += x[:, 0].long().tolist()
            break
        except torch.OutOfMemoryError:
            ctl.batch_size = 4
    assert not failures and ctl.steps == 7  # 2 of 8, then 6 of 4, one of which skipped
    trained_indices = sorted(i for i in trained if i >= 0)
    assert len(trained_indices) == 36 and len(set(trained_indices)) == 36  # each once, 4 skipped
    assert trained.count(-1) == 4 and ctl.state_dict()["loader"]["epoch"] == 1


@pytest.mark.parametrize("where", ["backward", "second-forward"])
def test_a_batch_served_again_after_an_error_trains_as_in_a_run_without_the_error(where):
    """An out-of-memory error in a backward, or in the second micro-batch's forward after ``ctl.backward()`` of the
    first, caught outside the loop: the batch is served again, and before, the failed attempt's gradients (and its
    micro-batch loss) went into the retried update. Now the run ends on the fault-free run's weights, bit for bit."""
    g = torch.Generator().manual_seed(1)
    dataset = (torch.randn(64, 8, generator=g), torch.randint(0, 2, (64,), generator=g))
    armed = {"step": -1}

    def train(fault_at):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), policy="fp32")
        armed["step"], failures = fault_at, 0

        def fail(*_):
            if ctl.steps == armed["step"]:
                armed["step"] = -1
                raise torch.OutOfMemoryError("out of memory (injected)")

        if where == "backward":  # part-way through autograd: the head's gradient is already in
            model[0].weight.register_hook(lambda grad: fail())
        else:
            model[0].register_forward_pre_hook(lambda module, args: fail() if args[0].shape[0] == 4 else None)
        while True:
            try:
                for x, y in ctl.loader(dataset, batch_size=16, epochs=1):
                    with ctl.autocast():
                        first = nn.functional.cross_entropy(model(x[:12]), y[:12]) * 0.75
                    ctl.backward(first)
                    with ctl.autocast():
                        second = nn.functional.cross_entropy(model(x[12:]), y[12:]) * 0.25
                    ctl.step(second)
                break
            except torch.OutOfMemoryError:
                failures += 1
        return [p.detach().clone() for p in model.parameters()], ctl.steps, failures

    clean, faulty = train(-1), train(2)
    assert clean[1:] == (4, 0) and faulty[1:] == (4, 1)
    for got, want in zip(faulty[0], clean[0], strict=True):
        assert torch.equal(got, want)


def test_a_backward_that_raises_leaves_no_gradient_for_the_next_batch():
    """An error part-way through a backward, caught inside the loop, which goes on to the next batch (no batch served
    again): the head's gradient, already accumulated, went into the next batch's update. Now the run equals one that
    skipped that batch before its forward."""
    g = torch.Generator().manual_seed(1)
    dataset = (torch.randn(64, 8, generator=g), torch.randint(0, 2, (64,), generator=g))

    def train(fail: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), policy="fp32")
        armed = [fail]

        def hook(grad):
            if armed[0] and ctl.steps == 1:
                armed[0] = False
                raise torch.OutOfMemoryError("out of memory (injected)")
            return grad

        model[0].weight.register_hook(hook)  # the first layer's: the head's gradient is in by then
        for batch, (x, y) in enumerate(ctl.loader(dataset, batch_size=16, epochs=1)):
            if not fail and batch == 1:
                continue  # the twin skips the batch before its forward
            try:
                with ctl.autocast():
                    loss = nn.functional.cross_entropy(model(x), y)
                ctl.step(loss)
            except torch.OutOfMemoryError:
                continue
        return [p.detach().clone() for p in model.parameters()], ctl.steps

    (faulty, steps), (skipped, twin_steps) = train(True), train(False)
    assert steps == twin_steps == 3
    for got, want in zip(faulty, skipped, strict=True):
        assert torch.equal(got, want)


def test_a_load_drops_a_half_finished_batchs_gradients_and_reads_the_resumed_lr():
    """A micro-batch's gradients (``ctl.backward()``) left by an error before the step went into the first update after
    ``load_state_dict()``; between the load and the next ``loader()`` call ``ctl.lr`` read the coupler from before
    the load, not the one the next update applies; ``ctl.batch_size`` set before any run was dropped silently."""
    g = torch.Generator().manual_seed(1)
    dataset = (torch.randn(64, 8, generator=g), torch.randint(0, 2, (64,), generator=g))
    config = ControllerConfig(elastic=ElasticConfig(lr_rule="linear", warmup_steps=4))

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, opt, Controller(model, opt, policy="fp32", config=config)

    model, opt, ctl = build()
    with pytest.raises(ValueError, match=r"batch_size=32: no run yet; pass batch_size to loader\(\)"):
        ctl.batch_size = 32
    batches = ctl.loader(dataset, batch_size=4, epochs=2)
    for _ in range(2):
        x, y = next(batches)
        ctl.step(nn.functional.cross_entropy(model(x), y))
    ctl.batch_size = 16  # a warm-up of the linear gain: 1 -> 4 over 4 steps
    x, y = next(batches)
    ctl.step(nn.functional.cross_entropy(model(x), y))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), ctl.state_dict()))  # (loads alias what they load)
    expected_lr = ctl.lr
    x, y = next(batches)
    ctl.backward(nn.functional.cross_entropy(model(x[:8]), y[:8]) / 2)  # then an error before the second half
    batches.close()
    model.load_state_dict(saved[0])
    opt.load_state_dict(copy.deepcopy(saved[1]))
    ctl.load_state_dict(copy.deepcopy(saved[2]))
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert ctl.lr == pytest.approx(expected_lr)  # read 0.34, the LR from before the rewind
    resumed = ctl.loader(dataset, batch_size=4, epochs=2)
    x, y = next(resumed)
    ctl.step(nn.functional.cross_entropy(model(x), y))
    after_resume = [p.detach().clone() for p in model.parameters()]
    # The twin: the same checkpoint loaded into a fresh controller, no half-finished batch.
    model, opt, ctl = build()
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    ctl.load_state_dict(saved[2])
    assert ctl.lr == pytest.approx(expected_lr)  # read 0.13, the gain last applied, before the loader() call
    x, y = next(ctl.loader(dataset, batch_size=4, epochs=2))
    ctl.step(nn.functional.cross_entropy(model(x), y))
    for got, want in zip(after_resume, model.parameters(), strict=True):
        assert torch.equal(got, want.detach())


def test_loader_on_an_evaluation_set_does_not_silently_steer_the_training_run(caplog):
    """``loader()`` serves one run's training data. Called on a test set inside the training loop, the open training
    iterator went on serving from the test set's loader (training stopped half-way through its epoch); called between
    epochs, the training data started over at epoch 0 without a word. Now the first raises, the second warns."""
    import logging

    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy="fp32")
    train, test = data(96), data(32)
    with pytest.raises(RuntimeError, match="replaced by a loader\\(\\) call on another dataset"):
        for x, y in ctl.loader(train, batch_size=16):
            ctl.step(nn.functional.cross_entropy(model(x), y))
            with caplog.at_level(logging.WARNING, logger="triaccel_rl"):
                for _ in ctl.loader(test, batch_size=16):  # an evaluation through the controller
                    break
    assert "loader() on another dataset ((32, 8) inputs) starts a new run of the data from epoch 0" in caplog.text
    ctl.close()


def test_loader_given_a_list_of_samples_says_what_to_pass_in_a_short_message():
    """A list of 60000 ``(x, y)`` samples named each element's type: a 540 KB message, saying nothing of the fix."""
    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy="fp32")
    x, y = data(600)
    with pytest.raises(ValueError) as refused:
        next(ctl.loader(list(zip(x, y, strict=True)), batch_size=16))
    assert str(refused.value) == (
        "dataset must be a pair (inputs, labels) of tensors; got a list of 600 items (tuple). For a list of (x, y) "
        "samples, pass the tensors (torch.stack(xs), torch.stack(ys))"
    )
    with pytest.raises(ValueError, match=r"got a tuple of 2 items \(Tensor, ndarray\)\. For a list"):
        next(ctl.loader((x, y.numpy()), batch_size=16))
    ctl.close()


def test_loader_on_data_of_other_shapes_measures_its_memory_again_and_checks_the_budget():
    """A new run of the data kept the first data's measured activations: the memory predicted (which the budget and
    batch moves read) was the 8x8 images' for 32x32 ones, and the budget a fresh controller refuses went unchecked."""
    from triaccel_rl.config import ConfigError, MemoryBudget

    def conv_run(memory=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(8, 2))  # fmt: skip
        return model, Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="fp32", memory=memory)

    def first_step(model, ctl, images):
        for x, y in ctl.loader(images, batch_size=16):
            ctl.step(nn.functional.cross_entropy(model(x), y))
            return

    small = (torch.randn(32, 3, 8, 8), torch.randint(0, 2, (32,)))
    large = (torch.randn(32, 3, 32, 32), torch.randint(0, 2, (32,)))
    model, ctl = conv_run()
    first_step(model, ctl, small)
    on_small, one_small = ctl.predicted_memory_bytes(16), ctl.predicted_memory_bytes(1)
    first_step(model, ctl, large)
    fresh_model, fresh = conv_run()
    first_step(fresh_model, fresh, large)
    assert ctl.predicted_memory_bytes(16) == fresh.predicted_memory_bytes(16) > on_small
    model, ctl = conv_run(MemoryBudget(bytes=(one_small + fresh.predicted_memory_bytes(1)) // 2))  # a small sample fits
    first_step(model, ctl, small)
    with pytest.raises(ConfigError, match="is smaller than one sample needs"):
        first_step(model, ctl, large)
    ctl.close()
    # A resume onto other data than this controller measured: its costs are the checkpoint data's, not its own
    # (the first version of this fix measured again on a new run only, not after load_state_dict()).
    saver_model, saver = conv_run()
    first_step(saver_model, saver, large)
    model, ctl = conv_run()
    first_step(model, ctl, small)
    ctl.load_state_dict(saver.state_dict())
    first_step(model, ctl, large)
    assert ctl.predicted_memory_bytes(16) == fresh.predicted_memory_bytes(16)


def test_a_step_whose_post_hook_raises_after_the_update_is_counted_and_its_batch_not_served_again():
    """The update went in, then a user's step post-hook raised: the step was not counted, so the next loader() call
    served the batch again (trained twice) and the interval's applied updates outnumbered its steps."""
    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=4))
    failures = [RuntimeError("a post-hook failed")]

    def post_hook(*_: Any) -> None:
        if failures and ctl.steps == 1:
            raise failures.pop()

    opt.register_step_post_hook(post_hook)
    served: list[int] = []
    dataset = (torch.arange(64).float().unsqueeze(1).repeat(1, 8), torch.arange(64) % 2)
    while True:
        try:
            for x, y in ctl.loader(dataset, batch_size=16):
                served += x[:, 0].long().tolist()
                ctl.step(nn.functional.cross_entropy(model(x), y))
            break
        except RuntimeError:
            pass
    assert ctl.steps == 4 and sorted(served) == list(range(64))  # each sample once
    ctl.close()
    assert ctl.skipped_steps == 0


def test_a_loop_over_epochs_with_total_epochs_is_the_run_of_one_loader_call():
    """With ``epochs=epoch + 1`` alone every epoch read as the run's end (progress 1.0 after epoch 0), and the anneal
    preset cut the LR from the first decision. ``total_epochs`` gives the length: progress, decisions and weights are
    those of one ``loader(epochs=4)`` call; without it (the control) they are not."""
    from dataclasses import replace

    def run(per_epoch, total_epochs=None):
        model, opt = model_and_optimizer()
        config = replace(ControllerConfig.preset("anneal"), interval_steps=2)
        ctl = Controller(model, opt, policy="heuristic", config=config)
        progress = []
        calls = [epoch + 1 for epoch in range(4)] if per_epoch else [4]
        for epochs in calls:
            for x, y in ctl.loader(data(96), batch_size=16, epochs=epochs, total_epochs=total_epochs):
                ctl.step(nn.functional.cross_entropy(model(x), y))
                progress.append(ctl.progress)
        ctl.close()
        return progress, [d.lr_scale for d in ctl.decisions], [p.detach().clone() for p in model.parameters()]

    single, per_epoch, control = run(False), run(True, total_epochs=4), run(True)
    assert per_epoch[0] == single[0] and per_epoch[1] == single[1]
    assert all(torch.equal(a, b) for a, b in zip(single[2], per_epoch[2], strict=True))
    assert control[0][5] == 1.0 and control[1] != single[1]
    model, opt = model_and_optimizer()
    ctl = Controller(model, opt)
    with pytest.raises(ValueError, match="total_epochs=2 must be a whole number >= epochs=3"):
        next(ctl.loader(data(96), batch_size=16, epochs=3, total_epochs=2))
    next(ctl.loader(data(96), batch_size=16, epochs=3.0, total_epochs=10.0))  # whole floats, as epochs takes them


@pytest.mark.parametrize("policy", ["fp32", "heuristic"])
def test_a_float64_default_dtype_trains_as_the_plain_loop(policy):
    """With ``torch.set_default_dtype(torch.float64)`` the first step raised "index_add_(): self (Double) and source
    (Float) must have the same scalar type" (the engine's per-layer sums took the default dtype), for every policy."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        x, y = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 3
        runs = []
        for controlled in (False, True):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            config = ControllerConfig(interval_steps=2)
            ctl = Controller(model, optimizer, policy=policy, config=config) if controlled else None
            for start in range(0, 64, 8):
                optimizer.zero_grad()
                with ctl.autocast() if ctl is not None else contextlib.nullcontext():
                    loss = nn.functional.cross_entropy(model(x[start : start + 8]), y[start : start + 8])
                if ctl is None:
                    loss.backward()
                    optimizer.step()
                else:
                    ctl.step(loss)
            if ctl is not None:
                assert ctl.steps == 8 and len(ctl.decisions) == 4
                ctl.close()
            runs.append([p.detach().clone() for p in model.parameters()])
        assert all(p.dtype == torch.float64 for p in runs[1])
        if policy == "fp32":  # the heuristic starts in bf16
            assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    finally:
        torch.set_default_dtype(previous)


def test_a_bare_learned_policys_speed_trial_ends_back_in_fp32():
    """A ``LearnedPolicy`` not made by ``make_policy`` keeps ``initial_precision`` None (the model's own, fp32): the
    end of its speed trial raised "unknown precision None" (until 2026-12-06)."""
    from triaccel_rl.policies import LearnedPolicy, pretrained_policy_path

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    policy = LearnedPolicy(pretrained_policy_path())
    policy.speed_trial = True  # on by default on a GPU, where step times are measured
    assert policy.initial_precision is None
    ctl = Controller(model, optimizer, policy=policy, config=ControllerConfig(interval_steps=4))
    x, y = torch.randn(256, 8), torch.randint(0, 4, (256,))
    for xb, yb in ctl.loader((x, y), batch_size=4, epochs=1):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(xb), yb)
        ctl.step(loss)
        if ctl._trial is None and "chosen" in ctl.speed_trial and not ctl.decisions:
            assert set(ctl.precisions) == {Precision.FP32}  # the trial over, the model's own precision back
    assert "chosen" in ctl.speed_trial and ctl.decisions
    ctl.close()


def test_a_loop_serving_its_own_batches_is_told_what_is_off_and_why_a_batch_move_is_refused(caplog):
    """Without ``ctl.loader()`` batch moves, the memory budget's checks and the progress rules were off silently, and
    a refused move read "batch 0 already at its largest allowed size 512"; ``ctl.lr`` after ``close()`` still read
    the multiplier the optimizer no longer applies."""
    model, optimizer = model_and_optimizer()
    ctl = Controller(model, optimizer, policy=_Alternating(), config=ControllerConfig(interval_steps=2))
    x, y = data(64)
    with caplog.at_level("INFO", logger="triaccel_rl"):
        for start in range(0, 64, 8):
            with ctl.autocast():
                loss = nn.functional.cross_entropy(model(x[start : start + 8]), y[start : start + 8])
            ctl.step(loss)
    warned = [r for r in caplog.records if "serves its own batches" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"
    refusals = [reason for report in ctl.decisions for reason in report.refused]
    assert refusals and all(
        "batch moves apply to ctl.loader()'s batches; this loop serves its own" in r for r in refusals
    )
    assert not any("already" in r for r in refusals)
    lr = optimizer.param_groups[0]["lr"]
    assert ctl.lr == pytest.approx(lr * ctl.engine.lr_scale) and ctl.engine.lr_scale != 1.0  # the policy moved it
    ctl.close()
    assert ctl.lr == lr  # the optimizer is the user's again: its own LR is what the next update applies


def _two_losses(out, y):
    """Two losses of one graph: a task loss and a penalty on the same outputs."""
    return nn.functional.cross_entropy(out, y), out.float().pow(2).mean()


@pytest.mark.parametrize("policy", ["fp32", "fp16"])
def test_two_losses_of_one_graph_step_as_the_plain_loops_retained_backwards(policy):
    """``ctl.backward(loss1, retain_graph=True); ctl.step(loss2)`` is the plain loop's ``loss1.backward(
    retain_graph=True); loss2.backward()`` (scaled by a ``GradScaler`` under fp16, where a bare ``loss1.backward()``
    would be unscaled by 65536 at the step). Before the fix ``backward`` took no ``retain_graph``, and the error for
    the freed graph named a leftover ``loss.backward()`` or an RNN's state, not the shared graph."""
    x, y = data(48)
    batches = [(x[16 * i : 16 * (i + 1)], y[16 * i : 16 * (i + 1)]) for i in range(3)]
    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy=policy, config=ControllerConfig(interval_steps=100))
    for xb, yb in batches:
        with ctl.autocast():
            loss1, loss2 = _two_losses(model(xb), yb)
        ctl.backward(loss1, retain_graph=True)
        ctl.step(loss2)
    assert ctl.steps == 3 and ctl.skipped_steps == 0
    plain, plain_opt = model_and_optimizer()
    scaler = torch.amp.GradScaler("cpu", enabled=policy == "fp16")
    for xb, yb in batches:
        plain_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16, enabled=policy == "fp16"):
            loss1, loss2 = _two_losses(plain(xb), yb)
        scaler.scale(loss1).backward(retain_graph=True)
        scaler.scale(loss2).backward()
        scaler.step(plain_opt)
        scaler.update()
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)
    with ctl.autocast():
        loss1, loss2 = _two_losses(model(x[:16]), y[:16])
    with pytest.raises(ValueError, match=r"retain_graph=1 must be True or False"):
        ctl.backward(loss1, retain_graph=1)  # type: ignore[arg-type]
    ctl.backward(loss1)  # frees the graph loss2 shares
    expected = r"losses sharing a graph: ctl.step\(loss1 \+ loss2\), or ctl.backward\(loss1, retain_graph=True\)"
    with pytest.raises(RuntimeError, match=expected):
        ctl.step(loss2)
    ctl.close()


def _indexed_run():
    """A controller on 12 samples whose first input column is the sample's index, and a step that records them."""
    torch.manual_seed(0)
    x = torch.zeros(12, 2)
    x[:, 0] = torch.arange(12).float()
    y = torch.zeros(12, dtype=torch.long)
    model = nn.Linear(2, 2)
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="fp32", device="cpu")
    trained: list[int] = []

    def step(xb):
        with ctl.autocast():
            ctl.step(model(xb).pow(2).mean())
        trained.extend(xb[:, 0].long().tolist())

    return ctl, (x, y), step, trained


def _refuse_moving(shape):
    """``Tensor.to`` raising for tensors of ``shape`` (moving them to the device failed) and working for the rest."""
    to = torch.Tensor.to

    def failing_to(self, *args, **kwargs):
        if tuple(self.shape) == shape:
            raise torch.OutOfMemoryError("injected: no room for the dataset on the device")
        return to(self, *args, **kwargs)

    return failing_to


_NOT_MOVED = "^injected: no room for the dataset on the device$"  # _refuse_moving's error, not another


@pytest.mark.parametrize(
    ("refusal", "error", "message"),
    [
        ("bad seed", ValueError, "^seed=-1 must be a whole number >= 0$"),
        ("another dataset not moved", torch.OutOfMemoryError, _NOT_MOVED),
        ("the same data not moved", torch.OutOfMemoryError, _NOT_MOVED),
    ],
    ids=["bad seed", "another dataset not moved", "the same data not moved"],
)
def test_a_refused_loader_call_leaves_the_unstepped_batch_to_be_served_again(refusal, error, message, monkeypatch):
    """The loop breaks out before ``step()`` on its second batch, which the next call must serve again. A refused
    ``loader()`` call in between (an evaluation set with a bad seed, data that cannot be moved to the device) cleared
    the record of that batch, and the memory model, before it raised: the batch was never trained, and a checkpoint
    counted it as trained. Now the run after a refused call is the run without it, sample for sample."""
    ctl, dataset, step, trained = _indexed_run()
    for i, (xb, _) in enumerate(ctl.loader(dataset, batch_size=4, epochs=1)):
        if i == 1:
            break
        step(xb)
    left_on = ctl.state_dict()["loader"]
    assert left_on == {"n": 12, "seed": 0, "epoch": 0, "cursor": 4, "samples_served": 4}  # the broken-on batch: not
    costs, memory_model = ctl.costs, ctl.memory_model
    evaluation = torch.zeros(5, 3), torch.zeros(5, dtype=torch.long)
    with monkeypatch.context() as patch, pytest.raises(error, match=message) as raised:
        if refusal == "bad seed":
            next(iter(ctl.loader(evaluation, batch_size=2, seed=-1)))
        elif refusal == "another dataset not moved":
            patch.setattr(torch.Tensor, "to", _refuse_moving((5, 3)))
            next(iter(ctl.loader(evaluation, batch_size=2)))
        else:  # new tensors of the run's data (moved each epoch, say), that cannot be moved to the device
            patch.setattr(torch.Tensor, "to", _refuse_moving((12, 2)))
            next(iter(ctl.loader((dataset[0].clone(), dataset[1].clone()), batch_size=4, epochs=1)))
    assert type(raised.value) is error
    assert ctl.state_dict()["loader"] == left_on
    assert ctl.costs is costs and ctl.memory_model is memory_model  # not measured again for data never taken
    for xb, _ in ctl.loader(dataset, batch_size=4, epochs=1):
        step(xb)
    assert sorted(trained) == list(range(12))  # every sample once in the epoch, as without the refused call
    assert ctl.state_dict()["loader"] == {"n": 12, "seed": 0, "epoch": 1, "cursor": 0, "samples_served": 12}
    ctl.close()


def test_a_refused_resume_leaves_the_checkpoint_pending_and_the_run_as_it_was():
    """``loader()`` after ``load_state_dict()`` at another base batch size is refused; the run's loader, batch size
    and LR coupler stay as they were, and the next call at the checkpoint's batch size carries on from its place."""
    ctl, dataset, step, trained = _indexed_run()
    for i, (xb, _) in enumerate(ctl.loader(dataset, batch_size=4, epochs=1)):
        if i == 2:
            break
        step(xb)
    saved = ctl.state_dict()
    other, _, other_step, other_trained = _indexed_run()
    other.load_state_dict(saved)
    with pytest.raises(ValueError, match="loader\\(batch_size=2\\) after a resume"):
        next(iter(other.loader(dataset, batch_size=2, epochs=1)))
    assert other._loader is None and other.lr_coupler is None and other.batch_size == 4
    assert other.state_dict()["loader"] == saved["loader"]
    for xb, _ in other.loader(dataset, batch_size=4, epochs=1):
        other_step(xb)
    assert sorted(trained + other_trained) == list(range(12))
    ctl.close()
    other.close()


def test_a_checkpoint_whose_lr_multiplier_is_off_this_ladder_is_refused():
    """Saved under ``preset("aggressive")`` at its x2.0 rung and loaded under the default ladder (0.5-1.5), the run
    trained above the top rung without a word; a multiplier on the ladder still loads."""
    model, optimizer = model_and_optimizer()
    saver = Controller(model, optimizer, policy="fp32", config=ControllerConfig.preset("aggressive"))
    saver.engine.lr_scale = 2.0  # where the aggressive ladder's top rung puts it
    state = copy.deepcopy(saver.state_dict())
    saver.close()
    model, optimizer = model_and_optimizer()
    ctl = Controller(model, optimizer, policy="fp32")
    with pytest.raises(ValueError, match=r"LR multiplier 2 is outside this controller's LR ladder \[0\.5, 0\.75"):
        ctl.load_state_dict(state)
    assert ctl.engine.lr_scale == 1.0 and ctl.steps == 0
    state["engine"]["lr_scale"] = 1.5
    ctl.load_state_dict(state)
    assert ctl.engine.lr_scale == 1.5


def test_the_cpu_memory_reading_follows_the_map_the_batch_and_the_memory_model():
    """``predicted_memory_bytes`` (the CPU's memory reading at every step) is cached on the memory model, its
    revision, the batch and the map: each change gives the memory model's own prediction again, never a stale one."""
    from triaccel_rl.memory import MemoryModel

    model, opt = model_and_optimizer()
    ctl = Controller(model, opt, policy="fp32", config=ControllerConfig(interval_steps=1000))
    train(ctl, model, epochs=1, batch_size=64)

    def fresh(batch):
        return ctl.memory_model.predict(batch, list(ctl.engine.precision.precisions))

    fp32 = ctl.predicted_memory_bytes(16)
    assert fp32 == fresh(16) and ctl.predicted_memory_bytes(32) == fresh(32) > fp32
    ctl.engine.precision.set(["bf16"] * 3)
    assert ctl.predicted_memory_bytes(16) == fresh(16) != fp32  # (the 16-bit weight copies: more on this model)
    ctl.engine.precision.precisions[0] = Precision.FP32  # written in place
    assert ctl.predicted_memory_bytes(16) == fresh(16) != ctl.memory_model.predict(16, [Precision.BF16] * 3)
    ctl.memory_model.observe(16, ctl.precisions, 10**9)  # a reading: the model's line moves
    assert ctl.predicted_memory_bytes(16) == fresh(16) >= 10**9
    ctl.memory_model = MemoryModel(ctl.costs, ctl.profile)  # replaced by one at the same revision
    ctl.memory_model.observe(16, ctl.precisions, 5 * 10**8)
    assert ctl.predicted_memory_bytes(16) == fresh(16) < 10**9
    with pytest.raises(ValueError, match="batch_size=True must be a whole number"):
        ctl.predicted_memory_bytes(True)  # equal to 1 as a key, and refused all the same
    ctl.predicted_memory_bytes(1)
    with pytest.raises(ValueError, match="batch_size=True must be a whole number"):
        ctl.predicted_memory_bytes(True)
    ctl.close()
