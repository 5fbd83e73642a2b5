"""Compiled kernels on CUDA at realistic sizes: an exhaustive-stride cast sweep and large fused steps."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _kernel_helpers import assert_bits_equal, assert_close, assert_stats_close
from triaccel_rl.kernels import (
    FlatParameterStore,
    FusedAdamW,
    FusedSGD,
    cast_to_low_precision,
    fused_adamw_step_reference,
    fused_sgd_step_reference,
    layer_grad_stats_reference,
    new_step_state,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_every_257th_bit_pattern(dtype: torch.dtype) -> None:
    """About 16.7M fp32 bit patterns spread over the whole range (every sign, exponent, NaN payload)."""
    bits = torch.arange(0, 2**32, 257, dtype=torch.int64, device="cuda")
    x = (bits - (bits >= 2**31).long() * 2**32).to(torch.int32).view(torch.float32)
    assert_bits_equal(cast_to_low_precision(x, dtype), x.to(dtype), f"cuda cast to {dtype}")


@pytest.mark.parametrize("block_size", [None, 1024, 2048, 4096])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_large_step_matches_reference(optimizer: str, block_size: int | None) -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    shapes = [[(1,)], [(4095,)], [(1000, 1001), (1000,)], *([[(3,)]] * 30), [(2048, 2047)]]
    layers = [
        [torch.nn.Parameter(torch.randn(s, device="cuda", generator=generator)) for s in layer] for layer in shapes
    ]
    store = FlatParameterStore(layers)
    n_layers = store.n_layers
    hyper: dict[str, Any]
    opt: FusedSGD | FusedAdamW
    if optimizer == "adamw":
        hyper = {"beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.05}
        opt = FusedAdamW(store, block_size=block_size, **hyper)
        states = [opt.exp_avg, opt.exp_avg_sq]
        step_state = new_step_state("cuda", 0.9, 0.99, n_layers=store.n_layers)
    else:
        hyper = {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}
        opt = FusedSGD(store, block_size=block_size, **hyper)
        states = [opt.momentum_buffer]
        step_state = new_step_state("cuda", n_layers=store.n_layers)
    reference_step = fused_adamw_step_reference if optimizer == "adamw" else fused_sgd_step_reference
    ref_states = [torch.zeros_like(store.params) for _ in states]
    ref_params = store.params.clone()
    ref_bf16, ref_fp16 = store.bf16_copy.clone(), store.fp16_copy.clone()
    factors = torch.rand(n_layers, device="cuda", generator=generator) + 0.5
    for step in range(3):
        codes = torch.tensor([(i + step) % 3 for i in range(n_layers)], dtype=torch.int32, device="cuda")
        store.grads.normal_(generator=generator).mul_(64.0)
        momentum_before = ref_states[0].clone()
        result = opt.step(0.01, factors, codes, inv_scale=1 / 64)
        ref_stats = layer_grad_stats_reference(store.grads, store.chunk_layer, n_layers, 1 / 64)
        common = (ref_bf16, ref_fp16, store.chunk_layer, factors, codes, ref_stats, step_state)
        reference_step(ref_params, store.grads, *ref_states, *common, lr=0.01, inv_scale=1 / 64, **hyper)
        assert_close(store.params, ref_params, f"{optimizer} step {step} params")
        for i, (got, want) in enumerate(zip(states, ref_states, strict=True)):
            assert_close(got, want, f"{optimizer} step {step} state {i}")
        assert_stats_close(result.stats, ref_stats, store, store.grads, 1 / 64, momentum_before, f"step {step}")
        for layer, code in enumerate(codes.tolist()):
            if code:
                buffer = store.bf16_copy if code == 1 else store.fp16_copy
                want = store.layer_segment(store.params, layer).to(buffer.dtype)
                assert_bits_equal(store.layer_segment(buffer, layer), want, f"step {step} layer {layer} copy")
        # Restart the reference from the kernel's state so errors do not compound across steps.
        ref_params.copy_(store.params)
        for got, want in zip(states, ref_states, strict=True):
            want.copy_(got)
