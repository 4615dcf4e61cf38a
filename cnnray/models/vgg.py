"""VGG-11/13/16/19 (Simonyan & Zisserman, 2014): one class plus a table of layer configs.

A config lists conv widths (3x3, padding 1, so the size is kept) and "M" for a 2x2
max-pool (halves the size). Two heads:

- CIFAR (`vgg11` ... `vgg19`, 32x32 inputs): flatten 512 * (H/32) * (W/32) -> Linear to
  the classes, no dropout (the common kuangliu/pytorch-cifar variant).
- ImageNet (`vgg11_imagenet` ... `vgg19_imagenet`, 224x224 inputs): flatten 512*7*7 ->
  4096 -> 4096 -> classes with ReLU and dropout, as in the paper. With norm "none",
  vgg19_imagenet is the lecture's VGG19 table: 24 layers, 143,667,240 parameters.

No adaptive pooling before the head: the flatten size follows image_size, so the layer
list stays exactly the paper's (and the lecture's table).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from cnnray.models.layers import as_image_size, conv_norm, flatten_features, kaiming_init_, require_min_size
from cnnray.models.registry import register_model

Layer = int | Literal["M"]  # conv output channels, or "M" for max-pool 2x2

cfgs: dict[str, list[Layer]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [
        64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
        512, 512, 512, "M", 512, 512, 512, "M",
    ],  # fmt: skip
    "vgg19": [
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
    ],  # fmt: skip
}

IMAGENET_HIDDEN = 4096  # units in each of the ImageNet head's two hidden layers


class VGG(nn.Module):
    """`features` (convs and pools from a cfg), flatten, `classifier` (CIFAR or ImageNet)."""

    def __init__(
        self,
        cfg: list[Layer],
        *,
        num_classes: int,
        in_channels: int,
        image_size: tuple[int, int],
        norm: str = "none",
        head: Literal["cifar", "imagenet"] = "cifar",
        dropout: float = 0.5,  # ImageNet head only: drop probability after each hidden fc
    ) -> None:
        super().__init__()
        height, width = as_image_size(image_size)
        num_pools = cfg.count("M")
        require_min_size("VGG", (height, width), 2**num_pools)  # each pool halves the side
        is_number = isinstance(dropout, (int, float)) and not isinstance(dropout, bool)
        if not is_number or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")

        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                # Pool before the block's last ReLU: the same values and gradients (max
                # commutes with the monotone ReLU) on 4x fewer elements. Both are
                # parameter-free, so state_dict keys stay torchvision's.
                pool = nn.MaxPool2d(kernel_size=2, stride=2)
                if layers and isinstance(layers[-1], nn.ReLU):
                    layers.insert(len(layers) - 1, pool)
                else:
                    layers.append(pool)
            else:
                layers += conv_norm(channels, item, 3, padding=1, norm=norm)
                layers.append(nn.ReLU(inplace=True))
                channels = item
        self.features = nn.Sequential(*layers)

        # Pools floor odd sizes, so H // 2**pools is exact: 224 -> 7, 32 -> 1.
        flat = channels * (height // 2**num_pools) * (width // 2**num_pools)
        if head == "cifar":
            self.classifier: nn.Module = nn.Linear(flat, num_classes)
        elif head == "imagenet":
            self.classifier = nn.Sequential(
                nn.Linear(flat, IMAGENET_HIDDEN),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(IMAGENET_HIDDEN, IMAGENET_HIDDEN),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(IMAGENET_HIDDEN, num_classes),
            )
        else:
            raise ValueError(f"unknown VGG head {head!r}; choose one of: cifar, imagenet")
        self._init_weights()

    def _init_weights(self) -> None:
        kaiming_init_(self)
        for module in self.classifier.modules():
            if isinstance(module, nn.Linear):  # torchvision's choice for the VGG head
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = flatten_features(x)
        return self.classifier(x)


# --- the registered variants (timm's way: a table, and a thin constructor per name) --------
# The CIFAR head takes 32x32 inputs and 10 classes; the ImageNet head 224x224 inputs, 1000
# classes, fc 4096 -> 4096 with dropout.
HEADS = {
    "cifar": dict(in_channels=3, image_size=(32, 32)),
    "imagenet": dict(in_channels=3, image_size=(224, 224), num_classes=1000),
}
_IMAGENET_HEAD = "ImageNet head (fc 4096, 4096, dropout)"
# name: (layer table in `cfgs`, head, description)
VARIANTS: dict[str, tuple[str, str, str]] = {
    "vgg11": ("vgg11", "cifar", "VGG-11, CIFAR head"),
    "vgg13": ("vgg13", "cifar", "VGG-13, CIFAR head"),
    "vgg16": ("vgg16", "cifar", "VGG-16, CIFAR head"),
    "vgg19": ("vgg19", "cifar", "VGG-19, CIFAR head"),
    "vgg11_imagenet": ("vgg11", "imagenet", f"VGG-11, {_IMAGENET_HEAD}"),
    "vgg13_imagenet": ("vgg13", "imagenet", f"VGG-13, {_IMAGENET_HEAD}"),
    "vgg16_imagenet": ("vgg16", "imagenet", f"VGG-16, {_IMAGENET_HEAD}"),
    "vgg19_imagenet": ("vgg19", "imagenet", "VGG-19, ImageNet head; the lecture's VGG19 table (143,667,240 params)"),
}


def _cifar_constructor(depth: str):  # noqa: ANN202
    def build(*, num_classes: int, in_channels: int, image_size: tuple[int, int], norm: str) -> VGG:
        return VGG(cfgs[depth], num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                   norm=norm, head="cifar")

    return build


def _imagenet_constructor(depth: str):  # noqa: ANN202
    def build(
        *,
        num_classes: int,
        in_channels: int,
        image_size: tuple[int, int],
        norm: str,
        dropout: float = 0.5,  # drop probability after each hidden fc
    ) -> VGG:
        return VGG(cfgs[depth], num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                   norm=norm, head="imagenet", dropout=dropout)

    return build


_CONSTRUCTORS = {"cifar": _cifar_constructor, "imagenet": _imagenet_constructor}


def _register(name: str):  # noqa: ANN202
    """Register VARIANTS[name]'s constructor under `name` (its keyword arguments are what
    `resolve_model_args` accepts for it)."""
    depth, head, description = VARIANTS[name]
    build = _CONSTRUCTORS[head](depth)
    build.__name__ = build.__qualname__ = name
    return register_model(name, **HEADS[head], description=description)(build)


vgg11, vgg13, vgg16, vgg19 = (_register(n) for n in ("vgg11", "vgg13", "vgg16", "vgg19"))
vgg11_imagenet, vgg13_imagenet, vgg16_imagenet, vgg19_imagenet = (
    _register(n) for n in ("vgg11_imagenet", "vgg13_imagenet", "vgg16_imagenet", "vgg19_imagenet")
)
