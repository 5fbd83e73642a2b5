"""Tests for triaccel_rl.precision: layer discovery and per-layer autocast regions (CPU)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from triaccel_rl.precision import LayerPrecision, find_layers
from triaccel_rl.types import LayerInfo, Precision


class Mixed(nn.Module):
    """Every kind of layer find_layers must tell apart, plus a frozen and a half-frozen Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(16, 8)
        self.ln = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.half_frozen = nn.Linear(8, 3)
        self.half_frozen.weight.requires_grad_(False)


def test_find_layers_exact() -> None:
    model = Mixed()
    found = find_layers(model)
    infos = [info for _, _, info in found]
    assert infos == [
        LayerInfo("conv", 3 * 4 * 9 + 4, True),
        LayerInfo("bn", 4 + 4, False),
        LayerInfo("fc", 16 * 8 + 8, True),
        LayerInfo("ln", 8 + 8, False),
        # One layer for attention: in_proj (3 * 8 * 8 + 24) and out_proj (8 * 8 + 8); out_proj not listed.
        LayerInfo("attn", 3 * 64 + 24 + 64 + 8, True),
        LayerInfo("half_frozen", 3, True),  # only the trainable bias counts
    ]
    assert [name for name, _, _ in found] == [info.name for info in infos]
    assert found[4][1] is model.attn
    assert all(module is not model.frozen for _, module, _ in found)


def test_find_layers_root_module() -> None:
    layer = nn.Linear(4, 2)
    [(name, module, info)] = find_layers(layer)
    assert module is layer
    assert name == "Linear"
    assert info == LayerInfo("<root>", 10, True)


@pytest.mark.parametrize(
    ("model", "name"),
    [(nn.Sequential(nn.ReLU(), nn.Dropout()), "Sequential"), (nn.Linear(3, 3).requires_grad_(False), "Linear")],
)
def test_find_layers_without_trainable_parameters(model: nn.Module, name: str) -> None:
    with pytest.raises(ValueError, match=rf"model {name} has no trainable parameters"):
        find_layers(model)


# ---------------------------------------------------------------- LayerPrecision


def three_linears() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))


def capture(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[Any]]:
    """Forward hooks (registered after LayerPrecision's, so they see what the layer really got and gave)."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles: list[Any] = []
    for name, module in model.named_children():

        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor, name: str = name) -> None:
            inputs[name] = args[0]
            outputs[name] = output

        handles.append(module.register_forward_hook(hook))
    return inputs, outputs, handles


@pytest.mark.parametrize(("low", "dtype"), [(Precision.BF16, torch.bfloat16), (Precision.FP16, torch.float16)])
def test_per_layer_dtypes_inside_context(low: Precision, dtype: torch.dtype) -> None:
    model = three_linears()
    lp = LayerPrecision(model, device_type="cpu")
    lp.set([low, Precision.FP32, low])
    inputs, outputs, _ = capture(model)
    with lp.context():
        out = model(torch.randn(7, 6))
    assert outputs["0"].dtype == dtype
    assert outputs["1"].dtype == dtype  # the ReLU between layers follows the outer low-precision region
    assert inputs["2"].dtype == torch.float32  # the fp32 layer's input was cast up by its pre-hook
    assert outputs["2"].dtype == torch.float32
    assert outputs["4"].dtype == dtype
    assert out.dtype == dtype


@pytest.mark.parametrize(("low", "dtype"), [(Precision.BF16, torch.bfloat16), (Precision.FP16, torch.float16)])
def test_low_precision_numbers_equal_reference(low: Precision, dtype: torch.dtype) -> None:
    # CPU autocast runs linear as exactly "cast input, weight and bias, then F.linear in the low dtype",
    # so the match is bit-exact (checked on torch 2.13 CPU: same kernel, same inputs).
    model = three_linears()
    lp = LayerPrecision(model, device_type="cpu")
    lp.set([low, Precision.FP32, low])
    inputs, outputs, _ = capture(model)
    x = torch.randn(7, 6)
    with lp.context():
        model(x)
    first, middle, last = model[0], model[2], model[4]
    assert torch.equal(outputs["0"], F.linear(x.to(dtype), first.weight.to(dtype), first.bias.to(dtype)))
    assert torch.equal(outputs["2"], F.linear(outputs["1"].float(), middle.weight, middle.bias))
    assert torch.equal(outputs["4"], F.linear(inputs["4"].to(dtype), last.weight.to(dtype), last.bias.to(dtype)))
    assert inputs["4"].dtype == torch.float32  # ReLU of the fp32 layer's output: autocast leaves relu alone


def test_outside_context_everything_fp32() -> None:
    model = three_linears()
    reference = three_linears()  # same seed: same weights
    lp = LayerPrecision(model, device_type="cpu")
    lp.set([Precision.BF16, Precision.FP16, Precision.BF16])
    _, outputs, _ = capture(model)
    x = torch.randn(3, 6)
    out = model(x)
    assert all(o.dtype == torch.float32 for o in outputs.values())
    assert torch.equal(out, reference(x))
    assert not torch.is_autocast_enabled("cpu")


def test_all_fp32_context_is_plain() -> None:
    model = three_linears()
    reference = three_linears()
    lp = LayerPrecision(model, device_type="cpu")
    x = torch.randn(3, 6)
    with lp.context():
        assert not torch.is_autocast_enabled("cpu")
        out = model(x)
    assert torch.equal(out, reference(x))


def test_attention_and_conv_layers_follow_their_precision() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(8, 8, 1)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.conv(x.transpose(1, 2)).transpose(1, 2)
            return h, self.attn(h, h, h)[0]

    model = Net()
    lp = LayerPrecision(model, device_type="cpu")
    assert [info.name for info in lp.layers] == ["conv", "attn"]
    lp.set(["bf16", "fp32"])
    with lp.context():
        h, a = model(torch.randn(2, 5, 8))
    assert h.dtype == torch.bfloat16
    assert a.dtype == torch.float32
    lp.set(["fp32", "bf16"])
    with lp.context():
        h, a = model(torch.randn(2, 5, 8))
    assert h.dtype == torch.float32
    assert a.dtype == torch.bfloat16


def test_set_all_layers_and_controllable_only() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    lp = LayerPrecision(model, device_type="cpu")
    assert lp.controllable_indices == [0, 2]
    lp.set(["bf16", "bf16", "fp16"])  # all layers: the norm stays fp32 whatever is asked
    assert lp.precisions == [Precision.BF16, Precision.FP32, Precision.FP16]
    lp.set([2, 1])  # controllable only
    assert lp.precisions == [Precision.FP16, Precision.FP32, Precision.BF16]
    lp.set([Precision.FP32, Precision.FP32])
    assert lp.precisions == [Precision.FP32] * 3


@pytest.mark.parametrize("count", [0, 1, 4])
def test_set_wrong_length(count: int) -> None:
    lp = LayerPrecision(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)), device_type="cpu")
    with pytest.raises(ValueError, match=rf"got {count} precisions; expected 3 \(all layers\) or 2 \(controllable"):
        lp.set(["bf16"] * count)
    assert lp.precisions == [Precision.FP32] * 3  # unchanged


def test_set_unknown_precision() -> None:
    lp = LayerPrecision(nn.Linear(4, 2), device_type="cpu")
    with pytest.raises(ValueError, match=r"unknown precision 'fp8'; allowed: fp32, bf16, fp16"):
        lp.set(["fp8"])
    for flag in (True, False):  # were bf16 and fp32 (bool is an int to Python); decode() refuses them too
        with pytest.raises(ValueError, match=rf"unknown precision {flag}; allowed: fp32, bf16, fp16"):
            lp.set([flag])
    assert lp.precisions == [Precision.FP32]


def test_norm_between_low_precision_layers_gets_fp32_input() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["bf16", "bf16"])
    inputs, outputs, _ = capture(model)
    with lp.context():
        model(torch.randn(3, 4))
    assert outputs["0"].dtype == torch.bfloat16
    assert inputs["1"].dtype == torch.float32
    assert outputs["2"].dtype == torch.bfloat16


class Boom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bad = nn.Linear(5, 2)  # wrong input width: raises inside its forward, after its pre-hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bad(self.fc(x))


@pytest.mark.parametrize("bad_precision", ["fp16", "fp32"])
def test_exception_inside_layer_closes_its_region(bad_precision: str) -> None:
    model = Boom()
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["bf16", bad_precision])
    with lp.context():
        with pytest.raises(RuntimeError, match=r"cannot be multiplied"):
            model(torch.randn(2, 4))
        # Back in the outer region: the failing layer's fp16 (or disabled) region must be closed.
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_exception_propagating_out_of_context_leaves_autocast_off() -> None:
    model = Boom()
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["bf16", "fp16"])
    with pytest.raises(RuntimeError, match=r"cannot be multiplied"), lp.context():
        model(torch.randn(2, 4))
    assert not torch.is_autocast_enabled("cpu")
    assert torch.get_autocast_dtype("cpu") == torch.bfloat16  # the CPU default, restored
    # A fresh forward works normally, inside and outside the context.
    model.bad = nn.Linear(4, 2)
    lp2 = LayerPrecision(model, device_type="cpu")
    lp2.set(["fp32", "fp16"])
    with lp2.context():
        assert model(torch.randn(2, 4)).dtype == torch.float16
    assert model(torch.randn(2, 4)).dtype == torch.float32


def test_exception_in_later_pre_hook_is_cleaned_up_by_context() -> None:
    # A user pre-hook registered after LayerPrecision's raises once the layer's region is open.
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["bf16", "fp16"])

    def explode(module: nn.Module, args: tuple[Any, ...]) -> None:
        raise KeyError("user hook")

    handle = model[1].register_forward_pre_hook(explode)
    with pytest.raises(KeyError, match=r"user hook"), lp.context():
        model(torch.randn(2, 4))
    handle.remove()
    assert not torch.is_autocast_enabled("cpu")
    with lp.context():
        out = model(torch.randn(2, 4))
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    # computed in fp16 (the bias rounded so), handed on in fp32 in the bf16 outer region
    assert out.dtype == torch.float32 and torch.equal(out, out.half().float())


def test_remove_restores_plain_behaviour() -> None:
    model = three_linears()
    reference = three_linears()
    user_handle = model[2].register_forward_hook(lambda module, args, output: None)
    lp = LayerPrecision(model, device_type="cpu")
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 3
    lp.set(["bf16", "fp32", "bf16"])
    lp.remove()
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0
    assert [len(m._forward_hooks) for m in model] == [0, 0, 1, 0, 0]  # only the user's hook is left
    x = torch.randn(4, 6)
    assert torch.equal(model(x), reference(x))
    # Without its hooks the fp32 layer is no longer held in fp32: the whole forward follows plain autocast.
    _, outputs, _ = capture(model)
    with lp.context():
        model(x)
    assert outputs["2"].dtype == torch.bfloat16
    user_handle.remove()


def test_needs_grad_scaler() -> None:
    lp = LayerPrecision(three_linears(), device_type="cpu")
    assert not lp.needs_grad_scaler
    lp.set(["bf16", "bf16", "fp32"])
    assert not lp.needs_grad_scaler
    lp.set(["bf16", "fp16", "fp32"])
    assert lp.needs_grad_scaler
    lp.set(["fp32"] * 3)
    assert not lp.needs_grad_scaler


def test_fp16_on_non_controllable_layer_needs_no_scaler() -> None:
    lp = LayerPrecision(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8)), device_type="cpu")
    lp.set(["fp32", "fp16"])  # the norm cannot be fp16: forced to fp32
    assert lp.precisions == [Precision.FP32, Precision.FP32]
    assert not lp.needs_grad_scaler


def test_backward_through_mixed_precision_gives_fp32_grads() -> None:
    """The loss and every gradient equal, bit for bit, those of the same forward written with explicit casts (CPU
    autocast is exactly "cast, then the op in the low dtype"; the casts' backward brings the gradients to fp32)."""
    model, reference = three_linears(), three_linears()  # same seed: same weights
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["bf16", "fp32", "fp16"])
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 6, generator=generator), torch.randint(0, 5, (8,), generator=generator)
    with lp.context():
        loss = F.cross_entropy(model(x), y)
    assert loss.dtype == torch.float32  # autocast runs cross_entropy in fp32
    loss.backward()
    first, middle, last = reference[0], reference[2], reference[4]
    h = F.linear(x.bfloat16(), first.weight.bfloat16(), first.bias.bfloat16()).relu()
    h = F.linear(h.float(), middle.weight, middle.bias).relu()  # the fp32 layer casts its input up
    h = F.linear(h.half(), last.weight.half(), last.bias.half())
    expected = F.cross_entropy(h.float(), y)
    expected.backward()
    assert torch.equal(loss, expected)
    for (name, p), want in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.equal(p.grad, want.grad), f"{name}: differs by {(p.grad - want.grad).abs().max():.3g}"


