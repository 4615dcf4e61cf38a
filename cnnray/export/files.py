"""`cnnray export`'s work: find the checkpoint, build the graph, write the file atomically,
and verify it against the checkpoint on a sample of its test set before it is renamed into
place (a file at `out` is always one that passed).

    export_checkpoint("runs/mnist", "onnx", "mnist.onnx")           # a run folder: its best checkpoint
    export_checkpoint("runs/mnist/ray/x/epoch-0003", "pt2", "m.pt2")  # a checkpoint folder

Errors: CheckpointError, ConfigError, DataError for bad input (the CLI's exit 2), ExportError
for a model or op the exporter refuses and for a file that fails verification (exit 1).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from cnnray.checkpoint import META_FILE, CheckpointError, atomic_write_json, file_mode, load_model
from cnnray.export.graph import PixelGraph
from cnnray.errors import first_line
from cnnray.export.graph import ExportError
from cnnray.files import RESULT_FILE  # what `cnnray train --out` writes
from cnnray.export.verify import Comparison, compare

FORMATS = ("onnx", "pt2")
SAMPLE = 512  # test images the export is verified on (~1 s of a small model's forward passes)


class VerificationError(ExportError):
    """The exported file does not give the checkpoint's predictions."""


@dataclass(frozen=True)
class ExportReport:
    out: Path
    format: str
    checkpoint: Path
    comparison: Comparison
    seconds: float

    def describe(self) -> str:
        return (f"{self.format} file {self.out} from {self.checkpoint}: verified on {self.comparison.describe()} "
                f"({self.seconds:.1f} s)")


def checkpoint_digest(directory: str | Path) -> str:
    """SHA-256 of the checkpoint's meta.json: it lists the weights' own SHA-256 beside the
    architecture, input description and TTA, so it names everything the graph depends on."""
    try:
        return hashlib.sha256((Path(directory) / META_FILE).read_bytes()).hexdigest()
    except OSError as e:
        raise CheckpointError(f"checkpoint {directory}: cannot read {META_FILE}: {e.strerror or e}") from None


def resolve_source(path: str | Path, stack: ExitStack) -> Path:
    """A checkpoint folder (meta.json) as it is; a `cnnray train --out` run folder
    (result.json) -> its best checkpoint, the one its test accuracy was measured on."""
    from cnnray.paths import resolve_path

    p = Path(resolve_path(str(path), "run or checkpoint folder"))
    if (p / META_FILE).is_file():
        return p
    if (p / RESULT_FILE).is_file():
        from cnnray.checkpoint import resolve_checkpoint

        try:
            recorded = json.loads((p / RESULT_FILE).read_text())["checkpoint"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"run folder {p}: {RESULT_FILE} names no checkpoint ({e})") from None
        return resolve_checkpoint(str(recorded), p, stack)
    raise CheckpointError(f"{p} is neither a checkpoint folder ({META_FILE}) nor a run folder ({RESULT_FILE})")


InputDescription = tuple[tuple[int, int, int], list[str], list[float], list[float]]


def input_description(meta: dict[str, Any], where: Path) -> InputDescription:
    """(C, H, W), class names, mean, std from meta.json's "data" (CheckpointError if absent)."""
    data = meta.get("data") or {}
    try:
        c, h, w = (int(s) for s in data["input_shape"])
        classes = [str(x) for x in data["classes"]]
        return (c, h, w), classes, [float(x) for x in data["mean"]], [float(x) for x in data["std"]]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {where}: meta.json lacks the input description ({e})") from None


def metadata(meta: dict[str, Any], ckpt: Path, input_dtype: str) -> dict[str, Any]:
    """What a client needs beside the graph (ONNX metadata_props, the .pt2 sidecar)."""
    from cnnray import __version__
    from cnnray.checkpoint import checkpoint_tta

    shape, classes, mean, std = input_description(meta, ckpt)
    return {
        "cnnray.model": meta["model"]["name"],
        "cnnray.classes": classes,
        "cnnray.input_shape": list(shape),  # C, H, W; the batch dimension N is dynamic
        "cnnray.input_dtype": input_dtype,
        "cnnray.input_range": "0..255",  # raw pixels: normalisation is in the graph
        "cnnray.mean": mean,
        "cnnray.std": std,
        "cnnray.tta": checkpoint_tta(meta),
        "cnnray.checkpoint_sha256": checkpoint_digest(ckpt),
        "cnnray.version": __version__,
    }


