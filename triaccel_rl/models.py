"""Model definitions for the proxy tasks and the GPU benchmark (no torchvision needed).

- ``MLP``, ``SmallResNet``: small proxy models.
- ``DepthwiseCNN``: MobileNet-style depthwise-separable blocks.
- ``TinyTransformer``: a pre-norm Transformer encoder classifier over token sequences.
- ``resnet18``: the CIFAR-style ResNet-18 (3×3 stem, no max-pool), any number of input channels.
- ``efficientnet_b0``: EfficientNet-B0 (MBConv with squeeze-excitation, SiLU), stem stride selectable.

Every constructor refuses a size or count that is not a positive integer (and other bad arguments) with a
``ValueError`` naming the argument, its value and what is allowed.
"""

from __future__ import annotations

import itertools
import math
import numbers

import torch
from torch import nn

__all__ = [
    "MLP",
    "BasicBlock",
    "DepthwiseCNN",
    "SmallResNet",
    "TinyTransformer",
    "efficientnet_b0",
    "resnet18",
]


class MLP(nn.Module):
    """A ReLU multi-layer perceptron over flattened inputs: ``Linear`` + ReLU per hidden width, then a ``Linear`` head.

    ``hidden=()`` is a linear classifier. Inputs ``[batch, ...]`` are flattened to ``[batch, in_features]``.

    Example:
        >>> MLP(6, (8, 4), 3)(torch.zeros(2, 2, 3)).shape
        torch.Size([2, 3])
    """

    def __init__(self, in_features: int, hidden: tuple[int, ...], n_classes: int) -> None:
        super().__init__()
        _check_positive_int("MLP", "in_features", in_features)
        _check_positive_int("MLP", "n_classes", n_classes)
        for width in _check_sizes("MLP", "hidden", hidden, allow_empty=True):
            _check_positive_int("MLP", "hidden width", width)
        sizes = (in_features, *hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns class logits ``[batch, n_classes]``."""
        return self.net(x)


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3×3 convs with batch norm and an identity or 1×1 shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        _check_positive_int("BasicBlock", "in_channels", in_channels)
        _check_positive_int("BasicBlock", "out_channels", out_channels)
        _check_positive_int("BasicBlock", "stride", stride)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the block."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-style CNN: a 3×3 stem, ``blocks_per_stage`` basic blocks per stage, pooling, a linear head.

    The stem (conv, batch norm, ReLU) has ``widths[0]`` channels and stride ``stem_stride``; stage ``i`` has
    ``widths[i]`` channels, and its first block has stride 2 for every stage after the first (stride 1 in the
    first), so each later stage halves the height and width. Global average pooling feeds the head.

    Example:
        >>> SmallResNet(1, (8, 16), 10)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int,
        widths: tuple[int, ...],
        n_classes: int,
        stem_stride: int = 1,
        blocks_per_stage: int = 1,
    ) -> None:
        super().__init__()
        _check_positive_int("SmallResNet", "in_channels", in_channels)
        for width in _check_sizes("SmallResNet", "widths", widths):
            _check_positive_int("SmallResNet", "width", width)
        _check_positive_int("SmallResNet", "n_classes", n_classes)
        _check_positive_int("SmallResNet", "stem_stride", stem_stride)
        _check_positive_int("SmallResNet", "blocks_per_stage", blocks_per_stage)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks = []
        previous = widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(previous, width, stride=2 if i > 0 and j == 0 else 1))
                previous = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(previous, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns class logits ``[batch, n_classes]``."""
        out = torch.relu(self.bn(self.stem(x)))
        out = self.blocks(out)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def resnet18(in_channels: int = 3, n_classes: int = 10) -> SmallResNet:
    """The CIFAR-style ResNet-18: 3×3 stride-1 stem, no max-pool, stages of 64-128-256-512 with 2 blocks each.

    He et al. (2016)'s ResNet-18 with the stem of its CIFAR experiments (the widely used CIFAR-10 form): a 32×32
    input leaves the stages at 32, 16, 8 and 4 pixels square. 1×1 projection shortcuts where the shape changes,
    batch norm at PyTorch's defaults (eps 1e-5, momentum 0.1), PyTorch's default initialisation.

    Example:
        >>> sum(p.numel() for p in resnet18().parameters())
        11173962
    """
    return SmallResNet(in_channels, (64, 128, 256, 512), n_classes, stem_stride=1, blocks_per_stage=2)


class DepthwiseCNN(nn.Module):
    """Depthwise-separable CNN: a stem then blocks of 3×3 depthwise + 1×1 pointwise conv, BN, ReLU6.

    The stem is a 3×3 stride-2 conv to ``widths[0]`` channels (BN, ReLU6). Each further width adds one block:
    a 3×3 depthwise conv (stride 2 where the width grows, else 1), BN, ReLU6, then a 1×1 conv to the new width,
    BN, ReLU6. Global average pooling feeds a linear head.

    Example:
        >>> DepthwiseCNN(1, (8, 16), 10)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int, widths: tuple[int, ...], n_classes: int) -> None:
        super().__init__()
        _check_positive_int("DepthwiseCNN", "in_channels", in_channels)
        for width in _check_sizes("DepthwiseCNN", "widths", widths):
            _check_positive_int("DepthwiseCNN", "width", width)
        _check_positive_int("DepthwiseCNN", "n_classes", n_classes)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], 3, 2, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU6(),
        ]
        for a, b in itertools.pairwise(widths):
            layers += [
                nn.Conv2d(a, a, 3, 2 if b > a else 1, 1, groups=a, bias=False),
                nn.BatchNorm2d(a),
                nn.ReLU6(),
                nn.Conv2d(a, b, 1, bias=False),
                nn.BatchNorm2d(b),
                nn.ReLU6(),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns class logits ``[batch, n_classes]``."""
        out = self.features(x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


class TinyTransformer(nn.Module):
    """A pre-norm Transformer encoder classifier over integer token sequences ``[batch, length]``.

    Token embeddings plus a learned position embedding, ``depth`` pre-norm encoder layers (``heads`` heads,
    feed-forward width ``dim * mlp_ratio``, GELU, no dropout), a final LayerNorm, the mean over positions and a
    linear head. Tokens may come in any dtype holding whole numbers in ``0..vocab - 1`` (the tasks store them as
    float32); they are cast with ``.long()``.

    Example:
        >>> TinyTransformer(vocab=16, length=8, dim=16, heads=2, depth=1, n_classes=4)(torch.zeros(3, 8)).shape
        torch.Size([3, 4])
    """

    def __init__(
        self, vocab: int, length: int, dim: int, heads: int, depth: int, n_classes: int, mlp_ratio: int = 2
    ) -> None:
        super().__init__()
        for name, value in (("vocab", vocab), ("length", length), ("dim", dim), ("heads", heads), ("depth", depth),
                            ("n_classes", n_classes), ("mlp_ratio", mlp_ratio)):  # fmt: skip
            _check_positive_int("TinyTransformer", name, value)
        if dim % heads:
            raise ValueError(
                f"TinyTransformer: dim={dim} must be a multiple of heads={heads} (each head gets dim/heads)"
            )
        self.length = length
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(1, length, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim * mlp_ratio, dropout=0.0, batch_first=True, norm_first=True, activation="gelu"
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Returns class logits ``[batch, n_classes]`` from the mean of the encoded tokens.

        Raises:
            ValueError: ``tokens`` is not ``[batch, length]`` (a shape check on the host: no device sync).
        """
        if tokens.dim() != 2 or tokens.shape[1] != self.length:
            raise ValueError(f"TinyTransformer expects tokens [batch, {self.length}], got shape {tuple(tokens.shape)}")
        out = self.encoder(self.embed(tokens.long()) + self.position)
        return self.head(self.norm(out).mean(dim=1))


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = nn.functional.adaptive_avg_pool2d(x, 1)
        scale = torch.sigmoid(self.expand(nn.functional.silu(self.reduce(scale))))
        return x * scale


class _MBConv(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, expand: int, kernel: int, stride: int, drop_prob: float = 0.0
    ) -> None:
        super().__init__()
        hidden = in_channels * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU()]
        layers += [
            nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.SiLU(),
            _SqueezeExcite(hidden, max(1, in_channels // 4)),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if not self.residual:
            return out
        if self.training and self.drop_prob > 0:
            # Stochastic depth, torchvision's "row" mode: each sample's branch is dropped with probability p and
            # the kept ones scaled by 1 / (1 - p). Draws from the device's RNG only when p > 0.
            keep = 1.0 - self.drop_prob
            mask = torch.empty(out.shape[0], 1, 1, 1, dtype=out.dtype, device=out.device).bernoulli_(keep)
            out = out * mask.div_(keep)
        return out + x


class _EfficientNet(nn.Module):
    def __init__(
        self, in_channels: int, n_classes: int, stem_stride: int, dropout: float, stochastic_depth_prob: float
    ) -> None:
        super().__init__()
        # (expand ratio, channels, repeats, stride, kernel) of EfficientNet-B0 (Tan & Le, 2019, Table 1).
        stages = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3), (6, 112, 3, 1, 5),
                  (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)]  # fmt: skip
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, 32, 3, stem_stride, 1, bias=False),
            nn.BatchNorm2d(32),
            nn.SiLU(),
        ]
        previous = 32
        n_blocks = sum(repeats for _, _, repeats, _, _ in stages)
        block_index = 0
        for expand, channels, repeats, stride, kernel in stages:
            for i in range(repeats):
                # torchvision's schedule: block b of n drops with probability p * b / n (the first never).
                drop_prob = stochastic_depth_prob * block_index / n_blocks
                layers.append(_MBConv(previous, channels, expand, kernel, stride if i == 0 else 1, drop_prob))
                previous = channels
                block_index += 1
        layers += [nn.Conv2d(previous, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.dropout = dropout
        self.head = nn.Linear(1280, n_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.Linear):
                nn.init.uniform_(module.weight, -1 / math.sqrt(module.in_features), 1 / math.sqrt(module.in_features))
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)
        if self.dropout > 0:
            out = nn.functional.dropout(out, self.dropout, training=self.training)
        return self.head(out)


def efficientnet_b0(
    in_channels: int = 3,
    n_classes: int = 10,
    stem_stride: int = 2,
    dropout: float = 0.0,
    stochastic_depth_prob: float = 0.0,
) -> nn.Module:
    """EfficientNet-B0 (our definition, following the paper's Table 1; about 4.0M parameters for 10 classes).

    Tan & Le (2019), as torchvision's ``efficientnet_b0`` builds it: a 3×3 stem to 32 channels, 16 MBConv blocks
    in 7 stages (expansion 1 then 6; 3×3 and 5×5 depthwise kernels; squeeze-excitation to a quarter of the
    block's input channels), a 1×1 conv to 1280 channels, pooling, a linear head; SiLU throughout, batch norm at
    PyTorch's defaults (eps 1e-5, momentum 0.1, as torchvision's B0). With 3 input channels and 1000 classes it
    has torchvision's 5,288,548 parameters, and a 224×224 input leaves the stages at 112, 56, 28, 14, 14, 7 and 7
    pixels square.

    Where it differs from torchvision's: ``in_channels`` and ``stem_stride`` are ours (``stem_stride=1`` keeps more
    resolution for 28×28 or 32×32 inputs); dropout before the head and stochastic depth are off unless asked for
    (torchvision's defaults are 0.2 and 0.2); the head's weights are drawn from U(±1/sqrt(1280)) (torchvision's
    from U(±1/sqrt(n_classes))) and the squeeze-excitation convs' biases keep PyTorch's default initialisation
    (torchvision zeroes them); blocks are one flat ``features`` sequence (torchvision nests them per stage), so
    state dicts do not load across.

    Args:
        in_channels: input image channels.
        n_classes: output classes.
        stem_stride: stride of the stem conv (torchvision: 2).
        dropout: dropout probability on the pooled features in training, in [0, 1).
        stochastic_depth_prob: the rate the blocks' stochastic depth is scaled from (torchvision's schedule), in
            [0, 1): block ``b`` of the 16, counted from 0, drops its residual branch with probability
            ``stochastic_depth_prob * b / 16`` in training, per sample, so the first never does and none reaches the
            rate itself. Only the 9 blocks with an identity shortcut (stride 1, as many channels out as in) drop; the
            others, the last included, always run their branch.

    Example:
        >>> sum(p.numel() for p in efficientnet_b0(n_classes=1000).parameters())
        5288548
    """
    _check_positive_int("efficientnet_b0", "in_channels", in_channels)
    _check_positive_int("efficientnet_b0", "n_classes", n_classes)
    _check_positive_int("efficientnet_b0", "stem_stride", stem_stride)
    for name, value in (("dropout", dropout), ("stochastic_depth_prob", stochastic_depth_prob)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
            raise ValueError(f"efficientnet_b0: {name}={value!r} must be a probability in [0, 1)")
    return _EfficientNet(in_channels, n_classes, stem_stride, float(dropout), float(stochastic_depth_prob))


def _check_positive_int(owner: str, name: str, value: object) -> None:
    """Refuse ``value`` unless it is a positive integer (``True`` and ``2.0`` are refused too; numpy's ints pass)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}: {name}={value!r} must be a positive integer")


def _check_sizes(owner: str, name: str, sizes: object, allow_empty: bool = False) -> tuple[object, ...]:
    """Return ``sizes`` as a tuple, refusing a non-sequence (a bare int) and, unless allowed, an empty one."""
    if not isinstance(sizes, (tuple, list)):
        raise ValueError(f"{owner}: {name}={sizes!r} must be a tuple of positive integers")
    if not sizes and not allow_empty:
        raise ValueError(f"{owner}: {name}=() must hold at least one width")
    return tuple(sizes)
