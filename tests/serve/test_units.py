"""Serving pieces without Ray: preprocessing against training's own decoder, schemas, metrics
merging, the Serve config file, and the CLI's refusals. Also the helpers the Serve tests share."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import REPO
from tests.helpers.serve import MNIST_INFO, encode, png, save_model, training_decode

NOISE_PNG = png(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))


# --- preprocessing is training's conversion --------------------------------------------------------
def test_png_decodes_to_the_training_pixels():
    from cnnray.serve.preprocess import decode_image

    rng = np.random.default_rng(0)
    digit = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    data = png(digit)
    served = decode_image(data, [1, 28, 28], 10**6)
    assert served.dtype == torch.uint8 and served.shape == (1, 28, 28)
    assert torch.equal(served[0], torch.from_numpy(digit))
    assert np.array_equal(served.numpy(), training_decode([data])[0])


def test_colour_jpeg_of_another_size_is_resized_as_training_resizes():
    from cnnray.serve.preprocess import decode_image

    rng = np.random.default_rng(1)
    first = encode(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), "PNG")
    photo = encode(Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)), "JPEG", quality=90)
    gray = encode(Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)), "PNG")
    expected = training_decode([first, photo, gray])
    assert np.array_equal(decode_image(photo, [3, 32, 32], 10**6).numpy(), expected[1])
    # a grayscale file for a colour model: repeated on the three channels, as training does
    assert np.array_equal(decode_image(gray, [3, 32, 32], 10**6).numpy(), expected[2])


def test_colour_image_for_a_grayscale_model_becomes_one_channel():
    from cnnray.serve.preprocess import decode_image

    rgba = np.full((28, 28, 4), 200, dtype=np.uint8)
    rgba[..., 3] = 255  # opaque (transparency is composited on white: tests/data/test_decode.py)
    out = decode_image(encode(Image.fromarray(rgba, mode="RGBA"), "PNG"), [1, 28, 28], 10**6)
    assert out.shape == (1, 28, 28) and int(out[0, 0, 0]) == 200


def test_normalisation_is_the_training_batches():
    """A serving batch (files decoded in the batch, JSON arrays, a bad file among them) gives
    every good image exactly the input training gives it."""
    from cnnray.data import ShardedBatches
    from cnnray.serve.preprocess import EncodedImage, batch_inputs

    x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    (batch, _), = list(ShardedBatches(x, torch.zeros(5, dtype=torch.long), batch_size=5, shuffle=False,
                                      drop_last=False, mean=(0.1307,), std=(0.3081,)))
    files = [EncodedImage(png(x[i, 0].numpy()), 10**6) for i in range(5)]
    inputs, errors = batch_inputs(files, (1, 28, 28), (0.1307,), (0.3081,))
    assert errors == [None] * 5 and torch.equal(inputs, batch)
    # array instances of the same pixel values (float32) beside files, and a file that is no image
    mixed = [files[0], x[1].float(), EncodedImage(b"no image", 10**6), files[3], x[4].float()]
    inputs, errors = batch_inputs(mixed, (1, 28, 28), (0.1307,), (0.3081,))
    assert [e is None for e in errors] == [True, True, False, True, True]
    assert errors[2].status == 400 and "not an image" in errors[2].message
    assert torch.equal(inputs, batch[[0, 1, 3, 4]])


@pytest.mark.parametrize(
    "data, fragment, status",
    [
        (b"", "empty image", 400),
        (b"hello, this is not an image", "not an image", 400),
        (NOISE_PNG[: len(NOISE_PNG) // 2], "cannot decode", 400),
        (encode(Image.new("L", (28, 28)), "GIF"), "GIF images are not accepted", 400),
        (encode(Image.new("L", (28, 28)), "TIFF"), "TIFF images are not accepted", 400),
        (encode(Image.new("L", (3000, 3000)), "PNG"), "larger than the limit", 413),
    ],
    ids=["empty", "text", "truncated", "gif", "tiff", "too-many-pixels"],
)
def test_bad_images_raise_request_errors(data, fragment, status):
    from cnnray.serve.preprocess import RequestError, decode_image

    with pytest.raises(RequestError) as info:
        decode_image(data, [1, 28, 28], 2000 * 2000)
    assert info.value.status == status and fragment in info.value.message


@pytest.mark.parametrize(
    "value, fragment",
    [
        (np.zeros((28, 28)).tolist(), "shape [28, 28]; expected [1, 28, 28]"),
        ([[[0.0] * 28] * 27 + [[0.0] * 27]], "not a regular nesting"),
        (np.full((1, 28, 28), np.nan).tolist(), "NaN or infinity"),
        (np.full((1, 28, 28), np.inf).tolist(), "NaN or infinity"),
        (np.full((1, 28, 28), 256.0).tolist(), "must lie in 0..255"),
        (np.full((1, 28, 28), -1).tolist(), "must lie in 0..255"),
        (np.full((1, 28, 28), True).tolist(), "must hold numbers"),
        (np.full((1, 28, 28), "7").tolist(), "must hold numbers"),
    ],
    ids=["shape", "ragged", "nan", "inf", "over-255", "negative", "bool", "strings"],
)
def test_bad_arrays_raise_request_errors(value, fragment):
    from cnnray.serve.preprocess import RequestError, array_instance

    with pytest.raises(RequestError) as info:
        array_instance(value, [1, 28, 28], "instance 0")
    assert info.value.status == 400 and fragment in info.value.message, info.value.message


def test_b64_instances():
    from cnnray.serve.preprocess import RequestError, decode_b64

    with pytest.raises(RequestError, match="not valid base64"):
        decode_b64("***", [1, 28, 28], 10**6, "instance 3")
    import base64

    with pytest.raises(RequestError, match="instance 3: not an image"):
        decode_b64(base64.b64encode(b"abc").decode(), [1, 28, 28], 10**6, "instance 3")


def test_checkpoint_metrics_become_valid_json():
    from cnnray.serve.preprocess import finite_json

    out = finite_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}})
    assert json.loads(json.dumps(out, allow_nan=False)) == {"a": None, "b": [1.0, None], "c": {"d": 2}}


# --- metrics -----------------------------------------------------------------------------------------
def _parse(text: bytes) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text.decode())
        for s in fam.samples
    }


def test_replica_metrics_add_up():
    from cnnray.serve.metrics import ServeMetrics, merge, render

    replicas = [ServeMetrics(), ServeMetrics()]
    for m, (ok, bad) in zip(replicas, [(3, 1), (5, 0)]):
        m.set_versions({"mnist": 2 if m is replicas[0] else 3})
        for _ in range(ok):
            with m.track("mnist", "kserve") as t:
                t.status = 200
        for _ in range(bad):
            with m.track("mnist", "torchserve") as t:
                t.status = 400
        m.batch_size.labels("mnist").observe(ok)
    with pytest.raises(RuntimeError):
        with replicas[1].track("mnist", "kserve"):
            raise RuntimeError("a bug in a handler counts as 500")
    text = render(merge(r.snapshot() for r in replicas))
    got = _parse(text)
    assert got[("cnnray_serve_requests_total", (("api", "kserve"), ("model", "mnist"), ("status", "200")))] == 8
    assert got[("cnnray_serve_requests_total", (("api", "torchserve"), ("model", "mnist"), ("status", "400")))] == 1
    assert got[("cnnray_serve_requests_total", (("api", "kserve"), ("model", "mnist"), ("status", "500")))] == 1
    assert got[("cnnray_serve_request_latency_seconds_count", (("model", "mnist"),))] == 10
    assert got[("cnnray_serve_batch_size_sum", (("model", "mnist"),))] == 8
    assert got[("cnnray_serve_batch_size_count", (("model", "mnist"),))] == 2
    assert got[("cnnray_serve_in_flight_requests", (("model", "mnist"),))] == 0
    assert got[("cnnray_serve_model_version", (("model", "mnist"),))] == 3  # max, not sum
    assert got[("cnnray_serve_replicas", ())] == 2
    assert b"# TYPE cnnray_serve_request_latency_seconds histogram" in text
    assert not any(name.endswith("_created") for name, _ in got)


def test_metrics_hub_drops_silent_replicas(monkeypatch):
    from cnnray.serve import metrics

    hub = metrics.MetricsHub()
    a, b = metrics.ServeMetrics(), metrics.ServeMetrics()
    a.requests.labels("m", "kserve", "200").inc(2)
    b.requests.labels("m", "kserve", "200").inc(5)
    hub.push("a", a.snapshot())
    hub.push("b", b.snapshot())
    assert _parse(metrics.render(hub.merged()))[("cnnray_serve_replicas", ())] == 2
    now = metrics.time.monotonic()
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now + metrics.STALE_S + 1)
    hub.push("b", b.snapshot())
    got = _parse(metrics.render(hub.merged()))
    assert got[("cnnray_serve_replicas", ())] == 1
    assert got[("cnnray_serve_requests_total", (("api", "kserve"), ("model", "m"), ("status", "200")))] == 5


# --- schemas, config, store resolution ---------------------------------------------------------------
def test_serve_args_refuse_unknown_keys():
    from pydantic import ValidationError

    from cnnray.serve.schemas import ServeArgs

    with pytest.raises(ValidationError, match="max_batch"):
        ServeArgs.model_validate({"model_store": "/x", "max_batch": 8})
    with pytest.raises(ValidationError):
        ServeArgs.model_validate({"model_store": "/x", "replicas": 0})


def test_serve_yaml_is_a_valid_serve_config_of_this_app():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from cnnray.serve.defaults import APP_NAME
    from cnnray.serve.runner import APP_IMPORT_PATH
    from cnnray.serve.schemas import ServeArgs

    config = yaml.safe_load((REPO / "jobs" / "configs" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == APP_IMPORT_PATH and app.name == APP_NAME
    assert config["http_options"]["host"] == "127.0.0.1"
    ServeArgs.model_validate(app.args)  # what Serve does before calling the builder


def test_store_resolution_takes_the_newest_version(tmp_path):
    from cnnray.config import ConfigError
    from cnnray.serve.engine import resolve_models
    from cnnray.serve.schemas import ServeArgs
    from cnnray.store import export

    a = save_model(tmp_path / "a", "cnn", MNIST_INFO, seed=1)
    b = save_model(tmp_path / "b", "cnn", MNIST_INFO, seed=2)
    store = tmp_path / "store"
    export(a, store, "digits")
    export(b, store, "digits")
    refs = resolve_models(ServeArgs(model_store=str(store), checkpoints={"direct": str(a)}))
    assert refs["digits"].version == 2 and refs["digits"].path == str(store / "digits" / "2")
    assert refs["direct"].version == 1
    with pytest.raises(ConfigError, match="both in the model store"):
        resolve_models(ServeArgs(model_store=str(store), checkpoints={"digits": str(a)}))
    with pytest.raises(ConfigError, match="names no model"):
        resolve_models(ServeArgs(model_store=str(tmp_path / "a")))


def test_a_model_that_fails_its_declared_input_is_refused_at_load(tmp_path):
    from cnnray.checkpoint import CheckpointError
    from cnnray.serve.engine import load_served_model
    from cnnray.serve.schemas import ModelRef

    ck = save_model(tmp_path / "bad", "cnn", MNIST_INFO, input_shape=[1, 20, 20])
    with pytest.raises(CheckpointError, match="fails on a \\[1, 20, 20\\] input"):
        load_served_model("bad", ModelRef(path=str(ck), version=1))


# --- CLI refusals (no Ray started) --------------------------------------------------------------------
def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """`cnnray ARGS` in this process (the same `main` the command runs), without Ray."""
    from cnnray.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:  # argparse refusing a flag's value (cnnray.argtypes): exit 2, one line
        code = e.code
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("ck") / "cnn", "cnn", MNIST_INFO)


def test_cli_serve_refuses_bad_input_in_one_line(checkpoint, tmp_path, capsys):
    """Each refused before Ray starts, exit 2, one line (a busy port and more replicas than
    the machine holds used to fail only after Ray had started, or hang)."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    busy_port = listener.getsockname()[1]
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in checkpoint.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "model.pt").write_bytes(b"not the weights")
    cases = [
        ([], "nothing to serve"),
        (["--checkpoint", str(checkpoint)], "--checkpoint and --name go together"),
        (["--model-store", str(tmp_path / "missing")], "is not a directory"),
        (["--checkpoint", str(corrupt), "--name", "x"], "model.pt is corrupt"),
        (["--checkpoint", str(checkpoint), "--name", "bad/name"], "invalid model name"),
        (["--checkpoint", str(checkpoint), "--name", "x", "--max-batch-size", "0"], "argument --max-batch-size"),
        (["--checkpoint", str(checkpoint), "--name", "x", "--replicas", "4096"], "--replicas 4096 need 4096 CPUs"),
        (["--checkpoint", str(checkpoint), "--name", "x", "--port", str(busy_port)], "cannot listen on 127.0.0.1"),
        (["--checkpoint", str(checkpoint), "--name", "x", "--port", "70000"], "argument --port: '70000' is not in [1, 65535]"),
        (["--checkpoint", str(checkpoint), "--name", "x", "--replicas", "many"], "argument --replicas: expected an integer, got 'many' (or auto)"),
        (["--checkpoint", str(checkpoint), "--name", "x", "--replicas", "0"], "argument --replicas"),
        (["--checkpoint", str(checkpoint), "--name", "x", "--replicas", "nan"], "argument --replicas"),
    ]
    try:
        for args, fragment in cases:
            code, _, lines = run_cli(capsys, "serve", *args)
            assert code == 2 and len(lines) == 1 and fragment in lines[0], (args, lines)
    finally:
        listener.close()


