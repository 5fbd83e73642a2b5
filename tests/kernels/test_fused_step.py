"""The fused SGD/AdamW step kernels against their PyTorch references: layouts, codes, edge values, the skip path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from _kernel_helpers import assert_bits_equal, assert_close, make_layers
from triaccel_rl.kernels import (
    FlatParameterStore,
    FusedAdamW,
    FusedSGD,
    StatRow,
    fused_adamw_step,
    fused_adamw_step_reference,
    fused_sgd_step,
    fused_sgd_step_reference,
    layer_grad_stats,
    layer_grad_stats_reference,
    new_step_state,
)

LAYOUTS = {
    "single_element": [[(1,)]],
    "awkward": [[(4095,)], [(4097,)], [(3, 5, 7), (2,)]],
    "tiny_and_large": [[(3,)] for _ in range(12)] + [[(90, 101)]],
    "empty_parameters": [[(0,), (3,)], [(2, 0, 5)], [(1,), (0, 4)]],  # a layer of one empty parameter, too
}
HYPER: dict[str, dict[str, Any]] = {
    "adamw": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01},
    "sgd_nesterov": {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    "sgd_dampening": {"momentum": 0.9, "dampening": 0.3},
    "sgd_plain": {},
}
BF16, FP16 = 1, 2
DTYPE_OF_CODE = {BF16: torch.bfloat16, FP16: torch.float16}


@dataclass
class FlatState:
    """The raw buffers one fused step works on, so the kernel and the reference can run on copies."""

    kind: str
    store: FlatParameterStore
    params: torch.Tensor
    grads: torch.Tensor
    states: list[torch.Tensor]
    bf16_copy: torch.Tensor
    fp16_copy: torch.Tensor
    step_state: torch.Tensor

    @classmethod
    def make(cls, kind: str, layout: list[list[tuple[int, ...]]], device: str, seed: int = 0) -> FlatState:
        store = FlatParameterStore(make_layers(layout, device, seed))
        n = store.n_elements
        generator = torch.Generator().manual_seed(seed + 1)
        # Non-zero optimizer state from the start, so every term of the update is exercised.
        if kind == "adamw":
            states = [torch.randn(n, generator=generator) * 0.1, torch.rand(n, generator=generator) * 0.01]
            step_state = new_step_state(device, HYPER[kind]["beta1"], HYPER[kind]["beta2"], n_layers=store.n_layers)
        else:
            states = [torch.randn(n, generator=generator) * 0.1]
            step_state = new_step_state(device, n_layers=store.n_layers)
        copies = torch.randn(n, generator=generator)
        return cls(
            kind=kind,
            store=store,
            params=store.params.clone(),
            grads=(torch.randn(n, generator=generator) * 512).to(device),
            states=[s.to(device) for s in states],
            bf16_copy=copies.to(torch.bfloat16).to(device),
            fp16_copy=copies.to(torch.float16).to(device),
            step_state=step_state,
        )

    def clone(self) -> FlatState:
        return FlatState(
            self.kind, self.store, self.params.clone(), self.grads.clone(), [s.clone() for s in self.states],
            self.bf16_copy.clone(), self.fp16_copy.clone(), self.step_state.clone(),
        )  # fmt: skip

    def step(
        self,
        use_reference: bool,
        lr_factors: torch.Tensor,
        codes: torch.Tensor,
        inv_scale: float | torch.Tensor = 1 / 512,
        lr: float = 0.05,
        block_size: int | None = None,
    ) -> torch.Tensor:
        """One fused step (stats pass, then update) by the kernels or by the references; returns the stats."""
        store = self.store
        if use_reference:
            stats = layer_grad_stats_reference(self.grads, store.chunk_layer, store.n_layers, inv_scale)
        else:
            stats = layer_grad_stats(self.grads, store.chunk_layer, store.n_layers, inv_scale)
        common = (self.bf16_copy, self.fp16_copy, store.chunk_layer, lr_factors, codes, stats, self.step_state)
        if self.kind == "adamw":
            step = fused_adamw_step_reference if use_reference else fused_adamw_step
            launch = {} if use_reference else {"block_size": block_size}
            step(self.params, self.grads, *self.states, *common, lr=lr, inv_scale=inv_scale, **HYPER[self.kind],
                 **launch)  # fmt: skip
        else:
            sgd_step = fused_sgd_step_reference if use_reference else fused_sgd_step
            launch = {} if use_reference else {"block_size": block_size}
            sgd_step(self.params, self.grads, *self.states, *common, lr=lr, inv_scale=inv_scale, **HYPER[self.kind],
                     **launch)  # fmt: skip
        return stats


def _factors_and_codes(n_layers: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    factors = torch.linspace(0.5, 1.5, n_layers, dtype=torch.float32, device=device)
    codes = torch.tensor([i % 3 for i in range(n_layers)], dtype=torch.int32, device=device)
    return factors, codes


def _assert_copies_follow_params(state: FlatState, codes: torch.Tensor, before: FlatState, what: str) -> None:
    """Coded layers' copies equal params.to(dtype) bit for bit; every other segment is unchanged."""
    store = state.store
    for layer, code in enumerate(codes.tolist()):
        for buffer, old, dtype_code in [
            (state.bf16_copy, before.bf16_copy, BF16),
            (state.fp16_copy, before.fp16_copy, FP16),
        ]:
            got = store.layer_segment(buffer, layer)
            if code == dtype_code:
                want = store.layer_segment(state.params, layer).to(DTYPE_OF_CODE[code])
            else:
                want = store.layer_segment(old, layer)
            assert_bits_equal(got, want, f"{what}: layer {layer} (code {code}) {buffer.dtype} copy")


