"""Checkpoints that rebuild the model without the training code.

A checkpoint is a directory:

    model.pt        the model's state_dict (tensors only)
    train_state.pt  optimizer and scheduler state, for resuming (optional)
    meta.json       model name and arguments, input description (shape, mean, std,
                    class names), epoch, config, metrics, and the SHA-256 of each file

Every file is written to a temporary name and renamed into place, and meta.json is
written last, so a directory without a valid meta.json is an incomplete checkpoint.
Loading verifies the digests and uses `torch.load(weights_only=True)`: no arbitrary
object is ever unpickled. Only `cnnray.models` is needed to rebuild the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

FORMAT = "cnnray-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete, corrupt or of an unknown format."""


def save_checkpoint(
    directory: str | Path,
    *,
    model_name: str,
    model_args: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    data_info: dict[str, Any],
    epoch: int,
    config: dict[str, Any],
    metrics: dict[str, Any],
    train_state: dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a checkpoint into `directory` (created if needed) and return it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # Tensors go to CPU first so a GPU-trained checkpoint loads on a CPU-only server.
    digests = {MODEL_FILE: _atomic_torch_save({k: v.detach().cpu() for k, v in state_dict.items()}, d / MODEL_FILE)}
    if train_state is not None:
        digests[STATE_FILE] = _atomic_torch_save(train_state, d / STATE_FILE)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"name": model_name, "args": model_args},
        "data": data_info,
        "epoch": epoch,
        "config": config,
        "metrics": metrics,
        "history": history or [],  # metrics of every epoch so far, for curves and reports
        "files": digests,
        "versions": {"torch": torch.__version__, "cnnray": _cnnray_version()},
    }
    atomic_write_bytes(json.dumps(meta, indent=2, sort_keys=True).encode(), d / META_FILE)
    return d


def read_meta(directory: str | Path) -> dict[str, Any]:
    """Read and sanity-check meta.json (no digests checked; see `verify_checkpoint`)."""
    d = Path(directory)
    path = d / META_FILE
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {d} is not a directory")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {d} has no {META_FILE}: incomplete or not a cnnray checkpoint") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {d}: cannot read {META_FILE}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {d}: {META_FILE} is not a cnnray checkpoint description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {d}: format version {meta.get('format_version')!r} is not supported "
            f"(this cnnray reads version {FORMAT_VERSION})"
        )
    return meta


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Check every listed file against its SHA-256; return the metadata."""
    d = Path(directory)
    meta = read_meta(d)
    for name, digest in meta.get("files", {}).items():
        if "/" in name or name.startswith("."):
            raise CheckpointError(f"checkpoint {d}: unexpected file name {name!r} in {META_FILE}")
        try:
            actual = _sha256(d / name)
        except OSError:
            raise CheckpointError(f"checkpoint {d} is missing {name}") from None
        if actual != digest:
            raise CheckpointError(f"checkpoint {d}: {name} is corrupt (SHA-256 mismatch)")
    return meta


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model from the registry and load its verified weights (eval mode)."""
    from cnnray.models import build_model

    d = Path(directory)
    meta = verify_checkpoint(d)
    try:
        model = build_model(meta["model"]["name"], **meta["model"]["args"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {d}: cannot rebuild the model: {e}") from None
    state = _safe_torch_load(d / MODEL_FILE, map_location)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {d}: weights do not fit the model: {str(e).splitlines()[0]}") from None
    return model.to(map_location).eval(), meta


def load_train_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Optimizer/scheduler state for resuming (verified, tensors and plain values only)."""
    d = Path(directory)
    meta = verify_checkpoint(d)
    if STATE_FILE not in meta.get("files", {}):
        raise CheckpointError(f"checkpoint {d} holds no training state to resume from")
    return _safe_torch_load(d / STATE_FILE, map_location)


def load_weights(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The verified state_dict alone."""
    d = Path(directory)
    verify_checkpoint(d)
    return _safe_torch_load(d / MODEL_FILE, map_location)


# --- helpers ----------------------------------------------------------------------------
def _safe_torch_load(path: Path, map_location: str | torch.device) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for bad or hostile files
        raise CheckpointError(f"cannot load {path}: {str(e).splitlines()[0]}") from None


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through a temporary file in the same folder, fsync, then rename into place:
    readers see the old file or the new one, never a torn one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_torch_save(obj: Any, path: Path) -> str:
    atomic_write(path, lambda f: torch.save(obj, f))
    return _sha256(path)


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """`data` into `path` with `atomic_write` (the folder must exist)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(obj: Any, path: str | Path) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), p)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cnnray_version() -> str:
    from cnnray import __version__

    return __version__
