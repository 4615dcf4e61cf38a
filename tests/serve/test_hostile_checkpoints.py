"""Hostile clients and careless colleagues against cnnray serve: models whose output is not
finite, a lying meta.json, and server paths in the error texts of a failed load.

One of the tests/serve/test_hostile_*.py files, each a kind of fault; the helpers (a /healthz
probe that runs while an attack goes on, misbehaving models, costly images) are in
tests/helpers/hostile.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.helpers import REPO
from tests.helpers.hostile import b64, nan_model, predict
from tests.helpers.serve import MNIST_INFO, png, save_model


# --- 4. non-finite output -------------------------------------------------------------------------
def test_nan_weights_are_refused_at_load(tmp_path):
    from cnnray.checkpoint import CheckpointError
    from cnnray.serve.engine import LocalBackend, load_served_model
    from cnnray.serve.schemas import ModelRef

    ref = ModelRef(path=str(nan_model(tmp_path / "nan")), version=1)
    with pytest.raises(CheckpointError, match="NaN or infinity"):
        load_served_model("diverged", ref)
    with pytest.raises(CheckpointError, match="NaN or infinity"):
        LocalBackend({"diverged": ref})


@pytest.mark.slow  # a server
def test_non_finite_output_is_a_4xx_and_metrics_count_the_status_sent(hostile):
    from prometheus_client.parser import text_string_to_metric_families

    blank = png(np.zeros((28, 28), np.uint8))
    bright = png(np.full((28, 28), 255, np.uint8))
    assert requests.post(f"{hostile.url}/predictions/overflow", data=blank, headers={"Content-Type": "image/png"},
                         timeout=30).status_code == 200
    r = requests.post(f"{hostile.url}/predictions/overflow", data=bright, headers={"Content-Type": "image/png"},
                      timeout=30)
    assert r.status_code == 422 and "NaN or infinity" in r.json()["error"], r.text
    r = predict(hostile.url, "overflow", [b64(blank), b64(bright)])
    assert r.status_code == 422 and "instance 1" in r.json()["error"], r.text
    text = requests.get(hostile.url + "/metrics", timeout=30).text
    counts = {
        (s.labels["api"], s.labels["status"]): s.value
        for f in text_string_to_metric_families(text) if f.name == "cnnray_serve_requests"
        for s in f.samples if s.name.endswith("_total") and s.labels["model"] == "overflow"
    }
    assert counts == {("torchserve", "200"): 1, ("torchserve", "422"): 1, ("kserve", "422"): 1}, counts


# --- 7. a lying meta.json ------------------------------------------------------------------------------
def lying_checkpoint(directory: Path, **meta_changes) -> Path:
    """A valid `mlp` checkpoint whose meta.json is then edited (digests stay valid: meta.json
    itself is not digested)."""
    ck = save_model(directory, "mlp", MNIST_INFO)
    meta = json.loads((ck / "meta.json").read_text())
    for dotted, value in meta_changes.items():
        target = meta
        *path, last = dotted.split("__")
        for key in path:
            target = target[key]
        target[last] = value
    (ck / "meta.json").write_text(json.dumps(meta))
    return ck


def test_model_args_are_checked_against_the_weights_before_allocating(tmp_path):
    """[20000, 20000] hidden units would build 1.6 GB of weights before finding they do not
    fit: the load runs in a child process whose peak memory is measured."""
    ck = lying_checkpoint(tmp_path / "ck", model__args__hidden_sizes=[20000, 20000])
    # VmHWM: this process image's own peak RSS. (ru_maxrss would not do: Linux carries the
    # forking parent's RSS into it, and pytest's process holds over a GB by then.)
    code = ("import sys\nfrom cnnray.checkpoint import CheckpointError, load_model\n"
            "try:\n    load_model(sys.argv[1])\nexcept CheckpointError as e:\n    print('refused:', e)\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
            "print('peak_kb', int(hwm.split()[1]))\n")
    out = subprocess.run([sys.executable, "-c", code, str(ck)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "refused:" in out.stdout and "do not fit" in out.stdout, out.stdout + out.stderr
    peak_kb = int(out.stdout.split("peak_kb")[-1])
    # importing torch takes ~0.4 GB; the lying model would add 1.6 GB (the old code: 2.1 GB)
    assert peak_kb < 1_000_000, f"the load peaked at {peak_kb / 1e6:.1f} GB"


MALFORMED = [
    ("huge-hidden", {"model__args__hidden_sizes": [1000000, 1000000]}, "do not fit"),
    ("negative-hidden", {"model__args__hidden_sizes": [-5]}, "cannot rebuild"),
    ("args-not-a-dict", {"model__args": [1, 2]}, "malformed"),
    ("model-not-a-dict", {"model": "mlp"}, "malformed"),
    ("unknown-arg", {"model__args__bogus": 1}, "cannot rebuild"),
    ("files-not-a-dict", {"files": ["model.pt"]}, "malformed"),
    ("digest-not-hex", {"files": {"model.pt": 5}}, "malformed"),
    ("odd-file-name", {"files__../../etc/passwd": "0" * 64}, "malformed"),
    ("epoch-a-string", {"epoch": "one"}, "malformed"),
    ("metrics-a-list", {"metrics": [1]}, "malformed"),
    ("data-a-string", {"data": "mnist"}, "malformed"),
    ("infinite-shape", {"data__input_shape": [1, 1e400, 28]}, "input description"),
    ("huge-probe", {"data__input_shape": [1, 100000, 100000]}, "impossible input shape"),
    ("no-classes", {"data__classes": []}, "no classes"),
    ("zero-std", {"data__std": [0.0]}, "std"),
]


@pytest.mark.parametrize("changes,fragment", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_every_malformed_meta_json_is_a_checkpoint_error(tmp_path, changes, fragment):
    from cnnray.checkpoint import CheckpointError
    from cnnray.serve.engine import load_served_model
    from cnnray.serve.schemas import ModelRef

    ck = lying_checkpoint(tmp_path / "ck", **changes)
    with pytest.raises(CheckpointError, match=fragment):
        load_served_model("m", ModelRef(path=str(ck), version=1))


# --- 9. error texts on unauthenticated routes name no server paths ---------------------------------
def test_load_failures_are_reported_without_server_paths(tmp_path):
    from cnnray.checkpoint import CheckpointError
    from cnnray.serve.engine import load_served_model, public_error
    from cnnray.serve.schemas import ModelRef

    ck = save_model(tmp_path / "secret-place" / "ck", "cnn", MNIST_INFO)
    (ck / "model.pt").write_bytes(b"corrupt")
    with pytest.raises(CheckpointError) as e:
        load_served_model("digits", ModelRef(path=str(ck), version=4))
    text = public_error(e.value, str(ck), "digits/4")
    assert "secret-place" not in text and str(tmp_path) not in text and "SHA-256" in text, text
