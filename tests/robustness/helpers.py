"""Small helpers for the robustness tests: a real checkpoint, and the HTTP app in a thread."""

from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch

MNIST_INFO = {"dataset": "mnist", "input_shape": [1, 28, 28], "mean": [0.1307], "std": [0.3081],
              "classes": [str(i) for i in range(10)]}


def save_model(directory: Path, model_name: str = "cnn", data_info: dict = MNIST_INFO, seed: int = 0,
               metrics: dict | None = None) -> Path:
    """A real cnnray checkpoint of freshly initialised weights."""
    from cnnray.checkpoint import save_checkpoint
    from cnnray.models import build_model, resolve_model_args

    c, h, w = data_info["input_shape"]
    args = resolve_model_args(model_name, num_classes=len(data_info["classes"]), in_channels=c, image_size=(h, w))
    torch.manual_seed(seed)
    model = build_model(model_name, **args)
    return save_checkpoint(directory, model_name=model_name, model_args=args, state_dict=model.state_dict(),
                           data_info=data_info, epoch=1, config={"seed": seed},
                           metrics=metrics if metrics is not None else {"val_accuracy": 0.1})


def png(seed: int, size: tuple[int, int] = (28, 28), mode: str = "L", fmt: str = "PNG") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = size if mode == "L" else (*size, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buf, format=fmt)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """cnnray's HTTP app over `LocalBackend`, served by uvicorn in a thread on loopback."""

    def __init__(self, models: dict) -> None:
        import uvicorn

        from cnnray.serve.api import build_http_app
        from cnnray.serve.engine import LocalBackend

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(build_http_app(LocalBackend(models)), host="127.0.0.1", port=self.port,
                                log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
