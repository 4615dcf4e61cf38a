"""Model registry: name -> constructor, default input shape and class count (timm-like).

Usage:
    from cnnray.models import build_model, resolve_model_args
    args = resolve_model_args("vgg11", norm="batch")  # JSON-ready, stored in checkpoints
    model = build_model("vgg11", **args)               # rebuilds exactly the same model

Every constructor is called as fn(*, num_classes, in_channels, image_size, norm, **extra)
where `extra` are its own keyword-only arguments (e.g. the MLP's hidden_sizes).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch
from torch import nn

from cnnray.errors import UnknownModelError
from cnnray.models.layers import NORMS, check_norm

# Arguments every constructor takes; anything else in its signature is model-specific.
COMMON_ARGS: tuple[str, ...] = ("num_classes", "in_channels", "image_size", "norm")
DEFAULT_NORM = "none"  # callers opt in to a norm; "none" is the lecture's plain networks


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: the constructor plus the input it expects by default."""

    name: str
    fn: Callable[..., nn.Module]
    in_channels: int
    image_size: tuple[int, int]  # (H, W) in pixels
    num_classes: int
    description: str
    norms: tuple[str, ...] = NORMS  # the norms it can be built with (others are refused)
    default_norm: str = DEFAULT_NORM  # used when no norm is given


class UnknownModelArgError(TypeError, ValueError):
    """Raised for a keyword a model does not take (a TypeError like Python's own, and a
    ValueError so that config validation can catch every bad setting with one clause)."""


_REGISTRY: dict[str, ModelSpec] = {}
_EMPTY = inspect.Parameter.empty


def register_model(
    name: str,
    *,
    in_channels: int,
    image_size: tuple[int, int],
    num_classes: int = 10,
    description: str,
    norms: tuple[str, ...] = NORMS,
    default_norm: str = DEFAULT_NORM,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers `fn` under `name` with its default input and class count.

    `norms` lists the norms the model can be built with (a subset of NORMS: a network that
    cannot train without a norm refuses "none"); `default_norm` is used when none is given.
    """
    if not norms or any(n not in NORMS for n in norms) or default_norm not in norms:
        raise ValueError(f"model {name!r}: norms {norms!r} must be a subset of {NORMS} holding {default_norm!r}")

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        params = inspect.signature(fn).parameters
        missing = [arg for arg in COMMON_ARGS if arg not in params]
        if missing:
            raise TypeError(f"constructor for {name!r} must accept {', '.join(missing)}")
        no_default = [key for key, value in _extra_args(fn).items() if value is _EMPTY]
        if no_default:
            # resolve_model_args fills every model-specific argument from its default.
            raise TypeError(f"constructor for {name!r} needs defaults for {no_default}")
        _REGISTRY[name] = ModelSpec(
            name=name,
            fn=fn,
            in_channels=in_channels,
            image_size=(image_size[0], image_size[1]),
            num_classes=num_classes,
            description=description,
            norms=tuple(norms),
            default_norm=default_norm,
        )
        return fn

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    """The registry entry for `name`; UnknownModelError lists the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; choose one of: {', '.join(list_models())}"
        ) from None


def check_model_norm(name: str, norm: str) -> str:
    """Return `norm` if model `name` can use it, else a one-line ValueError naming its norms."""
    spec = get_model_spec(name)
    if norm not in spec.norms:
        raise ValueError(f"model {name!r} cannot use norm {norm!r}; choose one of: {', '.join(spec.norms)}")
    return norm


def _extra_args(fn: Callable[..., nn.Module]) -> dict[str, Any]:
    """Model-specific keyword arguments of a constructor with their defaults."""
    return {
        param.name: param.default
        for param in inspect.signature(fn).parameters.values()
        if param.kind is inspect.Parameter.KEYWORD_ONLY and param.name not in COMMON_ARGS
    }


def model_extra_args(name: str) -> tuple[str, ...]:
    """The model-specific keyword arguments `name` takes (beyond COMMON_ARGS), read from
    its constructor's signature: cheap, no model is built. UnknownModelError otherwise."""
    return tuple(_extra_args(get_model_spec(name).fn))


def _positive_int(key: str, value: Any) -> int:
    # bool is an Integral too, but True as a channel count is surely a mistake.
    if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{key} must be a positive int, got {value!r}")
    return int(value)


def _image_size(value: Any) -> list[int]:
    if isinstance(value, Integral) and not isinstance(value, bool):
        value = (value, value)  # an int means a square image
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"image_size must be an int or a pair (H, W), got {value!r}")
    return [_positive_int("image_size", side) for side in value]


def _to_json(value: Any) -> Any:
    """Tuples become lists (recursively) so the dict survives a JSON round trip unchanged."""
    if isinstance(value, (tuple, list)):
        return [_to_json(item) for item in value]
    return value


def resolve_model_args(name: str, **kwargs: Any) -> dict[str, Any]:
    """Exactly the keyword arguments that build `name`, defaults filled in, JSON-ready.

    Keywords set to None are dropped first, so unset CLI flags fall back to the model's
    defaults instead of overriding them. Model-specific defaults are written out too, so
    a stored dict rebuilds the same model even if a default changes later.
    """
    spec = get_model_spec(name)
    given = {key: value for key, value in kwargs.items() if value is not None}
    extra = _extra_args(spec.fn)
    unknown = sorted(set(given) - set(COMMON_ARGS) - set(extra))
    if unknown:
        raise UnknownModelArgError(
            f"model {name!r} got unknown argument(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join([*COMMON_ARGS, *extra])}"
        )
    args: dict[str, Any] = {
        "num_classes": _positive_int("num_classes", given.get("num_classes", spec.num_classes)),
        "in_channels": _positive_int("in_channels", given.get("in_channels", spec.in_channels)),
        "image_size": _image_size(given.get("image_size", spec.image_size)),
        "norm": check_model_norm(name, check_norm(given.get("norm", spec.default_norm))),
    }
    for key, default in extra.items():
        args[key] = _to_json(given.get(key, default))
    # Build once on the meta device (shapes only: no memory, no init cost) so that a bad
    # model-specific value or a too-small image_size fails here, before any training.
    with torch.device("meta"):
        spec.fn(**args)
    return args


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Construct `name` (on the CPU, float32) from resolve_model_args(name, **kwargs)."""
    args = resolve_model_args(name, **kwargs)
    return get_model_spec(name).fn(**args)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (works on meta-device models too)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_catalog() -> list[dict[str, Any]]:
    """One JSON-ready dict per model: default input shape, classes, parameter count."""
    catalog = []
    for name in list_models():
        spec = get_model_spec(name)
        args = resolve_model_args(name)  # default args and the model's default norm
        with torch.device("meta"):  # count without allocating 100M+ VGG weights
            parameters = count_parameters(spec.fn(**args))
        catalog.append(
            {
                "name": name,
                "input_shape": [args["in_channels"], *args["image_size"]],
                "num_classes": args["num_classes"],
                "parameters": parameters,
                "description": spec.description,
            }
        )
    return catalog
