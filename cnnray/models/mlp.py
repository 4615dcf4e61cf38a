"""The lecture's feedforward network (FNN): flatten the image, ReLU hidden layers, logits.

It is the baseline the CNNs are compared with: no weight sharing, so its first layer has
C*H*W weights per hidden unit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cnnray.models.layers import as_image_size, check_norm, make_norm1d
from cnnray.models.registry import register_model


class MLP(nn.Module):
    """flatten -> [Linear -> norm? -> ReLU] per hidden size -> Linear(num_classes)."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        image_size: tuple[int, int],
        norm: str = "none",
        hidden_sizes: Sequence[int] = (512, 256),
    ) -> None:
        super().__init__()
        check_norm(norm)
        if (
            isinstance(hidden_sizes, (str, bytes))
            or not isinstance(hidden_sizes, Sequence)
            or any(not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in hidden_sizes)
        ):
            raise ValueError(f"hidden_sizes must be positive ints, got {hidden_sizes!r}")
        height, width = as_image_size(image_size)
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        features = in_channels * height * width
        for size in hidden_sizes:
            # The norm's shift makes the Linear's bias redundant, as for convs.
            layers.append(nn.Linear(features, size, bias=norm == "none"))
            layer_norm = make_norm1d(norm, size)
            if layer_norm is not None:
                layers.append(layer_norm)
            layers.append(nn.ReLU())
            features = size
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(self.flatten(x)))


@register_model(
    "mlp",
    in_channels=1,
    image_size=(28, 28),
    description="Lecture feedforward network: flatten, ReLU hidden layers (512, 256), linear",
)
def mlp(
    *,
    num_classes: int,
    in_channels: int,
    image_size: tuple[int, int],
    norm: str,
    hidden_sizes: Sequence[int] = (512, 256),  # units per hidden layer, input side first
) -> MLP:
    return MLP(
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        norm=norm,
        hidden_sizes=hidden_sizes,
    )