def test_cpu_fp16_convolution_is_emulated_with_fp16_rounding() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["fp16", "fp16"])
    x = torch.randn(2, 2, 6, 6) * 100
    _, outputs, _ = capture(model)
    with lp.context():
        model(x)
    conv = model[0]
    expected = nn.functional.conv2d(x.half().float(), conv.weight.half().float(), conv.bias.half().float()).half()
    assert outputs["0"].dtype == torch.float16
    assert torch.equal(outputs["0"], expected)
    huge = torch.full((1, 2, 6, 6), 1e5)  # beyond fp16's range: overflows to inf, as on a GPU
    with lp.context():
        assert not torch.isfinite(model(huge)).all()


class _Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn, self.head = cell(8, 16, batch_first=True), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, hx: Any = None) -> torch.Tensor:
        out, _ = self.rnn(x, hx)
        return self.head(out[:, -1])


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("low", ["bf16", "fp16"])
def test_a_recurrent_layer_runs_in_the_fp32_it_reports(cell: type[nn.RNNBase], low: str) -> None:
    """Not controllable, so reported fp32; autocast lowers the RNN kernels, so the outer region once ran it in 16 bits
    (and an fp16 LSTM on the CPU failed inside oneDNN). It runs in an fp32 region of its own, hidden states cast up;
    its output is the fp32 model's exactly."""
    torch.manual_seed(0)
    model = _Recurrent(cell)
    x = torch.randn(4, 6, 8)
    hx = torch.zeros(1, 4, 16, dtype=torch.bfloat16)
    hx = (hx, hx.clone()) if cell is nn.LSTM else hx
    with torch.no_grad():
        reference, _ = model.rnn(x)
    lp = LayerPrecision(model, device_type="cpu")
    lp.set([low, low])
    seen: dict[str, Any] = {}
    handle = model.rnn.register_forward_hook(lambda m, a, out: seen.update(out=out[0]))
    with lp.context():
        model(x, hx)
    handle.remove()
    assert lp.precisions == [Precision.FP32, Precision.parse(low)]
    assert seen["out"].dtype == torch.float32 and torch.equal(seen["out"], reference)
    with lp.context():  # the region closed with the layer: the head after it runs in the low precision
        assert model(x).dtype == Precision.parse(low).dtype


# ---------------------------------------------------------------- each layer type, against a plain forward

WIDTH = 8


class _Prelude(nn.Module):
    """A Linear in a 16-bit type, then the layer under test called by ``call`` (so its input arrives in 16 bits)."""

    def __init__(self, layer: nn.Module, call: Any) -> None:
        super().__init__()
        self.pre, self.layer, self.call = nn.Linear(WIDTH, WIDTH), layer, call

    def forward(self, x: torch.Tensor) -> Any:
        return self.call(self.layer, self.pre(x))


class _Gain(nn.Module):
    """A user's leaf module applying a functional op (a matmul autocast lowers) to its own parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(WIDTH, WIDTH) / 3)

    def forward(self, h: torch.Tensor, *, shift: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": F.linear(h, self.weight) + shift}


def _as_image(h: torch.Tensor) -> torch.Tensor:
    return h.unflatten(-1, (2, 4))  # [2, 4, 8] -> [2, 4, 2, 4]: 4 channels


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out["out"] if isinstance(out, dict) else out


# (name, layer, call, controllable). Calls use keyword arguments where users do.
LAYER_CASES: list[tuple[str, Any, Any, bool]] = [
    ("linear", lambda: nn.Linear(WIDTH, WIDTH), lambda m, h: m(input=h), True),
    ("conv1d", lambda: nn.Conv1d(4, 4, 3, padding=1), lambda m, h: m(h), True),
    ("conv2d", lambda: nn.Conv2d(4, 4, 3, padding=1), lambda m, h: m(_as_image(h)), True),
    ("depthwise", lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), lambda m, h: m(_as_image(h)), True),
    (
        "attention",
        lambda: nn.MultiheadAttention(WIDTH, 2, batch_first=True),
        lambda m, h: m(query=h, key=h, value=h, need_weights=False),
        True,
    ),
    ("layernorm", lambda: nn.LayerNorm(WIDTH), lambda m, h: m(h), False),
    ("groupnorm", lambda: nn.GroupNorm(2, 4), lambda m, h: m(h), False),
    (
        "lstm",
        lambda: nn.LSTM(WIDTH, WIDTH, batch_first=True),
        lambda m, h: m(h, hx=(h[:, :1].transpose(0, 1),) * 2),
        False,
    ),
    ("gru", lambda: nn.GRU(WIDTH, WIDTH, batch_first=True), lambda m, h: m(h), False),
    ("prelu", lambda: nn.PReLU(4), lambda m, h: m(h), False),
    ("custom", _Gain, lambda m, h: m(h, shift=h), False),
]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(("name", "make", "call", "controllable"), LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_each_layer_type_computes_in_its_precision_bit_for_bit(
    name: str, make: Any, call: Any, controllable: bool, precision: str
) -> None:
    """A layer set to fp32 (and every non-controllable one, which reports fp32) gives exactly what a plain fp32 forward
    of it gives on its input cast up; a bf16/fp16 layer exactly what ``torch.autocast`` of its type gives (the CPU's
    fp16 convolutions: the documented emulation). Its input comes from a Linear in the other 16-bit type, so the map is
    mixed and each layer runs in its own region; keyword arguments (``query=``, ``hx=``, ``shift=``) are cast as
    positional ones. Before the fix, keyword inputs stayed 16-bit (attention and the LSTM raised a dtype error), and
    the PReLU and the user's module computed in the outer bf16 while reporting fp32."""
    torch.manual_seed(0)
    model = _Prelude(make(), call)
    lp = LayerPrecision(model, device_type="cpu")
    assert [info.controllable for info in lp.layers] == [True, controllable]
    wanted = Precision.parse(precision)
    before = Precision.FP16 if wanted is Precision.BF16 else Precision.BF16
    lp.set([before, wanted])
    seen: dict[str, Any] = {}
    model.pre.register_forward_hook(lambda m, a, out: seen.update(h=out))
    x = torch.randn(2, 4, WIDTH)
    with lp.context():
        out = _first(model(x))
    raw = seen["h"]
    # the layer's input arrived in 16 bits; an fp16 one in fp32 (the map has bf16 layers: handed on in fp32, exact)
    handed_up = before is Precision.FP16 and Precision.BF16 in lp.precisions
    assert raw.dtype == (torch.float32 if handed_up else before.dtype)
    assert torch.equal(raw, raw.to(before.dtype).to(raw.dtype))
    if not controllable or wanted is Precision.FP32:
        expected = _first(call(model.layer, raw.float()))  # outside the context: a plain fp32 forward
    elif wanted is Precision.FP16 and isinstance(model.layer, nn.modules.conv._ConvNd):  # emulated on the CPU
        with torch.no_grad():  # its weight and bias rounded to fp16 too, as autocast casts them
            for param in model.layer.parameters():
                param.copy_(param.half())
        expected = _first(call(model.layer, raw.half().float())).half()
    else:
        with torch.autocast("cpu", dtype=wanted.dtype):
            expected = _first(call(model.layer, raw))
    reported = lp.precisions[1]
    assert reported is (wanted if controllable else Precision.FP32)
    assert expected.dtype == reported.dtype
    if reported is Precision.FP16:  # its fp16 result, handed on in fp32 in the map's bf16 outer region
        expected = expected.float()
    assert out.dtype == expected.dtype
    assert torch.equal(out, expected), f"{name}: differs by {(out.float() - expected.float()).abs().max():.3g}"
    assert not torch.is_autocast_enabled("cpu") and not lp._stack


def test_a_uniform_map_holds_the_non_controllable_layers_in_fp32_too() -> None:
    """No per-layer regions in a uniform map: the PReLU's and the user's module's own regions still hold."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.PReLU(), _Prelude(_Gain(), lambda m, h: m(h, shift=h)))
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["bf16", "bf16"])
    seen: dict[str, torch.Tensor] = {}
    model[1].register_forward_hook(lambda m, a, out: seen.update(prelu=out))
    model[2].layer.register_forward_hook(
        lambda m, a, k, out: seen.update(gain=out["out"], h=k["shift"]), with_kwargs=True
    )
    x = torch.randn(3, WIDTH)
    with lp.context():
        model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = model[0](x)
    assert torch.equal(seen["prelu"], model[1](first.float()))
    assert torch.equal(seen["gain"], model[2].layer(seen["h"], shift=seen["h"])["out"])
    assert seen["gain"].dtype == torch.float32


def test_a_float64_model_keeps_its_float64_under_a_mixed_map() -> None:
    """Autocast leaves float64 alone; an fp32 layer of a mixed map cast its float64 input down to fp32, then failed on
    its float64 weight ("mat1 and mat2 must have the same dtype") before the fix."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["bf16", "fp32"])
    x = torch.randn(3, 4, dtype=torch.float64)
    with lp.context():
        out = model(x)
    assert out.dtype == torch.float64 and torch.equal(out, model(x))


