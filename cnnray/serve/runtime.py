"""What runs a served model's forward pass: PyTorch itself, or its graph exported to ONNX and
run by ONNX Runtime. A runtime is chosen when a model version is loaded (`make_runtime`) and
is the only difference between the two: preprocessing, batching, budgets, store watching
and metrics are the same code (engine.LoadedModel, app.py, api.py).

    runtime = make_runtime("onnxruntime", module, meta, checkpoint_dir, threads=1)
    logits = runtime.logits(x)     # N x C x H x W normalised float32 -> N x K float32 (TTA applied)

The ONNX graph is exported at load from the checkpoint (cnnray.export: the checkpoint's TTA
inside, no normalisation: Serve's preprocessing has done it), so every checkpoint and store
version can be served; it is cached on disk by the checkpoint's SHA-256 (one export per
version, not one per replica or restart).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import torch

from cnnray.checkpoint import CheckpointError, atomic_write_bytes, checkpoint_tta
from cnnray.models.tta import tta_logits

RUNTIMES = ("torch", "onnxruntime")  # the default: cnnray.serve.defaults.DEFAULT_RUNTIME

log = logging.getLogger("ray.serve.cnnray")


class Runtime(Protocol):
    name: str

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """N x C x H x W normalised float32 -> N x K float32 logits, TTA applied."""
        ...


class TorchRuntime:
    """The model's own forward pass (on its device) with the checkpoint's TTA."""

    name = "torch"

    def __init__(self, module: torch.nn.Module, tta: str) -> None:
        self.module, self.tta = module, tta

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return tta_logits(self.module, x, self.tta)


class OnnxRuntime:
    """The checkpoint's graph (TTA inside) in an ONNX Runtime CPU session."""

    name = "onnxruntime"

    def __init__(self, session: Any) -> None:
        self.session = session

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        from cnnray.export.onnx import run_session

        return torch.from_numpy(run_session(self.session, x.detach().cpu().contiguous()))


def make_runtime(kind: str, module: torch.nn.Module, meta: dict[str, Any], path: str | Path,
                 device: torch.device, threads: int) -> Runtime:
    """The runtime `kind` for a loaded checkpoint; CheckpointError (one line) when the model
    cannot be exported for ONNX Runtime, or the runtime asked for cannot run on `device`."""
    tta = checkpoint_tta(meta)
    if kind == "torch":
        return TorchRuntime(module, tta)
    if kind != "onnxruntime":
        raise ValueError(f"unknown runtime {kind!r}; choose one of: {', '.join(RUNTIMES)}")
    if device.type != "cpu":
        raise CheckpointError("the onnxruntime runtime runs on CPUs: serve with --runtime torch on a GPU")
    from cnnray.export.graph import ExportError
    from cnnray.export.onnx import ort_session

    try:
        try:
            return OnnxRuntime(ort_session(_cached_graph(module, meta, Path(path)), threads))
        except ExportError:
            raise
        except Exception:  # a cached file ONNX Runtime cannot load (truncated by a full disk...)
            _cache_file(Path(path)).unlink(missing_ok=True)
            return OnnxRuntime(ort_session(_cached_graph(module, meta, Path(path)), threads))
    except Exception as e:
        from cnnray.errors import first_line

        raise CheckpointError(f"checkpoint {path}: {first_line(e, 300)}") from None


def cache_dir() -> Path:
    """$CNNRAY_ONNX_CACHE, else $XDG_CACHE_HOME/cnnray/onnx (~/.cache/cnnray/onnx): the
    user's own folder, not a shared /tmp where another account could plant a graph."""
    if os.environ.get("CNNRAY_ONNX_CACHE"):
        return Path(os.environ["CNNRAY_ONNX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnnray" / "onnx"


def _cache_file(path: Path) -> Path:
    """The cache entry of the serving graph of the checkpoint at `path`: its SHA-256 (of
    meta.json, which lists the weights' SHA-256) and the versions that export it."""
    import onnx

    from cnnray import __version__
    from cnnray.export.files import checkpoint_digest

    versions = f"serve-normalised|{torch.__version__}|{onnx.__version__}|{__version__}"
    return cache_dir() / f"{checkpoint_digest(path)}-{hashlib.sha256(versions.encode()).hexdigest()[:16]}.onnx"


def _cached_graph(module: torch.nn.Module, meta: dict[str, Any], path: Path) -> bytes:
    """The serialised serving graph of the checkpoint at `path`: from the cache when a
    graph of this checkpoint (SHA-256 of its meta.json, which lists its weights' SHA-256)
    by these torch and onnx versions is there, else exported now and cached. A cache that
    cannot be written costs only the next load's export."""
    import copy

    from cnnray.export.files import checkpoint_digest, input_description
    from cnnray.export.graph import PixelGraph
    from cnnray.export.onnx import onnx_bytes

    digest = checkpoint_digest(path)
    cached = _cache_file(path)
    try:
        return cached.read_bytes()
    except OSError:
        pass
    shape, _, mean, std = input_description(meta, path)
    # A copy in NCHW: the torch model stays as it is (channels-last, for explanations).
    nchw = copy.deepcopy(module).to(memory_format=torch.contiguous_format)
    graph = PixelGraph(nchw, mean, std, checkpoint_tta(meta), pixels=False)
    data = onnx_bytes(graph, shape, f"model {meta['model']['name']!r}", {"cnnray.checkpoint_sha256": digest})
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(data, cached)
    except OSError as e:
        log.warning("cnnray: cannot cache the ONNX graph in %s: %s", cached.parent, e)
    return data
