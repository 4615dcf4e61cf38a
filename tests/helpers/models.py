"""For the model tests (tests/models/): test input sizes, state-dict shapes, one training
step's outputs and gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnray.models import get_model_spec

MAX_TEST_SIDE = 64  # pixels; keeps the 224x224 ImageNet VGGs fast (their head needs >= 32)


def input_size(name: str) -> tuple[int, int]:
    """`name`'s default input side, at most MAX_TEST_SIDE pixels."""
    height, width = get_model_spec(name).image_size
    return (min(height, MAX_TEST_SIDE), min(width, MAX_TEST_SIDE))


def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Each state_dict entry's shape, by key."""
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def values_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One training-mode forward and cross-entropy backward of `x`: the outputs and every
    parameter's gradient."""
    model.train()
    out = model(x)
    F.cross_entropy(out, torch.arange(len(x)) % out.shape[1]).backward()
    return out.detach(), [p.grad for p in model.parameters()]
