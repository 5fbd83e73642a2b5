"""Tests for triaccel_rl.precision: modules with children and parameters of their own, which report fp32 (CPU).

A hand-written LoRA adapter around a frozen nn.Linear, or parameters on the model's root, compute their own operations
in the region around them (the context's 16-bit type for a matmul): a warning says so, naming them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from triaccel_rl import precision as precision_module
from triaccel_rl.models import TinyTransformer
from triaccel_rl.precision import LayerPrecision
from triaccel_rl.types import Precision

_OWN_OPERATIONS = "hold trainable weight matrices of their own beside child modules"
_BESIDE_CHILDREN = "of their own beside child modules"
"""The part of the warning that earlier wordings of it had too: what a check that none is said looks for."""


class LoRA(nn.Module):
    """A frozen base Linear and a trainable low-rank delta of the module's own (``x @ A.T @ B.T``)."""

    def __init__(self, base: nn.Linear, rank: int = 2, fp32_delta: bool = False) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.B = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)
        self.fp32_delta = fp32_delta
        self.delta_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=not self.fp32_delta):  # enabled=True leaves the region around as it is
            delta = (x @ self.A.t()) @ self.B.t()
        self.delta_dtype = delta.dtype
        return self.base(x) + delta


class Delta(nn.Module):
    """The same delta in a module without children: an fp32 region of its own."""

    def __init__(self, in_features: int, out_features: int, rank: int = 2) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_features) * 0.1)
        self.B = nn.Parameter(torch.randn(out_features, rank) * 0.1)
        self.delta_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (x @ self.A.t()) @ self.B.t()
        self.delta_dtype = delta.dtype
        return delta


class ChildlessLoRA(nn.Module):
    """A frozen base Linear beside a ``Delta`` child: the wrapper owns no parameter, so it is no layer."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.delta = Delta(base.in_features, base.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.delta(x)


class Adapted(nn.Module):
    """Two adapters, a head, and a matmul weight registered on the root itself."""

    def __init__(self, fp32_delta: bool = False) -> None:
        super().__init__()
        self.l1 = LoRA(nn.Linear(8, 16), fp32_delta=fp32_delta)
        self.l2 = ChildlessLoRA(nn.Linear(16, 16))
        self.head = nn.Linear(16, 3)
        self.scale = nn.Parameter(torch.randn(16, 16) * 0.1)
        self.root_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l2(torch.relu(self.l1(x))))
        mixed = h @ self.scale
        self.root_dtype = mixed.dtype
        return self.head(h + mixed)


class Prompted(nn.Module):
    """Only the root has a parameter of its own (a learned scale between two Linear layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x) @ self.scale)


class ViTLike(nn.Module):
    """A class token and a position embedding on the root, as a ViT holds them."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        return self.head(tokens[:, 0])


class LayerScaled(nn.Module):
    """A ConvNeXt-like block's learned layer scale (1-D) beside its Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.gamma = nn.Parameter(torch.full((8,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.fc(x)


@pytest.fixture(autouse=True)
def _warnings_said_afresh() -> Iterator[None]:
    """The warning is said once a process for a model type: each test starts as a fresh process would."""
    precision_module._warn_own_operations_in_region_around.cache_clear()
    yield
    precision_module._warn_own_operations_in_region_around.cache_clear()


def _own_operations_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if _BESIDE_CHILDREN in r.getMessage()]


def test_a_lora_wrapper_and_the_root_are_named_once_where_their_own_matmuls_run_in_16_bits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    model = Adapted()
    with caplog.at_level("WARNING", logger="triaccel_rl.precision"):
        lp = LayerPrecision(model, "cpu")
        LayerPrecision(Adapted(), "cpu").remove()  # another instance of the type: said already
    assert [(layer.name, layer.controllable) for layer in lp.layers] == [
        ("<root>", False),
        ("l1", False),
        ("l2.delta", False),
        ("head", True),
    ]
    [message] = _own_operations_warnings(caplog)
    assert message.startswith(f"modules ['<root>', 'l1'] of {Adapted.__module__}.Adapted {_OWN_OPERATIONS}")
    assert "a matmul on those matrices (a hand-written LoRA adapter's x @ A.T) computes in 16 bits" in message
    # What the warning says: the map keeps fp32 for them, their own matmuls follow the bf16 region around them, and a
    # module without children (l2.delta) computes in an fp32 region of its own.
    lp.set(["bf16"])
    assert lp.precisions == [Precision.FP32, Precision.FP32, Precision.FP32, Precision.BF16]
    with lp.context():
        out = model(torch.randn(5, 8))
    assert out.dtype == torch.bfloat16
    assert (model.root_dtype, model.l1.delta_dtype, model.l2.delta.delta_dtype) == (
        torch.bfloat16,
        torch.bfloat16,
        torch.float32,
    )


def test_the_autocast_block_the_warning_suggests_computes_the_wrappers_matmul_in_fp32() -> None:
    torch.manual_seed(0)
    model = Adapted(fp32_delta=True)
    lp = LayerPrecision(model, "cpu")
    lp.set(["bf16"])
    with lp.context():
        model(torch.randn(5, 8))
    assert model.l1.delta_dtype == torch.float32


def test_a_root_with_a_parameter_of_its_own_is_named(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="triaccel_rl.precision"):
        LayerPrecision(Prompted(), "cpu")
    [message] = _own_operations_warnings(caplog)
    assert message.startswith(f"modules ['<root>'] of {Prompted.__module__}.Prompted {_OWN_OPERATIONS}")


def test_the_warning_is_said_again_for_another_model_type(caplog: pytest.LogCaptureFixture) -> None:
    class OtherPrompted(Prompted):
        pass

    with caplog.at_level("WARNING", logger="triaccel_rl.precision"):
        LayerPrecision(Prompted(), "cpu")
        LayerPrecision(Prompted(), "cpu")
        LayerPrecision(OtherPrompted(), "cpu")
    assert [message.split(" hold ")[0] for message in _own_operations_warnings(caplog)] == [
        f"modules ['<root>'] of {Prompted.__module__}.Prompted",
        f"modules ['<root>'] of {Prompted.__module__}.{OtherPrompted.__qualname__}",
    ]


@pytest.mark.parametrize(
    "build",
    [
        lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)),
        # Modules computing as the fp32 they report, and a parametrized weight's originals (a warning of their own)
        lambda: nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.LSTM(8, 8), nn.BatchNorm1d(5)),
        lambda: nn.Sequential(nn.Linear(8, 8), weight_norm(nn.Linear(8, 8))),
        lambda: nn.Sequential(ChildlessLoRA(nn.Linear(8, 8)), nn.Linear(8, 2)),
        # Parameters of their own that are added or multiplied elementwise (in fp32 under autocast), no matrix
        lambda: ViTLike(),
        lambda: nn.Sequential(LayerScaled(), nn.Linear(8, 2)),
        lambda: TinyTransformer(vocab=10, length=6, dim=16, heads=2, depth=1, n_classes=3),
    ],
    ids=[
        "mlp",
        "norms-embeddings-rnn",
        "parametrized",
        "childless-adapter",
        "vit-root",
        "layer-scale",
        "tiny-transformer",
    ],
)
def test_models_without_such_modules_are_not_warned_about(build, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="triaccel_rl.precision"):
        LayerPrecision(build(), "cpu")
    assert _own_operations_warnings(caplog) == []
