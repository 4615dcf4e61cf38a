"""ONNX files of a PixelGraph: torch.onnx.export (the dynamo exporter), onnx.checker, and
ONNX Runtime sessions to run them (Serve's onnxruntime runtime and export verification).

onnx, onnxscript and onnxruntime are the `cnnray[onnx]` extra: imported inside functions,
so cnnray works without them until an ONNX file is asked for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from cnnray.errors import first_line
from cnnray.export.graph import ExportError, PixelGraph, quiet_exporters, require

INPUT_NAME = "pixels"  # the graph's input: N x C x H x W
OUTPUT_NAME = "logits"  # its output: N x K float32
def onnx_bytes(graph: PixelGraph, input_shape: tuple[int, int, int], what: str,
               metadata: Mapping[str, Any] | None = None) -> bytes:
    """The serialised ONNX model of `graph` (input `pixels`, batch dimension dynamic),
    with `metadata` as metadata_props (values JSON-encoded unless strings), checked by
    onnx.checker (full check, shapes inferred). `what` names the model in errors.
    Raises ExportError (one line) when the exporter or the checker refuses it."""
    onnx = require("onnx")
    require("onnxscript")  # the dynamo exporter's op library
    from cnnray.export.pt2 import export_program

    # torch.export first (the program a .pt2 holds), then ONNX from that program: a model
    # torch.export refuses is refused at once, not after the ONNX exporter's retries.
    exported = export_program(graph, input_shape, what, to="ONNX")
    try:
        with torch.inference_mode(False), torch.no_grad(), quiet_exporters():
            program = torch.onnx.export(
                exported, (), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                verbose=False, report=False,
            )
        proto = program.model_proto
    except Exception as e:  # the exporter raises many kinds (UserError, TorchExportError, ...)
        raise ExportError(f"cannot export {what} to ONNX: {first_line(e, 300)}") from None
    for key, value in (metadata or {}).items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value if isinstance(value, str) else json.dumps(value)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"{what}: the ONNX checker refuses the exported graph: {first_line(e, 300)}") from None
    return proto.SerializeToString()


def read_metadata(model: bytes | str) -> dict[str, str]:
    """metadata_props of an ONNX file (path) or serialised model, as a dict of strings."""
    onnx = require("onnx")
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model, load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def ort_session(model: bytes | str, threads: int) -> Any:
    """An ONNX Runtime CPU session of `model` (a path or serialised bytes) with `threads`
    intra-op threads (Serve sets torch's the same way: one per reserved CPU) and one
    inter-op thread (the graph is one chain: nothing runs beside it)."""
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # ORT's intra-op pool spins between tasks by default, burning a core for ~ms after each
    # batch: on a replica that shares its cores (the HTTP server, decoding) that is lost CPU.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only: no optimiser notes per session
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def run_session(session: Any, x: np.ndarray | torch.Tensor) -> np.ndarray:
    """The graph's logits (N x K float32) for the batch `x` (its input dtype)."""
    arr = x.numpy() if isinstance(x, torch.Tensor) else x
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(arr)})[0]
