"""One model made ready to explain its answers, and the explanation of one image.

    from cnnray.explain import Explainer
    ex = Explainer(model, input_shape=(1, 28, 28))
    opts = ex.options(methods="occlusion,gradcam", layers="all", channels=4)   # ExplainError if bad
    result = ex.explain(x, pixels, opts)         # x: 1 x C x H x W normalised; pixels: uint8 C x H x W
    result.to_json()                             # maps as numbers and base64 PNGs

The cost of one explanation is fixed by the model and the options alone (never by the
image): at most OCCLUSION_STEPS**2 + 1 forward passes for occlusion, one forward and one
backward pass for Grad-CAM, one forward pass for the response maps of at most every conv
layer, and at most MAX_CHANNELS PNGs per layer. Deterministic for the same image: the model
runs in eval mode (no dropout, batch norm's running statistics), and nothing is sampled.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnray.explain.attribution import OcclusionPlan, gradcam, occlusion
from cnnray.explain.layers import ConvShape, conv_layers, conv_maps, gradcam_layer, strongest_channels
from cnnray.explain.render import map_png, overlay_png

METHODS = ("occlusion", "gradcam")
DEFAULT_CHANNELS = 4  # response maps per layer, the strongest first
MAX_CHANNELS = 8  # the cap on channels per layer: 8 x (up to 20 layers) small PNGs per answer
MAX_LAYER_NAMES = 64  # names in one `layers` list; more is refused before any is looked up
MAX_NAME_CHARS = 200  # a layer or method name longer than this is quoted cut short in errors


class ExplainError(ValueError):
    """Options this model cannot explain with (an unknown method or layer, a bad count);
    the message says why and lists the valid choices."""


@dataclass(frozen=True)
class ExplainOptions:
    methods: tuple[str, ...]  # a subset of METHODS
    layers: tuple[str, ...]  # conv layer names whose response maps are wanted (maybe none)
    channels: int  # response maps per layer
    target: int | None  # class to explain; None: the predicted one


@dataclass
class Heatmap:
    method: str
    values: torch.Tensor  # H x W float32 at the input's size
    overlay_png: bytes
    details: dict[str, Any] = field(default_factory=dict)  # window and stride, or the layer


@dataclass
class LayerMaps:
    shape: ConvShape
    channels: list[int]  # the strongest channels, strongest first
    pngs: list[bytes]  # one per channel, at the map's size


@dataclass
class Explanation:
    target: int
    heatmaps: list[Heatmap]
    layers: list[LayerMaps]

    def to_json(self, decimals: int = 6) -> dict[str, Any]:
        """Plain JSON: each heat map as an H x W array (rounded to `decimals`) and a base64 PNG
        overlay; each layer's shapes (the lecture's formula beside the measured one) and its
        channels' PNGs."""
        return {
            "target": self.target,
            "explanations": {
                h.method: {
                    **h.details,
                    "shape": list(h.values.shape),
                    "min": float(h.values.min()),
                    "max": float(h.values.max()),
                    "attribution": np.round(h.values.numpy().astype(np.float64), decimals).tolist(),
                    "overlay_png": _b64(h.overlay_png),
                }
                for h in self.heatmaps
            },
            "feature_maps": [
                {
                    "layer": m.shape.name,
                    "kernel_size": list(m.shape.kernel_size),
                    "stride": list(m.shape.stride),
                    "padding": list(m.shape.padding),
                    "dilation": list(m.shape.dilation),
                    "input_shape": list(m.shape.input_shape),
                    "formula_shape": list(m.shape.formula_shape),
                    "measured_shape": list(m.shape.measured_shape),
                    "channels": [{"index": c, "png": _b64(p)} for c, p in zip(m.channels, m.pngs)],
                }
                for m in self.layers
            ],
        }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _names(value: str | list[str] | tuple[str, ...] | None) -> list[str] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(v).strip() for v in items if str(v).strip()]


def _quote(name: str) -> str:
    return repr(name[:MAX_NAME_CHARS] + ("..." if len(name) > MAX_NAME_CHARS else ""))


