"""The convolutions of a model: their output sizes by the lecture's formula beside the measured
ones, their response maps for one image, and the layer Grad-CAM looks at.

Everything here is found generically, by forward hooks during one forward pass, so every
model of the registry (and any plain nn.Module) works without a per-model table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cnnray.models.layers import conv_out


@dataclass(frozen=True)
class ConvShape:
    """One Conv2d: its hyper-parameters, its input and its output for one image.

    `formula_shape` is the lecture's floor((x + 2p - f) / s) + 1 per side ("Strided
    convolution", cnn-lecture-notes.md), with the dilated kernel d * (f - 1) + 1 as f;
    `measured_shape` is what the layer returned. They agree for every nn.Conv2d."""

    name: str  # module path, e.g. "conv2.0" or "features.18"
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]  # per side; "same" is given as the total split in two (rounded down)
    dilation: tuple[int, int]
    input_shape: tuple[int, int, int]  # C x H x W
    formula_shape: tuple[int, int, int]
    measured_shape: tuple[int, int, int]


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Every Conv2d with its module path, in definition order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def formula_side(size: int, conv: nn.Conv2d, axis: int) -> int:
    """Output side of `conv` along `axis` (0: height, 1: width) for an input side `size`:
    floor((x + 2p - f) / s) + 1, the lecture's formula (`cnnray.models.layers.conv_out`),
    with f the dilated kernel d * (f - 1) + 1 and 2p the total padding."""
    f = conv.dilation[axis] * (conv.kernel_size[axis] - 1) + 1
    if isinstance(conv.padding, str):  # "valid": none; "same": PyTorch pads f - 1 in all
        total = 0 if conv.padding == "valid" else f - 1
    else:
        total = 2 * conv.padding[axis]
    # conv_out takes p per side; an odd total ("same" with an even kernel) is passed exactly
    # by folding the odd pixel into the size.
    return conv_out(size + total % 2, f, conv.stride[axis], total // 2)


def _padding(conv: nn.Conv2d) -> tuple[int, int]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        return tuple((d * (k - 1)) // 2 for d, k in zip(conv.dilation, conv.kernel_size))  # type: ignore[return-value]
    return (int(conv.padding[0]), int(conv.padding[1]))


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    first = next(model.parameters(), None)
    if first is None:
        return torch.device("cpu"), torch.float32
    return first.device, first.dtype


@torch.no_grad()
def conv_maps(
    model: nn.Module, x: torch.Tensor, names: Sequence[str] | None = None
) -> list[tuple[ConvShape, torch.Tensor]]:
    """(shape record, C x H x W float32 response map on the CPU) of each Conv2d named in
    `names` (module paths; None: all) for the single image `x` (1 x C x H x W, normalised),
    in the order the layers run, before any norm or activation: the lecture's response maps.

    A layer that runs more than once gives its first call. Runs in eval mode without
    gradients; the model's mode is restored. Raises KeyError naming an unknown layer."""
    convs = dict(conv_layers(model))
    wanted = list(convs) if names is None else list(names)
    for name in wanted:
        if name not in convs:
            raise KeyError(name)
    out: dict[str, tuple[ConvShape, torch.Tensor]] = {}
    order: list[str] = []

    def hook(name: str, conv: nn.Conv2d):
        def fn(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if name in out:
                return
            c, h, w = (int(d) for d in inputs[0].shape[1:])
            shape = ConvShape(
                name=name,
                kernel_size=(int(conv.kernel_size[0]), int(conv.kernel_size[1])),
                stride=(int(conv.stride[0]), int(conv.stride[1])),
                padding=_padding(conv),
                dilation=(int(conv.dilation[0]), int(conv.dilation[1])),
                input_shape=(c, h, w),
                formula_shape=(conv.out_channels, formula_side(h, conv, 0), formula_side(w, conv, 1)),
                measured_shape=tuple(int(d) for d in output.shape[1:]),  # type: ignore[arg-type]
            )
            out[name] = (shape, output.detach()[0].float().cpu().contiguous())
            order.append(name)

        return fn

    handles = [convs[n].register_forward_hook(hook(n, convs[n])) for n in dict.fromkeys(wanted)]
    was_training = model.training
    device, dtype = _device_dtype(model)
    try:
        model.eval()(x.to(device, dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [out[n] for n in order]


def strongest_channels(maps: torch.Tensor, k: int) -> list[int]:
    """Indices of the `k` channels of a C x H x W response map with the most spatial contrast
    (standard deviation over H x W; a flat map says nothing), strongest first. Ties keep the
    lower index, so the choice is the same on every run."""
    spread = maps.flatten(1).std(1, unbiased=False) if maps.shape[1] * maps.shape[2] > 1 else maps.flatten(1)[:, 0].abs()
    order = sorted(range(maps.shape[0]), key=lambda i: (-float(spread[i]), i))
    return order[: max(0, k)]


@dataclass(frozen=True)
class CamLayer:
    """The layer Grad-CAM attributes to: its module path, the module, and its output shape."""

    name: str
    module: nn.Module
    output_shape: tuple[int, int, int]  # C x h x w for one image


@torch.no_grad()
def gradcam_layer(model: nn.Module, input_shape: Sequence[int]) -> CamLayer | None:
    """The last convolutional layer or block of `model`: of the modules that hold a Conv2d (or
    are one) and output a C x h x w map with h * w > 1, the one whose forward pass finishes
    last, found by hooks on every module during one forward pass of a zero image of
    `input_shape` (C x H x W). So ResNet gets its last stage (`layer4`, the residual sum
    included), VGG its last conv (or `features`, when its maps stay larger than 1 x 1), the
    lecture `cnn` its `conv2` block, airbench `block3`, LeNet-5 `c3` (its `c5` is 1 x 1:
    a Grad-CAM of one cell would be a flat map). None for a model without such a layer (the MLP).
    """
    has_conv = {name for name, m in model.named_modules() if any(isinstance(s, nn.Conv2d) for s in m.modules())}
    modules = dict(model.named_modules())
    finished: dict[str, tuple[int, tuple[int, ...]]] = {}
    counter = [0]

    def hook(name: str):
        def fn(module: nn.Module, inputs: object, output: object) -> None:
            counter[0] += 1
            if isinstance(output, torch.Tensor):
                finished[name] = (counter[0], tuple(int(d) for d in output.shape[1:]))

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items() if n and n in has_conv]
    was_training = model.training
    device, dtype = _device_dtype(model)
    try:
        model.eval()(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    spatial = [(order, n, s) for n, (order, s) in finished.items() if len(s) == 3 and s[1] * s[2] > 1]
    if not spatial:
        return None
    _, name, shape = max(spatial)
    return CamLayer(name, modules[name], shape)  # type: ignore[arg-type]
