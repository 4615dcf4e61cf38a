"""For the report tests: small image folders of three drawn classes, and finished runs as
`cnnray train --out` leaves them (a randomly initialised model, a made-up history)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnnray.checkpoint import save_checkpoint
from cnnray.config import TrainConfig
from cnnray.data import load_dataset
from cnnray.models import build_model, resolve_model_args
from cnnray.train.worker_data import data_info

CLASSES = ("bars", "columns", "diagonal")


def pattern(cls: int, side: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    img = rng.integers(0, 60, (side, side)).astype(np.uint8)
    stripes = np.arange(side) % 6 < 2
    mask = {0: stripes[:, None] & np.ones(side, bool), 1: stripes[None, :] & np.ones((side, 1), bool),
            2: np.add.outer(np.arange(side), np.arange(side)) % 6 < 2}[cls]
    img[mask] = 220
    return np.stack([img] * channels, axis=-1) if channels == 3 else img


def make_image_folder(root: Path, channels: int, side: int, per_class: int = 10) -> Path:
    rng = np.random.default_rng(side + channels)
    for split, n in (("train", per_class), ("test", per_class)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(pattern(c, side, channels, rng)).save(d / f"{i:03d}.png")
    return root


def make_run(run_dir: Path, model_name: str, data_dir: Path, epochs: int = 3) -> Path:
    """A finished run as `cnnray train --out` leaves it: result.json and a checkpoint."""
    from cnnray.train.epoch import evaluate
    from cnnray.train.worker_data import held_out_batches

    ds = load_dataset("imagefolder", data_dir)
    cfg = TrainConfig(model=model_name, dataset="imagefolder", data_dir=str(data_dir), epochs=epochs,
                      workers=1, batch_size=8, out=str(run_dir))
    args = resolve_model_args(model_name, num_classes=len(ds.classes), in_channels=ds.input_shape[0],
                              image_size=list(ds.input_shape[1:]), norm="none")
    torch.manual_seed(0)
    model = build_model(model_name, **args)
    history = [
        {"epoch": e, "train_loss": 1.2 - 0.2 * e, "train_accuracy": 0.4 + 0.1 * e, "val_loss": 1.1 - 0.15 * e,
         "val_accuracy": 0.45 + 0.1 * e, "best_val_accuracy": 0.45 + 0.1 * e, "samples_per_second": 24.0 + e,
         "epoch_seconds": 1.0, "lr": 0.1 / e, "start_epoch": 0, "world_size": 1,
         "step_lrs": [0.1 / e] * 4}
        for e in range(1, epochs + 1)
    ]
    ckpt = run_dir / "ray" / run_dir.name / f"epoch-{epochs:04d}"
    save_checkpoint(ckpt, model_name=model_name, model_args=args, state_dict=model.state_dict(),
                    data_info=data_info(ds), epoch=epochs, config=cfg.to_dict(), metrics=history[-1], history=history)
    test = evaluate(model.eval(), held_out_batches(cfg, torch.device("cpu")), torch.device("cpu"))
    result = {"model": model_name, "dataset": "imagefolder", "epochs": epochs, "workers": 1,
              "test_accuracy": test.accuracy, "best_val_accuracy": history[-1]["val_accuracy"], "best_epoch": epochs,
              "checkpoint": str(ckpt), "history": history, "config": cfg.to_dict()}
    (run_dir / "result.json").write_text(json.dumps(result))
    return ckpt
