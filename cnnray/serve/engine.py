"""Served models: which checkpoints to serve, loading them, and running a forward pass.

No Ray here: the Serve deployment (app.py) and the plain single-process baseline server
(`LocalBackend`, used by benchmarks/serve_load.py) share these pieces and the HTTP layer
(api.py), so the two differ only in batching and in Ray Serve itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cnnray.checkpoint import CheckpointError, load_model, verify_checkpoint
from cnnray.config import ConfigError
from cnnray.serve.metrics import MetricsReporter, ServeMetrics
from cnnray.serve.schemas import Limits, ModelRef, ServeArgs, ServeUserConfig
from cnnray.store import check_name, list_models, version_path


@dataclass(eq=False)
class LoadedModel:
    """One model version in memory, with what serving needs from its checkpoint."""

    name: str
    version: int
    path: str
    module: torch.nn.Module
    meta: dict[str, Any]
    device: torch.device
    input_shape: tuple[int, int, int] = field(init=False)
    classes: list[str] = field(init=False)
    mean: tuple[float, ...] = field(init=False)
    std: tuple[float, ...] = field(init=False)

    def __post_init__(self) -> None:
        data = self.meta.get("data") or {}
        try:
            c, h, w = (int(s) for s in data["input_shape"])
            self.input_shape = (c, h, w)
            self.classes = [str(x) for x in data["classes"]]
            self.mean = tuple(float(x) for x in data["mean"])
            self.std = tuple(float(x) for x in data["std"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {self.path}: meta.json lacks the input description ({e})") from None
        if not len(self.mean) == len(self.std) == c:
            raise CheckpointError(f"checkpoint {self.path}: mean and std need {c} values")

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """N x C x H x W normalised inputs -> N x classes probabilities (float32, CPU)."""
        with torch.inference_mode():
            logits = self.module(x.to(self.device, non_blocking=True))
            return torch.softmax(logits.float(), dim=1).cpu()

    def describe(self) -> dict[str, Any]:
        from cnnray.serve.preprocess import finite_json

        return {
            "name": self.name,
            "version": self.version,
            "ready": True,
            "architecture": self.meta["model"]["name"],
            "dataset": (self.meta.get("data") or {}).get("dataset"),
            "input_shape": list(self.input_shape),
            "classes": self.classes,
            "epoch": self.meta.get("epoch"),
            "metrics": finite_json(self.meta.get("metrics") or {}),
        }


def load_served_model(name: str, ref: ModelRef, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a verified checkpoint and run one forward pass, so a model that cannot answer
    requests of its declared input shape is refused here rather than on the first request."""
    device = torch.device(device)
    module, meta = load_model(ref.path, map_location=device)
    loaded = LoadedModel(name, ref.version, str(ref.path), module, meta, device)
    probe = torch.zeros(1, *loaded.input_shape)
    try:
        out = loaded.predict(probe)
    except Exception as e:
        shape = list(loaded.input_shape)
        raise CheckpointError(f"checkpoint {ref.path}: the model fails on a {shape} input: {e}") from None
    if out.shape != (1, len(loaded.classes)):
        raise CheckpointError(
            f"checkpoint {ref.path}: the model gives {out.shape[1]} outputs for {len(loaded.classes)} classes"
        )
    return loaded


def resolve_models(args: ServeArgs, verify: bool = True) -> dict[str, ModelRef]:
    """name -> checkpoint folder and version: the newest version of every model in the store,
    plus each directly named checkpoint (version 1). With `verify`, checks every digest."""
    found: dict[str, ModelRef] = {}
    if args.model_store:
        store = Path(args.model_store)  # absolute: ServeArgs resolved it (cnnray.paths)
        if not store.is_dir():
            raise ConfigError(f"model store {store} is not a directory")
        for name, versions in list_models(store).items():
            found[name] = ModelRef(path=str(version_path(store, name, versions[-1])), version=versions[-1])
    for name, path in args.checkpoints.items():
        check_name(name)
        if name in found:
            raise ConfigError(f"model name {name!r} is both in the model store and given as a checkpoint")
        found[name] = ModelRef(path=path, version=1)  # absolute (ServeArgs)
    if not found:
        where = f"model store {args.model_store}" if args.model_store else "the arguments"
        raise ConfigError(f"nothing to serve: {where} names no model (pass a model store or a checkpoint)")
    for ref in found.values() if verify else ():
        verify_checkpoint(ref.path)  # CheckpointError names the folder and the problem
    return found


def user_config_for(args: ServeArgs, models: dict[str, ModelRef] | None = None) -> dict[str, Any]:
    """The deployment's user_config (plain JSON) for these arguments."""
    cfg = ServeUserConfig(
        models=models if models is not None else resolve_models(args),
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
    )
    return cfg.model_dump(mode="json")


class LocalBackend:
    """The HTTP layer's backend without Ray Serve: one process, one request per forward pass.

    It is the baseline of the load benchmark ("a plain FastAPI server of the same model
    without batching"), and serves the same routes, schemas and preprocessing."""

    def __init__(self, models: dict[str, ModelRef], limits: Limits | None = None, device: str = "cpu") -> None:
        self.limits = limits or Limits()
        self.metrics = ServeMetrics()
        self._models = {name: load_served_model(name, ref, device) for name, ref in models.items()}
        self.metrics.set_versions({n: m.version for n, m in self._models.items()})
        self._reporter = MetricsReporter(self.metrics, self.replica_name(), None)

    def replica_name(self) -> str:
        return f"local-{os.getpid()}"

    def model(self, name: str) -> LoadedModel | None:
        return self._models.get(name)

    def models(self) -> list[LoadedModel]:
        return list(self._models.values())

    def failures(self) -> dict[str, tuple[int, str]]:
        return {}

    async def infer(self, entry: LoadedModel, inputs: list[torch.Tensor]) -> torch.Tensor:
        # Plain: the forward pass runs on the event loop, one request at a time.
        self.metrics.batch_size.labels(entry.name).observe(len(inputs))
        return entry.predict(torch.cat(inputs))

    async def metrics_text(self) -> bytes:
        return await self._reporter.text()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

