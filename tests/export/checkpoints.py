"""Checkpoints of untrained registry models, for the export and runtime tests."""

from __future__ import annotations

from pathlib import Path

import torch

from cnnray.models import get_model_spec

MAX_TEST_SIDE = 64  # pixels: the 224x224 ImageNet VGGs export at 64x64 (their head needs >= 32)


def shape_of(name: str) -> tuple[int, int, int]:
    spec = get_model_spec(name)
    h, w = (min(s, MAX_TEST_SIDE) for s in spec.image_size)
    return spec.in_channels, h, w


def save_untrained(directory: Path, name: str, tta: str = "none", seed: int = 0) -> Path:
    """A cnnray checkpoint of `name` with seeded random weights, and pixels of its test shape."""
    from cnnray.checkpoint import save_checkpoint
    from cnnray.models import build_model, resolve_model_args

    c, h, w = shape_of(name)
    spec = get_model_spec(name)
    args = resolve_model_args(name, in_channels=c, image_size=(h, w))
    torch.manual_seed(seed)
    model = build_model(name, **args)
    info = {"dataset": "synthetic", "input_shape": [c, h, w], "mean": [0.45] * c, "std": [0.25] * c,
            "classes": [f"class-{i}" for i in range(spec.num_classes)]}
    return save_checkpoint(directory, model_name=name, model_args=args, state_dict=model.state_dict(),
                           data_info=info, epoch=1, config={"seed": seed}, metrics={}, tta=tta)


def random_pixels(shape: tuple[int, int, int], n: int = 16, seed: int = 0) -> torch.Tensor:
    """n uint8 images of `shape`, uniform in 0..255."""
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
