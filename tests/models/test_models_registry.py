"""The model registry (unknown names and arguments, sizes, the catalog) and the layers the
models share (norms, the conv bias under batch norm)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cnnray.models import (UnknownModelError, build_model, get_model_spec, list_models, make_norm, model_catalog,
                           register_model, resolve_model_args)


# --- registry behaviour ---------------------------------------------------------------


def test_unknown_model_lists_the_choices() -> None:
    import re

    from cnnray.models.registry import list_models

    every = ", ".join(list_models())  # the registry's own list, whatever models it holds
    assert "cnn" in list_models()
    with pytest.raises(UnknownModelError, match=re.escape(f"unknown model 'foo'; choose one of: {every}")):
        build_model("foo")
    with pytest.raises(ValueError, match="lenet5"):  # UnknownModelError is a ValueError
        resolve_model_args("foo")


def test_bad_norm_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown norm 'bn'; choose one of: none, batch, "):
        build_model("cnn", norm="bn")


def test_none_kwargs_are_dropped() -> None:
    args = resolve_model_args(
        "cnn", num_classes=None, in_channels=None, image_size=None, norm=None
    )
    assert args == {"num_classes": 10, "in_channels": 1, "image_size": [28, 28], "norm": "none"}


def test_resolved_args_include_model_specific_defaults() -> None:
    assert resolve_model_args("mlp", image_size=32)["hidden_sizes"] == [512, 256]
    assert resolve_model_args("mlp", image_size=32)["image_size"] == [32, 32]  # int: square
    assert resolve_model_args("vgg19_imagenet")["dropout"] == 0.5
    args = resolve_model_args("mlp", hidden_sizes=(64,), norm="layer", num_classes=3)
    assert args["hidden_sizes"] == [64]
    out = build_model("mlp", **args)(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 3)


def test_unknown_kwarg_raises() -> None:
    with pytest.raises(TypeError, match="hidden_sizes"):
        resolve_model_args("cnn", hidden_sizes=[64])
    with pytest.raises(ValueError, match="unknown argument"):  # also a ValueError
        build_model("vgg11", dropout=0.1)  # only the ImageNet head has dropout


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 0},
        {"in_channels": -1},
        {"num_classes": True},
        {"image_size": (32,)},
        {"image_size": "32"},
        {"image_size": (32, 0)},
        {"image_size": 32.0},
    ],
)
def test_bad_common_values_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        resolve_model_args("tutorial_cnn", **kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("mlp", {"hidden_sizes": [64, 0]}),
        ("mlp", {"hidden_sizes": 64}),
        ("vgg16_imagenet", {"dropout": 1.0}),
    ],
)
def test_bad_model_specific_values_raise(name: str, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        resolve_model_args(name, **kwargs)


@pytest.mark.parametrize(
    ("name", "min_side"),
    [
        ("cnn", 4),
        ("tutorial_cnn", 16),
        ("lenet5", 28),
        ("vgg11", 32),
        ("vgg19", 32),
        ("vgg19_imagenet", 32),
    ],
)
def test_too_small_image_size_raises(name: str, min_side: int) -> None:
    with pytest.raises(ValueError, match="too small"):
        resolve_model_args(name, image_size=min_side - 1)
    with pytest.raises(ValueError, match="too small"):
        build_model(name, image_size=(min_side, min_side - 1))
    resolve_model_args(name, image_size=min_side)  # the minimum itself builds


@pytest.mark.parametrize("name", ["mlp", "resnet18"])
def test_models_without_a_minimum_size_take_tiny_images(name: str) -> None:
    model = build_model(name, image_size=1, norm="group").eval()
    assert model(torch.randn(1, get_model_spec(name).in_channels, 1, 1)).shape == (1, 10)


def test_non_square_images() -> None:
    for name in ("cnn", "tutorial_cnn", "lenet5", "vgg11", "resnet18", "mlp"):
        spec = get_model_spec(name)
        size = (spec.image_size[0], spec.image_size[1] + 8)
        model = build_model(name, image_size=size).eval()
        assert model(torch.randn(1, spec.in_channels, *size)).shape == (1, 10), name


def test_register_model_refuses_a_duplicate_name() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @register_model("cnn", in_channels=1, image_size=(28, 28), description="dup")
        def cnn(*, num_classes: int, in_channels: int, image_size: tuple, norm: str) -> nn.Module:
            return nn.Identity()


def test_model_catalog() -> None:
    catalog = model_catalog()
    assert [entry["name"] for entry in catalog] == list_models()
    assert json.loads(json.dumps(catalog)) == catalog
    by_name = {entry["name"]: entry for entry in catalog}
    assert by_name["vgg19_imagenet"]["parameters"] == 143_667_240
    assert by_name["vgg19_imagenet"]["input_shape"] == [3, 224, 224]
    assert by_name["vgg19_imagenet"]["num_classes"] == 1000
    assert by_name["cnn"]["parameters"] == 28_938
    assert by_name["cnn"]["input_shape"] == [1, 28, 28]
    assert all(entry["description"] for entry in catalog)


# --- layers -----------------------------------------------------------------------------


def test_make_norm() -> None:
    assert make_norm("none", 64) is None
    assert isinstance(make_norm("batch", 64), nn.BatchNorm2d)
    group = make_norm("group", 64)
    assert isinstance(group, nn.GroupNorm) and group.num_groups == 32
    assert make_norm("group", 6).num_groups == 6  # fewer channels than 32: one per group
    assert make_norm("group", 120).num_groups == 30  # largest divisor of 120 up to 32
    layer = make_norm("layer", 64)
    assert isinstance(layer, nn.GroupNorm) and layer.num_groups == 1
    with pytest.raises(ValueError, match="unknown norm"):
        make_norm("instance", 64)


def test_batch_norm_drops_the_conv_bias() -> None:
    with torch.device("meta"):
        plain = build_model("vgg11", norm="none")
        batch = build_model("vgg11", norm="batch")
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))
    assert all(m.bias is None for m in batch.modules() if isinstance(m, nn.Conv2d))
