"""LeNet-5 (LeCun et al., 1998), the lecture's first "classic" CNN.

Layer names follow the paper: C1 conv 6@5x5, S2 subsampling, C3 conv 16@5x5, S4
subsampling, C5 conv 120@5x5, F6 fully connected 84, then the output layer. tanh
activations and average-pool subsampling as in the paper (its trainable subsampling
coefficients and RBF output are replaced by plain average pooling and a Linear layer, the
usual modern reading). 61,706 parameters for 1x32x32 inputs and 10 classes.

The paper feeds 32x32 images (MNIST digits padded by 2). For smaller inputs (MNIST's
28x28, the registry default) C1 pads by 2 on that side instead, so C1's maps are 28x28
either way and the rest of the network, parameter count included, is the same. Inputs of
32 or more are not padded; larger ones leave C5 with more than 1x1 maps, and F6 grows.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnray.models.layers import as_image_size, conv_out, flatten_features, make_conv, norm_or_identity
from cnnray.models.registry import register_model

PAPER_SIZE = 32  # LeNet-5's input side; smaller sides are zero-padded in C1 (2 pixels)
MIN_SIZE = 28  # with padding 2, C5 needs a side of 28 to leave a 1x1 map


class LeNet5(nn.Module):
    """C1 -> tanh -> S2 -> C3 -> tanh -> S4 -> C5 -> tanh -> F6 -> tanh -> output."""

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: tuple[int, int] = (28, 28),
        norm: str = "none",
    ) -> None:
        super().__init__()
        height, width = as_image_size(image_size)
        if height < MIN_SIZE or width < MIN_SIZE:
            raise ValueError(
                f"image_size {height}x{width} is too small for lenet5: it needs at least "
                f"{MIN_SIZE}x{MIN_SIZE} (sides under {PAPER_SIZE} are padded by 2 in C1)"
            )
        pad = (2 if height < PAPER_SIZE else 0, 2 if width < PAPER_SIZE else 0)
        self.c1 = make_conv(in_channels, 6, 5, padding=pad, norm=norm)
        self.n1 = norm_or_identity(norm, 6)  # Identity for "none": no state_dict keys
        self.s2 = nn.AvgPool2d(2)
        self.c3 = make_conv(6, 16, 5, norm=norm)
        self.n3 = norm_or_identity(norm, 16)
        self.s4 = nn.AvgPool2d(2)
        self.c5 = make_conv(16, 120, 5, norm=norm)
        self.n5 = norm_or_identity(norm, 120)
        c5_h = self._c5_side(height, pad[0])
        c5_w = self._c5_side(width, pad[1])
        self.f6 = nn.Linear(120 * c5_h * c5_w, 84)  # 120 -> 84 when C5 maps are 1x1
        self.output = nn.Linear(84, num_classes)
        self.act = nn.Tanh()

    @staticmethod
    def _c5_side(side: int, pad: int) -> int:
        c1 = conv_out(side, 5, padding=pad)  # 28
        s2 = conv_out(c1, 2, 2)  # 14
        c3 = conv_out(s2, 5)  # 10
        s4 = conv_out(c3, 2, 2)  # 5
        return conv_out(s4, 5)  # 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.s2(self.act(self.n1(self.c1(x))))
        x = self.s4(self.act(self.n3(self.c3(x))))
        x = self.act(self.n5(self.c5(x)))
        x = flatten_features(x)
        x = self.act(self.f6(x))
        return self.output(x)


@register_model(
    "lenet5",
    in_channels=1,
    image_size=(28, 28),
    description="LeNet-5: tanh convs 6, 16, 120 @5x5 with average pooling, fc 84 (32x32 too)",
)
def lenet5(
    *, num_classes: int, in_channels: int, image_size: tuple[int, int], norm: str
) -> LeNet5:
    return LeNet5(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, norm=norm
    )
