"""Tests for triaccel_rl.engine.StepEngine: a sparse embedding stepped by an optimizer of the user's own.

``nn.Embedding(sparse=True)`` under ``torch.optim.SparseAdam``, beside the Controller's optimizer over the rest of the
model (recommendation and NLP models), was refused at the build even though the Controller's optimizer does not hold
it, and its sparse gradient at the step. Only a held sparse embedding is refused now.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from sparse_lookup import Lookup, lookup_batches
from torch.nn import functional as F

import triaccel_rl as ta

N_STEPS = 6


def _recommender() -> Lookup:
    return Lookup(vocab=50, sparse=True)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return lookup_batches(n, vocab=50, batch=16)


def _optimizers(model: Lookup) -> tuple[torch.optim.SGD, torch.optim.SparseAdam]:
    dense = torch.optim.SGD(model.head.parameters(), lr=0.1, momentum=0.9)
    return dense, torch.optim.SparseAdam(list(model.emb.parameters()), lr=0.01)


def _plain_run(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Lookup:
    model = _recommender()
    dense, sparse = _optimizers(model)
    for x, y in batches:
        dense.zero_grad()
        sparse.zero_grad()
        F.cross_entropy(model(x), y).backward()
        dense.step()
        sparse.step()
    return model


def _controller_step(ctl: ta.Controller, model: Lookup, sparse: torch.optim.Optimizer, x, y) -> None:
    """The README's order: the second optimizer's zero_grad() before the backward, its step() after ctl.step."""
    sparse.zero_grad()
    with ctl.autocast():
        loss = F.cross_entropy(model(x), y)
    ctl.step(loss)
    sparse.step()


def _needs_fused() -> None:
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the fused step needs a GPU or Triton's interpreter")


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_a_sparse_adam_embedding_beside_the_controller_trains_as_a_plain_loop(fused: bool) -> None:
    if fused:
        _needs_fused()
    batches = _batches(N_STEPS)
    plain = _plain_run(batches)
    model = _recommender()
    dense, sparse = _optimizers(model)
    with ta.Controller(model, dense, policy="fp32", fused=fused) as ctl:
        assert ctl.engine.fused == fused
        for x, y in batches:
            _controller_step(ctl, model, sparse, x, y)
    assert (ctl.steps, ctl.skipped_steps) == (N_STEPS, 0)
    # The fused kernel rounds the head's update in its own order; the reference path is the plain loop bit for bit
    tolerance = 1e-6 if fused else 0.0
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=tolerance, msg=lambda m, name=name: f"{name}: {m}")
    assert all(len(sparse.state[p]) == 3 for p in model.emb.parameters())  # SparseAdam stepped N_STEPS times
    assert int(sparse.state[model.emb.weight]["step"]) == N_STEPS


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_an_infinite_sparse_gradient_under_fp16_skips_both_optimizers(fused: bool) -> None:
    """The embedding's gradient is unscaled as autograd makes it (it stays sparse), checked by its values, and dropped
    on the skipped step: SparseAdam skips it, the head is not updated, and the loss scale backs off."""
    if fused:
        _needs_fused()
    batches = _batches(4)
    model = _recommender()
    dense, sparse = _optimizers(model)
    inject = {"on": False}

    def blow_up(grad: torch.Tensor) -> torch.Tensor:
        return grad * math.inf if inject["on"] else grad

    model.emb.weight.register_hook(blow_up)
    ctl = ta.Controller(model, dense, policy="fp16", fused=fused, config=ta.ControllerConfig(interval_steps=50))
    try:
        engine = ctl.engine
        assert engine.fused == fused
        for x, y in batches[:2]:
            _controller_step(ctl, model, sparse, x, y)
        assert engine.applied_steps() == 2
        # Unscaled: the fp32 gradient of the same batch (not 65536 times it), kept sparse for SparseAdam
        x, y = batches[2]
        reference = _recommender()
        reference.load_state_dict(model.state_dict())
        F.cross_entropy(reference(x), y).backward()
        sparse.zero_grad()
        with ctl.autocast():
            loss = F.cross_entropy(model(x), y)
        scale = engine.loss_scale
        ctl.step(loss)
        grad = model.emb.weight.grad
        assert grad is not None and grad.is_sparse
        torch.testing.assert_close(grad.to_dense(), reference.emb.weight.grad.to_dense(), rtol=1e-2, atol=1e-4)
        sparse.step()
        weights = copy.deepcopy(model.state_dict())
        moments = copy.deepcopy(sparse.state[model.emb.weight])
        applied = engine.applied_steps()
        inject["on"] = True
        x, y = batches[3]
        sparse.zero_grad()
        with ctl.autocast():
            loss = F.cross_entropy(model(x), y)
        ctl.step(loss)
        assert model.emb.weight.grad is None  # dropped: SparseAdam's step skips it
        sparse.step()
        assert engine.applied_steps() == applied
        assert engine.loss_scale == scale / 2
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, weights[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
        for key, value in sparse.state[model.emb.weight].items():
            torch.testing.assert_close(value, moments[key], rtol=0, atol=0)
        inject["on"] = False
        _controller_step(ctl, model, sparse, x, y)  # trains on
        assert engine.applied_steps() == applied + 1
        assert all(torch.isfinite(p).all() for p in model.parameters())
    finally:
        ctl.close()
    assert ctl.skipped_steps == 1


@pytest.mark.parametrize("held", ["all", "embedding"])
def test_a_sparse_embedding_the_controllers_optimizer_holds_is_still_refused(held: str) -> None:
    model = _recommender()
    params = model.parameters() if held == "all" else model.emb.parameters()
    with pytest.raises(
        ValueError,
        match=r"modules \['emb'\] make sparse gradients \(sparse=True\), which the controller's gradient statistics "
        r"and updates do not take: build them with sparse=False",
    ):
        ta.Controller(model, torch.optim.SGD(params, lr=0.1), policy="fp32")


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("policy", ["bf16", "fp16"])
def test_sixteen_bit_policies_train_a_sparse_adam_embedding_with_finite_weights(policy: str, fused: bool) -> None:
    """Every step is taken, the embedding's rows move and stay finite, and the signals are read at decisions."""
    if fused:
        _needs_fused()
    batches = _batches(8)
    model = _recommender()
    before = model.emb.weight.detach().clone()
    dense, sparse = _optimizers(model)
    config = ta.ControllerConfig(interval_steps=4)
    with ta.Controller(model, dense, policy=policy, config=config, fused=fused) as ctl:
        assert ctl.engine.fused == fused
        for x, y in batches:
            _controller_step(ctl, model, sparse, x, y)
        assert ctl.signals is not None
    assert (ctl.steps, ctl.skipped_steps) == (8, 0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model.emb.weight, before)
    assert int(sparse.state[model.emb.weight]["step"]) == 8


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_an_interval_of_nan_losses_rolls_back_and_the_second_optimizer_never_steps_on_them(fused: bool) -> None:
    """Each NaN step drops the embedding's gradient (SparseAdam skips it); a wholly non-finite interval restores the
    model, embedding included, to the last good copy (taken inside a ``ctl.step``, so before SparseAdam's step of that
    batch: its moments are the user's, not restored), and training then goes on finite."""
    batches = _batches(16)
    model = _recommender()
    dense, sparse = _optimizers(model)
    config = ta.ControllerConfig(interval_steps=4, snapshot_every=1)
    after_ctl_steps = []
    if fused:
        _needs_fused()
    with ta.Controller(model, dense, policy="fp32", config=config, fused=fused) as ctl:
        for step, (x, y) in enumerate(batches):
            sparse.zero_grad()
            with ctl.autocast():
                loss = F.cross_entropy(model(x), y)
                if 8 <= step < 12:
                    loss = loss * math.nan
            ctl.step(loss)
            if step < 8:
                after_ctl_steps.append([p.detach().clone() for p in model.parameters()])
            else:
                assert (model.emb.weight.grad is None) == (step < 12)
            sparse.step()
            if step == 11:
                assert ctl.rollbacks == 1
                assert int(sparse.state[model.emb.weight]["step"]) == 8  # no NaN batch reached it
                restored = [p.detach() for p in model.parameters()]
                assert any(
                    all(torch.equal(p, q) for p, q in zip(restored, copy, strict=True)) for copy in after_ctl_steps
                )
    assert ctl.skipped_steps == 4
    assert int(sparse.state[model.emb.weight]["step"]) == 12
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(sparse.state[model.emb.weight][key]).all() for key in ("exp_avg", "exp_avg_sq"))