class Explainer:
    """`model` (eval mode, on its device) with its conv layers and its Grad-CAM layer found once
    for inputs of `input_shape` (C x H x W). Not thread-safe: hooks are added to the model
    while it explains, so give each thread (and never the batched predict path) its own model."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], num_classes: int) -> None:
        self.model = model.eval()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.conv_names = [name for name, _ in conv_layers(model)]
        self.cam = gradcam_layer(model, self.input_shape)

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods this model supports: occlusion always, Grad-CAM with a conv layer."""
        return METHODS if self.cam is not None else ("occlusion",)

    def options(
        self,
        methods: str | list[str] | None = None,
        layers: str | list[str] | None = None,
        channels: int | str | None = None,
        target: int | str | None = None,
    ) -> ExplainOptions:
        """Checked options. `methods`: names (a list or comma-separated); None: every method
        the model supports. `layers`: "all", conv layer names, or None/"" for none. Raises
        ExplainError naming the valid choices."""
        asked = _names(methods)
        if asked is None:
            chosen = self.methods
        else:
            if len(asked) > len(METHODS) * 4:
                raise ExplainError(f"{len(asked)} methods named; choose from: {', '.join(METHODS)}")
            bad = [m for m in asked if m not in METHODS]
            if bad:
                raise ExplainError(f"unknown method {_quote(bad[0])}; choose from: {', '.join(METHODS)}")
            missing = [m for m in asked if m not in self.methods]
            if missing:
                raise ExplainError(f"this model has no convolutional layer for {missing[0]}; "
                                   f"its methods: {', '.join(self.methods)}")
            chosen = tuple(dict.fromkeys(asked))
        names = _names(layers) or []
        if names == ["all"]:
            names = list(self.conv_names)
        elif names:
            if len(names) > MAX_LAYER_NAMES:
                raise ExplainError(f"{len(names)} layers named, at most {MAX_LAYER_NAMES}: "
                                   "use layers=all for every conv layer")
            unknown = [n for n in names if n not in self.conv_names]
            if unknown:
                valid = ", ".join(self.conv_names) if self.conv_names else "none (the model has no conv layer)"
                raise ExplainError(f"unknown layer {_quote(unknown[0])}; this model's conv layers: {valid}")
        k = DEFAULT_CHANNELS if channels in (None, "") else _int(channels, "channels")
        if not 1 <= k <= MAX_CHANNELS:
            raise ExplainError(f"channels={k}: give 1 to {MAX_CHANNELS} response maps per layer")
        t = None if target in (None, "") else _int(target, "target")
        if t is not None and not 0 <= t < self.num_classes:
            raise ExplainError(f"target={t}: class indices run from 0 to {self.num_classes - 1}")
        if not chosen and not names:
            raise ExplainError("nothing to explain: name a method or some layers")
        return ExplainOptions(tuple(chosen), tuple(dict.fromkeys(names)), k, t)

    def explain(
        self, x: torch.Tensor, pixels: torch.Tensor, opts: ExplainOptions, probabilities: torch.Tensor | None = None
    ) -> Explanation:
        """Explain one image: `x` 1 x C x H x W normalised (any device: moved to the model's),
        `pixels` uint8 C x H x W as the model saw them (for the overlays). The class explained
        is opts.target, else the most probable in `probabilities` (K values, e.g. the served
        prediction with its test-time augmentation), else the model's own argmax."""
        first = next(self.model.parameters(), None)
        if first is not None:
            x = x.to(first.device, first.dtype)
        if opts.target is not None:
            target = opts.target
        elif probabilities is not None:
            target = int(torch.as_tensor(probabilities).argmax())
        else:
            with torch.no_grad():
                target = int(self.model(x).argmax(1)[0])
        heatmaps = []
        if "occlusion" in opts.methods:
            values, plan = occlusion(self.model, x, target)
            heatmaps.append(Heatmap("occlusion", values, overlay_png(pixels, values), _plan_json(plan)))
        if "gradcam" in opts.methods and self.cam is not None:
            values, small = gradcam(self.model, x, target, self.cam)
            details = {"layer": self.cam.name, "layer_shape": list(self.cam.output_shape),
                       "layer_map": np.round(small.numpy().astype(np.float64), 6).tolist()}
            heatmaps.append(Heatmap("gradcam", values, overlay_png(pixels, values), details))
        layers = []
        if opts.layers:
            for shape, maps in conv_maps(self.model, x, opts.layers):
                chosen = strongest_channels(maps, opts.channels)
                layers.append(LayerMaps(shape, chosen, [map_png(maps[c]) for c in chosen]))
        return Explanation(target, heatmaps, layers)


def _plan_json(plan: OcclusionPlan) -> dict[str, Any]:
    return {"window": list(plan.window), "stride": list(plan.stride), "windows": plan.windows}


def _int(value: int | str, what: str) -> int:
    if isinstance(value, bool):
        raise ExplainError(f"{what} must be a whole number")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if not (text.lstrip("-").isdigit() and len(text) <= 12):
        raise ExplainError(f"{what}={text[:40]!r} must be a whole number")
    return int(text)
