"""What a network sees: heat maps (occlusion, Grad-CAM) and response maps for one image.

    from cnnray.explain import Explainer
    ex = Explainer(model, input_shape=(1, 28, 28), num_classes=10)
    result = ex.explain(x, pixels, ex.options(layers="all"))

Below serve/ and report/ (it imports only the models and Captum), so `cnnray serve`'s
`:explain` route, `cnnray predict --explain` and the report's response maps run the same code.
Importing this package builds nothing and does not import Captum.
"""

from cnnray.explain.attribution import OCCLUSION_STEPS, OcclusionPlan, gradcam, occlusion, occlusion_plan
from cnnray.explain.explainer import (
    DEFAULT_CHANNELS,
    MAX_CHANNELS,
    MAX_LAYER_NAMES,
    METHODS,
    ExplainError,
    Explainer,
    ExplainOptions,
    Explanation,
)
from cnnray.explain.layers import CamLayer, ConvShape, conv_layers, conv_maps, gradcam_layer, strongest_channels

__all__ = [
    "DEFAULT_CHANNELS", "MAX_CHANNELS", "MAX_LAYER_NAMES", "METHODS", "OCCLUSION_STEPS",
    "CamLayer", "ConvShape", "ExplainError", "ExplainOptions", "Explainer", "Explanation", "OcclusionPlan",
    "conv_layers", "conv_maps", "gradcam", "gradcam_layer", "occlusion", "occlusion_plan", "strongest_channels",
]