def test_a_checkpoint_resumes_as_the_uninterrupted_run() -> None:
    """The user saves the model (the embedding too) and SparseAdam's state beside the Controller's checkpoint (its
    optimizer's state). Resumed, the run ends where the uninterrupted one does, bit for bit."""
    batches = _batches(N_STEPS)
    model = _recommender()
    dense, sparse = _optimizers(model)
    with ta.Controller(model, dense, policy="fp32") as ctl:
        for x, y in batches[:3]:
            _controller_step(ctl, model, sparse, x, y)
        saved = copy.deepcopy(ctl.state_dict())
        saved_sparse = copy.deepcopy(sparse.state_dict())
        saved_model = copy.deepcopy(model.state_dict())
        for x, y in batches[3:]:
            _controller_step(ctl, model, sparse, x, y)
    resumed = _recommender()
    dense_again, sparse_again = _optimizers(resumed)
    resumed.load_state_dict(saved_model)
    with ta.Controller(resumed, dense_again, policy="fp32") as ctl:
        ctl.load_state_dict(saved)
        sparse_again.load_state_dict(saved_sparse)
        for x, y in batches[3:]:
            _controller_step(ctl, resumed, sparse_again, x, y)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_a_second_optimizers_embedding_switched_to_sparse_after_the_build_is_taken(fused: bool) -> None:
    """The engine does not hold it: its sparse gradient is checked by its values and left to the user's optimizer
    (both paths raised, the reference one torch's NotImplementedError from ``_foreach_norm`` at first)."""
    if fused:
        _needs_fused()
    batches = _batches(3)
    model = _recommender()
    model.emb.sparse = False
    dense, _ = _optimizers(model)
    with ta.Controller(model, dense, policy="fp32", fused=fused) as ctl:
        model.emb.sparse = True
        sparse = torch.optim.SparseAdam(list(model.emb.parameters()), lr=0.01)
        for x, y in batches:
            _controller_step(ctl, model, sparse, x, y)
    plain = _plain_run(batches)  # sparse from the start: its embedding trains as the switched one
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6 if fused else 0.0)
