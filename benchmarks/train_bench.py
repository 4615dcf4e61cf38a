"""Training benchmarks: cnnray and a plain PyTorch reference, side by side in one run.

    python -m benchmarks.train_bench time-to-accuracy --data-dir ../shared/datasets/mnist
    python -m benchmarks.train_bench throughput --data-dir ../shared/datasets/mnist --workers 1,2
    python -m benchmarks.train_bench cifar --data-dir ../shared/datasets/cifar10-jpg.tar.gz   # GPU
    python -m benchmarks.train_bench cifar-fast --airbench ../cifar10-airbench   # airbench94 beside cifar10_fast

Each prints a table and the ratios, and writes a JSON record (machine, versions, settings,
results) into --out (default runs/bench/). The machines are noisy: compare the two sides
of one run, never figures from different runs.

Reference (benchmarks/train_reference.py) = the lecture's training loop and its MNIST CNN
class, copied verbatim: SGD lr 0.01 momentum 0.9, batch 64, cross-entropy, PyTorch's default
init, data already in memory as normalised float tensors, all cores for intra-op threads,
test accuracy after every epoch.

Time to accuracy runs `cnnray train` as a user types it: only --model, --dataset, --data-dir
and --epochs (so one worker in local mode: in the cnnray process, no Ray, every core),
unless --workers or --cpus-per-worker are given.

Throughput compares cnnray's loop, in local mode (no Ray) and on one Ray Train worker,
with a plain loop on the same global batch, optimizer and threads running cnnray's own
model and precision without Ray (pool before ReLU, channels-last, bf16 where native): the
ratio is the cost of cnnray and Ray Train alone. The same plain loop is also run on a Ray
Train worker of a private Ray started as cnnray starts it: Ray's own cost on the machine,
which the two ratios on a Ray Train worker then separate from cnnray's. Each figure is
paired with a plain-loop measurement taken just before it (this machine's speed drifts);
the lecture's CNN as written (what a user would run) is measured once beside them.
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

from benchmarks.machine import machine_info
from benchmarks.train_reference import reference_throughput

REPO = Path(__file__).resolve().parents[1]


def _private_ray_env() -> dict[str, str]:
    """This environment without RAY_ADDRESS: the child starts its own private local Ray."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


# --- cnnray, as a user runs it ---------------------------------------------------------------
def run_cnnray(args: list[str], out: Path) -> dict[str, Any]:
    """`cnnray train ...` in a fresh process: wall time includes Python, Ray start-up, workers,
    the test evaluation and result.json; not the optional HTML report (--no-report)."""
    cmd = [sys.executable, "-m", "cnnray.cli", "train", *args, "--out", str(out), "--no-report"]
    env = _private_ray_env()
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
def _run_for_result(cmd: list[str], what: str, env: dict[str, str] | None = None) -> Any:
    """Run `cmd` from the repository root (environment `env`, default this one's), echo its
    output, return the JSON of its one `RESULT {json}` line (the protocol of the reference
    and of benchmarks.airbench_peer)."""
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = proc.stdout.splitlines()
    print("\n".join(line for line in lines if not line.startswith("RESULT ")), flush=True)
    return json.loads(next(line for line in lines if line.startswith("RESULT ")).removeprefix("RESULT "))


def _reference_in_fresh_process(a: argparse.Namespace) -> dict[str, Any]:
    """reference_time_to_accuracy in a new interpreter, as the lecture's script runs: its
    first epoch pays its own first-use costs (torch.optim's torch._dynamo import) every
    round, not only in the first."""
    code = ("import json; from benchmarks.train_reference import reference_time_to_accuracy as r; "
            f"print('RESULT ' + json.dumps(r({a.data_dir!r}, {a.target!r}, {a.max_epochs!r}, {a.seed!r})))")
    return _run_for_result([sys.executable, "-c", code], "the reference")