def test_a_shared_module_called_twice_and_nested_layers_enter_and_leave_in_pairs() -> None:
    """A Linear called twice (weight sharing) and a Sequential inside a block: each call opens and closes its region."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Linear(4, 4)
            self.inner = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.shared(self.inner(self.shared(x)))

    torch.manual_seed(0)
    model = Block()
    lp = LayerPrecision(model, device_type="cpu")
    assert [info.name for info in lp.layers] == ["shared", "inner.0", "inner.2"]
    lp.set(["fp32", "bf16", "fp16"])
    depths: list[tuple[Any, ...]] = []
    for name, module in [("shared", model.shared), ("inner.0", model.inner[0]), ("inner.2", model.inner[2])]:
        module.register_forward_pre_hook(lambda m, a, name=name: depths.append((name, len(lp._stack))))
        module.register_forward_hook(lambda m, a, out: depths.append((len(lp._stack), out.dtype)))
    x = torch.randn(2, 4)
    with lp.context():
        out = model(x)
        assert not lp._stack and torch.get_autocast_dtype("cpu") == torch.bfloat16
    # Hooks registered after ours: each layer's region is open in its forward (depth 1) and closed after it (0).
    assert depths == [
        ("shared", 1), (0, torch.float32),
        ("inner.0", 1), (0, torch.bfloat16),
        ("inner.2", 1), (0, torch.float32),  # fp16, handed on in fp32 (the map has a bf16 layer)
        ("shared", 1), (0, torch.float32),
    ]  # fmt: skip
    s, a, b = model.shared, model.inner[0], model.inner[2]
    h = s(x)
    h = F.linear(h.bfloat16(), a.weight.bfloat16(), a.bias.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = torch.tanh(h)  # the outer region's
    h = F.linear(h.half(), b.weight.half(), b.bias.half())
    assert torch.equal(out, s(h.float()))


class _Tied(nn.Module):
    """enc, mid, ReLU, dec, the last computing with the first's weight (tied, as an autoencoder's)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 8, bias=False)
        self.mid = nn.Linear(8, 8)
        self.dec = nn.Linear(8, 8, bias=False)
        self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.relu(self.mid(self.enc(x))))


@pytest.mark.parametrize("tied_map", [["bf16", "fp32", "fp16"], ["fp16", "fp32", "bf16"]])
def test_layers_sharing_a_weight_each_compute_in_their_own_16_bit_type(tied_map: list[str]) -> None:
    """Found in review: autocast's cache of cast weights is keyed by the weight, not by the type, and lives until the
    context's region closes, so the second layer got the first's cast in the other 16-bit type and raised ("expected
    m1 and m2 to have the same dtype"). Each layer gives exactly its forward alone in its precision, and the shared
    weight's gradient sums the two layers' own, bit for bit."""
    torch.manual_seed(0)
    model = _Tied()
    lp = LayerPrecision(model, device_type="cpu")
    assert [info.name for info in lp.layers] == ["enc", "mid", "dec"]
    lp.set(tied_map)
    inputs, outputs, _ = capture(model)
    x = torch.randn(4, 8)
    with lp.context():
        out = model(x)
    for name, precision in zip(["enc", "mid", "dec"], lp.precisions, strict=True):
        with torch.autocast("cpu", dtype=precision.dtype, enabled=precision is not Precision.FP32):
            expected = getattr(model, name)(inputs[name])  # outside the context: the layer alone
        assert outputs[name].dtype == precision.dtype and torch.equal(outputs[name], expected), name
    out.float().sum().backward()
    weight = model.enc.weight.detach().clone().requires_grad_()
    first, last = lp.precisions[0].dtype, lp.precisions[2].dtype
    h = torch.relu(F.linear(F.linear(x.to(first), weight.to(first)).float(), model.mid.weight, model.mid.bias))
    reference = F.linear(h.to(last), weight.to(last))
    reference.float().sum().backward()
    assert torch.equal(out, reference) and torch.equal(model.enc.weight.grad, weight.grad)


def test_layers_of_the_outer_regions_type_still_cast_a_weight_once_a_forward() -> None:
    """What autocast's cache saves, kept where no other 16-bit type can read it: under a bf16/fp16/fp32 map (outer
    region bf16) the bf16 layer, called twice, casts its weight once; the fp16 one, whose casts bypass the cache, at
    each call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.b(self.b(self.a(self.a(x)))))

    class CountCasts(TorchDispatchMode):
        def __init__(self, weights: dict[str, torch.Tensor]) -> None:
            super().__init__()
            self.pointers = {weight.data_ptr(): name for name, weight in weights.items()}
            self.casts = dict.fromkeys(weights, 0)

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.pointers:
                self.casts[self.pointers[args[0].data_ptr()]] += 1
            return func(*args, **(kwargs or {}))

    model = Twice()
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["bf16", "fp16", "fp32"])
    with lp.context(), CountCasts({"a": model.a.weight, "b": model.b.weight}) as counter:
        model(torch.randn(2, 8))
    assert counter.casts == {"a": 1, "b": 2}


class _Island(nn.Module):
    """body, then router inside the model's own fp32 block, and head: a router kept in fp32 by its author."""

    def __init__(self, device_type: str = "cpu") -> None:
        super().__init__()
        self.device_type = device_type
        self.body, self.router, self.head = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        with torch.autocast(self.device_type, enabled=False):
            routes = self.router(h)  # a 16-bit h: cast up by the hooks, as a mixed map's fp32 layer gets it
        return self.head(h), routes


def _twice_in_context(
    model: nn.Module, precisions: list[str], copies: bool, caplog: pytest.LogCaptureFixture
) -> tuple[LayerPrecision, dict[str, torch.Tensor], dict[str, torch.Tensor], Any]:
    """Two forwards of ``model`` (seeded) under ``precisions``, warnings captured: the hooks, each child's input and
    output as it ran (``capture``), and the last output."""
    torch.manual_seed(0)
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(precisions)
    if copies:
        lp.use_weight_copies(_copies_of(model, lp))
    inputs, outputs, _ = capture(model)
    with caplog.at_level("WARNING", logger="triaccel_rl.precision"), lp.context():
        for _ in range(2):
            out = model(torch.randn(2, 8))
    return lp, inputs, outputs, out


def _copies_of(model: nn.Module, lp: LayerPrecision) -> Any:
    """Copies for ``lp.use_weight_copies``: each parameter cast to the layer's type (as the fused step keeps them)."""
    modules = dict(model.named_modules())

    def copies(index: int, dtype: torch.dtype) -> list[tuple[nn.Module, str, torch.Tensor]]:
        owner = modules[lp.layers[index].name]
        return [(owner, name, param.detach().to(dtype)) for name, param in owner.named_parameters(recurse=False)]

    return copies


