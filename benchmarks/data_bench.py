"""Data-loader benchmark: `--data-loader ray-data` against `memory`, side by side in one run.

    python -m benchmarks.data_bench --data-dir ../shared/datasets/cifar10-jpg.tar.gz

Two parts, each running `cnnray train` once per loader, each in a fresh process (Ray Train's
local mode: the training loop runs in that process, so its peak RSS is the worker's),
under one fresh $CNNRAY_DATA so both loaders pay their one-time decode:

1. throughput: the CIFAR-10 JPEG tarball, `--subset` training images (default 10,000),
   tutorial_cnn, `--epochs` (default 2): training samples/s of the last epoch (after
   warm-up) and the whole command's seconds (including the one decode pass each loader
   makes: the memory loader's decode-and-cache, the stream's scan).
2. peak memory: a generated image folder (`--big-images` JPEGs of `--big-size` squared
   RGB, default 10,000 of 128 x 128: 492 MB decoded) against a data budget per worker
   (`--budget-mib`, default 128 MiB, about a quarter of the decoded size): each process's
   peak RSS (VmHWM), and how much more that is than the same run's peak on 1/20 of the
   images (the fixed cost of the process: Ray, the model, the optimizer, a few batches).
   Ray Data's decode tasks run in Ray's worker processes, each holding one batch of
   DECODE_BATCH images; the table's figure is the training process's.

Prints both tables and the ratios, and writes a JSON record (machine, versions, settings,
results) to --out (default runs/bench/). Machines are noisy: compare the two sides of one
run only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_info

REPO = Path(__file__).resolve().parents[1]
LOADERS = ("memory", "ray-data")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(argv: list[str]) -> None:
    """Run `cnnray train argv` in this process; print {rc, baseline_kib, peak_kib} last."""
    import ray  # noqa: F401  (the baseline holds what every training process imports)
    import ray.data  # noqa: F401
    import ray.train  # noqa: F401
    import torch  # noqa: F401

    from cnnray.cli import main
    import cnnray.train.driver  # noqa: F401

    import threading

    baseline = _status_kib("VmRSS")
    peaks = {"RssAnon": 0, "RssShmem": 0}
    done = threading.Event()

    def sample() -> None:  # the kernel keeps no high-water mark per kind: sample every 20 ms
        while not done.wait(0.02):
            for k in peaks:
                peaks[k] = max(peaks[k], _status_kib(k))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = main(["train", "--no-report", *argv])  # the report is not training: see the README
    done.set()
    sampler.join()
    print(json.dumps({"rc": rc, "baseline_kib": baseline, "peak_kib": _status_kib("VmHWM"),
                      "anon_peak_kib": peaks["RssAnon"], "shmem_peak_kib": peaks["RssShmem"]}), flush=True)


def run_train(argv: list[str], data_home: Path, log: Path) -> dict[str, Any]:
    env = {**os.environ, "CNNRAY_DATA": str(data_home), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.data_bench", "child", *argv], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=f, text=True)
    seconds = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines or json.loads(lines[-1])["rc"] != 0:
        raise SystemExit(f"cnnray train {' '.join(argv)} failed; see {log}:\n{log.read_text()[-2000:]}")
    out = json.loads(lines[-1])
    out["command_seconds"] = seconds
    return out


def make_big_folder(root: Path, n: int, size: int, classes: int = 4) -> Path:
    """n JPEGs (quality 90) of size x size RGB noise with a class-dependent bright band."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    n_test = max(classes, n // 10)
    for split, count in (("train", n - n_test), ("test", n_test)):
        for i in range(count):
            c = i % classes
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            x = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
            band = slice(c * size // classes, (c + 1) * size // classes)
            x[band] += 120
            Image.fromarray(x, "RGB").save(d / f"{i:06d}.jpg", "JPEG", quality=90)
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"))
    p.add_argument("--subset", type=int, default=10_000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--big-images", type=int, default=10_000)
    p.add_argument("--big-size", type=int, default=128)
    p.add_argument("--budget-mib", type=float, default=128.0)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--skip", choices=("throughput", "memory"), help="leave one part out")
    args = p.parse_args()

    record: dict[str, Any] = {"machine": machine_info(), "settings": vars(args), "throughput": {}, "memory": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cnnray-databench-") as tmp:
        tmp = Path(tmp)
        if args.skip != "throughput":
            print(f"throughput: CIFAR-10 JPEG tarball, {args.subset} training images, tutorial_cnn, "
                  f"{args.epochs} epochs, one process (local mode)", flush=True)
            for loader in LOADERS:
                run = tmp / f"cifar-{loader}"
                argv = ["--model", "tutorial_cnn", "--dataset", "cifar10", "--data-dir", args.data_dir,
                        "--subset", str(args.subset), "--epochs", str(args.epochs), "--lr", "0.05",
                        "--data-loader", loader, "--out", str(run)]
                r = run_train(argv, tmp / f"home-cifar-{loader}", tmp / f"cifar-{loader}.log")
                result = json.loads((run / "result.json").read_text())
                r.update(samples_per_second=result["history"][-1]["samples_per_second"],
                         test_accuracy=result["test_accuracy"], total_seconds=result["total_seconds"])
                record["throughput"][loader] = r
                print(f"  {loader:9s} {r['samples_per_second']:8,.0f} samples/s (last epoch)  "
                      f"command {r['command_seconds']:.1f}s  test_acc {r['test_accuracy']:.3f}", flush=True)
            t = record["throughput"]
            ratio = t["ray-data"]["samples_per_second"] / t["memory"]["samples_per_second"]
            record["throughput_ratio"] = ratio
            print(f"  ratio ray-data / memory: {ratio:.2f}x samples/s", flush=True)

        if args.skip != "memory":
            decoded = args.big_images * 3 * args.big_size**2
            budget = int(args.budget_mib * 2**20)
            print(f"peak memory: {args.big_images} JPEGs of {args.big_size}x{args.big_size} RGB, "
                  f"{decoded / 2**20:.0f} MiB decoded = {decoded / budget:.1f}x the {args.budget_mib:g} MiB data budget",
                  flush=True)
            big = make_big_folder(tmp / "big", args.big_images, args.big_size)
            # The same training on 1/20 of the images: the process's fixed cost (Ray, the model,
            # the optimizer, a few batches), so that the difference is what the data costs.
            small = make_big_folder(tmp / "small", max(200, args.big_images // 20), args.big_size)
            for loader in LOADERS:
                r = {}
                for name, folder in (("small", small), ("big", big)):
                    run = tmp / f"{name}-{loader}"
                    argv = ["--model", "tutorial_cnn", "--dataset", "imagefolder", "--data-dir", str(folder),
                            "--epochs", "1", "--batch-size", "64", "--lr", "0.01", "--augment", "none", "--data-loader", loader,
                            "--out", str(run)]
                    r[name] = run_train(argv, tmp / f"home-{name}-{loader}", tmp / f"{name}-{loader}.log")
                r["peak_mib"] = r["big"]["peak_kib"] / 1024
                r["data_mib"] = (r["big"]["peak_kib"] - r["small"]["peak_kib"]) / 1024
                r["within_budget"] = r["data_mib"] * 2**20 <= budget
                record["memory"][loader] = r
                print(f"  {loader:9s} peak RSS {r['peak_mib']:7.0f} MiB, {r['data_mib']:7.0f} MiB above the same run on "
                      f"1/20 of the images ({r['small']['peak_kib'] / 1024:.0f} MiB): "
                      f"{'within' if r['within_budget'] else 'OVER'} the budget  command {r['big']['command_seconds']:.1f}s",
                      flush=True)
            record["decoded_mib"] = decoded / 2**20
    path = out / f"data_bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2:])
    else:
        main()
