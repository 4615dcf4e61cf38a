"""For the serving tests: the data_info of MNIST- and CIFAR-shaped checkpoints, checkpoints
of small models, images encoded in memory, and training's own decode of them."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MNIST_INFO = {
    "dataset": "mnist",
    "input_shape": [1, 28, 28],
    "mean": [0.1307],
    "std": [0.3081],
    "classes": [str(i) for i in range(10)],
}
CIFAR_INFO = {
    "dataset": "cifar10",
    "input_shape": [3, 32, 32],
    "mean": [0.4914, 0.4822, 0.4465],
    "std": [0.2470, 0.2435, 0.2616],
    "classes": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


# --- helpers shared by the Serve test modules ---------------------------------------------------
@contextlib.contextmanager
def one_thread():
    """torch on one thread: on a busy shared machine, two threads on two loaded cores make
    small conv steps ten times slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def save_model(directory: Path, model_name: str, data_info: dict, *, seed: int = 0,
               model: torch.nn.Module | None = None, metrics: dict | None = None, **overrides) -> Path:
    """A real cnnray checkpoint of `model` (or of freshly initialised weights)."""
    from cnnray.checkpoint import save_checkpoint
    from cnnray.models import build_model, resolve_model_args

    c, h, w = data_info["input_shape"]
    args = resolve_model_args(model_name, num_classes=len(data_info["classes"]), in_channels=c, image_size=(h, w))
    if model is None:
        torch.manual_seed(seed)
        model = build_model(model_name, **args)
    return save_checkpoint(
        directory, model_name=model_name, model_args=args, state_dict=model.state_dict(),
        data_info={**data_info, **overrides}, epoch=1, config={"seed": seed},
        metrics=metrics if metrics is not None else {"val_accuracy": 0.1, "val_loss": float("nan")},
    )


def train_cnn(images: torch.Tensor, labels: torch.Tensor, *, steps: int, seed: int = 0) -> torch.nn.Module:
    """The lecture's `cnn`, trained for `steps` SGD steps with training's own batches."""
    from cnnray.data import ShardedBatches
    from cnnray.models import build_model, resolve_model_args

    torch.manual_seed(seed)
    model = build_model("cnn", **resolve_model_args("cnn"))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = ShardedBatches(images, labels, batch_size=64, shuffle=True, drop_last=True, seed=seed,
                             mean=MNIST_INFO["mean"], std=MNIST_INFO["std"])
    done, epoch = 0, 0
    model.train()
    with one_thread():
        while done < steps:
            batches.set_epoch(epoch)
            for x, y in batches:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                done += 1
                if done == steps:
                    break
            epoch += 1
    return model.eval()


def offline_probs(checkpoint: Path, pixels_uint8: torch.Tensor) -> torch.Tensor:
    """What offline evaluation computes for N x C x H x W uint8 images: training's
    normalisation, the checkpoint's model, softmax."""
    from cnnray.checkpoint import load_model
    from cnnray.data import normalize

    model, meta = load_model(checkpoint)
    with torch.inference_mode(), one_thread():
        return torch.softmax(model(normalize(pixels_uint8, meta["data"]["mean"], meta["data"]["std"])), 1)


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def training_decode(files: list[bytes]) -> np.ndarray:
    """Decode image files with training's image-folder decoder: uint8 N x C x H x W, every
    image converted and resized as the first one sets (what `cnnray train` would store)."""
    from cnnray.data.imagefolder import ImageItem, decode_images

    items = [ImageItem("train", "a", f"train{i}", data=d) for i, d in enumerate(files)]
    items.append(ImageItem("test", "a", "test0", data=files[0]))
    # decode_images sorts train items by name: keep the given order with zero-padded names
    items = [ImageItem(it.split, it.cls, f"{it.split}{i:04d}", data=it.data) for i, it in enumerate(items)]
    return decode_images(items, "test")["train_x"]


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def json_body(obj) -> bytes:
    return json.dumps(obj).encode()  # allow_nan: NaN and Infinity literals, as some clients send