@pytest.mark.parametrize("kind", list(HYPER))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_step_matches_reference(device: str, layout: str, kind: str) -> None:
    kernel = FlatState.make(kind, LAYOUTS[layout], device)
    reference = kernel.clone()
    factors, codes = _factors_and_codes(kernel.store.n_layers, device)
    for step in range(2):  # the first step of SGD initialises the momentum buffer, the second uses it
        before = kernel.clone()
        kernel_stats = kernel.step(False, factors, codes)
        reference_stats = reference.step(True, factors, codes)
        what = f"{kind}/{layout} step {step}"
        assert_close(kernel.params, reference.params, f"{what} params")
        for i, (got, want) in enumerate(zip(kernel.states, reference.states, strict=True)):
            assert_close(got, want, f"{what} state {i}")
        assert torch.equal(kernel.step_state, reference.step_state), f"{what}: step state {kernel.step_state}"
        _assert_copies_follow_params(kernel, codes, before, what)
        stats_err = float((kernel_stats - reference_stats).abs().max())
        assert torch.allclose(kernel_stats, reference_stats, rtol=1e-5, atol=1e-6), f"{what}: stats err {stats_err:.3g}"
    assert float(kernel.step_state[0, 0]) == 2.0


@pytest.mark.parametrize("block_size", [None, 1024])
@pytest.mark.parametrize("kind", ["adamw", "sgd_dampening"])
def test_a_layer_sitting_out_keeps_its_count(device: str, kind: str, block_size: int | None) -> None:
    """Row 2 of the step state says layer 1 sits the step out: its count stays, every other count advances once
    (also with several programs a segment: one writer a layer), the kernel as the reference; a later step of that
    layer is its first (SGD: the momentum buffer starts from the gradient; AdamW: bias corrections of step 1)."""
    kernel = FlatState.make(kind, LAYOUTS["awkward"], device, seed=6)
    reference = kernel.clone()
    factors, codes = _factors_and_codes(kernel.store.n_layers, device)
    for state in (kernel, reference):
        state.step_state[2, 2] = 0.0  # column 1 + layer
    kernel.step(False, factors, codes, block_size=block_size)
    reference.step(True, factors, codes)
    assert kernel.step_state[0].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert torch.equal(kernel.step_state, reference.step_state)

    # Layer 1 takes part now; its step is its first. A fresh state of the same buffers stepped once is the reference.
    first = kernel.clone()
    first.step_state = new_step_state(device, **_betas(kind), n_layers=kernel.store.n_layers)
    for state in (kernel, reference):
        state.step_state[2, 2] = 1.0
    kernel.step(False, factors, codes, block_size=block_size)
    reference.step(True, factors, codes)
    first.step(False, factors, codes, block_size=block_size)
    assert kernel.step_state[0].tolist() == [2.0, 2.0, 1.0, 2.0]
    assert torch.equal(kernel.step_state, reference.step_state)
    layer_1 = [kernel.store.layer_segment(buffer, 1) for buffer in (kernel.params, *kernel.states)]
    for got, want in zip(
        layer_1, [first.store.layer_segment(b, 1) for b in (first.params, *first.states)], strict=True
    ):
        assert_bits_equal(got, want, f"{kind}: layer 1's late first step")
    assert_close(kernel.params, reference.params, f"{kind} params")


