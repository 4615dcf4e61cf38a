"""Training benchmarks: cnnray and a plain PyTorch reference, side by side in one run.

    python -m benchmarks.train_bench time-to-accuracy --data-dir ../shared/datasets/mnist
    python -m benchmarks.train_bench throughput --data-dir ../shared/datasets/mnist --workers 1,2
    python -m benchmarks.train_bench cifar --data-dir ../shared/datasets/cifar10-jpg.tar.gz   # GPU

Each prints a table and the ratios, and writes a JSON record (machine, versions, settings,
results) into --out (default runs/bench/). The machines are noisy: compare the two sides
of one run, never figures from different runs.

Reference = the lecture's training loop and its MNIST CNN class, copied here verbatim: SGD
lr 0.01 momentum 0.9, batch 64, cross-entropy, PyTorch's default init, data already in
memory as normalised float tensors, all cores for intra-op threads, test accuracy after
every epoch.

Time to accuracy runs `cnnray train` as a user types it: only --model, --dataset, --data-dir
and --epochs (so one worker in local mode: in the cnnray process, no Ray, every core),
unless --workers or --cpus-per-worker are given.

Throughput compares cnnray's loop, in local mode (no Ray) and on one Ray Train worker,
with two plain loops on the same global batch, optimizer and threads: the lecture's CNN as
written (what a user would run), and cnnray's own model and precision without Ray (pool
before ReLU, channels-last, bf16 where native), whose ratio is the cost of Ray Train alone.
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

import torch
from torch import nn

from benchmarks.machine import machine_info

REPO = Path(__file__).resolve().parents[1]


# --- the plain PyTorch reference ----------------------------------------------------------
class LectureCNN(nn.Module):
    """The lecture's MNIST CNN, as its "CNN(s) in pytorch" slide writes it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels=1, out_channels=16, kernel_size=5, stride=1, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(16, 32, 5, 1, 2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.out = nn.Linear(32 * 7 * 7, 10)  # fully connected layer, output 10 classes

    def forward(self, x):
        x = self.conv1(x)
        x = self.conv2(x)
        x = torch.flatten(x, start_dim=1)  # (batch_size, 32 * 7 * 7)
        return self.out(x)


def _mnist_tensors(data_dir: str) -> tuple[torch.Tensor, ...]:
    from cnnray.data import load_dataset, normalize

    ds = load_dataset("mnist", data_dir, download=False)
    xtr = normalize(ds.train_images, ds.mean, ds.std)
    xte = normalize(ds.test_images, ds.mean, ds.std)
    return xtr, ds.train_labels, xte, ds.test_labels


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum()) for i in range(0, len(y), 1000))
    return correct / len(y)


def reference_time_to_accuracy(data_dir: str, target: float, max_epochs: int, seed: int) -> dict[str, Any]:
    """The lecture's loop until test accuracy >= target; training time excludes evaluation."""
    start = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    xtr, ytr, xte, yte = _mnist_tensors(data_dir)
    torch.manual_seed(seed)
    model = LectureCNN()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    train_seconds, epochs, acc = 0.0, [], 0.0
    for epoch in range(max_epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(ytr))
        for i in range(0, len(ytr), 64):
            idx = order[i : i + 64]
            optimizer.zero_grad()
            loss = criterion(model(xtr[idx]), ytr[idx])
            loss.backward()
            optimizer.step()
        train_seconds += time.perf_counter() - t0
        acc = _accuracy(model, xte, yte)
        epochs.append({"epoch": epoch + 1, "test_accuracy": acc, "train_seconds": train_seconds})
        print(f"  reference epoch {epoch + 1}: test_accuracy {acc:.4f}  train {train_seconds:.1f}s", flush=True)
        if acc >= target:
            break
    return {
        "reached": acc >= target,
        "test_accuracy": acc,
        "epochs": len(epochs),
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "per_epoch": epochs,
    }


