"""Tests for triaccel_rl.models against the published architectures, and for the cost model's and profiler's counts.

Every expected number here is derived from the papers (He et al. 2016; Tan & Le 2019, Table 1) or by hand in the
comments, never read off the code's output.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import random

import pytest
import torch
from torch import nn

from triaccel_rl import profiling
from triaccel_rl.costs import CostModel, saved_bytes_per_sample
from triaccel_rl.models import MLP, DepthwiseCNN, SmallResNet, TinyTransformer, efficientnet_b0, resnet18
from triaccel_rl.precision import find_layers
from triaccel_rl.tasks import TASKS
from triaccel_rl.types import Precision


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def output_shapes(model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Shapes of the named modules' outputs in one eval-mode forward of ``x``."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [
        module.register_forward_hook(lambda _m, _a, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
        for name, module in modules.items()
    ]
    model.eval()
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return shapes


# ---------------------------------------------------------------- ResNet-18 (CIFAR-style)

# Parameters per stage, 3 input channels, 10 classes. Conv weights are in·out·k·k (no bias), BN 2 per channel.
#   stem: 3·64·9 + 2·64                                                    =      1,856
#   stage 1, 64→64, 2 blocks with identity shortcuts: 2·(2·64·64·9 + 2·2·64)  =    147,968
#   stage 2, 64→128: block 1 = 64·128·9 + 128·128·9 + 64·128 (1×1 shortcut) + 3·2·128 = 230,144;
#                    block 2 = 2·128·128·9 + 2·2·128 = 295,424               =    525,568
#   stage 3, 128→256: 294,912 + 589,824 + 32,768 + 1,536 = 919,040; 1,179,648 + 1,024 = 1,180,672
#                                                                           =  2,099,712
#   stage 4, 256→512: 1,179,648 + 2,359,296 + 131,072 + 3,072 = 3,673,088; 4,718,592 + 2,048 = 4,720,640
#                                                                           =  8,393,728
#   head: 512·10 + 10                                                       =      5,130
#   total                                                                   = 11,173,962 (the published count)
_RESNET18_STAGE_PARAMS = (147_968, 525_568, 2_099_712, 8_393_728)


def test_resnet18_parameters_stage_by_stage() -> None:
    model = resnet18(in_channels=3, n_classes=10)
    assert n_params(model.stem) + n_params(model.bn) == 1_856
    stages = [model.blocks[2 * i : 2 * i + 2] for i in range(4)]  # two basic blocks a stage
    assert [n_params(stage) for stage in stages] == list(_RESNET18_STAGE_PARAMS)
    assert n_params(model.head) == 5_130
    assert n_params(model) == 11_173_962
    # One input channel (the benchmark's stem): the stem loses 2·64·9 weights; 1000 classes add 990·513.
    assert n_params(resnet18(in_channels=1, n_classes=10)) == 11_173_962 - 2 * 64 * 9
    assert n_params(resnet18(in_channels=3, n_classes=1000)) == 11_173_962 + 990 * 513


def test_resnet18_layer_list_and_stage_shapes() -> None:
    """Every conv's (in, out, kernel, stride, padding) as the paper's CIFAR form has them, and each stage's output:
    a 32×32 input stays 32×32 through the stride-1 stem and stage 1, then halves per stage: 16, 8, 4."""
    model = resnet18()
    convs = [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0])
             for m in model.modules() if isinstance(m, nn.Conv2d)]  # fmt: skip
    expected = [(3, 64, 3, 1, 1)]  # 3×3 stride-1 stem, no max-pool
    widths = (64, 128, 256, 512)
    previous = 64
    for stage, width in enumerate(widths):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            expected += [(previous, width, 3, stride, 1), (width, width, 3, 1, 1)]
            if stride != 1 or previous != width:
                expected.append((previous, width, 1, stride, 0))  # projection shortcut
            previous = width
    assert convs == expected
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert all((m.eps, m.momentum) == (1e-5, 0.1) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    ends = {"stem": model.bn} | {f"stage{i + 1}": model.blocks[2 * i + 1] for i in range(4)}
    shapes = output_shapes(model, ends, torch.zeros(2, 3, 32, 32))
    assert shapes == {
        "stem": (2, 64, 32, 32),
        "stage1": (2, 64, 32, 32),
        "stage2": (2, 128, 16, 16),
        "stage3": (2, 256, 8, 8),
        "stage4": (2, 512, 4, 4),
    }
    # Fashion-MNIST's 28×28: a 3×3 stride-2 conv with padding 1 gives ceil(n / 2): 28, 14, 7, 4.
    model = resnet18(in_channels=1)
    ends = {f"stage{i + 1}": model.blocks[2 * i + 1] for i in range(4)}
    shapes = output_shapes(model, ends, torch.zeros(1, 1, 28, 28))
    assert [s[2:] for s in shapes.values()] == [(28, 28), (14, 14), (7, 7), (4, 4)]


# ---------------------------------------------------------------- EfficientNet-B0

# Tan & Le (2019), Table 1: (expansion, output channels, repeats, first stride, kernel) of stages 2-8 (MBConv).
_B0_STAGES = ((1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3), (6, 112, 3, 1, 5),
              (6, 192, 4, 2, 5), (6, 320, 1, 1, 3))  # fmt: skip

# Parameters per stage. An MBConv block from c_in to c_out, expansion e, kernel k, has hidden h = e·c_in channels and
# a squeeze-excitation width r = max(1, c_in // 4) (torchvision's: a quarter of the block's input channels):
#   expand 1×1 (only if e > 1): c_in·h + 2h (BN);  depthwise k×k: k²·h + 2h;  SE: h·r + r + r·h + h (biased 1×1s);
#   project 1×1: h·c_out + 2·c_out.
# E.g. stage 1's block (32→16, e=1, k=3; h=32, r=8): 9·32 + 64 + (256 + 8 + 256 + 32) + 32·16 + 32 = 1,448.
#   stage 2 (16→24, e=6, k=3): block 1 h=96, r=4: 1,536+192 + 864+192 + 384+4+384+96 + 2,304+48 = 6,004;
#           block 2 (24→24) h=144, r=6: 3,456+288 + 1,296+288 + 864+6+864+144 + 3,456+48 = 10,710 → 16,714
# and so on for the rest (same formula):
_B0_STAGE_PARAMS = (1_448, 16_714, 46_640, 242_930, 543_148, 2_026_348, 717_232)
# Stem 3·32·9 + 2·32 = 928; head conv 320·1280 + 2·1280 = 412,160; classifier 1280·1000 + 1000 = 1,281,000.
# Total: 928 + 3,594,460 (the stages' sum) + 412,160 + 1,281,000 = 5,288,548: torchvision's published count.


def _b0_block_params(c_in: int, c_out: int, expansion: int, kernel: int) -> int:
    hidden, squeeze = c_in * expansion, max(1, c_in // 4)
    expand = c_in * hidden + 2 * hidden if expansion != 1 else 0
    return (
        expand
        + kernel * kernel * hidden
        + 2 * hidden
        + 2 * hidden * squeeze
        + squeeze
        + hidden
        + hidden * c_out
        + 2 * c_out
    )


def test_efficientnet_b0_parameters_stage_by_stage() -> None:
    previous, by_formula = 32, []
    for expansion, channels, repeats, _, kernel in _B0_STAGES:
        by_formula.append(sum(_b0_block_params(previous if i == 0 else channels, channels, expansion, kernel)
                              for i in range(repeats)))  # fmt: skip
        previous = channels
    assert tuple(by_formula) == _B0_STAGE_PARAMS
    assert sum(_B0_STAGE_PARAMS) == 3_594_460

    model = efficientnet_b0(in_channels=3, n_classes=1000)
    features = model.features
    assert n_params(features[:3]) == 928
    block_counts = [repeats for _, _, repeats, _, _ in _B0_STAGES]
    starts = [3 + sum(block_counts[:i]) for i in range(len(block_counts))]
    assert [n_params(features[s : s + n]) for s, n in zip(starts, block_counts, strict=True)] == list(_B0_STAGE_PARAMS)
    assert n_params(features[19:]) == 412_160
    assert n_params(model.head) == 1_281_000
    assert n_params(model) == 5_288_548
    # 10 classes: the classifier is 1280·10 + 10 = 12,810 instead of 1,281,000.
    assert n_params(efficientnet_b0(in_channels=3, n_classes=10)) == 5_288_548 - 1_281_000 + 12_810


def test_efficientnet_b0_blocks_follow_table_1() -> None:
    """Each MBConv block's expansion, depthwise kernel and stride, squeeze width, residual, and SiLU everywhere."""
    model = efficientnet_b0()
    blocks = [m for m in model.features if type(m).__name__ == "_MBConv"]
    expected = []
    previous = 32
    for expansion, channels, repeats, stride, kernel in _B0_STAGES:
        for i in range(repeats):
            c_in = previous if i == 0 else channels
            s = stride if i == 0 else 1
            expected.append(
                (c_in, channels, c_in * expansion, kernel, s, max(1, c_in // 4), s == 1 and c_in == channels)
            )
        previous = channels
    found = []
    for block in blocks:
        convs = [m for m in block.block if isinstance(m, nn.Conv2d)]
        depthwise = next(m for m in convs if m.groups > 1)
        assert depthwise.groups == depthwise.in_channels == depthwise.out_channels  # depthwise, not grouped
        assert depthwise.padding[0] == depthwise.kernel_size[0] // 2
        squeeze = next(m for m in block.block if type(m).__name__ == "_SqueezeExcite")
        found.append((convs[0].in_channels, convs[-1].out_channels, depthwise.in_channels, depthwise.kernel_size[0],
                      depthwise.stride[0], squeeze.reduce.out_channels, block.residual))  # fmt: skip
    assert found == expected
    assert len(blocks) == 16
    activations = {type(m) for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU))}
    assert activations == {nn.SiLU}
    assert all((m.eps, m.momentum) == (1e-5, 0.1) for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_efficientnet_b0_stage_shapes_at_224() -> None:
    """Table 1's resolutions: 224 → stem 112; stages 112, 56, 28, 14, 14, 7, 7; the 1×1 head conv 7×7×1280."""
    model = efficientnet_b0(in_channels=3, n_classes=1000)
    counts = [repeats for _, _, repeats, _, _ in _B0_STAGES]
    ends = {"stem": model.features[2]}
    ends |= {f"stage{i + 1}": model.features[2 + sum(counts[: i + 1])] for i in range(len(counts))}
    ends["head_conv"] = model.features[21]
    shapes = output_shapes(model, ends, torch.zeros(1, 3, 224, 224))
    assert shapes == {
        "stem": (1, 32, 112, 112),
        "stage1": (1, 16, 112, 112),
        "stage2": (1, 24, 56, 56),
        "stage3": (1, 40, 28, 28),
        "stage4": (1, 80, 14, 14),
        "stage5": (1, 112, 14, 14),
        "stage6": (1, 192, 7, 7),
        "stage7": (1, 320, 7, 7),
        "head_conv": (1, 1280, 7, 7),
    }


def test_efficientnet_b0_dropout_and_stochastic_depth_are_opt_in() -> None:
    """Off by default (the benchmark's model: a training forward draws nothing); asked for, block b of 16 drops
    with probability p·b/16 (torchvision's schedule), per sample, scaled by 1/(1-p); eval mode is deterministic."""
    x = torch.randn(2, 1, 8, 8)  # tiny: four whole-model forwards
    torch.manual_seed(0)
    plain = efficientnet_b0(in_channels=1)
    assert [b.drop_prob for b in plain.features if type(b).__name__ == "_MBConv"] == [0.0] * 16
    plain.train()
    state = torch.random.get_rng_state()
    plain(x)
    assert torch.equal(torch.random.get_rng_state(), state)  # no random draw

    torch.manual_seed(0)
    noisy = efficientnet_b0(in_channels=1, dropout=0.5, stochastic_depth_prob=0.2)
    assert [b.drop_prob for b in noisy.features if type(b).__name__ == "_MBConv"] == [0.2 * b / 16 for b in range(16)]
    noisy.load_state_dict(plain.state_dict())  # the same weights: the options add no parameters
    noisy.eval()
    plain.eval()
    torch.testing.assert_close(noisy(x), plain(x), rtol=0, atol=0)
    noisy.train()
    torch.manual_seed(1)
    first = noisy(x)
    torch.manual_seed(2)
    assert not torch.equal(noisy(x), first)

    # Only the blocks with an identity shortcut drop (as the docstring says): stages 2-6's repeats, 9 of 16.
    blocks = [b for b in noisy.features if type(b).__name__ == "_MBConv"]
    assert [i for i, b in enumerate(blocks) if b.residual] == [2, 4, 6, 7, 9, 10, 12, 13, 14]
    last = blocks[15]  # 192 → 320 channels: no shortcut, so its 0.1875 never drops it
    assert not last.residual and last.drop_prob == 0.2 * 15 / 16
    y = torch.randn(4, 192, 2, 2)
    state = torch.random.get_rng_state()
    torch.testing.assert_close(last(y), last.block(y), rtol=0, atol=0)
    assert torch.equal(torch.random.get_rng_state(), state)

    block = noisy.features[5]  # stage 2's second block: residual, 24 → 24
    assert block.residual
    block.drop_prob = 0.5
    y = torch.randn(64, 24, 4, 4)
    torch.manual_seed(3)
    out = block(y)
    branch = block.block(y)  # training-mode batch norm: the same batch statistics as inside the call
    kept = torch.isclose(out, 2 * branch + y, atol=1e-5).flatten(1).all(1)
    assert torch.equal(out[~kept], y[~kept])  # each sample kept whole (its branch scaled ×2) or dropped whole
    assert 0 < int(kept.sum()) < 64


# ---------------------------------------------------------------- the small models


def test_mlp_layers_and_parameters() -> None:
    model = MLP(784, (256, 128), 10)
    linears = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [(784, 256), (256, 128), (128, 10)]
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 2  # after each hidden layer, not the head
    assert n_params(model) == 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10  # 235,146
    assert MLP(4, (), 3)(torch.zeros(5, 2, 2)).shape == (5, 3)  # hidden=(): a linear classifier on flattened inputs
    assert n_params(MLP(4, (), 3)) == 15


def test_small_resnet_and_depthwise_cnn_strides_and_parameters() -> None:
    # cnn-fmnist's SmallResNet(1, (16, 32, 64), stem_stride=2) on 28×28: stem 14; stage 1 14; stages 2, 3 halve: 7, 4.
    model = SmallResNet(1, (16, 32, 64), 10, stem_stride=2)
    shapes = output_shapes(model, {f"s{i}": model.blocks[i] for i in range(3)}, torch.zeros(1, 1, 28, 28))
    assert list(shapes.values()) == [(1, 16, 14, 14), (1, 32, 7, 7), (1, 64, 4, 4)]
    # DepthwiseCNN(1, (16, 32, 64)): stem 1·16·9 + 32 = 176; block 16→32: 16·9 + 32 + 16·32 + 64 = 752;
    # block 32→64: 32·9 + 64 + 32·64 + 128 = 2,528; head 64·10 + 10 = 650; total 4,106.
    model = DepthwiseCNN(1, (16, 32, 64), 10)
    assert n_params(model) == 4_106
    depthwise = [m for m in model.features if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert [(m.groups, m.in_channels, m.kernel_size, m.stride) for m in depthwise] == [
        (16, 16, (3, 3), (2, 2)),
        (32, 32, (3, 3), (2, 2)),
    ]
    assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 5  # stem + two per block
    # Stem stride 2 then a stride-2 depthwise conv where the width grows: 28 → 14 → 7 → 4; equal widths keep 4.
    assert output_shapes(model, {"f": model.features}, torch.zeros(1, 1, 28, 28))["f"] == (1, 64, 4, 4)
    model = DepthwiseCNN(1, (16, 16), 10)
    assert output_shapes(model, {"f": model.features}, torch.zeros(1, 1, 28, 28))["f"] == (1, 16, 14, 14)


def test_tiny_transformer_structure_and_parameters() -> None:
    """transformer-seq's model, counted by hand: embeddings 16·64 + positions 16·64; per layer attention
    3·64·64 + 3·64 (in) + 64·64 + 64 (out) = 16,640, feed-forward 64·128 + 128 + 128·64 + 64 = 16,576, two
    LayerNorms 256: 33,472, twice; final LayerNorm 128; head 64·4 + 4 = 260. Total 69,380."""
    model = TinyTransformer(vocab=16, length=16, dim=64, heads=4, depth=2, n_classes=4)
    assert n_params(model) == 1_024 + 1_024 + 2 * 33_472 + 128 + 260
    layers = list(model.encoder.layers)
    assert len(layers) == 2
    for layer in layers:
        assert layer.norm_first  # pre-norm
        assert layer.self_attn.num_heads == 4 and layer.self_attn.batch_first
        assert (layer.linear1.in_features, layer.linear1.out_features) == (64, 128)
        assert layer.activation is nn.functional.gelu
        assert layer.dropout.p == 0.0
    tokens = torch.randint(0, 16, (3, 16))
    model.eval()
    torch.testing.assert_close(model(tokens), model(tokens.float()), rtol=0, atol=0)  # float token ids, as stored
    with pytest.raises(ValueError, match=r"expects tokens \[batch, 16\], got shape \(3, 15\)"):
        model(tokens[:, :15])
    with pytest.raises(ValueError, match=r"got shape \(16,\)"):
        model(tokens[0])


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: MLP(0, (8,), 10), r"MLP: in_features=0 must be a positive integer"),
        (lambda: MLP(4, (8, 0), 10), r"MLP: hidden width=0"),
        (lambda: MLP(4, 8, 10), r"MLP: hidden=8 must be a tuple"),
        (lambda: MLP(4, (8,), True), r"MLP: n_classes=True"),
        (lambda: SmallResNet(1, (), 10), r"SmallResNet: widths=\(\) must hold at least one width"),
        (lambda: SmallResNet(1, (8, 16), 10, blocks_per_stage=0), r"blocks_per_stage=0 must be a positive integer"),
        (lambda: SmallResNet(1, (8,), 10, stem_stride=1.5), r"stem_stride=1.5"),
        (lambda: DepthwiseCNN(1, (), 10), r"DepthwiseCNN: widths=\(\)"),
        (lambda: DepthwiseCNN(1, (8, -4), 10), r"DepthwiseCNN: width=-4"),
        (lambda: TinyTransformer(16, 16, 30, 4, 2, 4), r"dim=30 must be a multiple of heads=4"),
        (lambda: TinyTransformer(16, 0, 32, 4, 2, 4), r"TinyTransformer: length=0"),
        (lambda: TinyTransformer(16, 16, 32, 4, 0, 4), r"TinyTransformer: depth=0"),
        (lambda: resnet18(in_channels=0), r"SmallResNet: in_channels=0"),
        (lambda: efficientnet_b0(n_classes=0), r"efficientnet_b0: n_classes=0"),
        (lambda: efficientnet_b0(stem_stride=0), r"efficientnet_b0: stem_stride=0"),
        (lambda: efficientnet_b0(dropout=1.0), r"dropout=1.0 must be a probability in \[0, 1\)"),
        (lambda: efficientnet_b0(stochastic_depth_prob=-0.1), r"stochastic_depth_prob=-0.1"),
    ],
)
def test_models_refuse_bad_arguments_by_name(build, match) -> None:
    """Before, most of these built silently (MLP(4, (8, 0), 10), SmallResNet(blocks_per_stage=0), which dropped
    every stage but the stem's width) or failed deep inside torch (IndexError on empty widths, an assert on dim)."""
    with pytest.raises(ValueError, match=match):
        build()


