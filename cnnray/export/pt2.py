"""torch.export `.pt2` files of a PixelGraph, with a JSON sidecar of metadata
(`FILE.pt2.json`: torch.export.save has no place for free-form metadata)."""

from __future__ import annotations

import io

import torch

from cnnray.errors import first_line
from cnnray.export.graph import MAX_BATCH, ExportError, PixelGraph, example_input, quiet_exporters


def export_program(
    graph: PixelGraph, input_shape: tuple[int, int, int], what: str, to: str = "torch.export"
) -> torch.export.ExportedProgram:
    """torch.export.export of `graph` with a dynamic batch dimension; ExportError (one
    line, naming `what`) when torch.export refuses the model."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    ex = example_input(input_shape, input_dtype=graph.input_dtype)
    try:
        with torch.inference_mode(False), torch.no_grad(), quiet_exporters():
            return torch.export.export(graph.eval(), (ex,), dynamic_shapes=({0: batch},))
    except Exception as e:
        raise ExportError(f"cannot export {what} {'with torch.export' if to == 'torch.export' else 'to ' + to}: "
                          f"{first_line(e, 300)}") from None


def program_bytes(program: torch.export.ExportedProgram) -> bytes:
    """The `.pt2` archive of `program` (torch.export.save into memory)."""
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def load_program(path: str) -> torch.nn.Module:
    """The callable module of a `.pt2` file (torch.export.load: the graph and its tensors,
    no pickled Python objects)."""
    return torch.export.load(path).module()
