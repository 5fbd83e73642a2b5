"""Tests for triaccel_rl.engine.StepEngine: a sparse gradient the build could not see is refused at the step.

The build refuses ``nn.Embedding(sparse=True)``; an embedding switched to sparse after it, or a hand-written one calling
``F.embedding(..., sparse=True)``, made the reference step raise torch's NotImplementedError from ``_foreach_norm``.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from sparse_lookup import Lookup, lookup_batches
from torch import nn
from torch.nn import functional as F

import triaccel_rl as ta
from triaccel_rl.engine import StepEngine

CPU = torch.device("cpu")
REFUSED = (
    r"parameters \['emb.weight'\] have sparse gradients \(an embedding's sparse=True set after the controller was "
    r"built, or F.embedding\(\.\.\., sparse=True\)\), which the controller's gradient statistics and non-finite checks "
    r"do not take: make them with sparse=False"
)


class _HandWrittenEmbedding(nn.Module):
    """An embedding the build's check of ``nn.Embedding`` and ``nn.EmbeddingBag`` does not know."""

    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(30, 8))
        self.sparse = sparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.weight, sparse=self.sparse)


def _lookup(hand_written: bool = False) -> Lookup:
    return Lookup(make_embedding=(lambda: _HandWrittenEmbedding(sparse=False)) if hand_written else None)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return lookup_batches(n)


def _step(ctl: ta.Controller, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    with ctl.autocast():
        loss = F.cross_entropy(model(batch[0]), batch[1])
    ctl.step(loss)


def _optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [copy.deepcopy(optimizer.state[p]["momentum_buffer"]) for g in optimizer.param_groups for p in g["params"]]


def test_a_hand_written_sparse_embedding_passes_the_build_and_is_refused_at_its_first_step() -> None:
    model = _lookup(hand_written=True)
    model.emb.sparse = True
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ta.Controller(model, optimizer, policy="fp32") as ctl:
        with pytest.raises(ValueError, match=REFUSED):
            _step(ctl, model, _batches(1)[0])
        assert ctl.steps == 0
        assert ctl.engine.applied_steps() == 0
        assert optimizer.state == {}
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


@pytest.mark.parametrize("hand_written", [False, True], ids=["nn.Embedding", "F.embedding"])
@pytest.mark.parametrize("policy", ["fp32", "fp16"])
def test_a_sparse_gradient_is_refused_at_the_reference_step_with_nothing_changed(
    hand_written: bool, policy: str
) -> None:
    """Switched to sparse after a first step: the next step raises before the statistics, leaving the parameters,
    the momentum, the loss scale and its growth count, and the step counters as they were. Switched back, training
    goes on as a plain loop's over the steps taken."""
    model = _lookup(hand_written)
    plain = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first, refused, last = _batches(3)
    ctl = ta.Controller(model, optimizer, policy=policy, config=ta.ControllerConfig(interval_steps=50))
    try:
        _step(ctl, model, first)
        engine = ctl.engine
        assert not engine.fused
        scaler = engine.grad_scaler
        assert (scaler is not None) == (policy == "fp16")
        weights, moments = copy.deepcopy(model.state_dict()), _optimizer_state(optimizer)
        scale = None if scaler is None else (scaler.get_scale(), int(scaler._growth_tracker))
        model.emb.sparse = True
        optimizer.zero_grad()
        with pytest.raises(ValueError, match=REFUSED):
            _step(ctl, model, refused)
        assert (ctl.steps, ctl.engine.applied_steps()) == (1, 1)
        assert scale == (None if scaler is None else (scaler.get_scale(), int(scaler._growth_tracker)))
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, weights[name], rtol=0, atol=0)
        for moment, kept in zip(_optimizer_state(optimizer), moments, strict=True):
            torch.testing.assert_close(moment, kept, rtol=0, atol=0)
        model.emb.sparse = False
        optimizer.zero_grad()
        _step(ctl, model, last)
        assert (ctl.steps, ctl.engine.applied_steps()) == (2, 2)
    finally:
        ctl.close()
    if policy == "fp32":
        plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
        for x, y in (first, last):
            plain_optimizer.zero_grad()
            F.cross_entropy(plain(x), y).backward()
            plain_optimizer.step()
        for p, q in zip(model.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("users_zero_grad", [False, True], ids=["views-kept", "after-users-zero-grad"])
def test_the_fused_path_trains_a_held_sparse_embedding_as_a_dense_one(users_zero_grad: bool) -> None:
    """The fused step adds a sparse gradient into its parameter's dense view of the flat buffer: it trains on, as a
    plain loop over the dense embedding (within the kernel's rounding), and is not refused. After a user's
    ``optimizer.zero_grad()`` the backward hands over autograd's own sparse gradient, which the step copies into the
    dense view (a foreach copy refuses sparse tensors: the step raised, and ``close()`` after it)."""
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the fused step needs a GPU or Triton's interpreter")
    model = _lookup()
    plain = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = StepEngine(model, optimizer, CPU, fused=True)
    model.emb.sparse = True
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for x, y in _batches(3):
        if users_zero_grad:
            optimizer.zero_grad()
        engine.backward_and_step(F.cross_entropy(model(x), y))
        plain_optimizer.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        plain_optimizer.step()
    assert engine.applied_steps() == 3
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    if users_zero_grad:
        optimizer.zero_grad()
        x, y = _batches(1)[0]
        F.cross_entropy(model(x), y).backward()  # a backward no step takes: a sparse gradient left at the close
        assert model.emb.weight.grad.is_sparse
        engine.remove()  # gives the parameters their own storage; the sparse gradient is left as it is
        assert model.emb.weight.grad.is_sparse