# ---------------------------------------------------------------- cost model: FLOPs and bytes by hand


def _costs(model: nn.Module, sample: torch.Tensor) -> CostModel:
    return CostModel.measure(model, [info for _, _, info in find_layers(model)], sample, optimizer_states=1)


@pytest.mark.parametrize(
    ("layer", "shape", "flops", "out_numel"),
    [
        # Linear(6, 4) on 3 tokens: 3·4 outputs, 6 multiply-adds each: 2·6·12.
        (nn.Linear(6, 4), (1, 3, 6), 2 * 6 * 12, 12),
        # Conv2d(3, 8, 3, padding 1) on 5×5: 8·5·5 = 200 outputs, 3·9 = 27 multiply-adds each.
        (nn.Conv2d(3, 8, 3, padding=1), (1, 3, 5, 5), 2 * 27 * 200, 200),
        # Grouped Conv2d(4, 6, 3, groups=2) on 6×6: 6·4·4 = 96 outputs, (4/2)·9 = 18 multiply-adds each.
        (nn.Conv2d(4, 6, 3, groups=2), (1, 4, 6, 6), 2 * 18 * 96, 96),
        # Depthwise Conv2d(4, 4, 3, stride 2, padding 1, groups=4) on 7×7: 4·4·4 = 64 outputs, 9 each.
        (nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4), (1, 4, 7, 7), 2 * 9 * 64, 64),
        # Conv1d(3, 5, 3) on 10 positions: 5·8 = 40 outputs, 3·3 = 9 each.
        (nn.Conv1d(3, 5, 3), (1, 3, 10), 2 * 9 * 40, 40),
        # ConvTranspose2d(4, 6, 2, stride 2) on 3×3: each of the 4·9 = 36 inputs scatters into 6·2·2 = 24 outputs;
        # 6·6·6 = 216 outputs. (Counted from the output, as a conv, it came to 2·(4·4)·216 = 6,912: 4× too many.)
        (nn.ConvTranspose2d(4, 6, 2, stride=2), (1, 4, 3, 3), 2 * 36 * 24, 216),
        # Grouped ConvTranspose1d(4, 6, 3, groups=2) on 5 positions: 20 inputs, each into (6/2)·3 = 9; 6·7 outputs.
        (nn.ConvTranspose1d(4, 6, 3, groups=2), (1, 4, 5), 2 * 20 * 9, 42),
    ],
    ids=["linear", "conv", "grouped-conv", "depthwise-conv", "conv1d", "conv-transpose", "grouped-conv-transpose"],
)
def test_cost_model_flops_and_bytes_by_hand(
    layer: nn.Module, shape: tuple[int, ...], flops: int, out_numel: int
) -> None:
    costs = _costs(nn.Sequential(layer), torch.zeros(shape))
    assert costs.flops_per_sample.tolist() == [flops]
    # What a step holds after the forward: the fp32 input, saved for the weight's gradient, and the output (the loss's).
    assert costs.activation_bytes_per_sample.tolist() == [4 * (math.prod(shape) + out_numel)]
    assert costs.static_bytes == n_params(layer) * 4 * 3  # weights, gradients, one momentum