def _betas(kind: str) -> dict[str, float]:
    return {name: HYPER[kind][name] for name in ("beta1", "beta2") if name in HYPER[kind]}


@pytest.mark.parametrize("kind", ["adamw", "sgd_nesterov"])
def test_blocks_smaller_than_a_segment(device: str, kind: str) -> None:
    """Several programs per segment (the GPU defaults do this): same results as one program per segment."""
    small = FlatState.make(kind, LAYOUTS["awkward"], device, seed=2)
    whole = small.clone()
    before = small.clone()
    factors, codes = _factors_and_codes(small.store.n_layers, device)
    small.step(False, factors, codes, block_size=1024)
    whole.step(False, factors, codes, block_size=small.store.segment_align)
    assert_close(small.params, whole.params, f"{kind} params, 1024-element blocks")
    for i, (got, want) in enumerate(zip(small.states, whole.states, strict=True)):
        assert_close(got, want, f"{kind} state {i}, 1024-element blocks")
    _assert_copies_follow_params(small, codes, before, f"{kind}, 1024-element blocks")


@pytest.mark.parametrize("kind", ["adamw", "sgd_nesterov"])
def test_every_precision_code_combination(device: str, kind: str) -> None:
    """Three layers, three steps, codes rotated each step: every layer is written as fp32, bf16 and fp16."""
    state = FlatState.make(kind, [[(50,)], [(4100,)], [(7, 3)]], device, seed=3)
    factors = torch.ones(3, device=device)
    for step in range(3):
        codes = torch.tensor([(step + i) % 3 for i in range(3)], dtype=torch.int64, device=device)
        before = state.clone()
        state.step(False, factors, codes)
        _assert_copies_follow_params(state, codes, before, f"{kind} step {step} codes {codes.tolist()}")


# The interpreter computes with numpy, which warns about the overflows these tests cause on purpose.
OVERFLOW_WARNING = "ignore:overflow encountered:RuntimeWarning"


@pytest.mark.filterwarnings(OVERFLOW_WARNING)
@pytest.mark.parametrize(
    ("kind", "poison"),
    [("adamw", "nan"), ("sgd_nesterov", "inf"), ("sgd_plain", "-inf"), ("adamw", "overflow_on_unscale")],
)
def test_nonfinite_grad_skips_step_bit_for_bit(device: str, kind: str, poison: str) -> None:
    state = FlatState.make(kind, LAYOUTS["awkward"], device, seed=4)
    factors, codes = _factors_and_codes(state.store.n_layers, device)
    state.step(False, factors, codes)  # a normal step first, so the state is not trivial
    clean_twin = state.clone()
    inv_scale = 1 / 512
    bad = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "overflow_on_unscale": 3e38}[poison]
    if poison == "overflow_on_unscale":
        inv_scale = 4.0  # finite scaled gradient whose unscaled value overflows to inf
    state.grads[state.store.layer_offsets[1] + 4096] = bad
    before = state.clone()
    stats = state.step(False, factors, codes, inv_scale=inv_scale)

    for name, got, want in [
        ("params", state.params, before.params),
        ("bf16 copy", state.bf16_copy, before.bf16_copy),
        ("fp16 copy", state.fp16_copy, before.fp16_copy),
        ("step state", state.step_state[0], before.step_state[0]),
        *((f"state {i}", s, b) for i, (s, b) in enumerate(zip(state.states, before.states, strict=True))),
    ]:
        assert torch.equal(got, want), f"skipped step changed {name}"
    bits = stats.view(torch.int32)
    assert bits[StatRow.GRAD_NONFINITE].tolist() == [0, 1, 0]
    assert int(bits[StatRow.NONFINITE_TOTAL, 0]) == 1
    for row in (StatRow.GRAD_DOT_MOMENTUM, StatRow.MOMENTUM_SQ_SUM, StatRow.SECOND_MOMENT_SUM):
        assert not stats[row].any(), f"skipped step reported {row.name}"

    # The next clean step continues as if the bad one never happened.
    state.grads.copy_(clean_twin.grads)
    state.step(False, factors, codes)
    clean_twin.step(False, factors, codes)
    assert torch.equal(state.params, clean_twin.params), "step after a skipped one differs from never skipping"
    assert torch.equal(state.step_state[0], clean_twin.step_state[0])


