"""Layer-by-layer summary in the lecture's VGG19 table format.

Usage:
    from cnnray.models import build_model, format_layer_table, layer_table
    model = build_model("vgg19_imagenet")
    print(format_layer_table(layer_table(model, (3, 224, 224)), input_shape=(3, 224, 224)))

Rows come from forward hooks during one 1-sample forward pass, so they follow the order
layers actually run in (a pool used twice gives two rows), and shapes are measured, not
derived. The model can sit on any device, the meta device included (shapes only, fast).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

# Leaf module types that get a row, with the lecture's name for them. Activations,
# dropout and flatten have no row, as in the lecture's table.
_KINDS: tuple[tuple[tuple[type[nn.Module], ...], str], ...] = (
    ((nn.Conv2d,), "Convolution"),
    ((nn.MaxPool2d,), "Max-pooling"),
    ((nn.AvgPool2d, nn.AdaptiveAvgPool2d), "Average-pooling"),
    ((nn.Linear,), "Fully connected"),
    (
        (
            nn.BatchNorm1d,
            nn.BatchNorm2d,
            nn.BatchNorm3d,
            nn.SyncBatchNorm,
            nn.GroupNorm,
            nn.LayerNorm,
        ),
        "Normalization",
    ),
)


@dataclass(frozen=True)
class LayerRow:
    """One row of the table: a layer's output for a single sample and its parameters."""

    index: int  # 1-based; row 0 is the input
    kind: str  # "Convolution", "Max-pooling", "Average-pooling", ...
    output_shape: tuple[int, ...]  # without the batch dimension, e.g. (64, 224, 224)
    neurons: int  # product of output_shape
    params: int  # learned parameters of this layer (weights + biases + norm scales)


def _kind(module: nn.Module) -> str | None:
    for types, kind in _KINDS:
        if isinstance(module, types):
            return kind
    return None


def layer_table(model: nn.Module, input_shape: tuple[int, int, int]) -> list[LayerRow]:
    """Rows for every conv, pool, linear and norm layer, in execution order.

    Runs one forward pass in eval mode without gradients on a zero input of shape
    (1, *input_shape) on the model's device and dtype; the training mode is restored.
    """
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    rows: list[LayerRow] = []

    def make_hook(kind: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            shape = tuple(output.shape[1:])
            rows.append(
                LayerRow(
                    index=len(rows) + 1,
                    kind=kind,
                    output_shape=shape,
                    neurons=math.prod(shape),
                    params=sum(p.numel() for p in module.parameters()),
                )
            )

        return hook

    handles = []
    for module in model.modules():
        kind = _kind(module)
        if kind is not None and next(module.children(), None) is None:  # leaves only
            handles.append(module.register_forward_hook(make_hook(kind)))
    was_training = model.training
    try:
        model.eval()  # batch norm uses running stats: a batch of one is fine
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return rows


def _dims(shape: Sequence[int]) -> str:
    # The lecture writes "64 x 224 x 224" for maps and "4,096" for vectors.
    return " x ".join(f"{d:,}" for d in shape)


def format_layer_table(
    rows: Sequence[LayerRow], input_shape: Sequence[int] | None = None
) -> str:
    """The lecture's table as aligned text: one line per row, then the totals.

    With `input_shape` a row 0 "Input" comes first. A "Flattening to a vector" line marks
    where a multi-dimensional output feeds a fully connected layer, as in the lecture.
    The totals sum the rows, so the input's own values are not counted as neurons.
    """
    header = (
        "Layer No.",
        "Type of Layer",
        "Output Dimension",
        "No. of Neurons",
        "No. of Learned Parameters",
    )
    body: list[tuple[str, ...] | str] = []
    if input_shape is not None:
        body.append(("0", "Input", _dims(input_shape), "-", "-"))
    previous = tuple(input_shape) if input_shape is not None else None
    for row in rows:
        if row.kind == "Fully connected" and previous is not None and len(previous) > 1:
            body.append(f"Flattening to a vector of length {math.prod(previous):,}")
        dims = _dims(row.output_shape)
        body.append((str(row.index), row.kind, dims, f"{row.neurons:,}", f"{row.params:,}"))
        previous = row.output_shape
    totals = (
        "",
        "",
        "",
        f"Total: {sum(r.neurons for r in rows):,}",
        f"Total: {sum(r.params for r in rows):,}",
    )
    cells = [header, *[line for line in body if isinstance(line, tuple)], totals]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]

    def fmt(line: tuple[str, ...]) -> str:
        # Text columns left-aligned, number columns right-aligned.
        parts = [
            cell.ljust(width) if i < 3 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths))
        ]
        return "  ".join(parts).rstrip()

    lines = [fmt(header), "  ".join("-" * width for width in widths)]
    lines += [line if isinstance(line, str) else fmt(line) for line in body]
    lines.append(fmt(totals))
    return "\n".join(lines)
