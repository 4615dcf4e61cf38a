"""cnnray.explain over the model registry: the shape of every map, the lecture's output-size
formula against every conv's measured output, determinism, the cost bound, option checks,
and the sanity check that cannot be faked (a pattern pasted into a larger blank canvas: most
of the occlusion and Grad-CAM mass lies on it)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cnnray.explain import (
    MAX_CHANNELS,
    OCCLUSION_STEPS,
    ExplainError,
    Explainer,
    conv_layers,
    conv_maps,
    occlusion_plan,
)
from cnnray.explain import attribution
from cnnray.models import build_model, get_model_spec, list_models


def small(name: str) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    """`name` with its default input, the ImageNet VGGs at 32 x 32 with 10 classes (the same
    layers, a head of 512 inputs instead of 25,088: seconds, not minutes, on a CPU)."""
    spec = get_model_spec(name)
    kw = {"image_size": (32, 32), "num_classes": 10} if name.endswith("_imagenet") else {"num_classes": 10}
    torch.manual_seed(0)
    model = build_model(name, **kw).eval()
    return model, (spec.in_channels, *kw.get("image_size", spec.image_size))


def image(shape: tuple[int, int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return ((pixels.float() / 255 - 0.5) / 0.25)[None], pixels


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        return img.height, img.width


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine two threads per test only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def few_windows(monkeypatch):
    """Occlusion with 2 x 2 windows of half the side: the registry-wide tests check shapes,
    not the bound (tested below with the real settings)."""
    monkeypatch.setattr(attribution, "OCCLUSION_STEPS", 2)
    monkeypatch.setattr(attribution, "OCCLUSION_WINDOW_SHARE", 0.5)


@pytest.mark.parametrize("name", list_models())
def test_formula_gives_every_conv_its_measured_output_shape(name, one_thread):
    model, shape = small(name)
    x, _ = image(shape)
    maps = conv_maps(model, x)
    assert [s.name for s, _ in maps] == [n for n, _ in conv_layers(model)]
    for s, m in maps:
        assert s.formula_shape == s.measured_shape == tuple(m.shape), s
        # The lecture's floor((x + 2p - f) / s) + 1, written out here once more.
        (fh, fw), (sh, sw), (ph, pw), (dh, dw) = s.kernel_size, s.stride, s.padding, s.dilation
        _, h, w = s.input_shape
        assert s.measured_shape[1:] == ((h + 2 * ph - (dh * (fh - 1) + 1)) // sh + 1,
                                        (w + 2 * pw - (dw * (fw - 1) + 1)) // sw + 1)
    assert not any(m._forward_hooks for _, m in conv_layers(model))  # hooks removed


def test_formula_covers_strides_dilations_and_same_padding():
    from cnnray.explain.layers import formula_side

    for conv in (torch.nn.Conv2d(1, 2, 3, stride=2, padding=1), torch.nn.Conv2d(1, 2, (5, 3), stride=(3, 1), dilation=2),
                 torch.nn.Conv2d(1, 2, 4, padding="same"), torch.nn.Conv2d(1, 2, (2, 7), padding="valid", stride=(1, 4))):
        for side in (17, 30):
            out = conv(torch.zeros(1, 1, side, side))
            assert (formula_side(side, conv, 0), formula_side(side, conv, 1)) == tuple(out.shape[2:])


@pytest.mark.parametrize("name", list_models())
def test_every_map_has_its_size_and_is_the_same_on_a_second_run(name, few_windows, one_thread):
    model, shape = small(name)
    x, pixels = image(shape)
    runs = []
    for _ in range(2):  # a fresh Explainer each time: nothing carried over between runs
        ex = Explainer(model, shape, 10)
        runs.append(ex.explain(x, pixels, ex.options(layers="all", channels=3)))
    result, again = runs
    assert [h.method for h in result.heatmaps] == (["occlusion"] if name == "mlp" else ["occlusion", "gradcam"])
    assert ex.methods == tuple(h.method for h in result.heatmaps)
    for h in result.heatmaps:
        assert tuple(h.values.shape) == shape[1:] and torch.isfinite(h.values).all()
        oh, ow = png_size(h.overlay_png)
        assert oh % shape[1] == 0 and ow % shape[2] == 0 and oh // shape[1] == ow // shape[2] and oh >= 112
    if ex.cam is not None:
        cam = result.heatmaps[1]
        assert cam.details["layer"] == ex.cam.name and (cam.values >= 0).all()  # ReLU'd (Selvaraju eq. 2)
        assert list(np.shape(cam.details["layer_map"])) == list(ex.cam.output_shape[1:])
    assert len(result.layers) == len(conv_layers(model))
    for layer in result.layers:
        c, h, w = layer.shape.measured_shape
        assert len(layer.channels) == len(layer.pngs) == min(3, c) and len(set(layer.channels)) == len(layer.channels)
        assert all(png_size(p) == (h, w) for p in layer.pngs)
    doc = result.to_json()
    assert set(doc["explanations"]) == set(ex.methods)
    for method, body in doc["explanations"].items():
        assert np.shape(body["attribution"]) == shape[1:] and body["shape"] == list(shape[1:])
    # Deterministic: the same numbers and the same PNG bytes.
    assert result.target == again.target
    for ha, hb in zip(result.heatmaps, again.heatmaps, strict=True):
        assert torch.equal(ha.values, hb.values) and ha.overlay_png == hb.overlay_png
    for la, lb in zip(result.layers, again.layers, strict=True):
        assert la.channels == lb.channels and la.pngs == lb.pngs


@pytest.mark.parametrize("side", [1, 2, 5, 16, 28, 32, 57, 224, 1024])
def test_occlusion_windows_are_bounded_and_counted_as_captum_counts(side):
    plan = occlusion_plan(side, 28)
    assert plan.windows <= OCCLUSION_STEPS**2 and plan.steps[0] <= OCCLUSION_STEPS
    assert plan.stride[0] <= plan.window[0] <= side
    # Captum's own count: the forward passes it makes (perturbed images, plus the original).
    seen = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return x.flatten(1).sum(1, keepdim=True)

    from captum.attr import Occlusion

    Occlusion(forward).attribute(torch.ones(1, 1, side, 28), sliding_window_shapes=(1, *plan.window),
                                 strides=(1, *plan.stride), target=0, perturbations_per_eval=1)
    assert sum(seen) == plan.windows + 1


def test_bad_options_name_the_valid_choices():
    model, shape = small("cnn")
    ex = Explainer(model, shape, 10)
    cases = [
        (dict(methods="shap"), "unknown method 'shap'; choose from: occlusion, gradcam"),
        (dict(layers="conv1.0,conv9"), "unknown layer 'conv9'; this model's conv layers: conv1.0, conv2.0"),
        (dict(layers=",".join(["conv1.0"] * 65)), "65 layers named, at most 64"),
        (dict(channels=MAX_CHANNELS + 1), f"give 1 to {MAX_CHANNELS}"),
        (dict(channels="many"), "must be a whole number"),
        (dict(target=10), "class indices run from 0 to 9"),
        (dict(methods="", layers=""), "nothing to explain"),
    ]
    for kw, message in cases:
        with pytest.raises(ExplainError) as e:
            ex.options(**kw)
        assert message in str(e.value), (kw, str(e.value))
    mlp, mshape = small("mlp")
    with pytest.raises(ExplainError, match="no convolutional layer for gradcam; its methods: occlusion"):
        Explainer(mlp, mshape, 10).options(methods="gradcam")
    assert ex.options(layers="all").layers == ("conv1.0", "conv2.0")
    assert ex.options(layers="conv2.0,conv2.0").layers == ("conv2.0",)


# --- the sanity check: a pattern pasted into a larger blank canvas -------------------------------
GLYPH = 12  # pixels
CANVAS = 36


def glyphs() -> torch.Tensor:
    """Three 12 x 12 patterns (uint8 0/255): a ring, a plus, an X."""
    g = torch.zeros(3, GLYPH, GLYPH)
    g[0, 1:-1, 1:3] = g[0, 1:-1, -3:-1] = g[0, 1:3, 1:-1] = g[0, -3:-1, 1:-1] = 1
    g[1, :, GLYPH // 2 - 1 : GLYPH // 2 + 1] = g[1, GLYPH // 2 - 1 : GLYPH // 2 + 1, :] = 1
    i = torch.arange(GLYPH)
    g[2, i, i] = g[2, i, GLYPH - 1 - i] = g[2, i[:-1], i[1:]] = g[2, i[:-1], GLYPH - 2 - i[:-1]] = 1
    return (g * 255).to(torch.uint8)


def pasted(patterns: torch.Tensor, n: int, canvas: int, gen: torch.Generator, blanks: bool):
    """n canvases (uint8 N x 1 x S x S) each holding one pattern at a random place (or, with
    `blanks`, class len(patterns): nothing), their classes and the patterns' top-left corners."""
    k, gh, gw = patterns.shape
    y = torch.randint(0, k + int(blanks), (n,), generator=gen)
    corner = torch.stack([torch.randint(0, canvas - gh + 1, (n,), generator=gen),
                          torch.randint(0, canvas - gw + 1, (n,), generator=gen)], 1)
    x = torch.zeros(n, 1, canvas, canvas, dtype=torch.uint8)
    for j in range(n):
        if y[j] < k:
            r, c = corner[j].tolist()
            x[j, 0, r : r + gh, c : c + gw] = patterns[y[j]]
    return x, y, corner