@pytest.mark.filterwarnings(OVERFLOW_WARNING)
@pytest.mark.parametrize("kind", ["adamw", "sgd_nesterov"])
def test_edge_gradients(device: str, kind: str) -> None:
    """Zero, denormal, tiny and huge (but finite) gradients: kernel and reference agree."""
    kernel = FlatState.make(kind, LAYOUTS["awkward"], device, seed=5)
    offsets = kernel.store.layer_offsets
    kernel.grads[offsets[0] : offsets[0] + 4095] = 0.0
    kernel.grads[offsets[1] : offsets[1] + 100] = 1e-40  # fp32 denormals
    kernel.grads[offsets[1] + 100 : offsets[1] + 200] = -1e-45
    kernel.grads[offsets[2] : offsets[2] + 50] = 1e30  # finite; g*g overflows the second moment to inf
    reference = kernel.clone()
    factors, codes = _factors_and_codes(kernel.store.n_layers, device)
    before = kernel.clone()
    kernel.step(False, factors, codes, inv_scale=1.0)
    reference.step(True, factors, codes, inv_scale=1.0)
    for what, got, want in [
        ("params", kernel.params, reference.params),
        *((f"state {i}", g, w) for i, (g, w) in enumerate(zip(kernel.states, reference.states, strict=True))),
    ]:
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), f"{kind} edge gradients {what}: finiteness"
        finite = torch.isfinite(want)
        assert_close(got[finite], want[finite], f"{kind} edge gradients {what}")
    if kind == "adamw":  # 1e30 squared: the second moment overflows to inf there, and that weight stops moving
        overflowed = slice(offsets[2], offsets[2] + 50)
        assert torch.isinf(kernel.states[1][overflowed]).all()
        assert torch.equal(kernel.params[overflowed], (before.params[overflowed] * (1 - 0.05 * 1.5 * 0.01)))
    _assert_copies_follow_params(kernel, codes, before, f"{kind} edge gradients")


# Weights at the edges of the 16-bit types: signed zeros, fp32 denormals, fp16's smallest subnormal and largest
# value, the ties around 65520 where fp16 rounds to inf, bf16's largest value and past it, inf and NaN.
EDGE_WEIGHTS = [0.0, -0.0, 1e-40, -1e-45, 2.0**-24, 65504.0, 65519.0, -65520.0, 1e5, 3.3895e38, 3.4e38,
                float("inf"), float("-inf"), float("nan")]  # fmt: skip


