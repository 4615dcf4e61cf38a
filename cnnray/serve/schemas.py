"""Pydantic schemas of the serving app: its builder arguments, its user_config and its HTTP API.

Three groups:
- `ServeArgs`: the typed arguments of the app builder (`serve run cnnray.serve.app:build_app
  model_store=...`, the `args:` of jobs/configs/serve.yaml, or `cnnray serve` flags).
- `ServeUserConfig`: what `reconfigure(user_config)` receives: the exact checkpoint folder
  and version of every served model, and the batching settings. A new version in the
  model store becomes a new user_config, applied in place without restarting replicas.
- Request and response bodies of the HTTP API (KServe v1 and TorchServe conventions).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cnnray.paths import resolve_path

from cnnray.serve.defaults import (
    DEFAULT_RUNTIME,
    BATCH_WAIT_S,
    MAX_BATCH_SIZE,
    BODY_TIMEOUT_S,
    MAX_BODY_BYTES,
    MAX_BUFFERED_BYTES,
    MAX_DRAIN_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_INSTANCES,
    MAX_ONGOING_REQUESTS,
    MAX_REQUEST_PIXELS,
    STORE_WATCH_S,
)
from cnnray.serve.autoscale import DOWNSCALE_DELAY_S, LOOK_BACK_S, TARGET_ONGOING_REQUESTS, UPSCALE_DELAY_S


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a default


class Limits(_Strict):
    """What one request may carry and cost; larger requests get a 4xx answer, never a crash.

    Every budget is checked before the work it bounds: the body's size on its Content-Length
    (or as it streams), the JSON's size (values) and depth before parsing, the pixels of
    every image (and their sum over a request) from the headers before decoding."""

    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=1024, le=1 << 30)
    max_instances: int = Field(MAX_INSTANCES, ge=1, le=4096)
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1, le=1 << 30)
    max_request_pixels: int = Field(MAX_REQUEST_PIXELS, ge=1, le=1 << 32)
    body_timeout_s: float = Field(BODY_TIMEOUT_S, gt=0, le=3600, allow_inf_nan=False)
    max_drain_bytes: int = Field(MAX_DRAIN_BYTES, ge=0, le=1 << 32)
    max_buffered_bytes: int = Field(MAX_BUFFERED_BYTES, ge=1024, le=1 << 40)  # all bodies held at once


class Autoscaling(_Strict):
    """Serve's autoscaling_config for `--replicas MIN-MAX` (see cnnray/serve/autoscale.py for
    the measured target and the delays' reasons)."""

    min_replicas: int = Field(ge=1, le=4096)
    max_replicas: int = Field(ge=1, le=4096)
    target_ongoing_requests: float = Field(TARGET_ONGOING_REQUESTS, gt=0, le=4096)
    upscale_delay_s: float = Field(UPSCALE_DELAY_S, ge=0, le=3600)
    downscale_delay_s: float = Field(DOWNSCALE_DELAY_S, ge=0, le=86_400)
    look_back_period_s: float = Field(LOOK_BACK_S, gt=0, le=3600)

    @model_validator(mode="after")
    def _ordered(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is over max_replicas {self.max_replicas}")
        return self


class ServeArgs(_Strict):
    """Arguments of `build_app`: which models to serve and how."""

    model_store: str | None = Field(None, description="model store: the newest version of every model in it")
    checkpoints: dict[str, str] = Field(
        default_factory=dict, description="name -> checkpoint folder, served as version 1"
    )
    replicas: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="replicas of the deployment, or 'auto': the cluster's total CPUs / cpus_per_replica (GPUs with gpu), at least 1"
    )
    gpu: bool = Field(False, description="one GPU per replica")
    cpus_per_replica: float = Field(1.0, ge=0, description="CPUs reserved per replica (and torch threads)")
    max_batch_size: int = Field(MAX_BATCH_SIZE, ge=1, le=4096)
    batch_wait_timeout_s: float = Field(BATCH_WAIT_S, ge=0, le=10)
    max_ongoing_requests: int = Field(MAX_ONGOING_REQUESTS, ge=1)
    watch_s: float = Field(
        STORE_WATCH_S, ge=0, allow_inf_nan=False,
        description="seconds between each replica's looks at the model store for new versions (0: never)",
    )
    limits: Limits = Field(default_factory=Limits)
    explain: bool = Field(True, description="answer POST /v1/models/{name}:explain (heat maps, response maps)")
    autoscaling: Autoscaling | None = Field(
        None, description="replicas between min_replicas and max_replicas by load (replaces `replicas`)"
    )
    runtime: Literal["torch", "onnxruntime"] = Field(
        DEFAULT_RUNTIME, description="what runs the forward pass: torch, or the exported ONNX graph in ONNX Runtime"
    )
    registry_uri: str | None = Field(
        None, description="MLflow registry of a models:/ model_store; default $MLFLOW_REGISTRY_URI or $MLFLOW_TRACKING_URI"
    )

    # Paths as typed where the app was built (`cnnray serve`, `serve run`), once
    # (cnnray.paths): absolute, so every replica, wherever its working directory, reads
    # the same folders. A ValueError here is a ValidationError naming the field.
    @field_validator("model_store")
    @classmethod
    def _resolve_store(cls, value: str | None) -> str | None:
        from cnnray.serve.registry import is_registry_uri, parse_registry_uri

        if is_registry_uri(value):  # an MLflow registry's model (cnnray.serve.registry)
            return parse_registry_uri(value) and value
        return None if value is None else resolve_path(value, "model_store")

    @model_validator(mode="after")
    def _registry_from_env(self) -> "ServeArgs":
        """A models:/ store's registry is fixed where the app is built, so every replica
        (on any node, whatever its environment) asks the same one."""
        from cnnray.serve.registry import is_registry_uri, registry_uri_from_env

        if is_registry_uri(self.model_store) and self.registry_uri is None:
            self.registry_uri = registry_uri_from_env()
        return self

    @field_validator("checkpoints")
    @classmethod
    def _resolve_checkpoints(cls, value: dict[str, str]) -> dict[str, str]:
        return {name: resolve_path(path, f"checkpoint of {name!r}") for name, path in value.items()}


