"""Model definitions for the proxy tasks and the GPU benchmark (no torchvision needed).

- ``MLP``, ``SmallResNet``: small proxy models.
- ``DepthwiseCNN``: MobileNet-style depthwise-separable blocks.
- ``TinyTransformer``: a pre-norm Transformer encoder classifier over token sequences.
- ``resnet18``: the CIFAR-style ResNet-18 (3×3 stem, no max-pool), any number of input channels.
- ``efficientnet_b0``: EfficientNet-B0 (MBConv with squeeze-excitation, SiLU), stem stride selectable.
"""

from __future__ import annotations

import itertools
import math

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
    """A ReLU multi-layer perceptron over flattened inputs."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], n_classes: int) -> None:
        super().__init__()
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

    Example:
        >>> sum(p.numel() for p in resnet18().parameters())
        11173962
    """
    return SmallResNet(in_channels, (64, 128, 256, 512), n_classes, stem_stride=1, blocks_per_stage=2)


class DepthwiseCNN(nn.Module):
    """Depthwise-separable CNN: a stem then blocks of 3×3 depthwise + 1×1 pointwise conv, BN, ReLU6."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], n_classes: int) -> None:
        super().__init__()
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
    """A pre-norm Transformer encoder classifier over integer token sequences ``[batch, length]``."""

    def __init__(
        self, vocab: int, length: int, dim: int, heads: int, depth: int, n_classes: int, mlp_ratio: int = 2
    ) -> None:
        super().__init__()
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
        """Returns class logits ``[batch, n_classes]`` from the mean of the encoded tokens."""
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
    def __init__(self, in_channels: int, out_channels: int, expand: int, kernel: int, stride: int) -> None:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


class _EfficientNet(nn.Module):
    def __init__(self, in_channels: int, n_classes: int, stem_stride: int) -> None:
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
        for expand, channels, repeats, stride, kernel in stages:
            for i in range(repeats):
                layers.append(_MBConv(previous, channels, expand, kernel, stride if i == 0 else 1))
                previous = channels
        layers += [nn.Conv2d(previous, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(1280, n_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.Linear):
                nn.init.uniform_(module.weight, -1 / math.sqrt(module.in_features), 1 / math.sqrt(module.in_features))
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def efficientnet_b0(in_channels: int = 3, n_classes: int = 10, stem_stride: int = 2) -> nn.Module:
    """EfficientNet-B0 (our definition, following the paper's Table 1; about 4.0M parameters for 10 classes).

    ``stem_stride=1`` keeps more resolution for 28×28 or 32×32 inputs.
    """
    return _EfficientNet(in_channels, n_classes, stem_stride)
