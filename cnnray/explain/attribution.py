"""Heat maps at the input's size: occlusion and Grad-CAM, computed with Captum.

- Occlusion (Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks",
  section 4.2): slide a square of the dataset's mean colour (0 after normalisation) over
  the image and record how much the class's probability drops; `captum.attr.Occlusion`.
  Model-agnostic: works for the MLP too.
- Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
  Gradient-based Localization", eq. 1-2): weight each channel of the last conv layer's
  output by the mean gradient of the class's score (the logit) over that map, sum over
  channels, ReLU; `captum.attr.LayerGradCam`, upsampled bilinearly to the input's size
  with `LayerAttribution.interpolate`.

Captum is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cnnray.explain.layers import CamLayer

# Occlusion's cost bound: at most OCCLUSION_STEPS window positions per side, so at most
# OCCLUSION_STEPS**2 = 144 perturbed forward passes (plus one) per image, whatever its size.
OCCLUSION_STEPS = 12
# The window's side, as a share of the image's shorter side: 5 pixels of a 28 x 28 digit
# (about a stroke's width and a half), 6 of a 32 x 32 CIFAR image, 38 of 224.
OCCLUSION_WINDOW_SHARE = 1 / 6
# Perturbed images per forward pass: bounds the memory (32 inputs' activations at once).
OCCLUSION_BATCH = 32


@dataclass(frozen=True)
class OcclusionPlan:
    window: tuple[int, int]  # pixels (H, W)
    stride: tuple[int, int]
    steps: tuple[int, int]  # window positions per side

    @property
    def windows(self) -> int:
        return self.steps[0] * self.steps[1]


def _side_plan(side: int) -> tuple[int, int, int]:
    window = min(side, max(1, math.ceil(side * OCCLUSION_WINDOW_SHARE)))
    stride = max(1, math.ceil((side - window) / (OCCLUSION_STEPS - 1)))
    stride = min(stride, window)  # Captum refuses a stride over the window (gaps no window covers)
    steps = math.ceil((side - window) / stride) + 1  # Captum's count (occlusion.py, shift_counts)
    return window, stride, steps


def occlusion_plan(height: int, width: int) -> OcclusionPlan:
    """Window, stride and window positions for an H x W input: at most OCCLUSION_STEPS per
    side (a stride of ceil((side - window) / (OCCLUSION_STEPS - 1)) pixels; windows overlap)."""
    (wh, sh, nh), (ww, sw, nw) = _side_plan(int(height)), _side_plan(int(width))
    return OcclusionPlan((wh, ww), (sh, sw), (nh, nw))


def occlusion(model: nn.Module, x: torch.Tensor, target: int) -> tuple[torch.Tensor, OcclusionPlan]:
    """H x W occlusion map (float32, CPU) of class `target` for one normalised image x
    (1 x C x H x W, on the model's device): per pixel, the mean drop in the class's softmax
    probability over the windows covering it (positive: the pixels speak for the class;
    negative: against). All channels are occluded together. Cost: plan.windows + 1 forward
    passes in batches of OCCLUSION_BATCH."""
    from captum.attr import Occlusion

    _, c, h, w = x.shape
    plan = occlusion_plan(h, w)

    def probability(inputs: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(inputs).float(), dim=1)

    with torch.no_grad():
        attr = Occlusion(probability).attribute(
            x, sliding_window_shapes=(c, *plan.window), strides=(c, *plan.stride), target=int(target),
            baselines=0.0, perturbations_per_eval=OCCLUSION_BATCH,
        )
    # Every channel of a pixel gets the same value (the window spans all channels).
    return attr[0, 0].detach().float().cpu(), plan


def gradcam(model: nn.Module, x: torch.Tensor, target: int, layer: CamLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(H x W Grad-CAM map at the input's size, h x w map at the layer's size), float32 on the
    CPU, of class `target` for one normalised image x (1 x C x H x W on the model's device):
    ReLU(sum_k alpha_k A^k), alpha_k the mean over the map of d(logit)/dA^k (Selvaraju et al.
    2017, eq. 1-2), upsampled bilinearly. One forward and one backward pass."""
    from captum.attr import LayerAttribution, LayerGradCam

    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            small = LayerGradCam(model, layer.module).attribute(x, target=int(target), relu_attributions=True)
    finally:
        model.train(was_training)
    small = small.detach().float()
    big = LayerAttribution.interpolate(small, tuple(x.shape[2:]), interpolate_mode="bilinear")
    return big[0, 0].cpu(), small[0, 0].cpu()