@pytest.mark.parametrize(
    "island_map",
    [["bf16", "bf16", "bf16"], ["fp16", "fp16", "fp16"], ["bf16", "bf16", "fp32"], ["fp16", "bf16", "fp16"]],
)
@pytest.mark.parametrize("copies", [False, True])
def test_a_layer_inside_the_models_own_fp32_block_computes_in_fp32_under_any_map(
    island_map: list[str], copies: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: under a uniform map (the hooks idle) the router computed in fp32, as its author asked; under a
    mixed map its pre-hook opened its 16-bit region inside the block, so its type hung on other layers' precisions.
    Reading a 16-bit weight copy inside the block raised under a uniform map. Now fp32 under every map, bit for bit
    the router alone in fp32; the other layers keep theirs; a warning names the router once."""
    model = _Island()
    lp, inputs, outputs, (_, routes) = _twice_in_context(model, island_map, copies, caplog)
    assert routes.dtype == torch.float32 and torch.equal(routes, model.router(inputs["router"].float()))
    for name, precision in (("body", lp.precisions[0]), ("head", lp.precisions[2])):
        with torch.autocast("cpu", dtype=precision.dtype, enabled=precision is not Precision.FP32):
            expected = getattr(model, name)(inputs[name])
        assert outputs[name].dtype == precision.dtype and torch.equal(outputs[name], expected), name
    assert lp.layers_in_model_fp32_blocks == [1] and lp.precisions[1] is Precision.parse(island_map[1])
    assert caplog.text.count("layer 'router' is called inside the model's own torch.autocast(enabled=False)") == 1
    assert not lp._stack and not lp._swapped


class _Region(nn.Module):
    """body, then mid inside the model's own bf16 autocast region, and head: a block its author runs in bf16."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.mid, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.mid(h)
        return self.head(h.float())  # (in plain fp32 too, a bf16 h would not meet the head's fp32 weight)


@pytest.mark.parametrize(
    "region_map",
    [["fp32", "fp32", "fp32"], ["fp16", "fp16", "fp16"], ["fp32", "fp16", "fp32"], ["fp16", "fp32", "fp16"]],
)
@pytest.mark.parametrize("copies", [False, True])
def test_a_layer_inside_the_models_own_16_bit_region_computes_in_its_type_under_any_map(
    region_map: list[str], copies: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: under a uniform map (the hooks idle) mid computed in the model's bf16, under a mixed map in the
    type its own region set (fp32 under ['fp16', 'fp32', 'fp16'], fp16 under ['fp32', 'fp16', 'fp32']): it hung on
    the other layers' precisions. Now bf16 under every map, bit for bit mid alone under autocast; a warning names it
    once where its set precision differs. (A model region of the outer region's own type cannot be told from ours.)"""
    model = _Region()
    lp, inputs, outputs, _ = _twice_in_context(model, region_map, copies, caplog)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.mid(inputs["mid"])
    assert outputs["mid"].dtype == torch.bfloat16 and torch.equal(outputs["mid"], expected)
    for name, precision in (("body", lp.precisions[0]), ("head", lp.precisions[2])):
        with torch.autocast("cpu", dtype=precision.dtype, enabled=precision is not Precision.FP32):
            reference = getattr(model, name)(inputs[name])
        assert outputs[name].dtype == precision.dtype and torch.equal(outputs[name], reference), name
    assert lp.layers_in_model_blocks == {1: (torch.bfloat16,)} and lp.layers_in_model_fp32_blocks == []
    message = "layer 'mid' is called inside the model's own torch.autocast(dtype=torch.bfloat16) block"
    assert caplog.text.count(message) == 1
    assert not lp._stack and not lp._swapped


def test_a_layer_called_outside_and_inside_the_models_region_is_cast_to_each_type() -> None:
    """mid runs in fp16 (its map), then again inside the model's bf16 region: with no region of ours there, autocast's
    cache handed it its fp16 weight ("mat1 and mat2 must have the same dtype, but got BFloat16 and Half")."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.mid, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.mid(self.body(x))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                inner = self.mid(h)
            self.inner = inner
            return self.head(inner.float())

    torch.manual_seed(0)
    model, x = Twice(), torch.randn(2, 8)
    lp = LayerPrecision(model, device_type="cpu")
    for region_map in (["fp32", "fp16", "fp32"], ["fp16", "fp16", "fp32"]):
        lp.set(region_map)
        with lp.context():
            model(x)
        assert model.inner.dtype == torch.bfloat16 and not lp._stack


def test_a_module_the_map_does_not_set_computes_in_fp32_inside_the_models_region_under_any_map() -> None:
    """A GRU and a PReLU inside the model's bf16 region: under the all-fp32 map they computed in bf16 (no region of
    ours opened), under any other map in fp32: their type hung on the other layers' precisions."""

    class Region(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(8, 8), nn.Linear(8, 3)
            self.gru, self.prelu = nn.GRU(8, 8, batch_first=True), nn.PReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.body(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                g, p = self.gru(h.unsqueeze(1))[0].squeeze(1), self.prelu(h)
            self.seen = (g.dtype, p.dtype)
            return self.head((g + p).float())

    torch.manual_seed(0)
    model = Region()
    lp = LayerPrecision(model, device_type="cpu")
    for region_map in (["fp32", "fp32"], ["fp32", "bf16"], ["bf16", "fp32"]):
        lp.set(region_map)
        with lp.context():
            model(torch.randn(4, 8))
        assert model.seen == (torch.float32, torch.float32), region_map


@pytest.mark.parametrize("region", ["off", "bf16"])
def test_a_layer_called_inside_another_takes_the_models_region_under_any_map(region: str) -> None:
    """inner runs inside outer's forward, both inside the model's own region: outer's region of ours recorded its own
    type, so inner took it for ours and kept its own precision under mixed maps (fp32 where the region is bf16)."""

    class Outer(nn.Linear):
        def __init__(self) -> None:
            super().__init__(8, 8)
            self.inner = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.inner(x)
            self.inner_dtype = z.dtype
            return super().forward(x) + z.to(x.dtype)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.outer, self.head = nn.Linear(8, 8), Outer(), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.body(x)
            if region == "off":
                with torch.autocast("cpu", enabled=False):
                    h = self.outer(h.float())
            else:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    h = self.outer(h)
            return self.head(h.float())

    model = Model()
    lp = LayerPrecision(model, device_type="cpu")
    expected = torch.float32 if region == "off" else torch.bfloat16
    maps = [
        ["fp16"] * 4,
        ["fp32", "fp16", "fp32", "fp16"],
        ["fp16", "fp16", "fp32", "fp16"],
        ["fp16", "fp32", "fp32", "fp16"],
    ]  # (with a bf16 layer, context()'s own region is bf16, which the model's bf16 one cannot be told from: documented)
    for region_map in maps:  # body, outer, inner, head
        lp.set(region_map)
        with lp.context():
            model(torch.randn(2, 8))
        assert model.outer.inner_dtype == expected and not lp._stack, region_map


def test_a_module_the_map_does_not_set_gets_fp32_inputs_in_the_models_fp32_block() -> None:
    """A PReLU inside the model's autocast(enabled=False) block, fed a bf16 layer's output: keyed on autocast alone,
    no region of ours cast its input up and it raised "Type promoting not supported"."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head, self.prelu = nn.Linear(8, 8), nn.Linear(8, 3), nn.PReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.body(x)
            with torch.autocast("cpu", enabled=False):
                h = self.prelu(h)
            self.seen = h.dtype
            return self.head(h)

    model = Block()
    lp = LayerPrecision(model, device_type="cpu")
    for region_map in (["bf16", "bf16"], ["bf16", "fp32"]):
        lp.set(region_map)
        with lp.context():
            model(torch.randn(2, 8))
        assert model.seen == torch.float32 and not lp._stack


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_a_layer_checkpointed_inside_another_layers_forward_recomputes_in_its_forwards_type(
    use_reentrant: bool,
) -> None:
    """An adapter (a Linear) checkpoints its child: the recompute, after the context has exited and outside the
    parent's region, took the context's bf16 for ours, read the parent's fp16 as the model's block, and recomputed in
    fp16 (a CheckpointError without reentrancy; with it, gradients unlike plain autocast's)."""
    import torch.nn.functional as F
    import torch.utils.checkpoint as checkpoint

    class Adapter(nn.Linear):
        def __init__(self) -> None:
            super().__init__(8, 8)
            self.inner = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.weight, self.bias) + checkpoint.checkpoint(
                self.inner, x, use_reentrant=use_reentrant
            )

    def run(model: nn.Module) -> list[torch.Tensor]:
        lp = LayerPrecision(model, device_type="cpu")
        lp.set(["bf16", "fp16", "bf16"])  # the layer, the adapter and its child
        with lp.context():
            loss = model(torch.ones(4, 8)).float().sum()
        loss.backward()
        lp.remove()
        return [p.grad.clone() for p in model.parameters()]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), Adapter())
    grads = run(model)
    model.zero_grad()
    model[1].forward = lambda x: F.linear(x, model[1].weight, model[1].bias) + model[1].inner(x)  # not checkpointed
    reference = run(model)
    for got, expected in zip(grads, reference, strict=True):
        assert torch.equal(got, expected)


def test_a_frozen_16_bit_norm_computes_in_its_own_type() -> None:
    """A frozen bf16 feature extractor (allowed: only trainable 16-bit parameters are refused): its LayerNorm got the
    parameterless norms' hook, which cast its bf16 input up to meet bf16 weights ("mixed dtype (CPU)")."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).to(torch.bfloat16).requires_grad_(False)
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.frozen(x.to(torch.bfloat16)).float())

    torch.manual_seed(0)
    model, x = Model(), torch.randn(4, 8)
    expected = model(x)
    lp = LayerPrecision(model, device_type="cpu")
    with lp.context():
        assert torch.equal(model(x), expected)  # all fp32: as plain PyTorch


def test_a_layer_seen_in_two_model_regions_is_listed_with_both() -> None:
    """First seen in the model's fp16 region, then in its autocast(enabled=False) block: the fp32 block was neither
    listed nor warned of (the record kept the first type only)."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.float16):
                x = self.b(self.a(x))
            with torch.autocast("cpu", enabled=False):
                return self.b(x.float())

    model = Model()
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["bf16", "bf16"])
    with lp.context():
        model(torch.randn(2, 8))
    assert lp.layers_in_model_blocks == {0: (torch.float16,), 1: (torch.float16, torch.float32)}
    assert lp.layers_in_model_fp32_blocks == [1]


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_a_shared_layer_recomputes_each_call_in_its_forwards_type(use_reentrant: bool) -> None:
    """Layer a runs at the top and inside layer o's forward; the model is checkpointed. One record per module (its
    last call's, inside o's fp16 region) made the recompute of its top call read context()'s bf16 as the model's
    block: a CheckpointError without reentrancy, a bf16 recompute of an fp32 layer with it."""
    import torch.nn.functional as F

    class Outer(nn.Linear):
        def __init__(self, shared: nn.Linear) -> None:
            super().__init__(8, 8)
            self.shared = [shared]  # not a child: the model owns it

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.weight, self.bias) + self.shared[0](x)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.o, self.c = Outer(self.a), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.o(self.a(x)))

    eager = _gradients_through_context(Model, ["fp32", "fp16", "bf16"], checkpoint_with=None)  # a, o, c
    assert torch.equal(_gradients_through_context(Model, ["fp32", "fp16", "bf16"], use_reentrant)["a.weight"],
                       eager["a.weight"])  # fmt: skip


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_a_layer_shared_by_the_models_fp32_block_and_an_fp32_parent_recomputes_as_it_ran(use_reentrant: bool) -> None:
    """s runs at the top in the model's autocast(enabled=False) block (fp32), then inside the fp32 parent p (its own
    bf16): both calls in one autocast state, so one record each overwrote the other, and the checkpointed top call
    recomputed in bf16 (a CheckpointError, or other gradients with reentrancy)."""
    import torch.nn.functional as F

    class Parent(nn.Linear):
        def __init__(self, shared: nn.Linear) -> None:
            super().__init__(8, 8)
            self.shared = [shared]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.weight, self.bias) + self.shared[0](x)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.s = nn.Linear(8, 8), nn.Linear(8, 8)
            self.p = Parent(self.s)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            with torch.autocast("cpu", enabled=False):
                h = self.s(h.float())
            return self.p(h)

    eager = _gradients_through_context(Model, ["bf16", "bf16", "fp32"], checkpoint_with=None)  # a, s, p
    assert torch.equal(_gradients_through_context(Model, ["bf16", "bf16", "fp32"], use_reentrant)["s.weight"],
                       eager["s.weight"])  # fmt: skip


def _gradients_through_context(
    build: Any, precisions: list[str], checkpoint_with: bool | None
) -> dict[str, torch.Tensor]:
    """Each parameter's gradient after one seeded forward of ``build()`` under ``precisions`` and a backward: the whole
    model checkpointed (``use_reentrant=checkpoint_with``), or not (None)."""
    import torch.utils.checkpoint as checkpoint

    torch.manual_seed(0)
    model = build()
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(precisions)
    x = torch.randn(4, 8, requires_grad=True)
    with lp.context():
        if checkpoint_with is None:
            out = model(x)
        else:
            out = checkpoint.checkpoint(model, x, use_reentrant=checkpoint_with)
        loss = out.float().sum()
    loss.backward()
    assert not lp._stack
    return {name: p.grad for name, p in model.named_parameters()}


def test_a_frozen_16_bit_backbones_parameterless_norm_is_left_alone_under_an_all_fp32_map() -> None:
    """Its norm owns no parameter, so it was hooked as ours: its bf16 input cast up met the backbone's next bf16
    layer in fp32 ("mat1 and mat2 must have the same dtype") under the all-fp32 map every run starts in."""
    frozen = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8, elementwise_affine=False), nn.Linear(8, 8))
    model = nn.Sequential(frozen.to(torch.bfloat16).requires_grad_(False), nn.Linear(8, 2))
    x = torch.randn(4, 8).bfloat16()
    expected = model[1](model[0](x).float())
    lp = LayerPrecision(model, device_type="cpu")
    with lp.context():
        assert torch.equal(model[1](model[0](x).float()), expected)


def test_a_layer_called_by_an_emulated_convolution_follows_the_models_fp16_region() -> None:
    """The emulated fp16 convolution (a CPU one) turns autocast off: its child took that for the model's fp32 block
    and computed in fp32 inside the model's fp16 region (plain autocast: fp16)."""

    class Conv(nn.Conv1d):
        def __init__(self) -> None:
            super().__init__(8, 8, 1)
            self.inner = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.inner_dtype = self.inner(x.squeeze(-1)).dtype
            return super().forward(x)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c = nn.Linear(8, 8), Conv()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.float16):
                return self.c(self.a(x).unsqueeze(-1))

    model = Model()
    lp = LayerPrecision(model, device_type="cpu")
    for region_map in (["bf16", "fp16", "bf16"], ["bf16", "fp32", "fp16"], ["fp32", "bf16", "bf16"]):  # a, c, inner
        lp.set(region_map)
        with lp.context():
            model(torch.randn(4, 8))
        assert model.c.inner_dtype == torch.float16 and not lp._stack, region_map


def test_a_tensor_passed_to_an_fp32_layer_several_times_is_cast_once() -> None:
    """Self-attention on a bf16 layer's output: h, h, h were cast up three times, so the three gradients came back in
    bf16 and were summed in bf16 (the body's gradient 0.4% off a single cast's), and ``query is key`` was lost."""
    torch.manual_seed(1)

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(16, 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.body(x)
            return self.head(self.attn(h, h, h, need_weights=False)[0])

    model, x = SelfAttention(), torch.randn(4, 6, 16)
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["bf16", "fp32", "bf16"])
    seen: list[bool] = []
    model.attn.register_forward_pre_hook(lambda m, args: seen.append(args[0] is args[1] is args[2]))
    with lp.context():
        out = model(x)
    out.float().sum().backward()
    hooked = model.body.weight.grad.clone()
    lp.remove()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # by hand: h cast up once
        h = model.body(x).float()
    with torch.autocast("cpu", enabled=False):
        o = model.attn(h, h, h, need_weights=False)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model.head(o)
    assert torch.equal(out, reference) and seen[0]
    reference.float().sum().backward()
    assert torch.equal(hooked, model.body.weight.grad)