def held_out_sample(meta: dict[str, Any], n: int, data_dir: str | None = None) -> torch.Tensor:
    """The first `n` images (uint8 N x C x H x W) of the checkpoint's test split, as its
    run evaluated it (same dataset, subset and seed); `data_dir` overrides the recorded one.
    Never downloads. ConfigError/DataError when the data cannot be read."""
    from cnnray.config import TrainConfig
    from cnnray.data import take_subset
    from cnnray.train.worker_data import load_for

    cfg = TrainConfig.from_dict(meta.get("config") or {})
    cfg = replace(cfg, download=False, **({"data_dir": data_dir} if data_dir else {}))
    ds = load_for(cfg)
    images, _ = take_subset(ds.test_images, ds.test_labels, cfg.subset, cfg.seed)
    return images[:n]


def reference_logits(model: torch.nn.Module, meta: dict[str, Any], images: torch.Tensor) -> torch.Tensor:
    """cnnray's own logits for uint8 (or 0..255 float) images: training's normalisation and
    the checkpoint's TTA, the path of the test evaluation and Serve."""
    from cnnray.checkpoint import checkpoint_tta
    from cnnray.data import normalize
    from cnnray.models.tta import tta_logits

    _, _, mean, std = input_description(meta, Path("?"))
    with torch.inference_mode():
        return tta_logits(model, normalize(images, mean, std), checkpoint_tta(meta))


def export_checkpoint(
    source: str | Path,
    fmt: str,
    out: str | Path,
    *,
    input_dtype: str = "float32",
    sample: int = SAMPLE,
    data_dir: str | None = None,
    images: torch.Tensor | None = None,
) -> ExportReport:
    """Export the checkpoint `source` (or a run folder's best) to `out` in `fmt` and verify it
    on `images` (uint8 N x C x H x W; default the first `sample` test images)."""
    from cnnray.checkpoint import checkpoint_tta
    from cnnray.paths import resolve_path

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    start = time.perf_counter()
    out_path = Path(resolve_path(str(out), "--out", lasting=True))
    with ExitStack() as stack:
        ckpt = resolve_source(source, stack)
        model, meta = load_model(ckpt)
        props = metadata(meta, ckpt, input_dtype)
    shape, _, mean, std = input_description(meta, ckpt)
    what = f"model {meta['model']['name']!r}"
    # The file holds NCHW weights (what ONNX stores and what GPU consumers expect), from a
    # copy: the checkpoint's model stays channels-last on a CPU (inference_layout), the
    # layout cnnray's own predictions, the reference below, are computed in.
    nchw = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    graph = PixelGraph(nchw, mean, std, checkpoint_tta(meta), input_dtype=input_dtype)
    # Exported before the test data is read: a model that cannot export is refused at once.
    if fmt == "onnx":
        from cnnray.export.onnx import onnx_bytes, ort_session, run_session

        data = onnx_bytes(graph, shape, what, props)
    else:
        from cnnray.export.pt2 import export_program, load_program, program_bytes

        data = program_bytes(export_program(graph, shape, what))
    del graph, nchw
    if images is None:
        images = held_out_sample(meta, sample, data_dir)
    reference = reference_logits(model, meta, images)
    x = images if input_dtype == "uint8" else images.float()

    def run(path: str) -> torch.Tensor:
        if fmt == "onnx":
            return torch.from_numpy(run_session(ort_session(path, torch.get_num_threads()), x))
        with torch.inference_mode():
            return load_program(path)(x)

    comparison = _write_verified(out_path, data, run, reference)
    if fmt == "pt2":  # torch.export.save keeps no free-form metadata: a sidecar beside it
        atomic_write_json(props, sidecar_path(out_path))
    return ExportReport(out_path, fmt, ckpt, comparison, time.perf_counter() - start)


def sidecar_path(pt2: Path) -> Path:
    """FILE.pt2 -> FILE.pt2.json, the metadata of a .pt2 file."""
    return pt2.with_name(pt2.name + ".json")


def _write_verified(
    out: Path, data: bytes, run: Callable[[str], torch.Tensor], reference: torch.Tensor
) -> Comparison:
    """Write `data` to a temporary file beside `out`, run that file (`run(path)` -> logits),
    and rename it to `out` only if its logits match `reference`; VerificationError if not.
    The file gets the mode a plain open() gives (umask), not mkstemp's 0600."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=out.suffix)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            comparison = compare(reference, run(tmp))
        except Exception as e:  # the runtime cannot load or run what was written
            raise VerificationError(f"the exported file cannot be run: {first_line(e, 300)}") from None
        if not comparison.ok:
            raise VerificationError(f"the exported file does not match the checkpoint: {comparison.describe()}")
        os.replace(tmp, out)
        return comparison
    finally:
        Path(tmp).unlink(missing_ok=True)
