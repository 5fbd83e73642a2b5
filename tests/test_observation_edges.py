"""Edge models for the observation: groups of zero-size layers only, and models whose matmul layers are all frozen."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_observation import make_signals
from torch import nn

from triaccel_rl.config import ControllerConfig
from triaccel_rl.controller import Controller
from triaccel_rl.observation import LayerGrouper, ObservationLayout, build_observation
from triaccel_rl.precision import LayerPrecision
from triaccel_rl.types import Precision, Signals

# ---------------------------------------------------------------- a group of zero-size layers only


def layer_signals(curvature: list[float], variance: list[float], snr: list[float], n_params: list[int]) -> Signals:
    """Signals of these layers, the first in bf16 and the others in fp32."""
    n = len(n_params)
    return make_signals(
        [0.0] * n,
        precisions=[Precision.BF16] + [Precision.FP32] * (n - 1),
        n_params=n_params,
        curvature=np.array(curvature),
        grad_variance=np.array(variance),
        snr=np.array(snr),
    )


def three_layer_signals(n_params: list[int]) -> Signals:
    """Layer 0 is zero-size (``nn.Linear(8, 0)``): its statistics read 0, no measurement; layers 1 and 2 are measured.

    Sensitivities ``log10(curvature * variance)``: layer 1 ``log10(10 * 4)``, layer 2 ``log10(1000 * 0.25)``; their
    median, which layer 0 holds, is ``log10(100) = 2``.
    """
    return layer_signals([0.0, 10.0, 1000.0], [0.0, 4.0, 0.25], [0.0, 0.1, 10.0], n_params)


def group_features(obs: np.ndarray, layout: ObservationLayout, group: int) -> dict[str, float]:
    names = ("rel_sensitivity", "log_curvature", "log_variance", "log_snr", "param_share", "is_fp32", "is_bf16")
    return {name: float(obs[layout.group(group, name)]) for name in names}


def test_a_group_of_zero_size_layers_only_reads_the_median_measured_layer() -> None:
    """Weighted by their 0 parameter elements, such a group read the floors (-6) and ``0 - median`` (-2 here)."""
    signals = three_layer_signals([0, 36, 36])
    grouper = LayerGrouper(np.ones(3, dtype=bool), n_groups=3, param_counts=[0, 36, 36])
    assert grouper.update(signals).tolist() == [1, 2, 0]  # the zero-size layer's median score: the middle group
    layout = ObservationLayout(3)
    obs = build_observation(signals, grouper, base_batch_size=64, layout=layout)
    # The unweighted mean of its one member, which holds the measured layers' medians: curvature (10 + 1000) / 2,
    # variance (4 + 0.25) / 2, SNR (0.1 + 10) / 2, its score the median score itself; its own precision, bf16.
    assert group_features(obs, layout, 1) == {
        "rel_sensitivity": 0.0,
        "log_curvature": float(np.float32(math.log10(505.0) / 5)),
        "log_variance": float(np.float32(math.log10(2.125) / 5)),
        "log_snr": float(np.float32(math.log10(5.05))),
        "param_share": 0.0,
        "is_fp32": 0.0,
        "is_bf16": 1.0,
    }
    # The measured layers' groups as before: each its own layer's values.
    assert group_features(obs, layout, 0)["log_curvature"] == float(np.float32(3 / 5))
    assert group_features(obs, layout, 2)["log_variance"] == float(np.float32(math.log10(4.0) / 5))


def test_a_zero_size_layer_tied_into_group_0_reads_as_the_measured_layer() -> None:
    """The review's case: its median score ties the one measured layer's, and the tie goes to the earlier layer."""
    signals = layer_signals([0.0, 10.0], [0.0, 4.0], [0.0, 0.1], [0, 36])
    grouper = LayerGrouper(np.ones(2, dtype=bool), n_groups=2, param_counts=[0, 36])
    assert grouper.update(signals).tolist() == [0, 1]
    layout = ObservationLayout(2)
    obs = build_observation(signals, grouper, base_batch_size=64, layout=layout)
    zero, measured = group_features(obs, layout, 0), group_features(obs, layout, 1)
    assert zero["rel_sensitivity"] == measured["rel_sensitivity"] == 0.0
    assert zero["log_curvature"] == measured["log_curvature"] == float(np.float32(1 / 5))
    assert zero["log_variance"] == measured["log_variance"] == float(np.float32(math.log10(4.0) / 5))
    assert zero["log_snr"] == measured["log_snr"] == float(np.float32(-1.0))
    assert (zero["param_share"], measured["param_share"]) == (0.0, 1.0)


def test_a_group_with_parameter_elements_keeps_the_parameter_weighted_mean() -> None:
    """One group of all three layers: the zero-size one weighs 0, the others 100 and 300 (as the policy trained on)."""
    signals = three_layer_signals([0, 100, 300])
    grouper = LayerGrouper(np.ones(3, dtype=bool), n_groups=1, param_counts=[0, 100, 300])
    grouper.update(signals)
    layout = ObservationLayout(1)
    obs = build_observation(signals, grouper, base_batch_size=64, layout=layout)
    features = group_features(obs, layout, 0)
    assert features["log_curvature"] == float(np.float32(math.log10((100 * 10.0 + 300 * 1000.0) / 400) / 5))
    assert features["log_variance"] == float(np.float32(math.log10((100 * 4.0 + 300 * 0.25) / 400) / 5))
    assert features["log_snr"] == float(np.float32(math.log10((100 * 0.1 + 300 * 10.0) / 400)))
    assert (features["is_fp32"], features["is_bf16"]) == (1.0, 0.0)  # the bf16 layer weighs 0


def test_a_controller_with_a_zero_size_layer_reads_no_floor_values() -> None:
    """End to end: ``nn.Linear(8, 0, bias=False)`` took group 0, whose log features read -6 for the shipped policy."""

    class WithEmptyHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.empty = nn.Linear(8, 0, bias=False)
            self.head = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x) + self.empty(x).sum()

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="zero-element tensors"):
        model = WithEmptyHead()
    ctl = Controller(model, torch.optim.SGD(model.parameters(), lr=0.01), policy="bf16",
                     config=ControllerConfig(interval_steps=4))  # fmt: skip
    seen: list[np.ndarray] = []
    predict = ctl.policy.predict
    ctl.policy.predict = lambda obs, *args, **kwargs: (seen.append(obs.copy()), predict(obs, *args, **kwargs))[1]
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    for xb, yb in ctl.loader((x, y), batch_size=8, epochs=1):
        with ctl.autocast():
            loss = nn.functional.cross_entropy(model(xb), yb)
        ctl.step(loss)
    ctl.close()
    assert ctl.grouper.assignment.tolist() == [0, 1] and seen
    layout = ObservationLayout(ctl.config.n_groups)
    for obs in seen:
        empty, head = group_features(obs, layout, 0), group_features(obs, layout, 1)
        assert empty["param_share"] == 0.0 and head["param_share"] == 1.0
        for name in ("rel_sensitivity", "log_curvature", "log_variance", "log_snr"):
            assert empty[name] == head[name], (name, empty, head)


# ---------------------------------------------------------------- every matmul layer frozen


def test_a_norm_only_fine_tune_is_told_its_layers_are_frozen() -> None:
    """It was told its matmuls ran outside nn.Linear (an nn.Embedding, x @ w) and to move them into one."""
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    for layer in (model[0], model[2]):
        layer.requires_grad_(False)
    optimizer = torch.optim.AdamW(model[1].parameters(), lr=1e-3)
    message = (
        "the layers ['0', '2'] (nn.Linear) are frozen: the controller sets the precision of trainable nn.Linear, Conv "
        "and MultiheadAttention layers only; leave one trainable or train without the controller"
    )
    with pytest.raises(ValueError) as refused:
        Controller(model, optimizer, policy="bf16")
    assert str(refused.value) == message
    model(torch.randn(4, 8)).sum().backward()  # nothing of the controller left on the model or the optimizer
    optimizer.step()


def test_many_frozen_layers_of_several_types_are_named_a_few() -> None:
    """An attention's out_proj (an nn.Linear inside it) is part of the attention layer, not a layer of its own."""

    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3)
            self.attention = nn.MultiheadAttention(4, 2)
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
            self.norm = nn.LayerNorm(4)

    model = Frozen()
    for module in (model.stem, model.attention, model.blocks):
        module.requires_grad_(False)
    with pytest.raises(ValueError) as refused:
        LayerPrecision(model, device_type="cpu")
    assert str(refused.value).startswith(
        "the layers ['stem', 'attention', 'blocks.0', ...] (nn.Conv2d, nn.MultiheadAttention, nn.Linear) are frozen: "
    )


