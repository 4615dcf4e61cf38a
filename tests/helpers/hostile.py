"""For the hostile-client tests (tests/serve/test_hostile_*.py): a /healthz probe run while an
attack goes on, models that misbehave (NaN weights, outputs that overflow), images whose
decoding costs more than their pixels, stalled connections, and the in-process servers."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

from cnnray.serve.schemas import Limits
from tests.helpers.serve import MNIST_INFO, LocalServer, save_model

HEALTH_P99_BOUND_S = 1.0  # generous: the target is 0.1 s; a blocked event loop shows as seconds
BODY_TIMEOUT_S = 2.0  # the in-process app's body timeout (the default is 10 s)
NOISE = np.random.default_rng(3).integers(0, 256, (28, 28), dtype=np.uint8)


class HealthProbe:
    """GET /healthz every `every_s` seconds in a thread while an attack runs: latencies and failures."""

    def __init__(self, url: str, every_s: float = 0.05) -> None:
        self.url, self.every_s = url + "/healthz", every_s
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                r = requests.get(self.url, timeout=30)
                if r.status_code != 200:
                    self.failures.append(f"status {r.status_code}")
            except requests.RequestException as e:
                self.failures.append(type(e).__name__)
            self.latencies.append(time.perf_counter() - start)
            self._stop.wait(self.every_s)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        deadline = time.monotonic() + 10
        while len(self.latencies) < 3 and time.monotonic() < deadline:  # a quick attack: a few probes more
            time.sleep(0.01)
        self._stop.set()
        self._thread.join(60)

    def p99(self) -> float:
        return float(np.quantile(self.latencies, 0.99))

    def check(self, what: str) -> None:
        assert len(self.latencies) >= 3, f"{what}: too few /healthz probes ({len(self.latencies)})"
        assert not self.failures, f"{what}: /healthz failed during the attack: {self.failures[:5]}"
        p99 = self.p99()
        print(f"\n[healthz during {what}] n={len(self.latencies)} p50={np.median(self.latencies) * 1000:.1f} ms "
              f"p99={p99 * 1000:.1f} ms max={max(self.latencies) * 1000:.1f} ms")
        assert p99 < HEALTH_P99_BOUND_S, f"{what}: /healthz p99 {p99 * 1000:.0f} ms"


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def overflow_model(directory: Path) -> Path:
    """A `cnn` that answers a blank image (0 in, 0 out: no biases) but overflows to NaN on a
    bright one (weights x 1e20 per layer); mean 0 and std 1, so blank stays 0 when normalised."""
    from cnnray.models import build_model, resolve_model_args

    torch.manual_seed(0)
    model = build_model("cnn", **resolve_model_args("cnn"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.zeros_like(p) if name.endswith("bias") else p * 1e20)
    return save_model(directory, "cnn", MNIST_INFO, model=model, mean=[0.0], std=[1.0])


def nan_model(directory: Path) -> Path:
    """A checkpoint whose weights are NaN, as a run that diverged in epoch 1 leaves."""
    from cnnray.models import build_model, resolve_model_args

    model = build_model("cnn", **resolve_model_args("cnn"))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return save_model(directory, "cnn", MNIST_INFO, model=model)


def predict(url: str, model: str, instances: list, timeout: float = 60) -> requests.Response:
    return requests.post(f"{url}/v1/models/{model}:predict", json={"instances": instances}, timeout=timeout)


def post_json_bytes(url: str, body: bytes, timeout: float = 120) -> requests.Response:
    return requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=timeout)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_split(pixels: np.ndarray, idat_bytes: int, extra: bytes = b"") -> bytes:
    """A valid 8-bit gray PNG of `pixels`, its image data in IDAT chunks of `idat_bytes`,
    `extra` (more chunks) before them."""
    import struct
    import zlib

    h, w = pixels.shape
    raw = zlib.compress(b"".join(b"\x00" + row.tobytes() for row in pixels))
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    idats = b"".join(png_chunk(b"IDAT", raw[i:i + idat_bytes]) for i in range(0, len(raw), idat_bytes))
    return b"\x89PNG\r\n\x1a\n" + ihdr + extra + idats + png_chunk(b"IEND", b"")


def bmp_rle8(pixels: np.ndarray) -> bytes:
    """A valid RLE8-compressed BMP of `pixels` (one (1, value) pair per pixel: the worst case)."""
    import struct

    h, w = pixels.shape
    rows = [b"".join(b"\x01" + bytes([v]) for v in row.tolist()) + b"\x00\x00" for row in pixels[::-1]]
    data = b"".join(rows)[:-2] + b"\x00\x01"  # end of bitmap instead of the last end of line
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 8, 1, len(data), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + info + palette + data


def jpeg(pixels: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def decode_cost_bombs() -> list[tuple[str, bytes]]:
    """Images whose decoding costs far more than their pixels say (Pillow loops in Python):
    3-4 s each at 8 MiB on the shared machine; these are the smallest that cross the limits."""
    from cnnray.serve.preprocess import MAX_PNG_CHUNKS

    text = png_chunk(b"tEXt", b"k\x00v")
    return [
        ("png-text-chunks", png_split(NOISE, 1 << 16, extra=text * MAX_PNG_CHUNKS)),
        ("png-empty-idats", png_split(NOISE, 1 << 16, extra=png_chunk(b"IDAT", b"") * MAX_PNG_CHUNKS)),
        ("bmp-rle8", bmp_rle8(np.tile(NOISE, (16, 16)))),  # 448 x 448: ~400 KB
        ("jpeg-comment-segments", jpeg(NOISE)[:2] + b"\xff\xfe\x00\x02" * (MAX_PNG_CHUNKS + 2000) + jpeg(NOISE)[2:]),
        ("jpeg-fill-bytes", jpeg(NOISE)[:2] + b"\xff" * (4 * MAX_PNG_CHUNKS) + jpeg(NOISE)[2:]),
    ]


def stalled_connections(host: str, port: int, path: str, n: int) -> list[socket.socket]:
    """`n` connections that send headers announcing 100 bytes, one byte of body, then nothing."""
    socks = []
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/png\r\n"
            f"Content-Length: 100\r\n\r\n").encode()
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(head + b"\x89")
        socks.append(s)
    return socks


def read_statuses(socks: list[socket.socket], timeout_s: float) -> list[str]:
    """The status line each socket receives, all within one deadline of `timeout_s` seconds."""
    deadline = time.monotonic() + timeout_s
    return [read_status(s, max(0.01, deadline - time.monotonic())) for s in socks]


def read_status(s: socket.socket, timeout_s: float) -> str:
    s.settimeout(timeout_s)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError as e:  # socket.timeout included: nothing came back in time
        return f"no answer ({type(e).__name__})"
    return data.split(b"\r\n", 1)[0].decode("latin-1")


def hostile_server(root: Path, **limits) -> LocalServer:
    """The in-process app on a free loopback port over `digits` (a plain cnn) and `overflow`
    (overflow_model), with the body timeout BODY_TIMEOUT_S; stop() it when done."""
    return LocalServer(_models(root), Limits(body_timeout_s=BODY_TIMEOUT_S, **limits))


def twin_servers(root: Path) -> list[LocalServer]:
    """The app with its lean inference path and without it (FastAPI's router all the way),
    over the same models: [lean, plain]."""
    models = _models(root)
    return [LocalServer(models, Limits(body_timeout_s=BODY_TIMEOUT_S), lean=lean) for lean in (True, False)]


def _models(root: Path) -> dict:
    from cnnray.serve.schemas import ModelRef

    return {
        "digits": ModelRef(path=str(save_model(root / "digits", "cnn", MNIST_INFO)), version=1),
        "overflow": ModelRef(path=str(overflow_model(root / "overflow")), version=1),
    }