def _graph_saved_bytes(model: nn.Module, batch: torch.Tensor, training: bool = False) -> int:
    """Bytes of the tensors the autograd graph of ``model(batch)`` (eval mode, or training mode if ``training``) holds,
    read off its nodes' ``_saved_*`` attributes (not through ``saved_tensors_hooks``, as the cost model counts them),
    and of the output: each storage once, parameters and buffers left out."""
    static = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    model.train(training)
    output = model(batch)
    storages = {output.untyped_storage().data_ptr(): output.untyped_storage().nbytes()}  # the logits, for the loss
    seen: set[object] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            value = getattr(node, name)
            for tensor in value if isinstance(value, tuple | list) else [value]:
                if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in static:
                    storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        stack.extend(function for function, _ in node.next_functions)
    return sum(storages.values())


def _graph_saved_bytes_per_sample(model: nn.Module, sample: torch.Tensor, training: bool = False) -> float:
    """What one more sample adds to :func:`_graph_saved_bytes` (half the difference between 4 and 2 copies)."""
    four, two = (_graph_saved_bytes(model, torch.cat([sample] * n), training) for n in (4, 2))
    return (four - two) / 2


def test_activation_bytes_count_what_operations_without_parameters_save() -> None:
    """Linear(4, 8), SiLU, Linear(8, 2): the first linear saves its input (4 floats), SiLU its input (the first
    linear's output, 8), the second linear its input (SiLU's output, 8), and the output (2) is held for the loss; the
    SiLU's and what follows it until the next layer count in the layer before. Counting each layer's output gave 8 + 2
    floats, under half of the 22 held."""
    model = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 2))
    costs = _costs(model, torch.zeros(1, 4))
    assert costs.activation_bytes_per_sample.tolist() == [4 * (4 + 8), 4 * (8 + 2)]