def reference_throughput(data_dir: str, batch_size: int, threads: int, seconds: float, *, model: str,
                         bf16: bool = False) -> float:
    """Samples/s of a plain loop with cnnray's default optimizer, loss and batch, on
    `model` "lecture" (LectureCNN, fp32 NCHW) or "cnnray" (its registered cnn in
    channels-last, with bf16 autocast if `bf16`): cnnray's step without Ray."""
    from cnnray.models import build_model

    torch.set_num_threads(threads)
    xtr, ytr, _, _ = _mnist_tensors(data_dir)
    net = LectureCNN() if model == "lecture" else build_model("cnn")
    if model == "cnnray":
        net = net.to(memory_format=torch.channels_last)
        xtr = xtr.contiguous(memory_format=torch.channels_last)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    order = torch.randperm(len(ytr))
    done, start, i = 0, None, 0
    while True:
        idx = order[i : i + batch_size]
        i = (i + batch_size) % (len(ytr) - batch_size)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = criterion(net(xtr[idx]), ytr[idx])
        loss.backward()
        optimizer.step()
        if start is None:  # the first step warms up allocators and kernels
            start = time.perf_counter()
            continue
        done += len(idx)
        if time.perf_counter() - start >= seconds:
            return done / (time.perf_counter() - start)


# --- cnnray, as a user runs it ---------------------------------------------------------------
def run_cnnray(args: list[str], out: Path) -> dict[str, Any]:
    """`cnnray train ...` in a fresh process: wall time includes Python, Ray start-up, workers,
    the test evaluation and result.json; not the optional HTML report (--no-report)."""
    cmd = [sys.executable, "-m", "cnnray.cli", "train", *args, "--out", str(out), "--no-report"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"cnnray train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads((out / "result.json").read_text())
    result["command_seconds"] = wall
    return result


# --- records ---------------------------------------------------------------------------------
def save_record(out_dir: Path, kind: str, settings: dict[str, Any], results: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"kind": kind, "machine": machine_info(), "settings": settings, "results": results}, indent=2))
    return path


