"""After ``close()``, the parameters, their gradients and the optimizer state own their storage (a review, 2026-12-07).

On the fused path they were views of the flat buffers: ``torch.save`` of one layer wrote every layer (45 MB for
ResNet-18's head of 22 kB), and any one of them kept the buffers alive.
"""

import copy
import io
import os

import pytest
import torch
from test_engine_fused import _TiedLM as TiedNet
from torch import nn

from triaccel_rl import controller as controller_module
from triaccel_rl.controller import Controller
from triaccel_rl.engine import StepEngine

needs_triton = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)",
)
PATHS = ["reference", pytest.param("fused", marks=needs_triton)]
KINDS = ["sgd", "adamw"]


class FusedEngine(StepEngine):
    """The fused step on a CPU (the Controller picks it only on CUDA by itself)."""

    def __init__(self, model, optimizer, device, fused=None):
        super().__init__(model, optimizer, device, fused=True)


def conv_net():
    """A channels-last convolution, a frozen layer and a batch norm (its buffers are not the store's)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 16),
        nn.BatchNorm1d(16),
        nn.Linear(16, 5),
    )
    model[0].to(memory_format=torch.channels_last)
    model[3].requires_grad_(False)
    return model


def tied_net():
    torch.manual_seed(0)
    return TiedNet()


def conv_batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def tied_batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 20, (8,), generator=g), torch.randint(0, 20, (8,), generator=g)) for _ in range(n)]


def make_optimizer(model, kind):
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)


def plain_steps(model, optimizer, batches):
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def trained(monkeypatch, path, kind, build=conv_net, batches=conv_batches, post_hook=None):
    """A model and optimizer after three controlled steps, the controller still open."""
    if path == "fused":
        monkeypatch.setattr(controller_module, "StepEngine", FusedEngine)
    model = build()
    optimizer = make_optimizer(model, kind)
    if post_hook is not None:
        optimizer.register_step_post_hook(post_hook)
    ctl = Controller(model, optimizer, policy="fp32")
    assert ctl.engine.fused == (path == "fused")
    for x, y in batches(3):
        optimizer.zero_grad()
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        try:
            ctl.step(loss)
        except RuntimeError as error:
            assert "post-hook" in str(error)
    return model, optimizer, ctl


def snapshot(model, optimizer):
    """Copies of the parameters, gradients and optimizer state as they are now (the optimizer's as exported)."""
    state = optimizer.state_dict()["state"]  # (on the fused path the export runs here)
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "state": {i: {k: v.clone() for k, v in entry.items()} for i, entry in state.items()},
    }


def assert_same(after, before):
    """Two snapshots hold the same values, bit for bit."""
    for i, (a, b) in enumerate(zip(after["params"], before["params"], strict=True)):
        assert torch.equal(a, b), f"parameter {i}"
    for i, (a, b) in enumerate(zip(after["grads"], before["grads"], strict=True)):
        assert (a is None and b is None) or torch.equal(a, b), f"gradient {i}"
    assert after["state"].keys() == before["state"].keys()
    for i, entry in before["state"].items():
        assert after["state"][i].keys() == entry.keys()
        for key, value in entry.items():
            assert torch.equal(after["state"][i][key], value), f"state {i} {key}"


def held_tensors(model, optimizer):
    """Every trainable parameter, its gradient and each optimizer state tensor, by a name for the messages."""
    tensors = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            tensors[name] = p
            if p.grad is not None:
                tensors[f"{name}.grad"] = p.grad
    names = {id(p): name for name, p in model.named_parameters()}
    for param, entry in optimizer.state.items():
        for key, value in entry.items():
            tensors[f"state[{names[id(param)]}][{key}]"] = value
    return tensors


