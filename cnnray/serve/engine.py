"""Served models: which checkpoints to serve, loading them, and running a forward pass.

No Ray here: the Serve deployment (app.py) and the plain single-process baseline server
(`LocalBackend`, used by benchmarks/serve_load.py) share these pieces and the HTTP layer
(api.py), so the two differ only in batching and in Ray Serve itself.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cnnray.checkpoint import CheckpointError, checkpoint_tta, load_model, verify_checkpoint
from cnnray.config import ConfigError
from cnnray.serve.checkpoint_arg import checkpoint_in
from cnnray.serve.defaults import DECODE_THREADS
from cnnray.serve.metrics import MetricsReporter, ServeMetrics
from cnnray.serve.preprocess import Payload, RequestError, batch_inputs
from cnnray.serve.registry import is_registry_uri, resolve_registry
from cnnray.serve.runtime import Runtime, TorchRuntime, make_runtime
from cnnray.serve.schemas import Limits, ModelRef, ServeArgs, ServeUserConfig
from cnnray.store import check_name, scan


@dataclass(eq=False)
class LoadedModel:
    """One model version in memory, with what serving needs from its checkpoint."""

    name: str
    version: int
    path: str
    module: torch.nn.Module
    meta: dict[str, Any]
    device: torch.device
    # What runs the forward pass (serve/runtime.py); None: the torch module itself, which
    # `module` always holds (explanations need it, whichever runtime serves).
    runtime: Runtime | None = None
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
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise CheckpointError(f"checkpoint {self.path}: meta.json lacks the input description ({e})") from None
        if not len(self.mean) == len(self.std) == c:
            raise CheckpointError(f"checkpoint {self.path}: mean and std need {c} values")
        if self.runtime is None:
            self.runtime = TorchRuntime(self.module, checkpoint_tta(self.meta))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """N x C x H x W normalised inputs -> N x classes probabilities (float32, CPU)."""
        with torch.inference_mode():
            # The checkpoint's test-time augmentation, as its test accuracy was measured.
            logits = self.runtime.logits(x.to(self.device, non_blocking=True))
            return torch.softmax(logits, dim=1).cpu()

    def inputs(self, payloads: Sequence[Payload]) -> tuple[torch.Tensor | None, list[RequestError | None]]:
        """Payloads -> (normalised inputs of those that decode, one RequestError or None per
        payload): `preprocess.batch_inputs` with this model's input shape and normalisation."""
        return batch_inputs(payloads, self.input_shape, self.mean, self.std)

    def scores(self, x: torch.Tensor | None, errors: list[RequestError | None]) -> list[list[float] | RequestError]:
        """One forward pass over `x` (the payloads without an error) -> per payload its class
        probabilities (a list of floats, one per class) or its RequestError."""
        if x is None:
            return list(errors)  # type: ignore[arg-type]
        rows = iter(self.predict(x).tolist())  # one tolist for the batch, not one per request
        return [e if e is not None else next(rows) for e in errors]

    def classify(self, payloads: Sequence[Payload]) -> list[list[float] | RequestError]:
        """`inputs` then `scores`: decoding, normalisation and one forward pass for payloads of
        one or many requests. CPU work, for a thread: never call it on the event loop."""
        return self.scores(*self.inputs(payloads))

    def describe(self) -> dict[str, Any]:
        from cnnray.serve.preprocess import finite_json

        return {
            "name": self.name,
            "version": self.version,
            "ready": True,
            "architecture": self.meta["model"]["name"],
            "dataset": _text_or_none((self.meta.get("data") or {}).get("dataset")),
            "input_shape": list(self.input_shape),
            "classes": self.classes,
            "epoch": self.meta.get("epoch"),
            "metrics": finite_json(self.meta.get("metrics") or {}),
        }


MAX_INPUT_CHANNELS = 4  # grayscale, RGB, RGBA: more is no image this server decodes
# C x H x W of a served model's input: 3 x 1024 x 1024 at most (ImageNet models take 3 x 224 x 224),
# so the load-time probe and each request's activations stay within a few hundred MB.
PROBE_MAX_VALUES = 3 * 1024 * 1024


def _check_input(loaded: LoadedModel) -> None:
    """meta.json's input description is checked before the probe allocates its size."""
    c, h, w = loaded.input_shape
    if not (1 <= c <= MAX_INPUT_CHANNELS and h >= 1 and w >= 1 and c * h * w <= PROBE_MAX_VALUES):
        raise CheckpointError(f"checkpoint {loaded.path}: meta.json declares an impossible input shape {[c, h, w]}")
    if not loaded.classes:
        raise CheckpointError(f"checkpoint {loaded.path}: meta.json lists no classes")
    if not all(math.isfinite(x) for x in loaded.mean) or not all(math.isfinite(s) and s > 0 for s in loaded.std):
        raise CheckpointError(f"checkpoint {loaded.path}: mean must be finite and std finite and positive")


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)[:200]


