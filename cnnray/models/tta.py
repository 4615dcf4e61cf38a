"""Inference: one implementation for validation, the test report and Serve of the model's
memory layout (`inference_layout`) and of test-time augmentation (TTA).

A checkpoint records the TTA its metrics were measured with (meta.json "tta"); every
reader of the checkpoint predicts with `tta_logits(model, x, tta)`, so a served
prediction equals the offline test evaluation's.

Modes (Jordan 2024, arXiv 2404.00498, section 3.6):
- "none": the logits of the image.
- "flip": the mean of the logits of the image and of its mirror image (2 forward passes).
- "flip_translate": the paper's level 2: 0.5 * flip(x) + 0.25 * flip(x shifted one pixel
  up-left) + 0.25 * flip(x shifted one pixel down-right), shifts with reflected borders
  (6 forward passes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TTA_MODES: tuple[str, ...] = ("none", "flip", "flip_translate")


def inference_layout(model: nn.Module, device: torch.device | str) -> nn.Module:
    """`model` (in place) in the memory layout every evaluation and Serve run it in:
    channels-last on CPUs, where oneDNN's fp32 convolutions are 1.1-4x faster with NHWC
    weights than NCHW (measured on the 2-core AMX CI machine, 2 threads, per image: the
    lecture cnn 22 against 93 us at batch 32, airbench 606 against 934, resnet18 2.8 against
    3.0 ms; NCHW inputs are converted by the first conv); NCHW on GPUs. Returns `model`.
    Evaluation, the report and Serve all use it, so their fp32 numbers stay equal."""
    cpu = torch.device(device).type == "cpu"
    # Only 4-D weights change layout; a tensor already in it is kept as it is.
    return model.to(memory_format=torch.channels_last if cpu else torch.contiguous_format)


def check_tta(tta: str) -> str:
    """Return `tta` if it is one of TTA_MODES, else raise a ValueError listing them."""
    if tta not in TTA_MODES:
        raise ValueError(f"unknown tta {tta!r}; choose one of: {', '.join(TTA_MODES)}")
    return tta


def _flip_mean(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # One forward pass over the image and its mirror together: one batch of 2N, not two of N.
    both = model(torch.cat([x, x.flip(-1)])).float()
    n = x.shape[0]  # not len(x): a Python int, which torch.export would fix the batch size to
    return 0.5 * (both[:n] + both[n:])


def tta_logits(model: nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """N x C x H x W normalised inputs -> N x K float32 logits averaged over the TTA views.

    The model's mode (eval/train) and grad state are the caller's. Raises ValueError for
    an unknown mode; "flip_translate" needs H, W >= 2 (reflect padding by one pixel).
    """
    check_tta(tta)
    if tta == "none":
        return model(x).float()
    logits = _flip_mean(model, x)
    if tta == "flip_translate":
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        h, w = x.shape[-2:]
        up_left = padded[..., 0:h, 0:w]  # content moves one pixel down-right
        down_right = padded[..., 2 : h + 2, 2 : w + 2]  # content moves one pixel up-left
        shifted = 0.5 * (_flip_mean(model, up_left) + _flip_mean(model, down_right))
        logits = 0.5 * logits + 0.5 * shifted
    return logits
