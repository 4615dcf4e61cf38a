"""Building blocks shared by the model families: norm factories and size arithmetic.

Every conv model takes the same `norm` argument, so the choice of normalisation and the
rule "a conv followed by a norm has no bias" live here once instead of in each file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

# "none": no norm layer, convs keep their bias (the lecture's plain CNNs).
# "batch": BatchNorm (the lecture's batch normalisation; needs batches > 1 in training).
# "group": GroupNorm with up to 32 groups (batch-size independent).
# "layer": GroupNorm with one group = layer norm over C, H, W (LayerNorm for the MLP).
NORMS: tuple[str, ...] = ("none", "batch", "group", "layer")


def check_norm(norm: str) -> str:
    """Return `norm` if it is one of NORMS, else raise a ValueError listing the choices."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")
    return norm


def group_count(channels: int, max_groups: int = 32) -> int:
    """Largest number of groups <= max_groups that divides `channels` (GroupNorm needs it)."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def make_norm(norm: str, channels: int) -> nn.Module | None:
    """Norm layer for a (N, C, H, W) feature map, or None for norm "none"."""
    check_norm(norm)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(group_count(channels, 32), channels)
    if norm == "layer":
        # One group normalises over all of C, H, W per sample: layer norm for images,
        # without tying the layer to one spatial size as nn.LayerNorm([C, H, W]) would.
        return nn.GroupNorm(1, channels)
    return None


def make_norm1d(norm: str, features: int) -> nn.Module | None:
    """Norm layer for a (N, F) activation (the MLP's hidden layers), or None for "none"."""
    check_norm(norm)
    if norm == "batch":
        return nn.BatchNorm1d(features)
    if norm == "group":
        # Fewer, larger groups than for convs: a hidden vector has no spatial extent, so
        # each group's statistics come from its features alone.
        return nn.GroupNorm(group_count(features, 8), features)
    if norm == "layer":
        return nn.LayerNorm(features)
    return None


def norm_or_identity(norm: str, channels: int) -> nn.Module:
    """make_norm, with nn.Identity for "none" (for models that call their norm by name)."""
    layer = make_norm(norm, channels)
    return nn.Identity() if layer is None else layer


def make_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
    norm: str = "none",
) -> nn.Conv2d:
    """Conv2d that keeps its bias only when no norm follows it.

    The norm's own shift (beta) makes a conv bias redundant: its mean subtraction cancels
    the bias, so keeping it would only add parameters that never matter.
    """
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        bias=check_norm(norm) == "none",
    )


def conv_norm(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
    norm: str = "none",
) -> list[nn.Module]:
    """[Conv2d] for norm "none", else [Conv2d without bias, norm layer]."""
    conv = make_conv(
        in_channels, out_channels, kernel_size, stride=stride, padding=padding, norm=norm
    )
    layer = make_norm(norm, out_channels)
    return [conv] if layer is None else [conv, layer]


def conv_out(size: int, kernel_size: int, stride: int = 1, padding: int = 0) -> int:
    """Output side of a conv or pool: floor((x + 2p - f) / s) + 1 (the lecture's formula)."""
    return (size + 2 * padding - kernel_size) // stride + 1


def as_image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) from an int (square) or a pair; lists from JSON become tuples."""
    if isinstance(image_size, int):
        return (image_size, image_size)
    height, width = image_size
    return (int(height), int(width))


def require_min_size(
    model: str, image_size: tuple[int, int], min_size: int | tuple[int, int]
) -> None:
    """Raise a ValueError naming the model if image_size is below its minimum (H, W)."""
    min_h, min_w = (min_size, min_size) if isinstance(min_size, int) else min_size
    height, width = image_size
    if height < min_h or width < min_w:
        raise ValueError(
            f"image_size {height}x{width} is too small for {model}: it needs at least "
            f"{min_h}x{min_w} so that every layer keeps a feature map of at least 1x1"
        )


def kaiming_init_(model: nn.Module) -> None:
    """He-normal conv weights (fan_in, ReLU gain), zero conv biases, unit norm scales.

    PyTorch's default conv init shrinks the activations' variance about 6-fold per ReLU
    layer, which stalls deep stacks without a norm (VGG-19, ResNet-18 with norm "none").
    He init in fan_in mode keeps the forward variance constant from layer to layer
    (fan_out mode, torchvision's choice, shrinks it wherever the width grows, e.g. the
    3 -> 64 stem, and then plain networks learn far more slowly).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class _FlattenFeatures(torch.autograd.Function):
    """torch.flatten(x, 1) of a channels-last x whose gradient comes back channels-last."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.shape = x.shape
        return torch.flatten(x, 1)  # a copy: x is not NCHW-contiguous

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.reshape(ctx.shape).contiguous(memory_format=torch.channels_last)


def flatten_features(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) feature maps -> (N, C*H*W) in channel-major (NCHW) order, the order the
    head's Linear weights are stored in, whatever x's memory format.

    The difference from torch.flatten(x, 1) is in the backward pass only: a channels-last
    x gets a channels-last gradient. torch.flatten's gradient is NCHW-strided, so the layer
    before (a ReLU, a pool) ran its backward on inputs of two layouts: for a ReLU on a CPU
    that is PyTorch's strided scalar loop, whose branch on the ReLU mask made it cost 4-20x
    the vectorised kernel depending on how many units are active (measured on the MNIST
    `cnn` in bf16: 70 us to over 1 ms a call against ~50 us). Values are identical. Where
    no gradient is wanted (evaluation, Serve), or x is NCHW or has the same memory order in
    both layouts (C == 1, or H == W == 1), this is torch.flatten itself.
    """
    channels_last_only = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last)
    if not (channels_last_only and torch.is_grad_enabled() and x.requires_grad):
        return torch.flatten(x, 1)
    return _FlattenFeatures.apply(x)