def _plain_on_ray_train_in_fresh_process(a: argparse.Namespace, threads: int, bf16: bool) -> float:
    """reference_throughput_on_ray_train in a new interpreter (its own private Ray, which
    its workers import this module from: the repository is on their PYTHONPATH)."""
    code = ("import json; from benchmarks.train_reference import reference_throughput_on_ray_train as r; "
            f"print('RESULT ' + json.dumps(r({a.data_dir!r}, {a.batch_size!r}, {threads!r}, {a.seconds!r}, "
            f"bf16={bf16!r})))")
    env = {**_private_ray_env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return float(_run_for_result([sys.executable, "-c", code], "the plain loop on a Ray Train worker", env=env))


def time_to_accuracy(a: argparse.Namespace) -> dict[str, Any]:
    """`--rounds` rounds of (the reference, then cnnray), each in a fresh process; the
    ratios are taken within each round (this machine's speed drifts over minutes) and
    their median is the result."""
    from statistics import median

    args = ["--model", "cnn", "--dataset", "mnist", "--data-dir", a.data_dir, "--epochs", str(a.epochs)]
    # Only what the user asked for beyond the defaults (cnnray picks workers' cores itself).
    args += ["--workers", str(a.workers)] if a.workers else []
    args += ["--cpus-per-worker", str(a.cpus_per_worker)] if a.cpus_per_worker else []
    args += ["--seed", str(a.seed)] if a.seed else []
    rounds = []
    for r in range(a.rounds):
        print(f"round {r + 1}: reference, the lecture's loop, until test accuracy >= {a.target}", flush=True)
        ref = _reference_in_fresh_process(a)
        print(f"round {r + 1}: cnnray train {' '.join(args)}", flush=True)
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
            # Where the whole command's time goes besides the epochs: inside the run (data
            # set-up, model, optimizer, validation, test, checkpoints: fit minus epochs),
            # and outside it (interpreter, imports, pre-flight data load, exit).
            "in_run_overhead_seconds": res["train_seconds"] - res["epoch_seconds_total"],
            "outside_run_seconds": res["command_seconds"] - res["total_seconds"],
        }
        ratios = {
            "train_time_ratio": ours["train_seconds"] / ref["train_seconds"],
            "whole_command_vs_reference_train": ours["total_seconds"] / ref["train_seconds"],
            "whole_command_vs_reference_total": ours["total_seconds"] / ref["total_seconds"],
        }
        rounds.append({"reference": ref, "cnnray": ours, **ratios})
        print(f"\n{'':26} {'test acc':>9} {'epochs':>7} {'train s':>8} {'whole s':>8}")
        for name, row in (("reference (lecture loop)", ref), ("cnnray train", ours)):
            print(f"{name:26} {row['test_accuracy']:>9.4f} {row['epochs']:>7} {row['train_seconds']:>8.1f} "
                  f"{row['total_seconds']:>8.1f}")
        print(f"cnnray's whole command, {ours['total_seconds']:.1f} s: epochs {ours['train_seconds']:.1f}, the rest of "
              f"the run {ours['in_run_overhead_seconds']:.1f}, Ray start-up {ours['ray_start_seconds']:.1f}, outside "
              f"the run {ours['outside_run_seconds']:.1f} (interpreter, imports, pre-flight, exit)")
        print(f"round {r + 1}: training time ratio {ratios['train_time_ratio']:.2f}, whole command / reference "
              f"training {ratios['whole_command_vs_reference_train']:.2f}, both reached {a.target}: "
              f"{ref['reached'] and ours['reached']}\n", flush=True)
    keys = ("train_time_ratio", "whole_command_vs_reference_train", "whole_command_vs_reference_total")
    result = {k: median(r[k] for r in rounds) for k in keys}
    result["all_reached"] = all(r["reference"]["reached"] and r["cnnray"]["reached"] for r in rounds)
    print(f"median over {a.rounds} round(s): cnnray training time / reference training time "
          f"{result['train_time_ratio']:.2f}; whole command / reference training time "
          f"{result['whole_command_vs_reference_train']:.2f} (target <= 0.50); whole command / reference whole "
          f"script {result['whole_command_vs_reference_total']:.2f}; every run reached {a.target}: "
          f"{result['all_reached']}")
    return {"rounds": rounds, **result}