# --- requests every route must refuse, with the status and a fragment of the error --------------
API_NOISE = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
BAD = [
    # (id, method, path, body, content type, status, fragment)
    ("not-an-image", "POST", "/predictions/digits", b"GIF? no: plain text", "image/png", 400, "not an image"),
    ("truncated-png", "POST", "/predictions/digits", png(API_NOISE)[:300], "image/png", 400, "cannot decode the PNG"),
    ("pcx", "POST", "/predictions/digits", encode(Image.new("L", (28, 28)), "PCX"), "image/png", 400,
     "PCX images are not accepted"),
    ("empty-body", "POST", "/predictions/digits", b"", "image/png", 400, "empty body"),
    ("image-too-large", "POST", "/predictions/digits", encode(Image.new("L", (600, 600)), "PNG"), "image/png", 413,
     "larger than the limit"),
    ("body-over-limit", "POST", "/predictions/digits", b"\x89PNG" + bytes(300 * 1024), "image/png", 413,
     "over the limit"),
    ("wrong-type-torchserve", "POST", "/predictions/digits", png(API_NOISE), "application/json", 415,
     "send image/png, image/jpeg or image/bmp"),
    ("wrong-type-kserve", "POST", "/v1/models/digits:predict", json_body({"instances": []}), "text/plain", 415,
     "send application/json"),
    ("unknown-model-torchserve", "POST", "/predictions/nope", png(API_NOISE), "image/png", 404, "unknown model 'nope'"),
    ("unknown-model-kserve", "POST", "/v1/models/nope:predict", json_body({"instances": [b64(png(API_NOISE))]}),
     "application/json", 404, "served models: colour, digits, direct, swap"),
    ("invalid-json", "POST", "/v1/models/digits:predict", b'{"instances": [', "application/json", 400,
     "not valid JSON"),
    ("not-an-object", "POST", "/v1/models/digits:predict", b"[1, 2]", "application/json", 400, '{"instances"'),
    ("empty-instances", "POST", "/v1/models/digits:predict", json_body({"instances": []}), "application/json", 400,
     "no instances"),
    ("too-many-instances", "POST", "/v1/models/digits:predict",
     json_body({"instances": [b64(png(API_NOISE))] * 9}), "application/json", 400, "too many instances: 9, at most 8"),
    ("wrong-shape", "POST", "/v1/models/digits:predict", json_body({"instances": [np.zeros((28, 28)).tolist()]}),
     "application/json", 400, "instance 0: array of shape [28, 28]; expected [1, 28, 28]"),
    ("nan", "POST", "/v1/models/digits:predict",
     json_body({"instances": [np.full((1, 28, 28), np.nan).tolist()]}), "application/json", 400, "NaN or infinity"),
    ("infinity", "POST", "/v1/models/digits:predict",
     json_body({"instances": [np.zeros((1, 28, 28)).tolist(), np.full((1, 28, 28), np.inf).tolist()]}),
     "application/json", 400, "instance 1: array holds NaN or infinity"),
    ("bad-base64", "POST", "/v1/models/digits:predict", json_body({"instances": [{"b64": "@@@"}]}),
     "application/json", 400, "not valid base64"),
    ("b64-not-an-image", "POST", "/v1/models/digits:predict",
     json_body({"instances": [b64(png(API_NOISE)), b64(b"text")]}), "application/json", 400,
     "instance 1: not an image"),
    ("instance-with-extra-key", "POST", "/v1/models/digits:predict",
     json_body({"instances": [{"b64": "", "url": "http://x"}]}), "application/json", 400, "instances.0"),
    ("kserve-body-over-limit", "POST", "/v1/models/digits:predict",
     json_body({"instances": [{"b64": "A" * (300 * 1024)}]}), "application/json", 413, "over the limit"),
    ("wrong-method", "GET", "/v1/models/digits:predict", None, None, 404, "unknown model 'digits:predict'"),
    ("method-not-allowed", "DELETE", "/predictions/digits", None, None, 405, "Method Not Allowed"),
    ("no-such-route", "GET", "/v2/anything", None, None, 404, "Not Found"),
]


class LocalServer:
    """The HTTP app over `LocalBackend`, served by uvicorn in a thread on a free loopback port."""

    def __init__(self, models: dict, limits=None, lean: bool = True) -> None:
        import uvicorn

        from tests.helpers.processes import free_port

        from cnnray.serve.api import build_http_app
        from cnnray.serve.engine import LocalBackend

        self.backend = LocalBackend(models, limits=limits)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(build_http_app(self.backend, lean=lean), host="127.0.0.1", port=self.port,
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
