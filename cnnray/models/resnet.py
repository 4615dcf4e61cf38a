"""ResNet-18 for CIFAR (He et al., 2015; the kuangliu/pytorch-cifar variant).

Differences from the ImageNet ResNet-18: a 3x3 stride-1 stem with no max-pool, so a 32x32
image keeps 32x32 maps in the first stage (then 16, 8, 4), and global average pooling
makes any input size >= 1x1 work. 11,173,962 parameters with norm "batch" and 10 classes.

With norm "none" the convs keep their biases and the last conv of every residual branch
starts at zero, so each block starts as the identity (as in Fixup): without a norm the
sum of 8 un-normalised branches would otherwise blow up the activations at init.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cnnray.models.layers import as_image_size, kaiming_init_, make_conv, norm_or_identity
from cnnray.models.registry import register_model

STAGE_WIDTHS = (64, 128, 256, 512)  # channels of the four stages; stages 2-4 stride 2


class BasicBlock(nn.Module):
    """conv3x3 -> norm -> ReLU -> conv3x3 -> norm, plus the (projected) input, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = make_conv(in_channels, out_channels, 3, stride=stride, padding=1, norm=norm)
        self.norm1 = norm_or_identity(norm, out_channels)
        self.conv2 = make_conv(out_channels, out_channels, 3, padding=1, norm=norm)
        self.norm2 = norm_or_identity(norm, out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            # 1x1 projection so the input matches the branch's size and channel count.
            self.shortcut = nn.Sequential(
                make_conv(in_channels, out_channels, 1, stride=stride, norm=norm),
                norm_or_identity(norm, out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem, four stages of BasicBlocks, global average pool, Linear."""

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        *,
        num_classes: int,
        in_channels: int,
        image_size: tuple[int, int],
        norm: str = "none",
    ) -> None:
        super().__init__()
        as_image_size(image_size)  # any size >= 1x1 works thanks to the global pool
        self.conv1 = make_conv(in_channels, STAGE_WIDTHS[0], 3, padding=1, norm=norm)
        self.norm1 = norm_or_identity(norm, STAGE_WIDTHS[0])
        stages = []
        channels = STAGE_WIDTHS[0]
        for index, (width, num_blocks) in enumerate(zip(STAGE_WIDTHS, blocks_per_stage)):
            strides = [1 if index == 0 else 2] + [1] * (num_blocks - 1)
            blocks = []
            for stride in strides:
                blocks.append(BasicBlock(channels, width, stride, norm))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

        kaiming_init_(self)
        if norm == "none":
            for module in self.modules():
                if isinstance(module, BasicBlock):
                    nn.init.zeros_(module.conv2.weight)  # block starts as the identity
                    nn.init.zeros_(module.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.pool(x), 1)  # 1 x 1 maps: either layout is the same order
        return self.fc(x)


@register_model(
    "resnet18",
    in_channels=3,
    image_size=(32, 32),
    description="ResNet-18, CIFAR variant: 3x3 stem, no max-pool, BasicBlocks [2, 2, 2, 2]",
)
def resnet18(
    *, num_classes: int, in_channels: int, image_size: tuple[int, int], norm: str
) -> ResNet:
    return ResNet(
        (2, 2, 2, 2),
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        norm=norm,
    )
