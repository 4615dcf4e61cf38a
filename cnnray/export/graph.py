"""The graph an exported file holds: a cnnray model wrapped so that a client's pixels go in
and cnnray's logits come out.

    graph = PixelGraph(model, mean, std, tta)        # model as load_model returns it
    logits = graph(pixels)                           # N x C x H x W, 0..255 -> N x K float32

Normalisation is training's formula, (x / 255 - mean) / std written as x * scale + shift
(cnnray.data.normalization, the constants Serve and the test evaluation use), and the
test-time augmentation is cnnray.models.tta.tta_logits itself, traced into the graph; so the
file alone gives the predictions that `cnnray train`'s test accuracy and Serve give.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from collections.abc import Sequence

import torch
from torch import nn

from cnnray.models.tta import check_tta, tta_logits

MAX_BATCH = 1 << 16  # the batch dimension's upper bound in the graph (dynamic below it)


class ExportError(Exception):
    """A model, op or file that cannot be exported; the message is one line naming it."""


def require(module: str) -> Any:
    """Import one of the `cnnray[onnx]` extra's packages, or ExportError saying how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{module} is not installed: pip install 'cnnray[onnx]'") from None


@contextmanager
def quiet_exporters() -> Iterator[None]:
    """Silence the exporters' own log lines and Python warnings while they run (torch.export
    logs a guard failure as a warning before raising it; the ONNX exporter prints its
    progress): the caller reports one line per outcome."""
    prefixes = ("torch", "onnxscript", "onnx_ir", "onnx")
    loggers = [logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict) if n.split(".")[0] in prefixes]
    loggers += [logging.getLogger(p) for p in prefixes]
    before = [(lg, lg.disabled) for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
    finally:
        for lg, disabled in before:
            lg.disabled = disabled


INPUT_DTYPES = ("float32", "uint8")  # what the exported graph's one input can be


class PixelGraph(nn.Module):
    """`model` behind normalisation and TTA.

    Input: N x C x H x W pixels in 0..255, float32 (or uint8 when `input_dtype` is "uint8":
    ONNX gives a graph input one type, so a file takes one or the other); with
    `pixels=False` the input is already normalised (what Serve's preprocessing hands its
    runtime) and only the TTA and the model are in the graph. Output: N x K float32 logits.
    """

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        tta: str,
        *,
        pixels: bool = True,
        input_dtype: str = "float32",
    ) -> None:
        super().__init__()
        from cnnray.data.loader import normalization  # the one normalisation (training, Serve)

        if input_dtype not in INPUT_DTYPES:
            raise ValueError(f"unknown input dtype {input_dtype!r}; choose one of: {', '.join(INPUT_DTYPES)}")
        self.model = model
        self.tta = check_tta(tta)
        self.pixels = pixels
        self.input_dtype = input_dtype
        scale, shift = normalization(mean, std)
        # Buffers, not Python floats: constants of the graph, shaped 1 x C x 1 x 1.
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pixels:
            x = x.to(torch.float32) * self.scale + self.shift
        return tta_logits(self.model, x, self.tta)


def example_input(input_shape: Sequence[int], batch: int = 2, input_dtype: str = "float32") -> torch.Tensor:
    """A batch of `batch` mid-grey images of `input_shape` (C, H, W): the example the
    exporters trace with (values are irrelevant to the graph; batch 2, not 1, because
    torch.export specialises a dimension of size 1 to a constant)."""
    dtype = torch.uint8 if input_dtype == "uint8" else torch.float32
    return torch.full((batch, *input_shape), 128, dtype=dtype)