def _epoch_rate(args: list[str], epochs: int) -> float:
    """Median samples/s of epochs 2..E of one `cnnray train` run (the first epoch pays the
    one-off costs: kernel choice, allocator warm-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        res = run_cnnray([*args, "--epochs", str(epochs)], Path(tmp) / "run")
    rates = sorted(h["samples_per_second"] for h in res["history"][1:])
    return rates[len(rates) // 2]


def throughput(a: argparse.Namespace) -> dict[str, Any]:
    """cnnray's loop (local mode, and one Ray Train worker actor) against a plain loop with
    the same model, precision, global batch, optimizer and threads; and that plain loop
    itself on a Ray Train worker, which measures Ray's own cost on this machine apart from
    cnnray's.

    This machine's speed drifts by 20-30% over minutes (a shared VM), so each figure is
    paired with a plain-loop measurement (without Ray) taken just before it, and the ratios
    are taken within each pair: `--rounds` rounds of (plain, local mode, plain, Ray Train
    worker, plain, plain on a Ray Train worker) per precision, medians reported."""
    from statistics import median

    from cnnray.train.device import native_bf16

    threads = a.threads or (os.cpu_count() or 1)
    bf16 = native_bf16(torch.device("cpu"))
    results: dict[str, Any] = {"batch_size": a.batch_size, "threads": threads, "bf16_native": bf16, "epochs": a.epochs,
                               "rounds": a.rounds, "pairs": [], "workers": {}}
    print(f"{threads} threads, global batch {a.batch_size}, SGD nesterov + label smoothing, samples/s "
          f"(cnnray: median of epochs 2..{a.epochs} of one run):")
    common = ["--model", "cnn", "--data-dir", a.data_dir, "--workers", "1", "--cpus-per-worker", str(threads),
              "--batch-size", str(a.batch_size)]
    precisions = (("bf16", []), ("fp32", ["--no-amp"])) if bf16 else (("fp32", ["--no-amp"]),)
    # (where, what runs there, cnnray's flags; None: the plain loop itself, Ray's own cost)
    paths = (("local mode", "cnnray", ["--local-mode"]), ("Ray Train worker", "cnnray", ["--no-local-mode"]),
             ("Ray Train worker", "plain loop", None))
    for r in range(a.rounds):
        for precision, amp_flags in precisions:
            for where, who, path_flags in paths:
                plain = reference_throughput(a.data_dir, a.batch_size, threads, a.seconds, model="cnnray",
                                             bf16=precision == "bf16")
                if path_flags is None:
                    ours = _plain_on_ray_train_in_fresh_process(a, threads, precision == "bf16")
                else:
                    ours = _epoch_rate([*common, *path_flags, *amp_flags], a.epochs)
                pair = {"round": r + 1, "precision": precision, "where": where, "who": who, "plain": plain,
                        "measured": ours, "ratio": ours / plain}
                results["pairs"].append(pair)
                print(f"  round {r + 1} {precision} {who + ', ' + where:30} plain {plain:>8,.0f}  it {ours:>8,.0f}  "
                      f"ratio {ours / plain:.2f}", flush=True)
    results["plain lecture fp32"] = reference_throughput(a.data_dir, a.batch_size, threads, a.seconds, model="lecture")
    print(f"  plain lecture CNN fp32 (as written)    {results['plain lecture fp32']:>8,.0f}", flush=True)
    for n in a.workers:  # DDP over n Ray Train workers sharing the cores
        rate = _epoch_rate(["--model", "cnn", "--data-dir", a.data_dir, "--workers", str(n), "--cpus-per-worker",
                            str(max(1, threads // n)), "--batch-size", str(a.batch_size), "--no-local-mode"], a.epochs)
        results["workers"][n] = rate
        print(f"  cnnray default, {n} Ray Train worker(s)  {rate:>8,.0f}", flush=True)
    results["ratios"] = {}
    for precision, _ in precisions:
        by_round = {}
        for where, who, _ in paths:
            by_round[who, where] = [p["ratio"] for p in results["pairs"]
                                    if (p["precision"], p["who"], p["where"]) == (precision, who, where)]
            results["ratios"][f"{precision}: {who}, {where} / plain loop"] = median(by_round[who, where])
        # What cnnray's loop adds on a Ray Train worker, Ray's own cost taken out: per round,
        # the ratio of the two paired ratios (each against its own plain loop without Ray).
        results["ratios"][f"{precision}: cnnray / plain loop, both on a Ray Train worker (ratio of ratios)"] = median(
            r_cnnray / r_plain_on_ray for r_cnnray, r_plain_on_ray
            in zip(by_round["cnnray", "Ray Train worker"], by_round["plain loop", "Ray Train worker"]))
    print("ratios (median over rounds; each against the plain loop without Ray measured just before it, "
          "the last of each precision a ratio of two such ratios):")
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


def cifar_fast(a: argparse.Namespace) -> dict[str, Any]:
    """airbench94's own code (benchmarks.airbench_peer) and `cnnray train --config
    jobs/configs/cifar10_fast.yaml`, one after the other on the same data and machine,
    each in a fresh process: test accuracy, training time and the whole command's time."""
    cmd = [sys.executable, "-m", "benchmarks.airbench_peer", "--airbench", a.airbench, "--data-dir", a.data_dir]
    print(f"peer: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    peer = _run_for_result(cmd, "airbench94")
    peer["command_seconds"] = time.perf_counter() - start
    args = ["--config", str(REPO / "jobs" / "configs" / "cifar10_fast.yaml"), "--data-dir", a.data_dir]
    args += ["--epochs", str(a.epochs)] if a.epochs else []
    args += ["--gpu"] if torch.cuda.is_available() else []
    print(f"cnnray: cnnray train {' '.join(args)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        res = run_cnnray(args, Path(tmp) / "run")
    ours = {"test_accuracy": res["test_accuracy"], "epochs": res["epochs"], "train_seconds": res["epoch_seconds_total"],
            "command_seconds": res["command_seconds"], "samples_per_second": res["samples_per_second"],
            "tta": res["config"]["tta"], "history": [{k: h[k] for k in ("epoch", "val_accuracy", "epoch_seconds")}
                                                     for h in res["history"]]}
    print(f"\n{'':34} {'test acc':>9} {'epochs':>7} {'train s':>8} {'whole s':>8}")
    print(f"{'airbench94 (its own code)':34} {peer['test_accuracy']:>9.4f} {peer.get('epochs', '9.9'):>7} "
          f"{peer.get('train_seconds', float('nan')):>8.0f} {peer['whole_seconds']:>8.0f}")
    print(f"{'cnnray train cifar10_fast.yaml':34} {ours['test_accuracy']:>9.4f} {ours['epochs']:>7} "
          f"{ours['train_seconds']:>8.0f} {ours['command_seconds']:>8.0f}")
    # airbench's clock: from its data loader to its final (TTA) test accuracy; cnnray's: the
    # whole command, interpreter start-up and data loading included.
    ratio = ours["command_seconds"] / peer["whole_seconds"]
    print(f"cnnray's whole command / airbench94's run (its own clock, without writing its data files and the "
          f"extra TTA levels): {ratio:.2f}")
    return {"airbench94": peer, "cnnray": ours, "whole_command_ratio": ratio}


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
    t.add_argument("--rounds", type=int, default=3, help="rounds of (reference, cnnray); ratios per round, median")
    t.set_defaults(func=time_to_accuracy)
    h = sub.add_parser("throughput", help="samples/s: Ray Train loop vs plain loop; 1..N workers")
    h.add_argument("--data-dir", default=str(REPO.parent / "shared" / "datasets" / "mnist"))
    h.add_argument("--batch-size", type=int, default=128)
    h.add_argument("--threads", type=int, default=0, help="total threads; default all cores")
    h.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",") if x], default=[2],
                   help="also DDP over these numbers of Ray Train workers (comma-separated; '' for none)")
    h.add_argument("--seconds", type=float, default=8.0, help="each plain-loop measurement's time")
    h.add_argument("--epochs", type=int, default=4, help="epochs of each cnnray run (the first is not timed)")
    h.add_argument("--rounds", type=int, default=2, help="rounds of paired measurements")
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
    f = sub.add_parser("cifar-fast", help="CIFAR-10: cifar10_fast.yaml beside airbench94's own code")
    f.add_argument("--airbench", required=True, help="a checkout of github.com/KellerJordan/cifar10-airbench")
    f.add_argument("--data-dir", default=str(REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"))
    f.add_argument("--epochs", type=int, default=0, help="cnnray's epochs; default the config's")
    f.set_defaults(func=cifar_fast)
    a = p.parse_args(argv)
    results = a.func(a)
    settings = {k: v for k, v in vars(a).items() if k not in ("func", "out")}
    print(f"\nrecord: {save_record(Path(a.out), a.kind, settings, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