class ModelRef(_Strict):
    """One served model version: a checkpoint folder."""

    path: str
    version: int = Field(ge=1)


class ServeUserConfig(_Strict):
    """The deployment's user_config; `reconfigure` loads whatever differs from what it serves."""

    models: dict[str, ModelRef]
    problems: list[str] = Field(default_factory=list)  # model-store entries skipped, one line each
    max_batch_size: int = Field(MAX_BATCH_SIZE, ge=1, le=4096)
    batch_wait_timeout_s: float = Field(BATCH_WAIT_S, ge=0, le=10)


# --- HTTP API ---------------------------------------------------------------------------
class B64Instance(_Strict):
    b64: str = Field(description="a PNG or JPEG file, base64-encoded")


class PredictRequest(_Strict):
    """KServe v1: `{"instances": [...]}`; an instance is {"b64": "..."} or a C x H x W array
    of pixel values in 0..255 (the model's input shape, before normalisation)."""

    instances: list[B64Instance | list[Any]]


class Prediction(BaseModel):
    label: str
    class_index: int
    probabilities: list[float]


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    model_name: str
    model_version: int


class TorchServeResponse(Prediction):
    model_name: str
    model_version: int


class ModelInfo(BaseModel):
    name: str
    version: int
    ready: bool
    error: str | None = None  # why a version failed to load (the previous one keeps serving)
    architecture: str | None = None  # registry name, e.g. "cnn"
    dataset: str | None = None
    input_shape: list[int] | None = None  # C, H, W
    classes: list[str] | None = None
    epoch: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)  # as stored in the checkpoint


class ModelList(BaseModel):
    models: list[ModelInfo]
    problems: list[str] = Field(default_factory=list)  # model-store entries skipped, and why


class ModelStatus(BaseModel):
    name: str
    version: int
    ready: bool
    error: str | None = None


class Health(BaseModel):
    status: str
    models: list[str]
    replica: str


class ErrorBody(BaseModel):
    error: str
