"""Slow serving checks on the real MNIST: `cnnray serve` answers all 10,000 test images over HTTP
as the offline evaluation does, at 32 concurrent clients; and the load benchmark runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO
from tests.helpers.processes import spawn_cnnray
from tests.helpers.serve import MNIST_INFO, one_thread, save_model, train_cnn

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mnist_checkpoint(tmp_path_factory, mnist_dir, data_cache) -> tuple[Path, object]:
    """A `cnn` trained for one epoch on the real MNIST training set (~98% test accuracy)."""
    from cnnray.data import load_dataset

    ds = load_dataset("mnist", mnist_dir)
    model = train_cnn(ds.train_images, ds.train_labels, steps=len(ds.train_labels) // 64)
    ck = save_model(tmp_path_factory.mktemp("mnist") / "cnn", "cnn", MNIST_INFO, model=model, metrics={})
    return ck, ds


def offline_evaluation(checkpoint: Path, ds) -> tuple[float, list[int]]:
    """Accuracy and per-image predictions as training's `evaluate` computes them."""
    from cnnray.checkpoint import load_model
    from cnnray.data import ShardedBatches
    from cnnray.train.epoch import evaluate

    model, meta = load_model(checkpoint)
    batches = ShardedBatches(ds.test_images, ds.test_labels, batch_size=1024, shuffle=False, drop_last=False,
                             mean=meta["data"]["mean"], std=meta["data"]["std"])
    with one_thread():
        stats = evaluate(model, batches, torch.device("cpu"))
        with torch.inference_mode():
            preds = [int(p) for x, _ in batches for p in model(x).argmax(1)]
    return stats.correct / stats.count, preds


def test_cnnray_serve_answers_the_10000_test_images_as_offline_evaluation(mnist_checkpoint, tmp_path):
    from benchmarks.serve_load import free_port, mnist_test_pngs, run_load, stop, wait_healthy

    ck, ds = mnist_checkpoint
    accuracy, offline = offline_evaluation(ck, ds)
    assert accuracy > 0.97
    pngs, labels = mnist_test_pngs(str(REPO.parent / "shared" / "datasets" / "mnist"), 10_000)
    assert labels == ds.test_labels.tolist()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w+")
    proc = spawn_cnnray(["serve", "--checkpoint", str(ck), "--name", "mnist", "--port", str(port), "--watch-s", "0"],
                        output=log)
    try:
        wait_healthy(url, proc, 300)
        result = run_load(url, "mnist", pngs, labels, requests=10_000, concurrency=32, server="cnnray serve")
    finally:
        code = stop(proc)
    log.seek(0)
    output = log.read()
    assert result.errors == 0, result.error_samples
    mismatches = [i for i, (a, b) in enumerate(zip(result.predictions, offline)) if a != b]
    assert not mismatches, f"{len(mismatches)} images answered differently, e.g. {mismatches[:5]}"
    assert result.accuracy == round(accuracy, 4)
    assert code == 130, output[-2000:]  # Ctrl-C: 128 + SIGINT after the graceful stop
    assert "[cnnray] serving mnist (version 1)" in output and "[cnnray] stopping" in output, output[-2000:]


def test_load_benchmark_compares_cnnray_serve_with_plain_fastapi(mnist_checkpoint, tmp_path):
    ck, _ = mnist_checkpoint
    out = tmp_path / "serve_load.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.serve_load", "--checkpoint", str(ck), "--requests", "300",
         "--concurrency", "16", "--warmup", "16", "--out", str(out), "--log", str(tmp_path / "servers.log")],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    # Both servers, every route: raw PNG (/predictions), JSON (:predict) and OIP v2 binary (/v2/.../infer).
    runs = [(r["server"].split(" (")[0], r["api"]) for r in record["results"]]
    assert runs == [(s, api) for s in ("plain FastAPI", "cnnray serve") for api in ("torchserve", "kserve", "oip")]
    for r in record["results"]:
        assert r["requests"] == 300 and r["errors"] == 0 and r["accuracy"] > 0.95
        assert r["requests_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["server_cpu_ms_per_request"] > 0  # every process of the server, per request
    assert record["machine"]["cpu_count"] >= 1 and record["machine"]["ray"]
    cnnray = record["servers"]["cnnray/torch"]  # keyed by server and runtime (--runtime torch, the default)
    assert cnnray["exit_code"] == 130 and cnnray["mean_batch_size"] >= 1  # stopped by Ctrl-C, drained
    # The defaults it ran with: the fast ingress, and replicas filling the machine's CPUs.
    assert cnnray["ingress"] == "fast" and cnnray["replicas"] == max(1, os.cpu_count() or 1)
    assert set(record["comparison"]) == {"torchserve", "kserve", "oip"}
    assert all(c["server_cpu_ratio"] > 0 for c in record["comparison"].values())
    assert "| cnnray serve" in proc.stdout and "| plain FastAPI" in proc.stdout