@pytest.mark.filterwarnings(OVERFLOW_WARNING)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("kind", list(HYPER))
def test_edge_weights_and_their_copies(device: str, kind: str) -> None:
    """Edge weights in a bf16 and an fp16 layer, a tiny LR so they stay near their edges: the kernel's weights and
    states match the reference (NaN and inf where it has them), and every copy is ``Tensor.to``'s, bit for bit."""
    kernel = FlatState.make(kind, LAYOUTS["awkward"], device, seed=8)
    edges = torch.tensor(EDGE_WEIGHTS, device=device)
    for layer in (1, 2):  # codes 1 (bf16) and 2 (fp16), see _factors_and_codes
        start = kernel.store.layer_offsets[layer]
        kernel.params[start : start + len(edges)] = edges
    reference = kernel.clone()
    factors, codes = _factors_and_codes(kernel.store.n_layers, device)
    assert codes.tolist() == [0, BF16, FP16]
    for step in range(2):
        before = kernel.clone()
        kernel.step(False, factors, codes, lr=1e-6)
        reference.step(True, factors, codes, lr=1e-6)
        for what, got, want in [
            ("params", kernel.params, reference.params),
            *((f"state {i}", g, w) for i, (g, w) in enumerate(zip(kernel.states, reference.states, strict=True))),
        ]:
            for test in (torch.isnan, torch.isinf):
                assert torch.equal(test(got), test(want)), f"{kind} step {step} {what}: {test.__name__} differs"
            finite = torch.isfinite(want)
            assert torch.equal(got[~finite].nan_to_num(), want[~finite].nan_to_num()), f"{what}: infinities differ"
            assert_close(got[finite], want[finite], f"{kind} step {step} edge {what}")
        _assert_copies_follow_params(kernel, codes, before, f"{kind} step {step} edge weights")


def test_inv_scale_tensor_equals_float(device: str) -> None:
    by_value = FlatState.make("adamw", LAYOUTS["awkward"], device, seed=6)
    by_tensor = by_value.clone()
    factors, codes = _factors_and_codes(by_value.store.n_layers, device)
    by_value.step(False, factors, codes, inv_scale=0.125)
    by_tensor.step(False, factors, codes, inv_scale=torch.tensor([0.125], device=device))
    assert torch.equal(by_value.params, by_tensor.params), "inv_scale as tensor and as float disagree"


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_optimizer_skip_flag_without_host_sync(device: str, optimizer: str) -> None:
    store = FlatParameterStore(make_layers(LAYOUTS["awkward"], device))
    opt = FusedAdamW(store) if optimizer == "adamw" else FusedSGD(store, momentum=0.9)
    store.grads.normal_()
    result = opt.step(lr=0.1)
    assert result.skipped.dim() == 0 and result.skipped.dtype == torch.bool
    assert result.skipped.device.type == torch.device(device).type
    assert not bool(result.skipped)
    store.grads[5] = float("nan")
    params_before = store.params.clone()
    result = opt.step(lr=0.1)
    assert bool(result.skipped) and int(result.nonfinite_total) == 1
    assert torch.equal(store.params, params_before)
    assert float(opt.step_count) == 1.0


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("apply", [True, False], ids=["applied", "skipped"])
def test_empty_buffers_advance_the_counts_as_the_reference_does(device: str, kind: str, apply: bool) -> None:
    """The kernel path returned before its counts moved on empty buffers (the reference path advanced them)."""

    def empty(dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(0, dtype=dtype, device=device)

    counts = []
    for step, kwargs in (
        (fused_sgd_step, {"momentum": 0.9}),
        (fused_sgd_step_reference, {"momentum": 0.9}),
        (fused_adamw_step, {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}),
        (fused_adamw_step_reference, {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}),
    ):
        if ("adamw" in step.__name__) != (kind == "adamw"):
            continue
        state = new_step_state(device, 0.9, 0.999, n_layers=1)
        stats = layer_grad_stats(empty(), empty(torch.int32), 1, segment_align=16)
        if not apply:
            stats.view(torch.int32)[StatRow.NONFINITE_TOTAL, 0] += 1
        moments = [empty()] if kind == "sgd" else [empty(), empty()]
        step(
            empty(), empty(), *moments, empty(torch.bfloat16), empty(torch.float16), empty(torch.int32),
            torch.ones(1, device=device), torch.zeros(1, dtype=torch.int32, device=device), stats, state,
            lr=0.1, segment_align=16, **kwargs,
        )  # fmt: skip
        counts.append(state[0].tolist())
    assert counts == ([[1.0, 1.0]] * 2 if apply else [[0.0, 0.0]] * 2)