def test_one_frozen_layer_is_named_alone_and_a_trainable_one_is_not_refused() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 2))
    model[1].requires_grad_(False)
    with pytest.raises(ValueError) as refused:
        LayerPrecision(model, device_type="cpu")
    assert str(refused.value).startswith("the layer ['1'] (nn.Linear) is frozen: ")
    model[1].bias.requires_grad_(True)  # one trainable parameter makes it a layer the controller sets
    LayerPrecision(model, device_type="cpu").remove()


def test_a_model_without_such_layers_keeps_the_advice_to_compute_through_linear() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match=r"its matmuls run elsewhere .*compute them through nn.Linear"):
        Controller(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="bf16")


class HandWrittenLoRA(nn.Module):
    """A frozen nn.Linear and ``adapters`` trainable low-rank updates ``x @ A @ B`` on bare parameters, then a norm."""

    def __init__(self, adapters: int = 1) -> None:
        super().__init__()
        self.base = nn.Linear(8, 4)
        self.base.requires_grad_(False)
        self.lora = nn.ParameterList()
        for _ in range(adapters):
            self.lora.append(nn.Parameter(torch.zeros(8, 2)))
            self.lora.append(nn.Parameter(torch.zeros(2, 4)))
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for a, b in zip(self.lora[::2], self.lora[1::2], strict=True):
            out = out + x @ a @ b
        return self.norm(out)


def test_a_hand_written_lora_is_told_to_compute_its_matmuls_through_linear() -> None:
    """Its trainable matmul weights are named (the norm's are not): leaving a frozen layer trainable is not the fix."""
    model = HandWrittenLoRA()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    message = (
        "the layer ['base'] (nn.Linear) is frozen: the controller sets the precision of trainable nn.Linear, Conv and "
        "MultiheadAttention layers only; leave one trainable or train without the controller. The trainable "
        "parameters ['lora.0', 'lora.1'] are outside such layers: if your forward multiplies by them (x @ A, a LoRA "
        "adapter written by hand), compute those matmuls through nn.Linear layers holding them, whose precision the "
        "controller sets"
    )
    with pytest.raises(ValueError) as refused:
        Controller(model, optimizer, policy="bf16")
    assert str(refused.value) == message
    with pytest.raises(ValueError) as refused:
        LayerPrecision(HandWrittenLoRA(adapters=2), device_type="cpu")
    assert "The trainable parameters ['lora.0', 'lora.1', 'lora.2', ...] are outside such layers: " in str(
        refused.value
    )