# --- the benchmarks --------------------------------------------------------------------------
def time_to_accuracy(a: argparse.Namespace) -> dict[str, Any]:
    print(f"reference: the lecture's loop, until test accuracy >= {a.target}", flush=True)
    ref = reference_time_to_accuracy(a.data_dir, a.target, a.max_epochs, a.seed)
    args = ["--model", "cnn", "--dataset", "mnist", "--data-dir", a.data_dir, "--epochs", str(a.epochs)]
    # Only what the user asked for beyond the defaults (cnnray picks workers' cores itself).
    args += ["--workers", str(a.workers)] if a.workers else []
    args += ["--cpus-per-worker", str(a.cpus_per_worker)] if a.cpus_per_worker else []
    args += ["--seed", str(a.seed)] if a.seed else []
    print(f"cnnray: cnnray train {' '.join(args)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        res = run_cnnray(args, Path(tmp) / "run")
    ours = {
        "reached": res["test_accuracy"] >= a.target,
        "test_accuracy": res["test_accuracy"],
        "epochs": res["epochs"],
        "train_seconds": res["epoch_seconds_total"],
        "fit_seconds": res["train_seconds"],
        "total_seconds": res["command_seconds"],
        "bf16": res["history"][-1].get("bf16"),
        "local_mode": res.get("local_mode"),
        "workers": res["workers"],
        "cpus_per_worker": res.get("cpus_per_worker"),
        "ray_start_seconds": res["ray_start_seconds"],
        # Where the whole command's time goes besides the epochs: inside the run (data set-up,
        # model, optimizer, validation, test, checkpoints: fit minus epochs), and outside it
        # (interpreter, imports, pre-flight data load before the run clock starts, and exit).
        "in_run_overhead_seconds": res["train_seconds"] - res["epoch_seconds_total"],
        "outside_run_seconds": res["command_seconds"] - res["total_seconds"],
    }
    rows = [("reference (lecture loop)", ref), ("cnnray train", ours)]
    print(f"\n{'':26} {'test acc':>9} {'epochs':>7} {'train s':>8} {'whole s':>8}")
    for name, r in rows:
        print(f"{name:26} {r['test_accuracy']:>9.4f} {r['epochs']:>7} {r['train_seconds']:>8.1f} {r['total_seconds']:>8.1f}")
    print(f"cnnray's whole command, {ours['total_seconds']:.1f} s: epochs {ours['train_seconds']:.1f}, the rest of "
          f"the run {ours['in_run_overhead_seconds']:.1f}, Ray start-up {ours['ray_start_seconds']:.1f}, outside the "
          f"run {ours['outside_run_seconds']:.1f} (interpreter, imports, pre-flight, exit)")
    ratios = {
        "train_time_ratio": ours["train_seconds"] / ref["train_seconds"],
        "whole_command_vs_reference_train": ours["total_seconds"] / ref["train_seconds"],
        "whole_command_vs_reference_total": ours["total_seconds"] / ref["total_seconds"],
    }
    print(f"\ncnnray training time / reference training time: {ratios['train_time_ratio']:.2f}"
          f"   (target <= 0.50, both reached {a.target}: {ref['reached'] and ours['reached']})")
    print(f"cnnray whole command / reference training time: {ratios['whole_command_vs_reference_train']:.2f}"
          f"   (whole command / reference whole script: {ratios['whole_command_vs_reference_total']:.2f})")
    return {"reference": ref, "cnnray": ours, **ratios}


def throughput(a: argparse.Namespace) -> dict[str, Any]:
    """Ray Train loop vs a plain loop, same model, global batch and total threads."""
    from cnnray.train.loop import native_bf16

    threads = a.threads or (os.cpu_count() or 1)
    bf16 = native_bf16(torch.device("cpu"))
    results: dict[str, Any] = {"batch_size": a.batch_size, "threads": threads, "bf16_native": bf16, "workers": {}}
    plain = {
        "plain lecture fp32": dict(model="lecture"),
        "plain cnnray-model fp32": dict(model="cnnray"),
        **({"plain cnnray-model bf16": dict(model="cnnray", bf16=True)} if bf16 else {}),
    }
    print(f"{threads} threads, global batch {a.batch_size}, SGD nesterov + label smoothing, samples/s:")
    for label, kw in plain.items():
        results[label] = reference_throughput(a.data_dir, a.batch_size, threads, a.seconds, **kw)
        print(f"  {label:32} {results[label]:>8,.0f}", flush=True)
    # The same plain loop again with an idle local Ray beside it (its daemons: GCS, raylet,
    # dashboard agent...): what a Ray worker's neighbours cost, apart from Ray Train.
    same = "plain cnnray-model bf16" if bf16 else "plain cnnray-model fp32"
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        label = same + ", idle Ray up"
        results[label] = reference_throughput(a.data_dir, a.batch_size, threads, a.seconds, **plain[same])
        print(f"  {label:32} {results[label]:>8,.0f}", flush=True)
    finally:
        ray.shutdown()
    # An epoch of 2 is timed: the first pays one-off costs (kernel choice, allocator warm-up).
    # One worker runs in local mode by default (the training process is the driver);
    # --no-local-mode puts the same loop in a Ray Train worker actor.
    paths = (("local mode", ["--local-mode"]), ("1 Ray Train worker", ["--no-local-mode"]))
    for where, path_flags in paths:
        for flags, precision in ((["--no-amp"], "cnnray fp32"), ([], "cnnray default")):
            label = f"{precision}, {where}"
            with tempfile.TemporaryDirectory() as tmp:
                res = run_cnnray(
                    ["--model", "cnn", "--data-dir", a.data_dir, "--epochs", "2", "--workers", "1",
                     "--cpus-per-worker", str(threads), "--batch-size", str(a.batch_size), *path_flags, *flags],
                    Path(tmp) / "run",
                )
            results[label] = res["history"][-1]["samples_per_second"]
            print(f"  {label:32} {results[label]:>8,.0f}", flush=True)
    for n in a.workers:
        with tempfile.TemporaryDirectory() as tmp:
            res = run_cnnray(
                ["--model", "cnn", "--data-dir", a.data_dir, "--epochs", "2", "--workers", str(n),
                 "--cpus-per-worker", str(max(1, threads // n)), "--batch-size", str(a.batch_size)],
                Path(tmp) / "run",
            )
        results["workers"][n] = res["history"][-1]["samples_per_second"]
        label = f"cnnray default, {n} worker(s)" + (" (local mode)" if res.get("local_mode") else "")
        print(f"  {label:32} {results['workers'][n]:>8,.0f}", flush=True)
    results["ratios"] = {f"{same}: with an idle Ray up / without": results[same + ", idle Ray up"] / results[same]}
    for where, _ in paths:
        fp32, default = results[f"cnnray fp32, {where}"], results[f"cnnray default, {where}"]
        results["ratios"].update({
            f"cnnray fp32, {where} / plain lecture fp32": fp32 / results["plain lecture fp32"],
            f"cnnray default, {where} / plain lecture fp32": default / results["plain lecture fp32"],
            f"cnnray fp32, {where} / plain cnnray-model fp32 (Ray's cost)": fp32 / results["plain cnnray-model fp32"],
            f"cnnray default, {where} / {same} (Ray's cost)": default / results[same],
        })
    print("ratios:")
    for k, v in results["ratios"].items():
        print(f"  {k:72} {v:.2f}")
    return results


def cifar(a: argparse.Namespace) -> dict[str, Any]:
    """CIFAR-10 time to a target test accuracy with cnnray (resnet18, GPU recipe)."""
    gpu = ["--gpu"] if torch.cuda.is_available() else []
    with tempfile.TemporaryDirectory() as tmp:
        res = run_cnnray(
            ["--model", a.model, "--dataset", "cifar10", "--data-dir", a.data_dir, "--epochs", str(a.epochs),
             "--workers", str(a.workers), "--batch-size", str(a.batch_size), "--lr", str(a.lr),
             "--norm", "batch", *gpu],
            Path(tmp) / "run",
        )
    out = {k: res[k] for k in ("test_accuracy", "epochs", "epoch_seconds_total", "train_seconds", "samples_per_second")}
    out["command_seconds"] = res["command_seconds"]
    out["reached"] = res["test_accuracy"] >= a.target
    print(json.dumps(out, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "runs" / "bench"), help="folder for the JSON records")
    sub = p.add_subparsers(dest="kind", required=True)
    t = sub.add_parser("time-to-accuracy", help="MNIST: time until test accuracy >= target")
    t.add_argument("--data-dir", default=str(REPO.parent / "shared" / "datasets" / "mnist"))
    t.add_argument("--target", type=float, default=0.99)
    # Default: cnnray's own (one worker, local mode, every core: the fastest layout of one
    # small machine); --workers 2 measures DDP on Ray Train workers instead.
    t.add_argument("--workers", type=int, default=0, help="default: cnnray's (1)")
    t.add_argument("--cpus-per-worker", type=int, default=0, help="default: cnnray's (all cores / workers)")
    t.add_argument("--epochs", type=int, default=2, help="cnnray's recipe length (one-cycle over these)")
    t.add_argument("--max-epochs", type=int, default=8, help="reference gives up after these")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=time_to_accuracy)
    h = sub.add_parser("throughput", help="samples/s: Ray Train loop vs plain loop; 1..N workers")
    h.add_argument("--data-dir", default=str(REPO.parent / "shared" / "datasets" / "mnist"))
    h.add_argument("--batch-size", type=int, default=128)
    h.add_argument("--threads", type=int, default=0, help="total threads; default all cores")
    h.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    h.add_argument("--seconds", type=float, default=10.0, help="reference measuring time")
    h.set_defaults(func=throughput)
    c = sub.add_parser("cifar", help="CIFAR-10 time to accuracy (meant for a GPU)")
    c.add_argument("--data-dir", default=str(REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"))
    c.add_argument("--model", default="resnet18")
    c.add_argument("--target", type=float, default=0.94)
    c.add_argument("--epochs", type=int, default=10)
    c.add_argument("--workers", type=int, default=1)
    c.add_argument("--batch-size", type=int, default=512)
    c.add_argument("--lr", type=float, default=0.4)
    c.set_defaults(func=cifar)
    a = p.parse_args(argv)
    results = a.func(a)
    settings = {k: v for k, v in vars(a).items() if k not in ("func", "out")}
    print(f"\nrecord: {save_record(Path(a.out), a.kind, settings, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
