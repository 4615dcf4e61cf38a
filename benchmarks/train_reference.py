"""The plain PyTorch reference of the training benchmarks (benchmarks/train_bench.py): the
lecture's training loop and its MNIST CNN class, copied here verbatim (SGD lr 0.01 momentum
0.9, batch 64, cross-entropy, PyTorch's default init, data already in memory as normalised
float tensors, all cores for intra-op threads, test accuracy after every epoch), and a plain
loop with cnnray's own model and optimizer for the throughput comparison, alone or on one
Ray Train worker. Nothing here imports cnnray's training code.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn


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


def _plain_on_ray_train_worker(config: dict[str, Any]) -> None:
    """Ray Train's train function: the plain loop on a Ray Train worker, written to a file."""
    rate = reference_throughput(config["data_dir"], config["batch_size"], config["threads"], config["seconds"],
                                model="cnnray", bf16=config["bf16"])
    Path(config["out"]).write_text(json.dumps({"samples_per_second": rate}))


def reference_throughput_on_ray_train(data_dir: str, batch_size: int, threads: int, seconds: float, *,
                                      bf16: bool) -> float:
    """reference_throughput(model="cnnray") on one Ray Train worker of a private local Ray
    started as cnnray starts it (cnnray.ray_start.init_ray): Ray's own cost on this
    machine (its daemons, Ray Train's controller and helper actors, the worker actor),
    without any cnnray code in the loop. Run in a fresh interpreter by the caller."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from cnnray.ray_start import init_ray

    with tempfile.TemporaryDirectory() as tmp:
        own = init_ray(ray_train=True)
        try:
            # Ray Train runs the worker in its trial folder: a relative path would not resolve.
            config = {"data_dir": str(Path(data_dir).resolve()), "batch_size": batch_size, "threads": threads, "seconds": seconds,
                      "bf16": bf16, "out": str(Path(tmp) / "rate.json")}
            TorchTrainer(_plain_on_ray_train_worker, train_loop_config=config,
                         scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
                         run_config=ray.train.RunConfig(storage_path=tmp)).fit()
            return json.loads((Path(tmp) / "rate.json").read_text())["samples_per_second"]
        finally:
            if own:
                ray.shutdown()