def test_what_a_batch_norm_saves_counts_in_the_layer_before_it() -> None:
    """Conv2d(1, 2, 3) on 6x6 (2 x 4 x 4 = 32 outputs), BatchNorm2d, ReLU, Linear(32, 3). The conv saves its input
    (36 floats); the batch norm its input (the conv's 32 outputs) and the ReLU its output (32): all three in the conv's
    precision, since batch norm computes on its input's 16 bits (precision.py) though it reports fp32. Counted in the
    batch norm, a bf16 map (conv and linear bf16, the norm fp32) was charged 0.82x fp32's activations, not 0.5x. The
    Linear's input is the ReLU's output, flattened: one storage, counted once; its output (3) counts in it."""
    from triaccel_rl.config import HardwareProfile
    from triaccel_rl.types import Precision

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
    costs = _costs(model, torch.zeros(1, 1, 6, 6))
    assert costs.activation_bytes_per_sample.tolist() == [4 * (36 + 32 + 32), 0, 4 * 3]
    profile = HardwareProfile.load()
    bf16_map = [Precision.BF16, Precision.FP32, Precision.BF16]
    assert costs.per_sample_bytes(bf16_map, profile) == 4 * 103 * profile.memory(Precision.BF16)


class _NormRegisteredFirst(nn.Module):
    """The model of the test above, its batch norm registered before the conv that feeds it."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(2)
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class _NormOnTheInput(nn.Module):
    """BatchNorm1d(4) on the model's input, then Linear(4, 3); the linear registered first."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