def saved_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("net", ["conv", "tied"])
def test_after_close_every_tensor_owns_its_storage_and_keeps_its_values(monkeypatch, path, kind, net):
    build, batches = (conv_net, conv_batches) if net == "conv" else (tied_net, tied_batches)
    model, optimizer, ctl = trained(monkeypatch, path, kind, build, batches)
    params = list(model.parameters())
    before = snapshot(model, optimizer)
    frozen = {name: p.data_ptr() for name, p in model.named_parameters() if not p.requires_grad}
    layouts = [(p.dtype, p.device, p.stride(), p.requires_grad) for p in params]
    ctl.close()

    tensors = held_tensors(model, optimizer)
    assert len(optimizer.state) == len(optimizer.param_groups[0]["params"])  # momentum / moments of each
    shared = {
        name: (t.untyped_storage().nbytes(), t.numel() * t.element_size())
        for name, t in tensors.items()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size()
    }
    assert not shared, f"storage bytes vs tensor bytes: {shared}"
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))  # the same objects
    assert list(map(id, optimizer.param_groups[0]["params"])) == [id(p) for p in params if p.requires_grad]
    assert [(p.dtype, p.device, p.stride(), p.requires_grad) for p in params] == layouts  # channels-last kept
    assert all(type(p) is nn.Parameter and p.is_leaf for p in params)
    assert {name: p.data_ptr() for name, p in model.named_parameters() if not p.requires_grad} == frozen
    if net == "tied":
        assert model.out.weight is model.emb.weight
    assert_same(snapshot(model, optimizer), before)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", PATHS)
def test_one_layer_saved_after_close_is_that_layer_s_size(monkeypatch, path, kind):
    """Its file was the whole flat buffer's on the fused path; now that of a fresh model's same layer."""
    model, optimizer, ctl = trained(monkeypatch, path, kind)
    ctl.close()
    fresh = conv_net()
    assert saved_bytes(model[5].state_dict()) == saved_bytes(fresh[5].state_dict())
    assert saved_bytes(model.state_dict()) == saved_bytes(fresh.state_dict())
    plain_optimizer = make_optimizer(fresh, kind)
    plain_steps(fresh, plain_optimizer, conv_batches(1))
    assert saved_bytes(optimizer.state_dict()) == saved_bytes(plain_optimizer.state_dict())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", PATHS)
def test_a_plain_loop_after_close_is_the_one_continued_from_a_copy_taken_before_it(monkeypatch, path, kind):
    model, optimizer, ctl = trained(monkeypatch, path, kind)
    copied = conv_net()
    copied.load_state_dict(copy.deepcopy(model.state_dict()))
    copied_optimizer = make_optimizer(copied, kind)
    copied_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    ctl.close()
    more = conv_batches(6)[3:]
    plain_steps(model, optimizer, more)
    plain_steps(copied, copied_optimizer, more)
    for (name, a), b in zip(model.state_dict().items(), copied.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@needs_triton
def test_close_after_a_step_that_raised_part_way_leaves_the_tensors_standalone(monkeypatch):
    """A step post-hook raised after the fused update went in: close() copies what the buffers hold then."""
    calls = []

    def raising(_optimizer, _args, _kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a user's post-hook failed")

    model, optimizer, ctl = trained(monkeypatch, "fused", "adamw", post_hook=raising)
    assert len(calls) == 3
    before = snapshot(model, optimizer)
    ctl.close()
    shared = [n for n, t in held_tensors(model, optimizer).items() if t.untyped_storage().nbytes() != t.nbytes]
    assert not shared, shared
    assert_same(snapshot(model, optimizer), before)


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
def test_the_flat_buffers_are_freed_at_close_while_the_controller_lives(monkeypatch, kind):
    """Kept after its close() (a Controller after its `with` block), the engine held every parameter, gradient and
    16-bit copy twice: in the flat buffers and in the parameters' own copies. Its state_dict() still works."""
    import gc
    import weakref

    _model, _optimizer, ctl = trained(monkeypatch, "fused", kind)
    store = ctl.engine.store
    buffers = {name: weakref.ref(getattr(store, name)) for name in ("params", "grads", "bf16_copy")}
    saved = ctl.state_dict()["engine"]["optimizer"]
    moments = {name: saved[name].clone() for name in ("momentum_buffer", "exp_avg", "exp_avg_sq") if name in saved}
    ctl.close()
    gc.collect()
    assert [name for name, ref in buffers.items() if ref() is not None] == []
    after = ctl.state_dict()["engine"]["optimizer"]  # the moments, as they were at close()
    assert moments and all(torch.equal(after[name], value) for name, value in moments.items())
