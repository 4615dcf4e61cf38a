"""Sweeps at an equal budget: random+ASHA, Optuna(TPE)+ASHA and PBT, side by side in one run.

    python -m benchmarks.tune_bench --data-dir ../shared/datasets/cifar10-jpg.tar.gz
    python -m benchmarks.tune_bench --data-dir ../shared/datasets/cifar10-jpg.tar.gz --quick   # the test's size

Every sweep tunes lr (log-uniform) and momentum (uniform) of the same CIFAR-10 subset run
(constant learning rate, so that a trial's lr is the rate it trains with, under PBT too)
and may spend the same budget of trial-epochs (`cnnray tune --budget`: the sweep ends once
its trials have trained that many epochs in all):

    random+asha   random draws, ASHA (grace 1 epoch, reduction factor 2)
    optuna+asha   Optuna's TPE, seeded, behind a ConcurrencyLimiter, and ASHA
    pbt           a population of budget / epochs trials, perturbed every epoch

ASHA stops trials early, so its sweeps draw as many trials as the budget is expected to
hold (budget / the mean epochs a trial runs under ASHA's rungs); the epochs each sweep
really spent are in the table. Each method runs once per seed (the searcher's and the
trials' --seed); the table gives the mean and spread (sample standard deviation) of the
best validation accuracy over the seeds. All sweeps share one private Ray. Writes a JSON
record (machine, versions, settings, every sweep's result) into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
METHODS = ("random+asha", "optuna+asha", "pbt")
SPACE = {"lr": {"loguniform": [1e-3, 0.3]}, "momentum": {"uniform": [0.5, 0.95]}}
SIZES = {  # subset (train and test images), epochs per trial, budget (trial-epochs), seeds
    "quick": dict(subset=500, epochs=2, budget=4, seeds=[0]),
    "default": dict(subset=5000, epochs=4, budget=16, seeds=[0, 1, 2]),
}


def asha_mean_epochs(epochs: int, grace: int = 1, rf: float = 2.0) -> float:
    """Expected epochs of one trial under ASHA when a 1/rf share passes each rung."""
    from cnnray.tune.schedulers import asha_rungs

    marks = [*asha_rungs(epochs, grace, rf), epochs]
    total, share, done = 0.0, 1.0, 0
    for mark in marks:
        total += share * (mark - done)
        done, share = mark, share / rf
    return total


def sweep_config(method: str, seed: int, *, data_dir: str, subset: int, epochs: int, budget: int, out: Path,
                 model: str) -> Any:
    from cnnray.config import TrainConfig
    from cnnray.tune.schedulers import min_budget
    from cnnray.tune.space import parse_space
    from cnnray.tune.sweep import SweepConfig

    base = TrainConfig(model=model, dataset="cifar10", data_dir=data_dir, subset=subset, epochs=epochs,
                       batch_size=128, schedule="constant", norm="batch", seed=seed, workers=1, verbose=False)
    space, _ = parse_space(SPACE, base)
    common = dict(train=base, space=space, budget=budget, out=str(out / f"{method}-seed{seed}"))
    if method == "pbt":
        return SweepConfig(**common, scheduler="pbt", search="random", samples=budget // epochs, perturbation_interval=1)
    search = "optuna" if method == "optuna+asha" else "random"
    samples = math.ceil(budget / asha_mean_epochs(epochs))
    sweep = SweepConfig(**common, scheduler="asha", search=search, samples=samples)
    while min_budget(sweep) > budget:  # every trial must be able to reach the first rung
        sweep = SweepConfig(**{**common, "scheduler": "asha", "search": search, "samples": sweep.samples - 1})
    return sweep


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from benchmarks.machine import machine_info
    from cnnray.ray_start import init_ray
    from cnnray.tune.schedulers import spent_trial_epochs
    from cnnray.tune.sweep import run_sweep

    size = dict(SIZES["quick" if args.quick else "default"])
    for key in ("subset", "epochs", "budget"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    if args.seeds:
        size["seeds"] = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out).resolve() / time.strftime("%Y%m%d-%H%M%S")
    own = init_ray(None, ray_train=True)
    machine = machine_info()
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    try:
        for seed in size["seeds"]:
            for method in METHODS:
                sweep = sweep_config(method, seed, data_dir=str(Path(args.data_dir).resolve()), subset=size["subset"],
                                     epochs=size["epochs"], budget=size["budget"], out=out, model=args.model)
                started = time.perf_counter()
                best = run_sweep(sweep, echo=lambda line: None)
                seconds = time.perf_counter() - started
                spent = spent_trial_epochs(Path(sweep.out))
                exploits = len(json.loads((Path(sweep.out) / "exploits.json").read_text())) if method == "pbt" and (Path(sweep.out) / "exploits.json").is_file() else 0
                results.append({"method": method, "seed": seed, "trials": best["trials"], "spent_trial_epochs": spent,
                                "best_val_accuracy": best["val_accuracy"], "test_accuracy": best["test_accuracy"],
                                "best": best["swept"], "exploits": exploits, "seconds": seconds})
                print(f"[tune_bench] {method} seed {seed}: best val {best['val_accuracy']:.4f} "
                      f"({best['trials']} trials, {spent} trial-epochs, {seconds:.0f}s)", flush=True)
                record = {"machine": machine, "size": size, "model": args.model, "space": SPACE,
                          "results": results, "table": table(results)}
                # After every sweep: a long run stopped early still leaves what it measured.
                (out / "tune_bench.json").write_text(json.dumps(record, indent=2))
    finally:
        if own:
            ray.shutdown()
    print(record["table"])
    print(f"[tune_bench] wrote {out / 'tune_bench.json'}")
    return record


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: per method, the mean +- spread of the best validation accuracy over seeds."""
    lines = ["| method | seeds | best val acc, mean ± sd | min–max | trial-epochs spent (mean) | trials (mean) |",
             "|---|---|---|---|---|---|"]
    for method in METHODS:
        rows = [r for r in results if r["method"] == method]
        if not rows:
            continue
        accs = [r["best_val_accuracy"] for r in rows]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {method} | {len(rows)} | {statistics.mean(accs):.4f} ± {sd:.4f} | {min(accs):.4f}–{max(accs):.4f} "
                     f"| {statistics.mean(r['spent_trial_epochs'] for r in rows):.1f} "
                     f"| {statistics.mean(r['trials'] for r in rows):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="the CIFAR-10 tarball (or folder)")
    p.add_argument("--quick", action="store_true", help="the test's size: 500 images, 2 epochs, budget 4, one seed")
    p.add_argument("--subset", type=int, help="training (and test) images; default 5000 (quick 500)")
    p.add_argument("--epochs", type=int, help="epochs per trial; default 4 (quick 2)")
    p.add_argument("--budget", type=int, help="trial-epochs per sweep; default 16 (quick 4)")
    p.add_argument("--seeds", help="comma-separated seeds; default 0,1,2 (quick 0)")
    p.add_argument("--model", default="cnn", help="default cnn")
    p.add_argument("--out", default=str(REPO / "runs" / "bench" / "tune"), help="default runs/bench/tune")
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
