"""Model zoo: the lecture's networks behind one registry.

    from cnnray.models import build_model, list_models, resolve_model_args
    args = resolve_model_args("resnet18", norm="batch")  # JSON-ready, for checkpoints
    model = build_model("resnet18", **args)

Importing this package registers the models (cheap: no weights are built) and imports
torch; nothing else runs.
"""

from cnnray.models import airbench, cnn, lenet, mlp, resnet, vgg  # noqa: F401 (registers the models)
from cnnray.models.layers import NORMS, make_norm
from cnnray.models.registry import (
    ModelSpec,
    UnknownModelArgError,
    UnknownModelError,
    build_model,
    check_model_norm,
    count_parameters,
    get_model_spec,
    list_models,
    model_catalog,
    model_extra_args,
    register_model,
    resolve_model_args,
)
from cnnray.models.summary import LayerRow, format_layer_table, layer_table

__all__ = [
    "NORMS",
    "LayerRow",
    "ModelSpec",
    "UnknownModelArgError",
    "UnknownModelError",
    "build_model",
    "check_model_norm",
    "count_parameters",
    "format_layer_table",
    "get_model_spec",
    "layer_table",
    "list_models",
    "make_norm",
    "model_catalog",
    "model_extra_args",
    "register_model",
    "resolve_model_args",
]
