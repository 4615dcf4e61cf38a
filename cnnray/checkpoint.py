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
import re
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from cnnray.errors import CheckpointError, first_line
# Re-exported: the store and the tests read these from here as well.
from cnnray.files import atomic_write, atomic_write_bytes, atomic_write_json, dir_mode, file_mode  # noqa: F401

FORMAT = "cnnray-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"


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
    tta: str = "none",
) -> Path:
    """Write a checkpoint into `directory` (created if needed) and return it.

    `tta` is the test-time augmentation its metrics were measured with (cnnray.models.tta);
    Serve and the report predict with the same."""
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
        "tta": tta,
        "files": digests,
        "versions": {"torch": torch.__version__, "cnnray": _cnnray_version()},
    }
    atomic_write_bytes(json.dumps(meta, indent=2, sort_keys=True).encode(), d / META_FILE)
    return d


def read_meta(directory: str | Path) -> dict[str, Any]:
    """Read and check the structure of meta.json (no digests checked; see `verify_checkpoint`).

    Raises CheckpointError for every malformed meta.json: not JSON, not an object, another
    format, or a field of the wrong type (so that no later reader meets a surprise)."""
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
    problem = _meta_problem(meta)
    if problem:
        raise CheckpointError(f"checkpoint {d}: malformed {META_FILE}: {problem}")
    return meta


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the fields of a parsed meta.json, or None."""
    model = meta.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str) or not isinstance(model.get("args"), dict):
        return 'model must be {"name": str, "args": {...}}'
    if not all(isinstance(k, str) for k in model["args"]):
        return "model args must be keyed by name"
    files = meta.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        return f"files must list {MODEL_FILE} and its SHA-256"
    for name, digest in files.items():
        if name not in (MODEL_FILE, STATE_FILE):
            return f"unexpected file name {name[:80]!r} (expected {MODEL_FILE} or {STATE_FILE})"
        if not isinstance(digest, str) or not _SHA256.match(digest):
            return f"the SHA-256 of {name} is not 64 hexadecimal digits"
    if not isinstance(meta.get("data", {}), dict):
        return "data must be an object"
    epoch = meta.get("epoch")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
        return "epoch must be an integer"
    from cnnray.models.tta import TTA_MODES

    if meta.get("tta", "none") not in TTA_MODES:  # absent: a checkpoint from before TTA
        return f"tta must be one of {', '.join(TTA_MODES)}"
    for key, kind in (("config", dict), ("metrics", dict), ("history", list)):
        if not isinstance(meta.get(key, kind()), kind):
            return f"{key} must be a{'n object' if kind is dict else ' list'}"
    return None


def checkpoint_tta(meta: dict[str, Any]) -> str:
    """The test-time augmentation a checkpoint's predictions use ("none" if it names none);
    `meta` as read_meta returns it (already checked)."""
    return str(meta.get("tta", "none"))


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Check every listed file against its SHA-256; return the metadata."""
    d = Path(directory)
    meta = read_meta(d)  # file names are checked there: model.pt or train_state.pt only
    for name, digest in meta["files"].items():
        try:
            actual = _sha256(d / name)
        except OSError:
            raise CheckpointError(f"checkpoint {d} is missing {name}") from None
        if actual != digest:
            raise CheckpointError(f"checkpoint {d}: {name} is corrupt (SHA-256 mismatch)")
    return meta


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model from the registry and load its verified weights (eval mode, in
    the layout evaluation and Serve run it in: cnnray.models.tta.inference_layout).

    The model is first built on the meta device (no memory) and its parameter shapes are
    compared with the weights', so arguments in meta.json that do not match the weights
    (say hidden sizes [20000, 20000] beside a 100k-parameter state_dict) are refused before
    anything of their size is allocated. Every failure is a CheckpointError."""
    from cnnray.models import build_model

    d = Path(directory)
    meta = verify_checkpoint(d)
    name, args = meta["model"]["name"], meta["model"]["args"]
    try:
        with torch.device("meta"):
            skeleton = build_model(name, **args)
    except Exception as e:  # unknown name or argument, or values the constructor refuses
        raise CheckpointError(f"checkpoint {d}: cannot rebuild the model: {first_line(e, 300)}") from None
    state = _safe_torch_load(d / MODEL_FILE, map_location)
    mismatch = _shape_mismatch(skeleton.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"checkpoint {d}: weights do not fit the model its {META_FILE} describes: {mismatch}")
    try:
        model = build_model(name, **args)  # now known to be the size of the weights
        model.load_state_dict(state, strict=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {d}: weights do not fit the model: {first_line(e, 300)}") from None
    from cnnray.models.tta import inference_layout

    return inference_layout(model.to(map_location), map_location).eval(), meta


def _shape_mismatch(expected: dict[str, torch.Tensor], state: Any) -> str | None:
    """The first difference between a model's state_dict (shapes only) and loaded weights."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return f"{MODEL_FILE} is not a dictionary of tensors"
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected), key=str)
    if missing or extra:
        return f"missing {missing[:3]}, unexpected {extra[:3]}"
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            return f"{key} is {list(state[key].shape)} in the weights, {list(tensor.shape)} in the model"
    return None


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


def _atomic_torch_save(obj: Any, path: Path) -> str:
    atomic_write(path, lambda f: torch.save(obj, f))
    return _sha256(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cnnray_version() -> str:
    from cnnray import __version__

    return __version__


def resolve_checkpoint(path: str, run_dir: Path, stack: ExitStack) -> Path:
    """A local directory for the checkpoint recorded as `path`.

    Tries the path itself, then its last three and two components under `run_dir` (the
    folder was moved or copied from a cluster: `ray/<run>/epoch-N` of a run,
    `runs/<trial>/epoch-N` of a sweep), then a `scheme://` URI copied into a temporary
    directory that lives as long as `stack`.
    """
    p = Path(path).expanduser()
    if "://" not in path and p.is_dir():
        return p
    parts = Path(path.split("://", 1)[-1].rstrip("/")).parts
    for k in (3, 2):
        moved = run_dir.joinpath(*parts[-k:])
        if len(parts) >= k and moved.is_dir():
            return moved
    if "://" in path:
        import pyarrow.fs

        local = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cnnray-report-")))
        try:
            pyarrow.fs.copy_files(path, str(local))
        except Exception as e:  # pyarrow raises OSError/ArrowInvalid/... per filesystem
            raise CheckpointError(f"cannot copy checkpoint {path}: {e}") from None
        return local
    raise CheckpointError(f"checkpoint {path} not found (nor at the same place under {run_dir})")