def test_a_batch_norm_is_passed_over_in_the_order_the_layers_run_not_the_order_they_were_registered() -> None:
    """Found in review: registered before its conv, the batch norm of the test above was charged 256 of the conv's
    400 bytes (the order of ``find_layers``, registration order, decided which norm was passed over). Here the conv
    still saves its input (36 floats), the norm its input (32) and the ReLU its output (32), all in the conv; the
    linear its output (3). A norm that runs first, on the model's fp32 input, computes in fp32: it keeps its input (4
    floats), wherever it is registered; the linear after it saves its input (the norm's output, 4) and its output
    (3)."""
    model = _NormRegisteredFirst()
    sample = torch.zeros(1, 1, 6, 6)
    assert [info.name for _, _, info in find_layers(model)] == ["bn", "conv", "fc"]
    costs = _costs(model, sample)
    assert costs.activation_bytes_per_sample.tolist() == [0, 4 * (36 + 32 + 32), 4 * 3]
    assert costs.activation_bytes_per_sample.sum() == _graph_saved_bytes_per_sample(model, sample)
    model = _NormOnTheInput()
    assert [info.name for _, _, info in find_layers(model)] == ["fc", "bn"]
    costs = _costs(model, torch.zeros(1, 4))
    assert costs.activation_bytes_per_sample.tolist() == [4 * (4 + 3), 4 * 4]
    assert costs.activation_bytes_per_sample.sum() == _graph_saved_bytes_per_sample(model, torch.zeros(1, 4))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_activation_bytes_equal_the_autograd_graphs_saved_tensors_on_every_task(name: str) -> None:
    """On EfficientNet-B0 the outputs came to 0.61x what the graph keeps (3.71 against 6.06 MB a sample), on the
    Transformer tasks 0.53-0.55x, on the depthwise CNNs 0.67-0.68x."""
    torch.manual_seed(0)
    task = TASKS[name]
    model = task.build_model()
    sample = task.load_data(8, 8, 0).train_x[:1]
    costs = _costs(model, sample)
    assert costs.activation_bytes_per_sample.sum() == _graph_saved_bytes_per_sample(model, sample)


class _Encoder(nn.Module):
    """PyTorch's own ``TransformerEncoderLayer(16, 2, 32)`` at its default dropout (0.1), and a head on the mean."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(1))


def test_activation_bytes_count_dropout_as_a_training_step_holds_it() -> None:
    """Found in review: the measuring forwards ran in eval mode, where dropout returns its input, so the layer after
    it saved a storage counted already. In training, Linear(4, 8), ReLU, Dropout(0.5), Linear(8, 2) holds the first
    linear's input (4 floats), the ReLU's output (8) and the dropout's float32 mask on the CPU (8), in the first
    linear; the dropout's output, which the second linear saves (8), and the logits (2), in the second. Eval mode
    counted 4 + 8 and 2, 0.47x of it; an MLP 16-256-10 with Dropout(0.5) 0.35x, a TransformerEncoderLayer at its
    default dropout 0.1 0.40x. Both checked against a training forward's autograd graph; the modes are put back."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))
    mlp.eval()
    costs = _costs(mlp, torch.randn(1, 4))
    assert costs.activation_bytes_per_sample.tolist() == [4 * (4 + 8 + 8), 4 * (8 + 2)]
    assert not any(module.training for module in mlp.modules())
    assert costs.activation_bytes_per_sample.sum() == _graph_saved_bytes_per_sample(mlp, torch.randn(1, 4), True)
    encoder = _Encoder()
    sample = torch.randn(1, 6, 16)
    costs = _costs(encoder, sample)
    assert all(module.training for module in encoder.modules())
    assert costs.activation_bytes_per_sample.sum() == _graph_saved_bytes_per_sample(encoder, sample, training=True)


class _OneAtATime(nn.Module):
    """A model that takes one sample only."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) != 1:
            raise RuntimeError(f"one sample at a time; got {len(x)}")
        return self.fc(x)


def test_activation_bytes_fall_back_to_outputs_where_a_batch_cannot_run(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="triaccel_rl.costs"):
        costs = _costs(_OneAtATime(), torch.zeros(1, 4))
    assert "counts each layer's output" in caplog.text and "one sample at a time" in caplog.text
    assert costs.activation_bytes_per_sample.tolist() == [4 * 3]  # the output, fp32
    assert (
        saved_bytes_per_sample(_OneAtATime(), [info for _, _, info in find_layers(_OneAtATime())], torch.zeros(1, 4))
        is None
    )


def test_measuring_costs_leaves_no_trace() -> None:
    """The saved-tensor forwards run in training mode: batch norm's running statistics, dropout's draws and the
    mode itself are put back, and no gradient is left."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(64, 2))
    model.eval()
    sample = torch.randn(1, 1, 6, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    _costs(model, sample)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


class _Carried(nn.Module):
    """A GRU carrying its hidden state across batches (detached), and a layer initialised from its first batch."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 8, batch_first=True)
        self.head = nn.Linear(8, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if not hasattr(self, "scale"):  # data-dependent init, as Glow's ActNorm does
            self.scale = 1.0 / x.std(unbiased=False).clamp_min(1e-6).item()
        out, h = self.rnn(x * self.scale, getattr(self, "h", None))
        self.h = h.detach()
        return self.head(out[:, -1])


def test_measuring_costs_puts_back_the_modules_own_attributes() -> None:
    """The one-sample measurement left the GRU's carried state at a batch of one (the user's first step of 16 raised
    "Expected hidden size (1, 16, 8), got [1, 1, 8]") and initialised the scale from one sample (a zero deviation:
    1e6), and the call counter ran 3 ahead."""
    model = _Carried()
    _costs(model, torch.randn(1, 3, 4))
    assert model.calls == 0 and not hasattr(model, "h") and not hasattr(model, "scale")
    model(torch.randn(16, 3, 4))  # the user's first batch: its own state and init
    assert model.h.shape == (1, 16, 8) and model.scale < 10


class _Counted(nn.Module):
    """Counts its forwards in a tensor attribute (not a buffer), added to in place, e.g. to anneal a rate."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.calls = torch.zeros((), dtype=torch.long)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lin(x)


def test_measuring_costs_puts_back_a_tensor_attribute_written_in_place() -> None:
    """The attributes were put back shallowly: the same tensor, written in place, kept the measurement's 3 forwards
    (a Controller's 4 training forwards read 7)."""
    model = _Counted()
    counter = model.calls
    _costs(model, torch.randn(1, 4))
    assert model.calls is counter and int(model.calls) == 0