@pytest.mark.parametrize(
    "norm", [nn.LayerNorm(4, elementwise_affine=False), nn.GroupNorm(2, 2, affine=False), nn.InstanceNorm1d(2)]
)
def test_a_norm_without_parameters_gets_fp32_inputs_as_one_with_them(norm: nn.Module) -> None:
    """Norms own no layer without trainable parameters, so no hook: on the CPU, autocast ran them in bf16 after a bf16
    layer (the next fp32 layer got bf16-rounded values), against the docs' "norm layers still get fp32 inputs"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Unflatten(1, (2, 4)), norm, nn.Flatten(), nn.Linear(8, 2))
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["bf16", "fp32"])
    _, outputs, _ = capture(model)
    seen: list[torch.dtype] = []
    norm.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    with lp.context():
        model(torch.randn(4, 8))
    assert seen == [torch.float32]
    with torch.autocast("cpu", enabled=False):  # the fp32 head's input: the norm of the bf16 output, in fp32
        expected = model[4](model[3](norm(model[1](outputs["0"].float()))))
    assert torch.equal(outputs["4"], expected)


@pytest.mark.parametrize("cast_after", [False, True])
def test_a_model_with_16_bit_parameters_is_refused_by_name(cast_after: bool) -> None:
    """Every forward of a model.bfloat16() failed deep inside a norm or a matmul ("mat1 and mat2 must have the same
    dtype"), under an all-fp32 map too: the fp32 regions cast their inputs to fp32."""
    model = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    message = r"parameters \['0.weight', '0.bias', '1.weight'\] are torch.bfloat16 \(of 6 in 16 bits\).*model in fp32"
    if not cast_after:
        with pytest.raises(ValueError, match=message):
            LayerPrecision(model.bfloat16(), device_type="cpu")
        return
    lp = LayerPrecision(model, device_type="cpu")
    model.bfloat16()
    with pytest.raises(ValueError, match=message), lp.context():
        model(torch.randn(2, 6).bfloat16())
    frozen = nn.Sequential(nn.Linear(6, 6).bfloat16().requires_grad_(False), nn.Linear(6, 2))
    LayerPrecision(frozen, device_type="cpu")  # a frozen 16-bit body trains nothing in 16 bits: taken


def test_a_layer_inside_an_fp32_layers_forward_keeps_its_own_precision() -> None:
    """Autocast is off there too, but by the fp32 layer's region, not the model's code: the inner layer is not taken
    for one in the model's fp32 block. It computes in bf16 and hands its result up to the fp32 region it returns
    into."""

    class Outer(nn.Linear):  # a controllable layer calling another inside its forward
        def __init__(self) -> None:
            super().__init__(4, 4)
            self.inner = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(self.inner(x))

    model = nn.Sequential(Outer(), nn.Linear(4, 2))
    lp = LayerPrecision(model, device_type="cpu")
    assert [info.name for info in lp.layers] == ["0", "0.inner", "1"]
    lp.set(["fp32", "bf16", "fp16"])
    seen: dict[str, torch.Tensor] = {}
    model[0].inner.register_forward_hook(lambda m, a, out: seen.update(inner=out))
    x = torch.randn(2, 4)
    with lp.context():
        model(x)
    inner = model[0].inner
    in_bf16 = F.linear(x.bfloat16(), inner.weight.bfloat16(), inner.bias.bfloat16())
    assert seen["inner"].dtype == torch.float32 and torch.equal(seen["inner"], in_bf16.float())
    assert lp.layers_in_model_fp32_blocks == []


def test_a_context_inside_another_gives_the_outer_one_back_its_regions() -> None:
    """Before the fix, leaving the inner context turned the hooks off for the rest of the outer one: its fp32 layer
    then ran in the outer bf16."""
    model = three_linears()
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["bf16", "bf16", "fp32"])
    x = torch.randn(2, 6)
    with lp.context():
        with lp.context():
            inner = model(x)
        outer = model(x)
        assert torch.is_autocast_enabled("cpu")
    assert inner.dtype == outer.dtype == torch.float32 and torch.equal(inner, outer)
    assert not lp._active and not lp._stack and not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("layer", ["lstm", "custom"])
def test_an_error_inside_a_layer_with_an_fp32_region_of_its_own_leaves_the_region(layer: str) -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(WIDTH, WIDTH)
            self.rnn = nn.LSTM(WIDTH, WIDTH) if layer == "lstm" else _Gain()

        def forward(self, x: torch.Tensor) -> Any:
            h = self.fc(x)
            return self.rnn(h[..., :5]) if layer == "lstm" else self.rnn(h, shift=h[:, :3])  # wrong widths

    model = Broken()
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["fp16"])
    with lp.context():
        with pytest.raises(RuntimeError, match=r"input.size\(-1\) must be equal|size of tensor a \(8\)"):
            model(torch.randn(3, WIDTH))
        assert not lp._stack
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
    assert not torch.is_autocast_enabled("cpu")


def test_a_hook_that_raises_before_ours_does_not_close_an_enclosing_layers_region() -> None:
    """Our forward hook is always called, even when a pre-hook registered before ours raised and ours never opened a
    region. Before the fix it closed the innermost region, whoever's: here the enclosing layer's fp16 one, whose
    forward then ran in the outer bf16."""

    class Outer(nn.Linear):  # a controllable layer calling another inside its forward
        def __init__(self) -> None:
            super().__init__(4, 4)
            self.inner = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            try:
                x = self.inner(x)
            except KeyError:
                pass
            return super().forward(x)

    model = nn.Sequential(Outer(), nn.Linear(4, 2))
    model[0].inner.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(KeyError("refused")))
    lp = LayerPrecision(model, device_type="cpu")  # hooks after the user's
    assert [info.name for info in lp.layers] == ["0", "0.inner", "1"]
    lp.set(["fp16", "fp32", "bf16"])
    seen: dict[str, torch.Tensor] = {}
    model[0].register_forward_hook(lambda m, a, out: seen.update(out=out))
    with lp.context():
        model(torch.randn(2, 4))
        assert not lp._stack
    assert seen["out"].dtype == torch.float32  # computed in fp16, handed on in fp32 (the map has a bf16 layer)
    assert torch.equal(seen["out"], seen["out"].half().float())


def test_a_transformer_encoder_layers_sublayers_each_compute_in_their_precision() -> None:
    """Attention (called with keyword arguments by the encoder layer), the feed-forward Linears and the norms: each
    gives exactly a plain forward, in its precision, of the inputs it received; fp32 ones received no 16-bit input."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(WIDTH, WIDTH), nn.TransformerEncoderLayer(WIDTH, 2, 16, dropout=0.0, batch_first=True)
    )
    lp = LayerPrecision(model, device_type="cpu")
    names = [info.name for info in lp.layers]
    assert names == ["0", "1.self_attn", "1.linear1", "1.linear2", "1.norm1", "1.norm2"]
    lp.set(["bf16", "fp32", "fp16", "bf16"])
    modules = dict(model.named_modules())
    calls: dict[str, tuple[tuple[Any, ...], dict[str, Any], Any]] = {}
    for name in names:
        modules[name].register_forward_hook(
            lambda m, a, k, out, name=name: calls.update({name: (a, dict(k), out)}), with_kwargs=True
        )
    with lp.context():
        model(torch.randn(2, 3, WIDTH))
    for name, precision in zip(names, lp.precisions, strict=True):
        args, kwargs, out = calls[name]
        out = _first(out)
        with torch.autocast("cpu", dtype=precision.dtype, enabled=precision is not Precision.FP32):
            expected = _first(modules[name](*args, **kwargs))  # outside the context: no hooks at work
        if precision is Precision.FP32:
            inputs = [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor) and t.is_floating_point()]
            assert all(t.dtype == torch.float32 for t in inputs), name
        if precision is Precision.FP16:  # handed on in fp32 (the map has bf16 layers)
            expected = expected.float()
        assert out.dtype == expected.dtype and torch.equal(out, expected), name


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_a_checkpointed_segment_recomputes_in_each_layers_precision(use_reentrant: bool) -> None:
    """``torch.utils.checkpoint`` recomputes the segment in the backward, after ``context()`` exited: the hooks were
    idle, so the fp32 layer recomputed in the outer bf16 region. Non-reentrant checkpointing raised ("recomputed
    values ... different metadata"); reentrant gave the fp32 layer other gradients (9.7e-4 off). Now bit for bit."""
    from torch.utils.checkpoint import checkpoint

    class Model(nn.Module):
        def __init__(self, checkpointed: bool) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
            self.head = nn.Linear(8, 2)
            self.checkpointed = checkpointed

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            body = checkpoint(self.body, x, use_reentrant=use_reentrant) if self.checkpointed else self.body(x)
            return self.head(body)

    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = Model(checkpointed)
        precision = LayerPrecision(model, "cpu")
        precision.set([Precision.BF16, Precision.FP32, Precision.BF16])  # a mixed map
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), requires_grad=use_reentrant)
        with precision.context():
            out = model(x)
        out.float().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        assert not precision._stack  # every region the recompute opened was closed
    for plain, recomputed in zip(*grads, strict=True):
        assert torch.equal(plain, recomputed)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_a_checkpointed_forward_under_the_users_own_autocast_off_inside_the_context_recomputes_as_it_ran(
    use_reentrant: bool,
) -> None:
    """An fp32 island of the user's (``autocast(enabled=False)``) inside ``context()``, checkpointed: its recompute
    was judged from the autocast state then (off), took the hooks for idle, and non-reentrant checkpointing raised,
    reentrant gave gradients 9e-3 off the same forward unchecked."""
    from torch.utils.checkpoint import checkpoint

    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
        precision = LayerPrecision(model, "cpu")
        precision.set([Precision.BF16, Precision.FP32])
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with precision.context(), torch.autocast("cpu", enabled=False):
            out = checkpoint(model, x, use_reentrant=use_reentrant) if checkpointed else model(x)
        out.float().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        assert not precision._stack
    for plain, recomputed in zip(*grads, strict=True):
        assert torch.equal(plain, recomputed)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_a_checkpointed_forward_run_outside_the_context_is_recomputed_as_it_ran(use_reentrant: bool) -> None:
    """In plain fp32 (outside ``context()``) the hooks are idle, and so they stay in its recompute: they switched on
    there (any forward run by the backward was taken for a recompute of one inside), so non-reentrant checkpointing
    raised and reentrant gave gradients 1.3e-2 off the plain run's."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
    precision = LayerPrecision(body, "cpu")
    precision.set([Precision.BF16, Precision.FP32])  # a mixed map, not in force outside the context
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    body(x).sum().backward()
    plain = [p.grad.clone() for p in body.parameters()]
    body.zero_grad()
    checkpoint(body, x.clone().requires_grad_(use_reentrant), use_reentrant=use_reentrant).sum().backward()
    for expected, recomputed in zip(plain, (p.grad for p in body.parameters()), strict=True):
        assert torch.equal(expected, recomputed)
    assert not precision._stack


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_a_forward_between_a_checkpointed_one_and_its_backward_leaves_its_recompute(use_reentrant: bool) -> None:
    """An evaluation forward of the same modules outside the context (under ``no_grad``) overwrote each module's record:
    the recompute then ran with the hooks idle (a CheckpointError, or reentrant gradients 7.8e-3 off). The post-hooks
    then read the state inside the fp32 layer's region, which the outside forward had recorded too: the recompute left
    that region open, the later layers ran in it and autocast stayed off past the backward."""
    from torch.utils.checkpoint import checkpoint

    grads = []
    for interleave in (False, True):
        torch.manual_seed(0)
        body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        precision = LayerPrecision(body, "cpu")
        precision.set([Precision.BF16, Precision.FP32, Precision.BF16])  # an fp32 layer in the middle
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), requires_grad=use_reentrant)
        with precision.context():
            out = checkpoint(body, x, use_reentrant=use_reentrant)
        if interleave:
            with torch.no_grad():
                body(torch.randn(3, 4))
        out.float().sum().backward()
        assert not precision._stack and not torch.is_autocast_enabled("cpu")  # every region closed
        grads.append([p.grad.clone() for p in body.parameters()])
    for alone, interleaved in zip(*grads, strict=True):
        assert torch.equal(alone, interleaved)


def test_a_frozen_16_bit_backbone_inside_a_module_with_a_parameter_of_its_own_runs_under_an_all_fp32_map() -> None:
    """A prompt on the root module around a frozen bf16 backbone: the root's hook cast the bf16 input up, and the
    backbone's bf16 Linear met it in fp32 ("mat1 and mat2 must have the same dtype")."""

    class PromptTuned(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Linear(4, 4).bfloat16().requires_grad_(False)
            self.prompt = nn.Parameter(torch.zeros(4))
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x).float() + self.prompt)

    torch.manual_seed(0)
    model = PromptTuned()
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    expected = model(x)
    precision = LayerPrecision(model, "cpu")
    assert [(layer.name, layer.controllable) for layer in precision.layers] == [("<root>", False), ("head", True)]
    with precision.context():
        assert torch.equal(model(x), expected)
    precision.set(["bf16"])
    with precision.context():
        assert model(x).dtype == torch.bfloat16