def load_served_model(
    name: str, ref: ModelRef, device: torch.device | str = "cpu", runtime: str = "torch", threads: int = 1
) -> LoadedModel:
    """Load a verified checkpoint and run one forward pass, so a model that cannot answer
    requests of its declared input shape, or answers them with NaN or infinity (weights of
    a run that diverged), is refused here rather than answering every request with garbage.
    `runtime` (serve/runtime.py) runs the forward passes, with `threads` intra-op threads
    for onnxruntime (torch's are the process's). Raises CheckpointError."""
    device = torch.device(device)
    module, meta = load_model(ref.path, map_location=device)
    loaded = LoadedModel(name, ref.version, str(ref.path), module, meta, device)
    _check_input(loaded)
    bad = [k for k, t in module.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CheckpointError(f"checkpoint {ref.path}: weights hold NaN or infinity ({bad[0]}{more})")
    if runtime != "torch":  # after the weights' check: a NaN model is refused for what it is
        loaded.runtime = make_runtime(runtime, module, meta, ref.path, device, threads)
        _check_runtime_agrees(loaded)
    try:
        out = loaded.predict(torch.zeros(1, *loaded.input_shape))
    except Exception as e:
        shape = list(loaded.input_shape)
        raise CheckpointError(f"checkpoint {ref.path}: the model fails on a {shape} input: {e}") from None
    if out.shape != (1, len(loaded.classes)):
        raise CheckpointError(
            f"checkpoint {ref.path}: the model gives {out.shape[1]} outputs for {len(loaded.classes)} classes"
        )
    if not torch.isfinite(out).all():
        raise CheckpointError(f"checkpoint {ref.path}: the model's output on a blank image is NaN or infinite")
    return loaded


def _check_runtime_agrees(loaded: LoadedModel) -> None:
    """The runtime's logits against the torch module's on 8 seeded random inputs, within
    export verification's tolerance (cnnray.export.verify), or CheckpointError: a graph that
    would answer differently from the checkpoint is never served."""
    from cnnray.export.verify import compare

    x = torch.randn(8, *loaded.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = TorchRuntime(loaded.module, checkpoint_tta(loaded.meta)).logits(x)
        got = loaded.runtime.logits(x)
    result = compare(want, got)
    if not result.ok:
        raise CheckpointError(f"checkpoint {loaded.path}: the {loaded.runtime.name} graph does not match the model: "
                              f"{result.describe()}")


def public_error(e: BaseException, path: str | Path, label: str) -> str:
    """`e`'s first line for clients: the server's path to the checkpoint becomes `label`
    (say "digits/3"), so unauthenticated routes do not reveal the server's file system."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = text.replace(f"checkpoint {path} ", "checkpoint ").replace(f"checkpoint {path}:", "checkpoint:")
    return text.replace(str(path), label)[:500]


@dataclass
class Resolution:
    """What to serve (`models`), and one line per store entry skipped (`problems`)."""

    models: dict[str, ModelRef]
    problems: list[str] = field(default_factory=list)


def resolve(
    args: ServeArgs, current: dict[str, ModelRef] | None = None, bad: dict[str, tuple[Any, str]] | None = None
) -> Resolution:
    """name -> checkpoint folder and version: the newest *usable* version of every model in
    the store, plus each directly named checkpoint (version 1).

    A store version whose checkpoint does not verify (still being copied, unreadable,
    corrupt) is skipped for the next older one and described in `problems`; a model without
    a usable version is left out. Versions in `current` (being served) are not re-verified;
    `bad` remembers failed versions by their files' sizes and times, so a poll re-verifies
    only what changed. A directly named checkpoint that fails raises CheckpointError, and a
    store that is not a folder raises ConfigError unless `current` is given (a running
    server keeps serving what it has)."""
    current = current or {}
    bad = {} if bad is None else bad
    found: dict[str, ModelRef] = {}
    problems: list[str] = []
    if is_registry_uri(args.model_store):  # models:/NAME@ALIAS or models:/NAME/VERSION
        got, lines = resolve_registry(args.model_store, args.registry_uri, serving=bool(current))
        found.update({got.name: ModelRef(path=got.path, version=got.version)} if got else current)
        problems += lines
    elif args.model_store:
        store = Path(args.model_store)  # absolute: ServeArgs resolved it (cnnray.paths)
        if not store.is_dir() and not current:
            raise ConfigError(f"model store {store} is not a directory")
        seen = scan(store)
        problems += seen.problems
        if not store.is_dir() or (seen.problems and seen.problems[0].startswith("cannot read the store")):
            found.update({n: r for n, r in current.items() if n not in args.checkpoints})
        for name, have in seen.models.items():
            ref = _newest_usable(store, name, have, current.get(name), bad, problems)
            if ref is not None:
                found[name] = ref
    for name, path in args.checkpoints.items():
        check_name(name)
        if name in found:
            raise ConfigError(f"model name {name!r} is both in the model store and given as a checkpoint")
        # A run folder serves its best checkpoint (result.json); absolute (ServeArgs).
        found[name] = ModelRef(path=checkpoint_in(path), version=1)
        if current.get(name) != found[name]:
            verify_checkpoint(found[name].path)  # CheckpointError names the folder and the problem
    return Resolution(found, problems)


def _newest_usable(
    store: Path, name: str, have: list[int], serving: ModelRef | None, bad: dict[str, tuple[Any, str]],
    problems: list[str],
) -> ModelRef | None:
    for version in reversed(have):
        ref = ModelRef(path=str(store / name / str(version)), version=version)
        if ref == serving:
            return ref
        stamp = _stamp(Path(ref.path))
        if ref.path in bad and bad[ref.path][0] == stamp:
            problems.append(bad[ref.path][1])
            continue
        try:
            verify_checkpoint(ref.path)
            bad.pop(ref.path, None)
            return ref
        except CheckpointError as e:
            why = f"{name}/{version}: skipped: {public_error(e, ref.path, f'{name}/{version}')}"
            bad[ref.path] = (stamp, why)
            problems.append(why)
    return None


def _stamp(folder: Path) -> Any:
    """Names, sizes and modification times of a folder's files: equal stamps, same content
    (as far as a poll needs to know)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
        return tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries)
    except OSError as e:
        return ("unreadable", e.errno)


def resolve_models(args: ServeArgs) -> dict[str, ModelRef]:
    """`resolve(args).models` (every one verified), refused with ConfigError when that is
    nothing at all; the message says why the first store versions were skipped."""
    res = resolve(args)
    if not res.models:
        where = f"model store {args.model_store}" if args.model_store else "the arguments"
        why = f" ({'; '.join(res.problems[:3])})" if res.problems else ""
        raise ConfigError(f"nothing to serve: {where} names no model that can be served{why}")
    return res.models


def user_config_for(
    args: ServeArgs, models: dict[str, ModelRef] | None = None, problems: list[str] | None = None
) -> dict[str, Any]:
    """The deployment's user_config (plain JSON) for these arguments; `problems` (store
    entries skipped) travel with it so that every replica reports them in /v1/models."""
    cfg = ServeUserConfig(
        models=models if models is not None else resolve_models(args),
        problems=problems or [],
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
    )
    return cfg.model_dump(mode="json")


class LocalBackend:
    """The HTTP layer's backend without Ray Serve: one process, one request per forward pass.

    It is the baseline of the load benchmark ("a plain FastAPI server of the same model
    without batching"), and serves the same routes, schemas and preprocessing."""

    def __init__(
        self, models: dict[str, ModelRef], limits: Limits | None = None, device: str = "cpu",
        explain: bool = True, runtime: str = "torch",
    ) -> None:
        from cnnray.serve.explain import ExplainService

        self.limits = limits or Limits()
        self.explainer = ExplainService() if explain else None  # :explain, on its own threads
        self.metrics = ServeMetrics()
        threads = torch.get_num_threads()  # the process's: ONNX Runtime gets as many as torch
        self._models = {name: load_served_model(name, ref, device, runtime, threads) for name, ref in models.items()}
        self.metrics.set_versions({n: m.version for n, m in self._models.items()})
        self._reporter = MetricsReporter(self.metrics, self.replica_name(), None)
        # Decoding off the event loop, as any server must (a large image decodes for seconds).
        self._pool = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="cnnray-plain-decode")

    def replica_name(self) -> str:
        return f"local-{os.getpid()}"

    def model(self, name: str) -> LoadedModel | None:
        return self._models.get(name)

    def models(self) -> list[LoadedModel]:
        return list(self._models.values())

    def failures(self) -> dict[str, tuple[int, str]]:
        return {}

    def problems(self) -> list[str]:
        return []

    async def infer(self, entry: LoadedModel, payloads: list[Payload]) -> list[list[float] | RequestError]:
        # Plain: each request decoded on the thread pool, its forward pass on the event loop,
        # one request at a time.
        x, errors = await asyncio.get_running_loop().run_in_executor(self._pool, entry.inputs, payloads)
        if x is not None:
            self.metrics.batch_size.labels(entry.name).observe(x.shape[0])
        return entry.scores(x, errors)

    async def metrics_text(self) -> bytes:
        return await self._reporter.text()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.explainer is not None:
            self.explainer.close()