def test_cli_serve_refusal_through_the_command():
    proc = subprocess.run([sys.executable, "-m", "cnnray.cli", "serve", "--name", "x"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "--checkpoint and --name go together" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_print_config_is_a_deployable_serve_config(checkpoint, capsys):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from cnnray.serve.schemas import ServeArgs

    code, out, _ = run_cli(capsys, "serve", "--checkpoint", str(checkpoint), "--name", "mnist", "--port", "8123",
                           "--print-config")
    assert code == 0
    config = yaml.safe_load(out)
    (app,) = ServeDeploySchema.model_validate(config).applications
    args = ServeArgs.model_validate(app.args)
    assert args.checkpoints == {"mnist": str(checkpoint.resolve())}
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert args.replicas == "auto" and args.watch_s == 5.0  # the defaults: fill the node, watch the store


def test_cli_predict_refusals(tmp_path, capsys):
    code, _, lines = run_cli(capsys, "predict", "--model", "m", str(tmp_path / "none.png"))
    assert code == 2 and "cannot read" in lines[0]
    img = tmp_path / "a.png"
    img.write_bytes(png(np.zeros((28, 28), np.uint8)))
    code, _, lines = run_cli(capsys, "predict", "--url", "ftp://x", "--model", "m", str(img))
    assert code == 2 and "must start with http://" in lines[0]
    # nothing listens on port 9 (discard) of loopback: the error says so in one line
    code, _, lines = run_cli(capsys, "predict", "--url", "http://127.0.0.1:9", "--model", "m", str(img),
                             "--timeout", "5")
    assert code == 1 and len(lines) == 1 and "cannot be reached" in lines[0], lines


def test_wrapped_base64_is_accepted():
    import base64

    from cnnray.serve.preprocess import decode_b64

    text = base64.encodebytes(NOISE_PNG).decode()  # wrapped at 76 columns, as `base64` tools write it
    assert "\n" in text
    assert torch.equal(decode_b64(text, [1, 28, 28], 10**6, "instance 0")[0], torch.from_numpy(
        np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)))


@pytest.mark.parametrize("resources, args, expected", [
    ({"CPU": 2.0}, {}, 2),  # the CI machine: a replica per core
    ({"CPU": 16.0}, {"cpus_per_replica": 4}, 4),
    ({"CPU": 1.0}, {"cpus_per_replica": 2}, 1),  # at least one
    ({"CPU": 8.0, "GPU": 3.0}, {"gpu": True}, 3),  # one per GPU
    ({"CPU": 8.0}, {"replicas": 5}, 5),  # a number stays
])
def test_auto_replicas_fill_the_cluster(monkeypatch, resources, args, expected):
    import ray

    from cnnray.serve.app import auto_replicas
    from cnnray.serve.schemas import ServeArgs

    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    assert auto_replicas(ServeArgs(model_store="/x", **args)) == expected