def test_a_map_set_inside_an_open_context_applies_to_the_layers_from_their_next_call() -> None:
    """The context took the uniform map's fast path at entry: a layer set to fp32 inside it computed in bf16 while
    ``precisions`` said fp32."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    seen: dict[str, torch.dtype] = {}
    for name, module in model.named_children():
        module.register_forward_hook(lambda _m, _a, out, name=name: seen.__setitem__(name, out.dtype))
    precision = LayerPrecision(model, "cpu")
    x = torch.randn(3, 4)
    precision.set(["bf16", "bf16"])
    with precision.context():
        model(x)
        assert seen == {"0": torch.bfloat16, "1": torch.bfloat16, "2": torch.bfloat16}
        precision.set(["bf16", "fp32"])
        model(x)
        assert seen["0"] == torch.bfloat16 and seen["2"] == torch.float32
    precision.set(["fp32", "fp32"])
    with precision.context():
        precision.set(["bf16", "fp32"])
        model(x)
        assert seen["0"] == torch.bfloat16 and seen["2"] == torch.float32


def test_one_string_for_the_whole_map_is_refused_by_name() -> None:
    precision = LayerPrecision(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), "cpu")
    with pytest.raises(ValueError, match=r"precisions='bf16' is one string: give a sequence, one precision a layer"):
        precision.set("bf16")  # type: ignore[arg-type]
    assert precision.precisions == [Precision.FP32, Precision.FP32]


def test_a_parametrized_module_is_named_in_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Its weight's originals live under ``parametrizations``: listed as an fp32 layer of their own while the Linear
    computes in the context's type (a documented limitation, said once at construction)."""
    from torch.nn.utils.parametrizations import weight_norm

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), weight_norm(nn.Linear(8, 8, bias=False)))
    with caplog.at_level("WARNING", logger="triaccel_rl.precision"):
        precision = LayerPrecision(model, "cpu")
    assert [layer.name for layer in precision.layers] == ["0", "2.parametrizations.weight"]
    assert "modules ['2'] are parametrized" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="triaccel_rl.precision"):
        LayerPrecision(nn.Sequential(nn.Linear(8, 8)), "cpu")
    assert "parametrized" not in caplog.text


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_a_map_set_inside_the_context_is_recomputed_as_the_forward_ran(use_reentrant: bool) -> None:
    """The context is entered on a uniform bf16 map (its one region, hooks idle), then set to fp32 inside it; the
    forward ran each layer in fp32. The checkpoint's recompute took the path from the map after the context had exited
    (uniform fp32: hooks idle) and ran in the restored bf16 region: a CheckpointError, or with reentrant checkpointing
    silently other gradients."""
    from torch.utils.checkpoint import checkpoint

    def gradient(set_inside: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        lp = LayerPrecision(model, "cpu")
        lp.set(["bf16", "bf16"] if set_inside else ["fp32", "fp32"])
        x = torch.randn(3, 4, requires_grad=True)  # reentrant checkpointing needs an input that does
        with lp.context():
            lp.set(["fp32", "fp32"])
            out = checkpoint(model, x, use_reentrant=use_reentrant)
        assert out.dtype == torch.float32
        out.sum().backward()
        return model[0].weight.grad

    assert torch.equal(gradient(set_inside=True), gradient(set_inside=False))


def test_a_map_set_in_an_inner_context_holds_in_the_outer_one_after() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    _, outputs, _ = capture(model)
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["bf16", "bf16"])
    with lp.context():
        with lp.context():
            lp.set(["fp32", "fp32"])
        model(torch.randn(2, 4))
    assert [outputs[name].dtype for name in ("0", "1")] == [torch.float32, torch.float32]  # were bf16 (the entry's)


class _TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


@pytest.mark.parametrize(
    "precisions",
    [["fp16", "bf16", "bf16"], ["fp16", "fp16", "bf16"], ["bf16", "fp16", "fp32"], ["fp16", "bf16", "fp16"]],
)
def test_a_map_mixing_bf16_and_fp16_runs_cat_on_an_fp16_layers_output(precisions: list[str]) -> None:
    """Autocast's promote ops (cat, stack) take only fp32 and the region's own type: an fp16 layer's output in the bf16
    outer region raised "Unexpected floating ScalarType in at::autocast::prioritize". It is handed on in fp32 (exact:
    the fp16 values), so the result is what casting each branch's fp16 output up by hand gives."""
    torch.manual_seed(0)
    model = _TwoBranches()
    x = torch.randn(3, 4)
    lp = LayerPrecision(model, "cpu")
    lp.set(precisions)
    seen = {}
    for name in ("a", "b"):
        getattr(model, name).register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out))
    with lp.context():
        out = model(x)
    for name, precision in zip("ab", precisions, strict=False):
        dtype = Precision.parse(precision).dtype
        # an fp16 branch: its fp16 result exactly, in fp32
        expected = F.linear(x.to(dtype), getattr(model, name).weight.to(dtype), getattr(model, name).bias.to(dtype))
        assert seen[name].dtype == (torch.float32 if dtype == torch.float16 else dtype)
        assert torch.equal(seen[name], expected.to(seen[name].dtype))
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_an_fp16_layer_keeps_its_type_where_no_layer_is_bf16() -> None:
    model = three_linears()
    _, outputs, _ = capture(model)
    lp = LayerPrecision(model, "cpu")
    lp.set(["fp16", "fp32", "fp16"])
    with lp.context():
        model(torch.randn(2, 6))
    assert [outputs[n].dtype for n in ("0", "2", "4")] == [torch.float16, torch.float32, torch.float16]


def test_the_parametrized_module_warning_says_which_modules_still_compute_in_their_precision(caplog) -> None:
    from torch.nn.utils.parametrizations import weight_norm

    model = nn.Sequential(weight_norm(nn.Linear(8, 8)), nn.ReLU(), weight_norm(nn.Linear(8, 8, bias=False)))
    with caplog.at_level("WARNING", logger="triaccel_rl.precision"):
        lp = LayerPrecision(model, "cpu")
    assert [(info.name, info.controllable) for info in lp.layers] == [
        ("0", True),
        ("0.parametrizations.weight", False),
        ("2.parametrizations.weight", False),
    ]
    free, kept = (r.getMessage() for r in caplog.records)
    assert "['2']" in free and "its precision is not controlled" in free
    assert "['0']" in kept and "each computes in its set precision" in kept
    _, outputs, _ = capture(model)
    lp.set(["bf16"])
    with lp.context():
        model(torch.randn(2, 8))
    assert outputs["0"].dtype == torch.bfloat16


def _saved_bytes(run: Any) -> int:
    """Bytes of the tensors autograd saves for the backward while ``run()`` runs."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return total


def test_a_map_set_inside_the_context_moves_its_region_to_the_maps_type() -> None:
    """Entered on bf16 and set to fp16, the context kept its bf16 region: every fp16 layer handed its result on in
    fp32 (1.75x the saved activations of a context entered on fp16, in review). It now runs as if entered on the map:
    the same outputs, the same saved bytes; and the region as it was once the context closes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(32, 16)
    plain = model(x)  # before any hook: fp32 as torch runs it
    lp = LayerPrecision(model, "cpu")
    lp.set(["fp16"] * 3)
    with lp.context():
        reference_bytes = _saved_bytes(lambda: model(x))
        reference = model(x)
    for entry in (["bf16"] * 3, ["fp32"] * 3, ["bf16", "fp16", "fp32"]):
        lp.set(entry)
        with lp.context():
            lp.set(["fp16"] * 3)
            assert torch.get_autocast_dtype("cpu") == torch.float16 and torch.is_autocast_enabled("cpu")
            assert _saved_bytes(lambda: model(x)) == reference_bytes, entry
            out = model(x)
        assert out.dtype == torch.float16 and torch.equal(out, reference), entry
        assert not torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    lp.set(["bf16"] * 3)
    with lp.context():  # and to all-fp32: the region off, as a context entered on it
        lp.set(["fp32"] * 3)
        assert not torch.is_autocast_enabled("cpu")
        inside = model(x)
        assert inside.dtype == torch.float32 and torch.equal(inside, plain)
    outside = model(x)
    assert outside.dtype == torch.float32 and torch.equal(outside, plain)


