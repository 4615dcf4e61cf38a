"""airbench94, the paper's own code, trained on cnnray's data: the CIFAR-10 peer.

    python -m benchmarks.airbench_peer --airbench /path/to/cifar10-airbench \
        --data-dir ../shared/datasets/cifar10-jpg.tar.gz

Source: K. Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU" (arXiv 2404.00498),
`legacy/airbench94.py` of github.com/KellerJordan/cifar10-airbench. That file is imported
from the user's checkout; nothing of it is copied into cnnray. The data is what cnnray
trains on (its image-folder reader, so the same decoded pixels), given to airbench in its
own file format (`cifar10/train.pt`, `test.pt`: uint8 N x 32 x 32 x 3 and labels; the
training images in a fixed random order, as in CIFAR-10's own files).

- On a GPU, airbench's `main()` runs unmodified (fp16 weights, CUDA events for timing).
- On a CPU its `main()` cannot run (it calls .cuda() and CUDA events), so this file runs
  the same steps with only the device glue changed: float32 weights under bf16 autocast
  instead of .half().cuda(), perf_counter instead of CUDA events, one thread per core.
  Hyperparameters, network, whitening, loader, lookahead and TTA are airbench's objects.

Prints the per-epoch progress, then one line `RESULT {json}`: test accuracy at TTA levels
0, 1, 2 (CPU) or at airbench's tta_level (GPU), training seconds and the whole run's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn


def load_airbench(checkout: Path) -> Any:
    """airbench94 as a module, from `checkout`/legacy/airbench94.py (its top level only
    defines things; main() runs under __main__)."""
    path = checkout / "legacy" / "airbench94.py"
    if not path.is_file():
        raise SystemExit(f"no {path}: give --airbench a checkout of github.com/KellerJordan/cifar10-airbench")
    spec = importlib.util.spec_from_file_location("airbench94", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_airbench_data(data_dir: str, folder: Path) -> None:
    """cnnray's decoded CIFAR-10 (image folder or canonical) as airbench's cifar10/*.pt."""
    from cnnray.data import load_dataset

    name = "cifar10" if Path(data_dir).is_dir() and (Path(data_dir) / "cifar-10-batches-py").is_dir() else "imagefolder"
    ds = load_dataset(name, data_dir, download=False)
    (folder / "cifar10").mkdir(parents=True, exist_ok=True)
    # An image folder lists the training images class by class; CIFAR-10's own files hold
    # them in a random order, which airbench relies on (it whitens from the first 5,000).
    order = torch.randperm(len(ds.train_labels), generator=torch.Generator().manual_seed(0))
    train_x, train_y = ds.train_images[order], ds.train_labels[order]
    for split, x, y in (("train", train_x, train_y), ("test", ds.test_images, ds.test_labels)):
        torch.save({"images": x.permute(0, 2, 3, 1).contiguous(), "labels": y, "classes": list(ds.classes)},
                   folder / "cifar10" / f"{split}.pt")


def run_gpu(ab: Any) -> dict[str, Any]:
    """airbench's own main() (one run), in the folder holding cifar10/*.pt."""
    start = time.perf_counter()
    acc = ab.main(0)
    return {"device": torch.cuda.get_device_name(), "test_accuracy": acc, "tta_level": ab.hyp["net"]["tta_level"],
            "whole_seconds": time.perf_counter() - start}


def run_cpu(ab: Any, epochs: float) -> dict[str, Any]:
    """airbench94's main() steps on the CPU (see the module docstring for what differs)."""
    start = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    hyp = ab.hyp
    batch_size, momentum = hyp["opt"]["batch_size"], hyp["opt"]["momentum"]
    kilostep_scale = 1024 * (1 + 1 / (1 - momentum))
    lr = hyp["opt"]["lr"] / kilostep_scale
    wd = hyp["opt"]["weight_decay"] * batch_size / kilostep_scale
    lr_biases = lr * hyp["opt"]["bias_scaler"]
    loss_fn = nn.CrossEntropyLoss(label_smoothing=hyp["opt"]["label_smoothing"], reduction="none")
    test_loader = ab.CifarLoader("cifar10", train=False, batch_size=2000, gpu="cpu")
    train_loader = ab.CifarLoader("cifar10", train=True, batch_size=batch_size, aug=hyp["aug"], gpu="cpu")
    for loader in (test_loader, train_loader):  # airbench keeps fp16 images; the CPU computes in fp32/bf16
        loader.images = loader.images.float()
    total_train_steps = math.ceil(len(train_loader) * epochs)
    half, cuda = nn.Module.half, nn.Module.cuda
    nn.Module.half = lambda self: self  # make_net's .half().cuda(): fp32 weights on the CPU
    nn.Module.cuda = lambda self, *a, **k: self
    try:
        model = ab.make_net()
    finally:
        nn.Module.half, nn.Module.cuda = half, cuda
    norm_biases = [p for k, p in model.named_parameters() if "norm" in k and p.requires_grad]
    other_params = [p for k, p in model.named_parameters() if "norm" not in k and p.requires_grad]
    optimizer = torch.optim.SGD([dict(params=norm_biases, lr=lr_biases, weight_decay=wd / lr_biases),
                                 dict(params=other_params, lr=lr, weight_decay=wd / lr)],
                                momentum=momentum, nesterov=True)

    def get_lr(step: int) -> float:  # airbench94's schedule
        warmup_steps = int(total_train_steps * 0.23)
        if step < warmup_steps:
            frac = step / warmup_steps
            return 0.2 * (1 - frac) + 1.0 * frac
        frac = (step - warmup_steps) / (total_train_steps - warmup_steps)
        return 1.0 * (1 - frac) + 0.07 * frac

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, get_lr)
    alpha_schedule = 0.95**5 * (torch.arange(total_train_steps + 1) / total_train_steps) ** 3
    lookahead_state = ab.LookaheadState(model)
    t0 = time.perf_counter()
    ab.init_whitening_conv(model[0], train_loader.normalize(train_loader.images[:5000]))
    train_seconds, current_steps = time.perf_counter() - t0, 0
    for epoch in range(math.ceil(epochs)):
        model[0].bias.requires_grad = epoch < hyp["opt"]["whiten_bias_epochs"]
        t0 = time.perf_counter()
        model.train()
        for inputs, labels in train_loader:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outputs = model(inputs)
                loss = loss_fn(outputs, labels).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            current_steps += 1
            if current_steps % 5 == 0:
                lookahead_state.update(model, decay=alpha_schedule[current_steps].item())
            if current_steps >= total_train_steps:
                lookahead_state.update(model, decay=1.0)
                break
        train_seconds += time.perf_counter() - t0
        print(f"[airbench94] epoch {epoch + 1}  training {train_seconds:.0f} s", flush=True)
    t0 = time.perf_counter()
    acc = ab.evaluate(model, test_loader, tta_level=hyp["net"]["tta_level"])  # airbench's final evaluation
    eval_seconds, whole_seconds = time.perf_counter() - t0, time.perf_counter() - start
    # The other TTA levels for the record, after the clock (airbench reports only its own).
    accs = {level: ab.evaluate(model, test_loader, tta_level=level) for level in (0, 1)}
    return {"device": "cpu", "threads": torch.get_num_threads(), "epochs": epochs, "test_accuracy": acc,
            "tta_level": hyp["net"]["tta_level"], "test_accuracy_by_tta_level": {**accs, hyp["net"]["tta_level"]: acc},
            "train_seconds": train_seconds, "eval_seconds": eval_seconds, "whole_seconds": whole_seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.airbench_peer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--airbench", required=True, type=Path, help="a checkout of KellerJordan/cifar10-airbench")
    p.add_argument("--data-dir", required=True, help="CIFAR-10: an image-folder tarball/folder or canonical batches")
    p.add_argument("--epochs", type=float, default=None, help="CPU only; default airbench's 9.9")
    a = p.parse_args(argv)
    ab = load_airbench(a.airbench.resolve())
    data_dir = str(Path(a.data_dir).resolve())
    with tempfile.TemporaryDirectory(prefix="airbench-data-") as tmp:
        write_airbench_data(data_dir, Path(tmp))
        os.chdir(tmp)  # airbench reads cifar10/train.pt relative to the working folder
        if torch.cuda.is_available():
            result = run_gpu(ab)
        else:
            result = run_cpu(ab, a.epochs or ab.hyp["opt"]["train_epochs"])
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
