"""Served models without Ray for the serve tests: `local` (the OIP v2, multipart and
autoscaling tests: the app through FastAPI's TestClient), `hostile` (the hostile-input tests:
the app on a real loopback port, one per module so a test that stalls connections cannot
reach another module's), `good_checkpoint` (a plain cnn checkpoint folder)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.hostile import hostile_server
from tests.helpers.serve import MNIST_INFO, png, save_model

VERSION = 3  # the served model-store version (any other is refused)
LIMITS = {"max_body_bytes": 256 * 1024, "max_instances": 8, "max_image_pixels": 512 * 512}


@dataclass
class Local:
    client: object  # fastapi.testclient.TestClient over build_http_app(LocalBackend)
    backend: object
    pngs: list[bytes]  # 4 MNIST-sized PNGs
    pixels: np.ndarray  # the same images, float32 N x 1 x 28 x 28, 0..255


def digit_pngs(n: int, seed: int = 0) -> tuple[list[bytes], np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return [png(a) for a in arrays], arrays[:, None].astype(np.float32)


@pytest.fixture(scope="session")
def local(tmp_path_factory) -> Local:
    """The HTTP app over LocalBackend (the replica's routes and preprocessing, no Ray),
    serving "digits" as model-store version VERSION, through FastAPI's TestClient."""
    from fastapi.testclient import TestClient

    from cnnray.serve.api import build_http_app
    from cnnray.serve.engine import LocalBackend
    from cnnray.serve.schemas import Limits, ModelRef

    ck = save_model(Path(tmp_path_factory.mktemp("oip")) / "digits", "cnn", MNIST_INFO)
    backend = LocalBackend({"digits": ModelRef(path=str(ck), version=VERSION)}, limits=Limits(**LIMITS))
    pngs, pixels = digit_pngs(4)
    with TestClient(build_http_app(backend)) as client:
        yield Local(client, backend, pngs, pixels)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """The in-process app on a free loopback port over `digits` and `overflow`, with the
    hostile tests' body timeout (tests/helpers/hostile.hostile_server); stopped at the end."""
    server = hostile_server(tmp_path_factory.mktemp("hostile"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    """A freshly initialised `cnn` checkpoint for MNIST-shaped input (untrained weights)."""
    return save_model(tmp_path_factory.mktemp("good") / "ck", "cnn", MNIST_INFO)