def test_a_map_set_between_a_checkpointed_forward_and_its_backward_is_recomputed_as_the_forward_ran() -> None:
    """The forward ran on a uniform map (hooks idle); a mixed map set before the backward must not change the
    recompute's path (taken from the map then, layer 0 recomputed in an fp32 region of its own: other metadata)."""
    from torch.utils.checkpoint import checkpoint

    def gradient(set_between: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        lp = LayerPrecision(model, "cpu")
        lp.set(["bf16", "bf16"])
        with lp.context():
            out = checkpoint(model, torch.randn(3, 4), use_reentrant=False)
            if set_between:
                lp.set(["fp32", "bf16"])
        out.float().sum().backward()
        assert model[0].weight.grad is not None
        return model[0].weight.grad

    assert torch.equal(gradient(set_between=True), gradient(set_between=False))


def test_an_interrupted_layer_forward_leaves_autocast_off_after_the_context() -> None:
    """A Ctrl-C inside a layer's forward skips torch's always_call post-hooks: the layer's region stayed open, the
    context closed it after its own outer region, and that region gave back the state it found on entry, bf16 on:
    autocast stayed on for the rest of the process, and a plain matmul ran in bf16 after ``close()``."""

    class Interrupted(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise KeyboardInterrupt

    model = nn.Sequential(nn.Linear(6, 6), Interrupted(6, 6), nn.Linear(6, 2))
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["bf16", "fp16", "fp32"])
    with pytest.raises(KeyboardInterrupt), lp.context():
        model(torch.randn(3, 6))
    assert not lp._stack and not torch.is_autocast_enabled("cpu")
    assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.float32


def test_a_copy_of_the_model_made_after_the_hooks_closes_its_regions_on_the_stack_it_opened_them_on() -> None:
    """An EMA copy (``copy.deepcopy``) made after the hooks: the post-hook, a bound method, was copied with a copy of
    its ``LayerPrecision``, the pre-hook (a closure) was not, so the copy's layers opened regions on one stack and
    closed them on another; the regions left open turned autocast on for good when the context closed."""
    import copy

    model = three_linears()
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["bf16", "bf16", "fp32"])
    ema = copy.deepcopy(model)
    with lp.context():
        out = ema(torch.randn(3, 6))
        assert not lp._stack
    assert out.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def _saved_and_loaded(model: nn.Module) -> nn.Module:
    import io

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_a_model_saved_with_the_hooks_in_loads_with_them_acting_while_they_are_in() -> None:
    """``torch.save(model)`` while the hooks were in failed: "Can't pickle local object '_as_closure.<locals>.hook'".
    Each hook is saved by a name; loaded while its ``LayerPrecision`` is in, it is that hook, as in a deep copy."""
    model = three_linears()
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["bf16", "fp32", "bf16"])
    loaded, reference = _saved_and_loaded(model), three_linears()
    assert [h.__module__ for m in loaded.modules() for h in m._forward_pre_hooks.values()] == [
        "triaccel_rl._pickled_hooks"
    ] * 3
    x = torch.randn(4, 6)
    with lp.context():
        expected, out = model(x), loaded(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # all three in bf16: the middle layer's fp32 region is ours
        assert not torch.equal(reference(x), expected)


def test_a_model_saved_with_the_hooks_in_loads_as_an_unhooked_one_once_they_are_removed() -> None:
    """Loaded after ``remove`` (a ``Controller`` closed, or another process), every hook does nothing: the model
    computes as one never hooked, under the user's own autocast too (an fp32 layer's hook would hold it in fp32)."""
    model, reference = three_linears(), three_linears()
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["bf16", "fp32", "fp16"])
    saved_in = _saved_and_loaded(model)  # loaded while in: the live hooks, idle outside the context
    import io

    buffer = io.BytesIO()
    torch.save(model, buffer)
    lp.remove()
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in loaded.modules()) == 6
    assert not any(len(m._forward_pre_hooks) for m in model.modules())
    x = torch.randn(4, 6)
    assert torch.equal(loaded(x), reference(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loaded(x).dtype == torch.bfloat16
        assert torch.equal(loaded(x), reference(x))
        assert torch.equal(saved_in(x), reference(x))


def test_a_model_saved_with_the_hooks_in_by_another_process_loads_without_this_ones_hooks(tmp_path) -> None:
    """The names were numbers counted from 0 in every process: a model saved in one process, loaded in another where
    a ``LayerPrecision`` was in (a teacher beside a student), got the student's live hooks (a pre-hook called as the
    teacher's forward hook replaced a layer's output with its ``(args, kwargs)``)."""
    import subprocess
    import sys
    from pathlib import Path

    from triaccel_rl import _pickled_hooks

    path = tmp_path / "teacher.pt"
    saving = (
        "import sys, torch; sys.path.insert(0, 'tests'); from test_precision import three_linears;"
        "from triaccel_rl.precision import LayerPrecision; model = three_linears();"
        "LayerPrecision(model, device_type='cpu').set(['bf16', 'fp32', 'bf16']);"
        f"torch.save(model, {str(path)!r})"
    )
    subprocess.run([sys.executable, "-c", saving], check=True, cwd=Path(__file__).parent.parent)
    student = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.PReLU(), nn.Linear(6, 5))
    lp = LayerPrecision(student, device_type="cpu")
    lp.set(["bf16", "bf16"])
    teacher, reference = torch.load(path, weights_only=False), three_linears()
    loaded_hooks = [h for m in teacher.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]
    assert len(loaded_hooks) == 6 and all(h is _pickled_hooks.inert for h in loaded_hooks)
    x = torch.randn(4, 6)
    with lp.context():
        assert torch.equal(teacher(x), reference(x))


def _save_hooked_model(path: str) -> None:
    model = three_linears()
    LayerPrecision(model, device_type="cpu").set(["bf16", "fp32", "bf16"])
    torch.save(model, path)


def test_a_model_saved_with_the_hooks_in_by_a_forked_child_loads_without_the_parents_hooks(tmp_path) -> None:
    """A forked child inherited its parent's token and counter, so it named its hooks as the parent names its own:
    the parent loading the child's model got its own live hooks."""
    import multiprocessing

    from triaccel_rl import _pickled_hooks

    parent = three_linears()
    lp = LayerPrecision(parent, device_type="cpu")
    lp.set(["bf16", "fp32", "bf16"])
    mark = next(_pickled_hooks._numbers)  # the child counts on from here, as this process would
    path = tmp_path / "child.pt"
    child = multiprocessing.get_context("fork").Process(target=_save_hooked_model, args=(str(path),))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    _pickled_hooks._numbers = itertools.count(mark + 1)  # this process's next names are the child's numbers
    other = three_linears()
    LayerPrecision(other, device_type="cpu").set(["bf16", "fp32", "bf16"])
    loaded = torch.load(path, weights_only=False)
    hooks = [h for m in loaded.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]
    assert len(hooks) == 6 and all(h is _pickled_hooks.inert for h in hooks)


def test_a_torchscript_submodule_is_refused_by_name_and_no_hook_stays_behind() -> None:
    """Its ``register_forward_pre_hook`` raised "not supported on ScriptModules", naming no module, after the layers
    before it had their hooks: a refused Controller left them on the model."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), torch.jit.script(nn.Linear(4, 4)), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"^modules \['2'\] \(of 1\) are TorchScript"):
        LayerPrecision(model, device_type="cpu")
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model[:2].modules())


def test_a_hook_a_module_refuses_leaves_no_other_hook_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """A module raising in ``register_forward_hook`` (any reason) after others took theirs: all are removed."""
    model = three_linears()

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("no hooks here")

    monkeypatch.setattr(model[4], "register_forward_hook", refuse)
    with pytest.raises(RuntimeError, match="no hooks here"):
        LayerPrecision(model, device_type="cpu")
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_a_float64_layer_set_to_16_bits_is_named_once(caplog: pytest.LogCaptureFixture) -> None:
    """autocast leaves float64 ops alone: a float64 layer set to bf16 computed in float64 while the map, the policies
    and the cost model said bf16, with nothing said. It still runs as it is (a whole float64 model trains under the
    controller), and a warning names it, once."""
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6).double(), nn.Linear(6, 2))
    lp = LayerPrecision(model, device_type="cpu")
    with caplog.at_level("WARNING", logger="triaccel_rl"):
        lp.set(["fp32", "fp32", "fp32"])
        assert "float64" not in caplog.text
        lp.set(["bf16", "bf16", "bf16"])
        lp.set(["fp16", "fp16", "fp16"])
    warnings = [r.getMessage() for r in caplog.records if "float64 parameters" in r.getMessage()]
    assert warnings == [
        "layer 1 has float64 parameters: autocast leaves float64 alone, so it computes in float64 whatever its "
        "precision says (bf16); the cost model counts the precision. Cast it to float32 for the controller to set it"
    ]
    seen: dict[str, torch.dtype] = {}
    for name in ("0", "1", "2"):
        model.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: seen.update({name: out.dtype}))
    with lp.context():
        model[2](model[1](model[0](torch.randn(3, 6)).double()).float())
    assert seen == {"0": torch.float16, "1": torch.float64, "2": torch.float16}


@pytest.mark.parametrize("precisions", [["fp16", "fp16"], ["fp16", "bf16"], ["bf16", "fp16"]])
def test_a_float64_cnn_computes_in_float64_under_a_16_bit_map_on_the_cpu(precisions: list[str]) -> None:
    """The CPU fp16 emulation took float64 convolutions too: it cast their float64 result to fp16, which the next
    float64 convolution refused ("Input type (float) and bias type (double) should be the same"). Autocast leaves
    float64 alone: the model computes as it does unhooked."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).double()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(precisions)
    with lp.context():
        out = model(x)
    assert out.dtype == torch.float64 and torch.equal(out, model(x))


def test_an_emulated_fp16_convolution_rounds_only_fp32_and_16_bit_results() -> None:
    """A convolution whose forward returns float64 (of fp32 weights, so emulated) had its result cast to fp16."""

    class Wide(nn.Conv1d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).double()

    torch.manual_seed(0)
    conv = Wide(2, 3, 1)
    lp = LayerPrecision(conv, device_type="cpu")
    lp.set(["fp16"])
    x = torch.randn(2, 2, 5)
    with lp.context():
        out = conv(x)
    assert out.dtype == torch.float64
    rounded = conv.weight.half().float(), conv.bias.half().float()
    assert torch.equal(out, F.conv1d(x.half().float(), *rounded).double())  # fp16 inputs and weights, fp32 sums


class _Net(nn.Module):
    """A controllable layer, then modules the map does not set: each kind of hook that runs them in fp32."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.prelu = nn.PReLU()  # a leaf module: an fp32 region of its own
        self.ln = nn.LayerNorm(16)  # a norm: its inputs cast up
        self.bare = nn.LayerNorm(16, elementwise_affine=False)  # a norm that is no layer: the same
        self.rnn = nn.GRU(16, 16, batch_first=True)  # an RNN: an fp32 region of its own
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.bare(self.ln(self.prelu(self.inp(x)))))
        return self.out(h[:, -1])


def test_a_copy_of_the_model_made_after_the_hooks_runs_its_unset_modules_in_fp32() -> None:
    """An EMA copy (``copy.deepcopy``) made after the hooks: the hooks of the modules the map does not set were bound
    methods, copied with a copy of the LayerPrecision that is never active, so the copy ran them in the outer bf16."""
    import copy

    torch.manual_seed(0)
    model = _Net()
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(["bf16", "bf16"])
    ema = copy.deepcopy(model)
    seen: dict[str, torch.dtype] = {}
    for name in ("prelu", "ln", "bare", "rnn"):
        ema.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: seen.update({name: args[0].dtype}))
    x = torch.randn(2, 3, 8)
    with lp.context():
        expected, out = model(x), ema(x)
        assert not lp._stack
    assert seen == dict.fromkeys(("prelu", "ln", "bare", "rnn"), torch.float32)
    assert torch.equal(out, expected)


class _Factorized(nn.Linear):
    """A controllable layer whose forward runs a child layer first (a low-rank pre-projection)."""

    def __init__(self) -> None:
        super().__init__(4, 4)
        self.pre = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pre(x))


class _WithSide(nn.Linear):
    """A controllable layer concatenating its own result with a child layer's."""

    def __init__(self) -> None:
        super().__init__(4, 4)
        self.side = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.linear(x, self.weight, self.bias), self.side(x)], dim=-1)


