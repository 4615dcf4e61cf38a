"""Small helpers for the robustness tests: a real MNIST checkpoint, and random images in any format."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from tests.helpers.serve import MNIST_INFO
from tests.helpers.serve import save_model as shared_save_model


def save_model(directory: Path, model_name: str = "cnn", data_info: dict = MNIST_INFO, seed: int = 0,
               metrics: dict | None = None) -> Path:
    """A real cnnray checkpoint of freshly initialised weights (tests.helpers.serve's, MNIST by default)."""
    return shared_save_model(directory, model_name, data_info, seed=seed, metrics=metrics)


def png(seed: int, size: tuple[int, int] = (28, 28), mode: str = "L", fmt: str = "PNG") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = size if mode == "L" else (*size, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buf, format=fmt)
    return buf.getvalue()