def on_pattern(heat: torch.Tensor, corner: tuple[int, int], size: tuple[int, int], margin: int = 0) -> float:
    """Share of the positive mass of `heat` inside the pattern's box (grown by `margin` pixels)."""
    v = heat.clamp(min=0)
    r, c = corner
    inside = v[max(0, r - margin) : r + size[0] + margin, max(0, c - margin) : c + size[1] + margin].sum()
    return float(inside / v.sum()) if float(v.sum()) > 0 else 0.0


def normalise(pixels: torch.Tensor, mean: float = 0.1307, std: float = 0.3081) -> torch.Tensor:
    return (pixels.float() / 255 - mean) / std


def check_mass_on_pattern(model, patterns, canvas, gen, trials: int, blanks: bool) -> dict[str, float]:
    """Mean share of occlusion and Grad-CAM mass on the pattern over `trials` canvases the
    model classifies right. Grad-CAM is counted on its own grid: the box grown by one cell of
    its layer (input side / map side pixels, 4 for the cnn), since that is its resolution."""
    k = patterns.shape[0]
    ex = Explainer(model, (1, canvas, canvas), k + int(blanks))
    x, y, corner = pasted(patterns, trials * 3, canvas, gen, blanks=False)
    cell = -(-canvas // ex.cam.output_shape[1])
    shares: dict[str, list[float]] = {"occlusion": [], "gradcam": []}
    with torch.no_grad():
        right = (model(normalise(x)).argmax(1) == y).nonzero().flatten()[:trials].tolist()
    assert len(right) == trials
    for j in right:
        result = ex.explain(normalise(x[j : j + 1]), x[j], ex.options(target=int(y[j])))
        for h in result.heatmaps:
            margin = cell if h.method == "gradcam" else 0
            shares[h.method].append(on_pattern(h.values, tuple(corner[j].tolist()), patterns.shape[1:], margin))
    return {m: float(np.mean(s)) for m, s in shares.items()}


def test_most_explanation_mass_lies_on_the_pattern(one_thread):
    """A tiny `cnn` trained here on 36 x 36 canvases, each blank or holding one of three 12 x 12
    patterns at a random place; one-vs-rest (sigmoid) loss with blank canvases as all-negative,
    so each class's score must be raised by its own pattern (with softmax, one class can be
    learned as 'none of the others', and its evidence then lies everywhere but the pattern).
    The box is 11% of the canvas: chance would put 11% of the mass there."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    patterns = glyphs()
    model = build_model("cnn", image_size=(CANVAS, CANVAS), num_classes=3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        x, y, _ = pasted(patterns, 32, CANVAS, gen, blanks=True)
        target = torch.nn.functional.one_hot(y, 4)[:, :3].float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(normalise(x)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    shares = check_mass_on_pattern(model, patterns, CANVAS, gen, trials=9, blanks=False)
    assert shares["occlusion"] > 0.6, shares
    assert shares["gradcam"] > 0.5, shares


@pytest.mark.slow
def test_most_explanation_mass_lies_on_a_real_mnist_digit(mnist_dir, data_cache, one_thread):
    """The lecture `cnn` trained on real MNIST digits, each pasted at a random place of a blank
    56 x 56 canvas (softmax over the 10 digits, as cnnray trains); then digits of the test set
    at new random places: most occlusion and Grad-CAM mass lies on the digit's 28 x 28 box
    (a quarter of the canvas)."""
    from cnnray.data import load_dataset

    ds = load_dataset("mnist", mnist_dir)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    canvas = 56
    model = build_model("cnn", image_size=(canvas, canvas), num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    train_x, train_y = ds.train_images[:20000], ds.train_labels[:20000]
    for _ in range(300):
        idx = torch.randint(0, len(train_x), (64,), generator=gen)
        x = torch.zeros(64, 1, canvas, canvas, dtype=torch.uint8)
        corner = torch.randint(0, canvas - 28 + 1, (64, 2), generator=gen)
        for j in range(64):
            r, c = corner[j].tolist()
            x[j, 0, r : r + 28, c : c + 28] = train_x[idx[j], 0]
        loss = torch.nn.functional.cross_entropy(model(normalise(x)), train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ex = Explainer(model, (1, canvas, canvas), 10)
    cell = -(-canvas // ex.cam.output_shape[1])
    shares: dict[str, list[float]] = {"occlusion": [], "gradcam": []}
    tried = 0
    for i in range(100):
        if len(shares["occlusion"]) == 8:
            break
        r, c = torch.randint(0, canvas - 28 + 1, (2,), generator=gen).tolist()
        x = torch.zeros(1, 1, canvas, canvas, dtype=torch.uint8)
        x[0, 0, r : r + 28, c : c + 28] = ds.test_images[i, 0]
        with torch.no_grad():
            if int(model(normalise(x)).argmax()) != int(ds.test_labels[i]):
                continue
        tried += 1
        result = ex.explain(normalise(x), x[0], ex.options(target=int(ds.test_labels[i])))
        for h in result.heatmaps:
            shares[h.method].append(on_pattern(h.values, (r, c), (28, 28), cell if h.method == "gradcam" else 0))
    means = {m: float(np.mean(s)) for m, s in shares.items()}
    assert tried == 8 and means["occlusion"] > 0.6 and means["gradcam"] > 0.5, means