def _in(layer: nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    """``layer``'s own linear map computed in ``precision``, as autocast does it, in fp32."""
    dtype = Precision.parse(precision).dtype
    return F.linear(x.to(dtype), layer.weight.to(dtype), layer.bias.to(dtype)).float()


@pytest.mark.parametrize(
    ("model_type", "precisions"),
    [
        (_Factorized, ["fp32", "bf16", "fp32"]),
        (_Factorized, ["fp32", "fp16", "fp32"]),
        (_WithSide, ["fp16", "bf16", "bf16"]),
        (_WithSide, ["fp16", "bf16", "fp16"]),
    ],
)
def test_a_16_bit_layer_inside_another_layers_forward_hands_its_result_up_to_that_layers_region(
    model_type: type[nn.Module], precisions: list[str]
) -> None:
    """A 16-bit layer called inside a parent layer's forward handed its result back in its own type where the context's
    region was its type or fp32, whatever the parent's region: an fp32 parent's matmul raised ("mat1 and mat2 must have
    the same dtype"), an fp16 parent's cat of a bf16 result too ("Unexpected floating ScalarType"). It is handed up in
    fp32 (exact), so the result is what casting the child's output up by hand gives."""
    torch.manual_seed(0)
    model = nn.Sequential(model_type(), nn.Linear(4 if model_type is _Factorized else 8, 2))
    parent, head = model
    child = next(parent.children())
    lp = LayerPrecision(model, device_type="cpu")
    lp.set(precisions)
    x = torch.randn(3, 4)
    with lp.context():
        out = model(x)
    if model_type is _Factorized:
        h = _in(parent, _in(child, x, precisions[1]), precisions[0])
    else:
        h = torch.cat([_in(parent, x, precisions[0]), _in(child, x, precisions[1])], dim=-1)
    expected = _in(head, h, precisions[2])
    assert torch.equal(out.float(), expected)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_an_fp16_layer_inside_an_emulated_convolutions_forward_hands_its_result_up() -> None:
    """The emulated fp16 convolution (a CPU one) computes in fp32 with autocast off: an fp16 child's result, of the
    type the emulated region stands for, came back in fp16 and the conv raised ("Input type (c10::Half) and bias type
    (float) should be the same"). It is handed up in fp32: the fp16 values the emulation computes on."""

    class Conv(nn.Conv1d):
        def __init__(self) -> None:
            super().__init__(4, 4, 1)
            self.inner = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(self.inner(x.transpose(1, 2)).transpose(1, 2))

    torch.manual_seed(0)
    conv = Conv()
    lp = LayerPrecision(conv, device_type="cpu")
    lp.set(["fp16", "fp16"])
    x = torch.randn(2, 4, 3)
    with lp.context():
        out = conv(x)
    inner = _in(conv.inner, x.transpose(1, 2), "fp16").transpose(1, 2)
    rounded = conv.weight.half().float(), conv.bias.half().float()
    assert out.dtype == torch.float16 and torch.equal(out, F.conv1d(inner, *rounded).half())


def test_a_tensor_passed_to_a_module_with_a_parameter_of_its_own_several_times_is_cast_once() -> None:
    """A module with children and a parameter of its own (a learned gate around attention) called as ``block(h, h, h)``
    on a bf16 layer's output: its hook cast ``h`` once an argument, so ``q is k`` no longer held inside (three bf16
    gradients summed in bf16)."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Parameter(torch.ones(16))
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.seen = (q is k and k is v, q.dtype)
            return self.attn(q, k, v, need_weights=False)[0] * self.gate

    torch.manual_seed(0)
    model = nn.ModuleDict({"inp": nn.Linear(8, 16), "block": Gated()})
    lp = LayerPrecision(model, device_type="cpu")
    assert [(info.name, info.controllable) for info in lp.layers] == [
        ("inp", True),
        ("block", False),
        ("block.attn", True),
    ]
    lp.set(["bf16", "fp32"])
    with lp.context():
        h = model["inp"](torch.randn(4, 5, 8))
        model["block"](h, h, h)
    assert model["block"].seen == (True, torch.float32)


def test_functional_call_on_the_fused_path_computes_with_the_weights_it_was_given() -> None:
    """The pre-hook swapped the engine's 16-bit copy of the model's own weights in over whatever the owner held:
    under ``torch.func.functional_call`` (an EMA's or a meta-learner's weights) the caller's tensors, so the output was
    the model's own. Now exactly autocast's cast of the given weights; the model's own forward still reads the copies
    (here zeros, to tell them apart)."""
    from torch.func import functional_call

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    lp = LayerPrecision(model, device_type="cpu")  # as StepEngine(fused=True) sets it up, without its 4 s build
    lp.set(["bf16", "bf16"])
    copies = _copies_of(model, lp)
    lp.use_weight_copies(lambda i, dtype: [(o, n, torch.zeros_like(c)) for o, n, c in copies(i, dtype)])
    given = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = functional_call(model, given, (x,))
    assert torch.count_nonzero(expected) > 0
    with lp.context():
        assert torch.equal(functional_call(model, given, (x,)), expected)
        assert torch.count_nonzero(model(x)) == 0
    assert not lp._swapped and all(isinstance(p, nn.Parameter) for p in model.parameters())


class _OwnFp16Region(nn.Module):
    """``a`` inside the model's own fp16 autocast region (an ``@autocast()`` forward), ``b`` after it."""

    def __init__(self, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.dtype = dtype
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype != torch.float32):
            h = self.a(x)
        return self.b(h.float())


@pytest.mark.parametrize("precisions", [["bf16", "bf16"], ["fp32", "fp32"], ["fp32", "bf16"]])
def test_a_layer_in_the_models_own_fp16_region_needs_the_grad_scaler(precisions: list[str]) -> None:
    """needs_grad_scaler read the set precisions only: a layer computing in fp16 in the model's own region got no loss
    scaling, and its gradients underflowed. Known from the first forward, before the loss is scaled; the model's own
    fp32 and bf16 regions need none."""
    lp = LayerPrecision(_OwnFp16Region(), device_type="cpu")
    lp.set(precisions)
    assert not lp.needs_grad_scaler
    with lp.context():
        lp.model(torch.randn(2, 8))
    assert lp.layers_in_model_blocks == {0: (torch.float16,)} and lp.needs_grad_scaler
    for dtype in (torch.float32, torch.bfloat16):
        other = LayerPrecision(_OwnFp16Region(dtype), device_type="cpu")
        other.set(precisions)
        with other.context():
            other.model(torch.randn(2, 8))
        assert not other.needs_grad_scaler, dtype


_UNORDERED_MESSAGE = (
    r"give an ordered sequence \(a list, tuple or array\) with one precision per layer \(3: \['0', '1', '2'\]\) "
    r"or per controllable layer \(2: \['0', '2'\]\), in that order"
)


@pytest.mark.parametrize(
    ("precisions", "message"),
    [
        # Before the fix: the dict's keys read as the precisions 0 and 2 (fp32, fp16), the set in its hash order.
        ({0: "bf16", 2: "fp16"}, r"precisions=\{0: 'bf16', 2: 'fp16'\} is a dict: " + _UNORDERED_MESSAGE),
        ({"bf16"}, r"precisions=\{'bf16'\} is a set: " + _UNORDERED_MESSAGE),
        (frozenset({"fp16", "bf16"}), r"is a frozenset: " + _UNORDERED_MESSAGE),
        ((p for p in ["bf16", "fp32"]), r"is a generator: " + _UNORDERED_MESSAGE),
    ],
)
def test_a_map_that_is_not_an_ordered_sequence_is_refused_naming_the_layers(precisions: Any, message: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    precision = LayerPrecision(model, "cpu")
    with pytest.raises(ValueError, match=message):
        precision.set(precisions)
    assert precision.precisions == [Precision.FP32] * 3


def test_lists_tuples_and_numpy_arrays_still_set_the_map_in_their_order() -> None:
    import numpy as np

    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    precision = LayerPrecision(model, "cpu")
    for precisions in (["bf16", "fp16"], ("bf16", "fp16"), np.array([1, 2]), np.array(["bf16", "fp32", "fp16"])):
        precision.set(precisions)
        assert precision.precisions == [Precision.BF16, Precision.FP32, Precision.FP16]
        precision.set(["fp32"] * 3)


def test_a_map_written_in_place_is_read_afresh_by_context_and_the_hooks() -> None:
    """What the map implies (its context's type, uniform or not, all fp32) is derived once per map, not at each read:
    a map written in place (``precisions[i] = ...``, no ``set()``) must be read as written, by ``uniform``, by
    ``context()`` and by a norm's hook, at the next read."""
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    seen: dict[str, torch.dtype] = {}
    for name, module in model.named_children():
        module.register_forward_hook(
            lambda _m, args, out, name=name: seen.update({name: out.dtype, f"{name}<": args[0].dtype})
        )
    precision = LayerPrecision(model, "cpu")
    x = torch.randn(3, 4)
    with precision.context():  # derived for the all-fp32 map
        model(x)
    assert (precision.uniform, precision.all_fp32) == (Precision.FP32, True)
    precision.precisions[0] = Precision.BF16
    assert (precision.uniform, precision.all_fp32) == (None, False)
    with precision.context():
        model(x)
    assert [seen[name] for name in ("0<", "0", "1<", "1", "2<", "2")] == [torch.float32, torch.bfloat16] + [
        torch.float32
    ] * 4  # the norm's bf16 input cast up, the fp32 layer's too
    precision.precisions[2] = Precision.BF16
    assert (precision.uniform, precision.all_fp32) == (Precision.BF16, False)
    precision.precisions[0] = precision.precisions[2] = Precision.FP32
    assert (precision.uniform, precision.all_fp32) == (Precision.FP32, True)
    with precision.context():
        assert not torch.is_autocast_enabled("cpu")


def test_the_emulated_fp16_convolution_follows_the_device_type() -> None:
    """An fp16 convolution is emulated on the CPU only: the derived fact is keyed on the device type too."""
    precision = LayerPrecision(nn.Sequential(nn.Conv1d(2, 2, 1)), "cpu")
    precision.set(["fp16"])
    assert precision._emulates_fp16
    precision.device_type = "cuda"
    assert not precision._emulates_fp16
    precision.device_type = "cpu"
    assert precision._emulates_fp16


def test_flat_inputs_are_cast_up_once_each_and_left_alone_when_none_is_16_bit() -> None:
    """The flat path of ``_map_tensors`` (plain tensors by position, a norm's call): a tensor passed twice is cast
    once (``q is k`` holds after), others kept as they are; nothing to cast is None (the hook changes nothing);
    nested inputs or keywords take the pytree walk as before."""
    from triaccel_rl.precision import _map_tensors, _up_from_16_bit

    h, y = torch.ones(2, dtype=torch.bfloat16), torch.zeros(2)
    result = _map_tensors(((h, h, y), {}), _up_from_16_bit)
    assert result is not None
    args, kwargs = result
    assert args[0] is args[1] and args[2] is y and args[0].dtype == torch.float32 and kwargs == {}
    assert torch.equal(args[0], torch.ones(2))
    assert _map_tensors(((y, y), {}), _up_from_16_bit) is None
    assert _map_tensors(((), {}), _up_from_16_bit) is None
    nested = _map_tensors((((h, h), y), {"hx": h}), _up_from_16_bit)
    assert nested is not None
    (pair, same), named = nested
    assert pair[0] is pair[1] is named["hx"] and pair[0].dtype == torch.float32 and same is y