class _Penalised(nn.Module):
    """Appends an activation penalty to a list attribute each forward, for the user to add to the loss and clear (an
    activity regulariser, a mixture of experts' load-balancing loss), and notes each batch size in a dict, a set and a
    deque."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)
        self.penalties: list[torch.Tensor] = []
        self.batches: dict[int, int] = {7: 1}  # what the user had noted before: kept
        self.sizes: set[int] = set()
        self.recent: collections.deque[int] = collections.deque(maxlen=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        self.penalties.append(h.abs().mean())
        self.batches[len(x)] = self.batches.get(len(x), 0) + 1
        self.sizes.add(len(x))
        self.recent.append(len(x))
        return self.fc2(h)


def test_measuring_costs_puts_back_the_contents_of_list_and_dict_attributes() -> None:
    """The attributes were bound again, the same objects, as changed in place: the penalty list kept the measurement's
    3 entries, two with the graphs of its 2- and 4-sample forwards, and the user's first step, summing the list into
    its loss, backpropagated through them (fc1's bias gradient 1.76 where 1.51)."""
    torch.manual_seed(0)
    model = _Penalised()
    unmeasured = copy.deepcopy(model)
    penalties, batches = model.penalties, model.batches
    _costs(model, torch.ones(1, 4))
    assert model.penalties is penalties and penalties == []
    assert model.batches is batches and batches == {7: 1}
    assert model.sizes == set() and list(model.recent) == [] and model.recent.maxlen == 2
    for net in (model, unmeasured):  # the user's first step
        (net(torch.ones(3, 4)).sum() + sum(net.penalties)).backward()
    assert model.fc1.bias.grad is not None and unmeasured.fc1.bias.grad is not None
    assert torch.equal(model.fc1.bias.grad, unmeasured.fc1.bias.grad)


def test_measuring_costs_puts_a_counter_attribute_back_as_it_was() -> None:
    """The contents went back through ``update``, which a ``Counter`` adds up: its ``(key, count)`` pairs became keys
    of count 1, nested once more a measuring pass ({'train': 3} read {((('train', 3), 1), 1): 1})."""
    model = nn.Sequential(nn.Linear(4, 2))
    model.calls = collections.Counter({"train": 3, "eval": 1})
    model.by_batch = collections.defaultdict(int, {7: 2})
    _costs(model, torch.ones(1, 4))
    assert model.calls == collections.Counter({"train": 3, "eval": 1})
    assert dict(model.by_batch) == {7: 2} and model.by_batch.default_factory is int


class _InitialisedOnFirstBatch(nn.Module):
    """Registers a buffer centring its output on the first batch's mean, and a parameter and a submodule with it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if "shift" not in self._buffers:
            self.register_buffer("shift", h.detach().mean(0))
            self.register_buffer("seen", torch.zeros(()), persistent=False)
            self.gain = nn.Parameter(torch.ones(4))
            self.out = nn.Linear(4, 2)
        return self.out((h - self.shift) * self.gain)


def test_measuring_costs_drops_what_the_forward_registered() -> None:
    """The parameter, buffer and submodule dicts were bound again as changed: the buffer registered in the forward
    stayed, with the measurement's sample's mean, and the user's first batch never initialised the layer."""
    torch.manual_seed(0)
    model = _InitialisedOnFirstBatch()
    unmeasured = copy.deepcopy(model)
    _costs(model, torch.full((1, 4), 5.0))
    assert list(model.state_dict()) == ["fc.weight", "fc.bias"]
    assert list(model.named_buffers()) == [] and [name for name, _ in model.named_modules()] == ["", "fc"]
    assert model._non_persistent_buffers_set == set()
    batch = torch.randn(3, 4)
    outputs = []
    for net in (model, unmeasured):  # the user's first batch initialises it, drawing the new layer's weights
        torch.manual_seed(1)
        outputs.append(net(batch))
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(model.shift, model.fc(batch).detach().mean(0))
    assert model.state_dict().keys() == unmeasured.state_dict().keys()


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
def test_measuring_costs_sets_aside_the_users_forward_hooks() -> None:
    """A forward hook collecting an activation penalty saw the measurement's outputs of 1, 2 and 4 samples, and kept
    the last two's graphs for the user's first step to backpropagate through; a global one too. Torch's own pre-hooks
    (weight norm computes the weight in one) still run, and every hook is back afterwards."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    plain = _costs(model, torch.randn(1, 4))
    nn.utils.weight_norm(model[2])
    seen: list[int] = []
    model[0].register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append(-out.shape[0]))
    try:
        costs = _costs(model, torch.randn(1, 4))
        assert seen == []
        assert costs.activation_bytes_per_sample.tolist() == plain.activation_bytes_per_sample.tolist()
        model(torch.randn(3, 4))
    finally:
        handle.remove()
    assert sorted(seen) == [-3, -3, -3, -3, 3]  # the global hook on the model and its three layers
    assert len(nn.modules.module._global_forward_hooks) == 0


def test_a_forward_hook_the_model_needs_runs_in_the_measurement_where_the_forward_raises_without_it() -> None:
    """Set aside, a hook returning its module's output reshaped (flattened for the next layer) made the measuring
    forwards raise, and the model was measured as parameters only. They run with it then, as an ``nn.Flatten`` would."""
    torch.manual_seed(0)
    hooked = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Linear(4 * 6 * 6, 3))
    hooked[1].register_forward_hook(lambda module, args, out: out.flatten(1))
    flattened = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    sample = torch.randn(1, 1, 8, 8)
    costs, reference = _costs(hooked, sample), _costs(flattened, sample)
    assert costs.flops_per_sample.tolist() == reference.flops_per_sample.tolist() == [2592.0, 864.0]
    assert costs.activation_bytes_per_sample.tolist() == reference.activation_bytes_per_sample.tolist()
    assert costs.activation_bytes_per_sample.tolist() == [832.0, 12.0]


@dataclasses.dataclass
class _Output:
    logits: torch.Tensor | None
    extra: tuple[torch.Tensor, ...] | None = None


class _ReturnsDataclass(nn.Module):
    """``Linear(4, 8), ReLU, Linear(8, 2)`` returning its logits in a dataclass (nested: in a tuple, in another)."""

    def __init__(self, nested: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        self.nested = nested

    def forward(self, x: torch.Tensor) -> _Output | tuple[_Output]:
        logits = self.net(x)
        return (_Output(None, (logits,)),) if self.nested else _Output(logits)


@pytest.mark.parametrize("nested", [False, True])
def test_activation_bytes_count_the_logits_a_model_returns_in_a_dataclass(nested: bool) -> None:
    """An unregistered dataclass was one pytree leaf, not a tensor: its logits (2 fp32 values a sample) were left
    out; the same model returning a tensor counts [48, 8] (the docstring example of saved_bytes_per_sample)."""
    model = _ReturnsDataclass(nested)
    layers = [info for _, _, info in find_layers(model)]
    assert saved_bytes_per_sample(model, layers, torch.zeros(1, 4)).tolist() == [48.0, 8.0]


class _TiedLM(nn.Module):
    """An embedding and an output projection sharing one weight (a language model's tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.out = nn.Linear(16, 100, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(x))


def test_a_tied_weight_is_accounted_once() -> None:
    """Both layers' ``n_params`` count the shared weight; the accounting counted it twice (weights, gradients and
    optimizer state 38,400 bytes against 19,200, and two 16-bit copies), as the engine, which updates it once, does
    not."""
    model = _TiedLM()
    costs = _costs(model, torch.zeros(1, 5, dtype=torch.long))
    assert [info.n_params for info in costs.layers] == [1600, 1600]
    assert costs.owned_params == (1600, 0)  # the first layer owns it, as StepEngine's layer_parameters says
    assert costs.static_bytes == 1600 * 4 * 3
    assert costs.fixed_bytes([Precision.BF16] * 2) == 1600 * 4 * 3 + 1600 * 2  # one 16-bit copy
    only = CostModel.parameters_only(list(costs.layers), 1, costs.owned_params)
    assert only.static_bytes == costs.static_bytes


def test_frozen_weights_are_accounted_once_without_gradients_or_state() -> None:
    """A frozen layer (fine-tuning a head) owns no trainable parameter, so it is no layer: its weights were not
    accounted at all (4,198,400 bytes missing here)."""
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    model[0].requires_grad_(False)
    costs = _costs(model, torch.zeros(1, 1024))
    assert costs.frozen_bytes == (1024 * 1024 + 1024) * 4
    assert costs.static_bytes == (1024 * 10 + 10) * 4 * 3  # the head: weights, gradients, one momentum
    assert costs.fixed_bytes([Precision.FP32]) == costs.static_bytes + costs.frozen_bytes


class _CrossAttention(nn.Module):
    def __init__(self, by_keyword: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=6, batch_first=True)
        self.by_keyword = by_keyword

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, key, value = x[:, :5, :8], x[:, :, :4], x[:, :, 2:8]
        if self.by_keyword:
            return self.attn(query, key=key, value=value, need_weights=False)[0]
        return self.attn(query, key, value, need_weights=False)[0]


@pytest.mark.parametrize("by_keyword", [False, True])
def test_cost_model_cross_attention_by_hand(by_keyword: bool) -> None:
    """5 query tokens of width E = 8, 7 key tokens of kdim 4 and vdim 6: projections q 5·8·8, k 7·4·8, v 7·6·8,
    out 5·8·8 (multiply-adds: 320 + 224 + 336 + 320 = 1,200); scores and weighted sum 5·7·8 each (560).
    Before the fix, attention counted as self-attention of the query's length and width: 2·4·8·40 + 4·5·40 = 3,360."""
    model = _CrossAttention(by_keyword)
    costs = _costs(model, torch.zeros(1, 7, 8))
    assert costs.flops_per_sample.tolist() == [2 * (1_200 + 560)]
    assert costs.activation_bytes_per_sample.tolist() == [_graph_saved_bytes_per_sample(model, torch.zeros(1, 7, 8))]


class _Recurrent(nn.Module):
    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The cost model's sample is batch-first ([1, ...]); a sequence-first RNN gets it as [T, 1, features].
        return self.rnn(x if self.rnn.batch_first else x.transpose(0, 1))[0]


@pytest.mark.parametrize(
    ("rnn", "shape", "flops"),
    [
        # LSTM(3 → 5) over 4 steps: 4 gates, each W_ih (5×3) and W_hh (5×5) a step: 2·4·5·(3 + 5) = 320 a step.
        (nn.LSTM(3, 5, batch_first=True), (1, 4, 3), 4 * 320),
        # GRU(3 → 5), 2 layers, both directions, sequence-first, 4 steps: 3 gates; layer 1 reads 3 inputs
        # (2·3·5·8 = 240 a step), layer 2 both directions' 10 (2·3·5·15 = 450); two directions: 2·4·(240 + 450).
        (nn.GRU(3, 5, num_layers=2, bidirectional=True), (1, 4, 3), 2 * 4 * (240 + 450)),
        # LSTM(3 → 6, projected to 2), 4 steps: gates from 3 inputs and the 2-wide projected state, 2·4·6·5 = 240,
        # plus the projection 2·6·2 = 24 a step.
        (nn.LSTM(3, 6, proj_size=2, batch_first=True), (1, 4, 3), 4 * 264),
        # A tanh RNN(3 → 5), 4 steps: one gate, 2·5·8 = 80 a step.
        (nn.RNN(3, 5), (1, 4, 3), 4 * 80),
    ],
    ids=["lstm", "gru-2-layers-bidirectional", "lstm-projected", "rnn"],
)
@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_cost_model_recurrent_layers_by_hand(rnn: nn.RNNBase, shape: tuple[int, ...], flops: int) -> None:
    """Before, a recurrent layer counted one FLOP an output element (20 for the first case, not 1,280), so a model
    with LSTMs was priced as almost free in modelled step time."""
    costs = _costs(_Recurrent(rnn), torch.zeros(shape))
    assert costs.flops_per_sample.tolist() == [flops]
    assert costs.activation_bytes_per_sample.tolist() == [
        _graph_saved_bytes_per_sample(_Recurrent(rnn), torch.zeros(shape))
    ]


def test_cost_model_refuses_precisions_of_another_length() -> None:
    """Before, step_ms and per_sample_bytes raised numpy's 'shapes not aligned', naming neither count."""
    from triaccel_rl.config import HardwareProfile

    costs = _costs(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), torch.zeros(1, 4))
    profile = HardwareProfile.load()
    for call in (
        lambda: costs.step_ms(8, [Precision.FP32], profile),
        lambda: costs.memory_bytes(8, [Precision.FP32] * 3, profile),
        lambda: costs.fixed_bytes([Precision.BF16]),
    ):
        with pytest.raises(ValueError, match=r"precisions for a cost model of 2 layers"):
            call()


def test_cost_model_of_resnet18_counts_every_conv() -> None:
    """ResNet-18 on one 32×32 image: the convs' FLOPs are 2 × its multiply-adds, by hand from the stage shapes (each
    conv's output pixels × out channels × in channels·k²): stem 32²·64·27; stage 1, four convs 32²·64·576;
    stage 2: 16²·128·(576 + 3·1152 + 64 for the shortcut); stage 3: 8²·256·(1152 + 3·2304 + 128); stage 4:
    4²·512·(2304 + 3·4608 + 256). That is 0.556 G multiply-adds, the figure published for CIFAR ResNet-18."""
    model = resnet18()
    entries = find_layers(model)
    costs = _costs(model, torch.zeros(1, 3, 32, 32))
    by_type = {kind: sum(f for (_, module, _), f in zip(entries, costs.flops_per_sample, strict=True)
                         if isinstance(module, kind)) for kind in (nn.Conv2d, nn.Linear)}  # fmt: skip
    macs = (
        32 * 32 * 64 * 27
        + 4 * 32 * 32 * 64 * 576
        + 16 * 16 * 128 * (576 + 1152 * 3 + 64)
        + 8 * 8 * 256 * (1152 + 2304 * 3 + 128)
        + 4 * 4 * 512 * (2304 + 4608 * 3 + 256)
    )
    assert macs == 555_417_600
    assert by_type == {nn.Conv2d: 2 * macs, nn.Linear: 2 * 512 * 10}


# ---------------------------------------------------------------- measure_profile's arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, r"steps=0 must be a positive integer"),
        ({"steps": 2.5}, r"steps=2.5 must be a positive integer"),
        ({"steps": True}, r"steps=True must be a positive integer"),
        ({"batch_size": 0}, r"batch_size=0 must be a positive integer"),
        ({"device": "gpu"}, r"device='gpu' is not a device"),
        ({"device": "meta"}, r"device='meta' cannot be profiled; use a CUDA device or 'cpu'"),
    ],
)
def test_measure_profile_refuses_bad_arguments_before_measuring(kwargs, match, monkeypatch) -> None:
    """Before, steps=True ran one step, steps=2.5 failed in range() after building a model, and a 'meta' or 'mps'
    device was timed with the host clock (no sync: the times said nothing)."""
    monkeypatch.setattr(profiling, "_time_steps", lambda *args: pytest.fail("measured despite a bad argument"))
    with pytest.raises(ValueError, match=match):
        profiling.measure_profile(**{"device": "cpu", "batch_size": 8, "steps": 2, "small": True, **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_measure_profile_refuses_cuda_without_it() -> None:
    with pytest.raises(ValueError, match=r"device='cuda', but CUDA is not available here; use 'cpu'"):
        profiling.measure_profile("cuda", batch_size=8, steps=2, small=True)


def test_a_measured_profile_models_the_steps_it_measured(tmp_path, monkeypatch) -> None:
    """Found in review: the time factors were whole-step ratios, fixed time included, which ``step_ms`` applies to the
    batch's part of a step alone: measured at 10 ms (fp32), 4 ms (bf16) and 3 ms (fp16) with 2 ms fixed, the
    written profile modelled the bf16 step at 2 + 8 x 0.4 = 5.2 ms and the fp16 one at 4.4. Above the fixed time the
    factors are (4 - 2) / 8 and (3 - 2) / 8, and each step comes back as measured."""
    from triaccel_rl.config import HardwareProfile

    ms = {Precision.FP32: 10.0, Precision.BF16: 4.0, Precision.FP16: 3.0}
    monkeypatch.setattr(
        profiling, "_time_steps", lambda model, x, y, p, steps: (2.0, 1.0) if isinstance(model, MLP) else (ms[p], 1.0)
    )
    profiling.measure_profile("cpu", batch_size=8, steps=1, small=True).save(tmp_path / "profile.json")
    profile = HardwareProfile.load(tmp_path / "profile.json")
    assert profile.time_factor == {"fp32": 1.0, "bf16": 0.25, "fp16": 0.125}
    costs = _costs(SmallResNet(3, (8, 16), 10), torch.zeros(1, 3, 32, 32))
    for precision, measured in ms.items():
        assert costs.step_ms(8, [precision] * len(costs.layers), profile) == pytest.approx(measured, rel=1e-12)


def test_measure_profile_leaves_the_callers_generators_as_they_were(monkeypatch) -> None:
    """Found in review: measuring called ``torch.manual_seed(0)`` and drew its batch from the caller's generator, so a
    draw after profiling was seed 0's stream, not the caller's."""
    monkeypatch.setattr(profiling, "_time_steps", lambda *args: (1.0, 1.0))
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    profiling.measure_profile("cpu", batch_size=2, steps=1, small=True)
    assert torch.equal(torch.rand(3), expected)


class _Wayward(nn.Module):
    """A forward that touches what a measurement must put back, and computes a branch it drops."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = self.calls + 1  # a new tensor bound to the buffer's name
        random.random()  # Python's generator drawn
        h = self.bn(self.fc(x))
        torch.sigmoid(h).sum().item()  # a branch computed and dropped: its saved output is freed before the end
        return self.out(torch.relu(h))


def test_a_measurement_puts_back_modes_buffers_and_generators_and_counts_only_what_is_held() -> None:
    """Found in review: a model in train mode with a frozen batch norm (eval) came back with it in train mode; a buffer
    bound to a new tensor kept the new one; Python's generator had moved; the dropped sigmoid branch was counted."""
    model = _Wayward()
    model.bn.eval()
    calls = model.calls
    state = random.getstate()
    costs = _costs(model, torch.randn(1, 4))
    assert model.training and not model.bn.training
    assert model.calls is calls and model.calls.item() == 0
    assert random.getstate() == state
    # fc's input (4) and output (8, saved by the norm); the ReLU's output (8, saved by out) in fc, the norm passed
    # over; the logits (2) in out
    assert costs.activation_bytes_per_sample.tolist() == [4 * (4 + 8 + 8), 0, 4 * 2]


def test_saved_bytes_are_the_same_under_inference_mode_and_under_torch_compile() -> None:
    """Under inference mode nothing was saved (all zeros, no error); a compiled model's layers ran no hooks, so every
    byte counted in the first layer."""
    model = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 2))
    layers = [info for _, _, info in find_layers(model)]
    eager = saved_bytes_per_sample(model, layers, torch.zeros(1, 4))
    assert eager is not None and eager.tolist() == [48.0, 40.0]
    with torch.inference_mode():
        inference = saved_bytes_per_sample(model, layers, torch.zeros(1, 4))
    assert inference is not None and inference.tolist() == eager.tolist()
    compiled = torch.compile(model, backend="aot_eager")
    compiled_layers = [info for _, _, info in find_layers(compiled)]
    measured = saved_bytes_per_sample(compiled, compiled_layers, torch.zeros(1, 4))
    assert measured is not None and measured.tolist() == eager.tolist()


def test_a_compiled_model_that_already_ran_one_sample_counts_its_flops() -> None:
    """A compiled policy that had acted on one observation (eval mode, no gradients, a batch of one) before its costs
    were measured: the FLOP count ran that cached graph, which runs no module's hooks, and counted 0 in every layer."""
    torch._dynamo.reset()  # a fresh cache: no earlier test's compiles count towards its recompile limit
    model = torch.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), backend="eager")
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 4))  # a rollout step
    model.train()
    costs = _costs(model, torch.zeros(1, 4))
    assert costs.flops_per_sample.tolist() == [2 * 4 * 8, 2 * 8 * 2]
    assert costs.activation_bytes_per_sample.tolist() == [48.0, 8.0]
