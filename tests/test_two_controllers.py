"""Two Controllers in one process: models that share modules are refused; separate ones train as two plain loops."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import triaccel_rl as ta
from triaccel_rl.precision import LayerPrecision

DRIVEN = (
    r"of Sequential are driven by another open Controller .*step a second optimizer yourself \(README, 'Use it in "
    r"your own training loop'\), close\(\) the other Controller first, or deep-copy the model before building"
)


def mlp(n_out: int = 2) -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, n_out))


def hook_counts(model: nn.Module) -> list[tuple[int, int]]:
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1)


def test_model_sharing_a_module_with_an_open_controller_is_refused_before_any_hook() -> None:
    torch.manual_seed(0)
    body = nn.Linear(8, 16)
    a = nn.Sequential(body, nn.ReLU(), nn.Linear(16, 2))
    b = nn.Sequential(body, nn.ReLU(), nn.Linear(16, 3))
    with ta.Controller(a, sgd(a), policy="bf16"):
        before, optimizer = hook_counts(b), sgd(b)
        with pytest.raises(ValueError, match=r"modules \['0'\] \(of 1\) " + DRIVEN):
            ta.Controller(b, optimizer, policy="fp16")
        assert hook_counts(b) == before
        assert not optimizer._optimizer_step_pre_hooks
    ta.Controller(b, sgd(b), policy="fp16").close()  # the first one closed: its hooks are inert


def test_same_model_under_a_second_controller_is_refused() -> None:
    model = mlp()
    body, head = torch.optim.SGD(model[0].parameters(), lr=0.1), torch.optim.Adam(model[2].parameters())
    with ta.Controller(model, body, policy="bf16") as first:
        before = hook_counts(model)
        with pytest.raises(ValueError, match=r"modules \['0', '2'\] \(of 2\) " + DRIVEN):
            ta.Controller(model, head, policy="fp32")
        assert hook_counts(model) == before
        assert not head._optimizer_step_pre_hooks
        with first.autocast():  # the first one is untouched
            loss = model(torch.randn(4, 8)).float().square().mean()
        first.step(loss)
        assert first.steps == 1


def test_deep_copy_made_while_a_controller_is_open_is_refused_and_accepted_once_it_is_closed() -> None:
    model = mlp()
    first = ta.Controller(model, sgd(model), policy="bf16")
    copied_open = copy.deepcopy(model)  # carries the first one's hooks, which act for it
    with pytest.raises(ValueError, match=r"modules \['0', '2'\] \(of 2\) " + DRIVEN):
        ta.Controller(copied_open, sgd(copied_open), policy="fp16")
    separate = mlp()
    ta.Controller(separate, sgd(separate), policy="fp16").close()
    first.close()
    copied_closed = copy.deepcopy(model)
    for copied in (copied_open, copied_closed):  # the closed one's hooks are inert: shed when the new ones go in
        with ta.Controller(copied, sgd(copied), policy="fp16") as second:
            assert hook_counts(copied) == [(0, 0), (1, 1), (0, 0), (1, 1)]  # the second's pair a layer, no more
            with second.autocast():
                loss = copied(torch.randn(4, 8)).float().square().mean()
            second.step(loss)
            assert second.engine.precision.layers_in_model_blocks == {}


def test_forward_inside_another_controllers_context_is_not_the_models_own_block(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A generator run under the discriminator's context nested in its own: the discriminator's fp16 region is no
    # block of the generator's code (recorded as one, the bf16 generator took a loss scaler and warned).
    torch.manual_seed(0)
    generator, discriminator = mlp(8), mlp(1)
    g = LayerPrecision(generator, "cpu")
    d = LayerPrecision(discriminator, "cpu")
    g.set(["bf16", "bf16"])
    d.set(["fp16", "fp16"])
    with caplog.at_level(logging.WARNING), g.context(), d.context():
        out = discriminator(generator(torch.randn(4, 8)))
    assert out.dtype == torch.float16
    assert g.layers_in_model_blocks == {} and d.layers_in_model_blocks == {}
    assert not g.needs_grad_scaler
    assert "model's own" not in caplog.text
    # A block of the model's own code inside the other context still is one.
    blocked = Fp32Block(generator)
    with g.context(), d.context():
        assert blocked(torch.randn(4, 8)).dtype == torch.float32
    assert g.layers_in_model_blocks == {0: (torch.float32,), 1: (torch.float32,)}
    g.remove()
    d.remove()


class Fp32Block(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return self.inner(x)


def test_16_bit_input_under_an_all_fp32_map_is_cast_up() -> None:
    # A discriminator fed a bf16 generator's fakes: the bf16 and mixed maps cast them, the all-fp32 one raised.
    torch.manual_seed(0)
    discriminator = mlp(1)
    fakes = torch.randn(4, 8).bfloat16()
    expected = discriminator(fakes.float())
    with ta.Controller(discriminator, sgd(discriminator), policy="fp32") as ctl:
        with ctl.autocast():
            out = discriminator(fakes)
        assert out.dtype == torch.float32
        assert torch.equal(out, expected)
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    lp = LayerPrecision(attention, "cpu")
    h = torch.randn(2, 3, 8)
    with lp.context():  # keyword inputs, through the general walk
        got, _ = attention(query=h.half(), key=h.half(), value=h.half(), need_weights=False)
    assert got.dtype == torch.float32
    assert torch.equal(got, attention(h.half().float(), h.half().float(), h.half().float(), need_weights=False)[0])
    lp.remove()


G0 = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
D0 = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
bce = nn.functional.binary_cross_entropy_with_logits


def gan(kind: str, *, controlled: bool, nested: bool = False, steps: int = 6) -> list[torch.Tensor]:
    torch.manual_seed(0)
    real, noise = torch.randn(48, 8), torch.randn(steps, 16, 4)
    generator, discriminator = copy.deepcopy(G0), copy.deepcopy(D0)
    if kind == "adam":
        g_opt = torch.optim.Adam(generator.parameters(), lr=1e-3, betas=(0.5, 0.999))
        d_opt = torch.optim.Adam(discriminator.parameters(), lr=1e-3, betas=(0.5, 0.999))
    else:
        g_opt = torch.optim.SGD(generator.parameters(), lr=0.05, momentum=0.9)
        d_opt = torch.optim.SGD(discriminator.parameters(), lr=0.05, momentum=0.9)
    config = ta.ControllerConfig(interval_steps=3)
    g_ctl = ta.Controller(generator, g_opt, policy="fp32", config=config) if controlled else None
    d_ctl = ta.Controller(discriminator, d_opt, policy="fp32", config=config) if controlled else None
    g_region = g_ctl.autocast if g_ctl is not None else torch.enable_grad
    d_region = d_ctl.autocast if d_ctl is not None else torch.enable_grad
    for i in range(steps):
        batch = real[i * 6 % 32 : i * 6 % 32 + 16]
        d_opt.zero_grad()
        with g_region():
            fake = generator(noise[i])
        with d_region():
            d_loss = bce(discriminator(batch), torch.ones(16, 1)) + bce(
                discriminator(fake.detach()), torch.zeros(16, 1)
            )
        if d_ctl is not None:
            d_ctl.step(d_loss)
        else:
            d_loss.backward()
            d_opt.step()
        g_opt.zero_grad()
        with g_region(), d_region() if nested else torch.enable_grad():
            g_loss = bce(discriminator(fake), torch.ones(16, 1))
        if g_ctl is not None:
            g_ctl.step(g_loss)
        else:
            g_loss.backward()
            g_opt.step()
    if g_ctl is not None and d_ctl is not None:
        g_ctl.close()
        d_ctl.close()
    return [p.detach().clone() for p in (*generator.parameters(), *discriminator.parameters())]


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("nested", [False, True])
def test_gan_pair_of_separate_models_in_fp32_equals_a_plain_loop(kind: str, nested: bool) -> None:
    plain = gan(kind, controlled=False)
    controlled = gan(kind, controlled=True, nested=nested)
    for want, got in zip(plain, controlled, strict=True):
        assert torch.equal(want, got), (want - got).abs().max().item()
