"""`cnnray tune`: a Ray Tune sweep in which every trial is a Ray Train run.

    cnnray tune --model cnn --dataset mnist --data-dir ../shared/datasets/mnist --samples 8 --epochs 3 --out sweeps/x
    cnnray tune --model cnn --dataset mnist --space space.yaml --workers-per-trial 2 --out sweeps/y
    cnnray tune ... --out sweeps/x --resume      # continue an interrupted sweep
    cnnray tune ... --search optuna --scheduler asha --budget 40
    cnnray tune ... --scheduler pbt --perturbation-interval 2 --samples 4

Every `cnnray train` flag sets the config all trials start from; the search space (the
default, or --space FILE.yaml) then varies some TrainConfig fields per trial.
"""

from __future__ import annotations

import argparse

# `cnnray train` flags that the sweep sets itself or names differently.
# Trials always run on Ray Train workers: Tune reports through Ray Train callbacks, which
# local mode does not run.
_NOT_TRAIN_FLAGS = ("--workers", "--out", "--resume", "--storage-path", "--local-mode")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from cnnray.argtypes import POSITIVE_INT, Range
    from cnnray.cli.flags import TRAIN_FLAGS
    from cnnray.config import FIELD_RANGES

    p = sub.add_parser(
        "tune",
        help="sweep hyperparameters with Ray Tune (each trial a Ray Train run)",
        description="Sweep learning rate, momentum, normalisation (or any TrainConfig field) with Ray Tune; "
        "every trial is a Ray Train (DDP) run, ASHA stops bad trials early, the best checkpoint is exported.",
    )
    p.add_argument("--samples", type=POSITIVE_INT.argtype(int), default=8, help="configs drawn from the space; default 8")
    p.add_argument("--workers-per-trial", dest="workers", type=FIELD_RANGES["workers"].argtype(int), help="Ray Train workers (DDP ranks) per trial; default 1")
    p.add_argument("--max-concurrent", type=POSITIVE_INT.argtype(int), help="trials at once; default: as many as the cluster's CPUs (GPUs) fit")
    from cnnray.tune.schedulers import SCHEDULERS
    from cnnray.tune.search import SEARCHERS

    p.add_argument("--search", choices=SEARCHERS, default="random",
                   help="random: draw (grid entries enumerated); grid: every choice enumerated; "
                   "optuna: Optuna's TPE, seeded by --seed; default random")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="asha",
                   help="asha | hyperband (stop bad trials early) | pbt (exploit the best trials' checkpoints, "
                   "perturb lr/momentum/weight_decay) | none; default asha")
    p.add_argument("--perturbation-interval", type=POSITIVE_INT.argtype(int), default=1,
                   help="pbt: epochs between exploit/explore steps; default 1")
    p.add_argument("--budget", type=POSITIVE_INT.argtype(int), metavar="TRIAL_EPOCHS",
                   help="end the sweep once its trials have trained this many epochs in all; default: no limit")
    p.add_argument("--gpus-per-trial", type=Range(0, 4096, lo_open=True).argtype(float),
                   help="with --gpu: GPUs a trial's workers share, e.g. 0.25 packs 4 trials on a GPU; default 1 per worker")
    p.add_argument("--grace-period", type=POSITIVE_INT.argtype(int), default=1, help="epochs before ASHA may stop a trial; default 1")
    p.add_argument("--reduction-factor", type=Range(1, 1000, lo_open=True).argtype(float), default=2.0, help="ASHA keeps the best 1/N at each rung; default 2")
    p.add_argument("--space", metavar="FILE.yaml", help="search space over TrainConfig fields; default: lr, momentum, norm")
    p.add_argument("--out", default="sweeps/latest", help="sweep folder (table, plot, best.json); default sweeps/latest")
    p.add_argument("--model-store", help="where the best model is exported; default <out>/models")
    p.add_argument("--name", help="exported model name; default <model>-<dataset>")
    p.add_argument("--register", metavar="NAME", help="register the best checkpoint as a new version of this MLflow "
                   "model (at --tracking-uri); alias champion moves to it when it beats the champion")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue the sweep in --out: finished trials are kept")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of TrainConfig keys for every trial; flags override it")
    for flag, (key, kwargs) in TRAIN_FLAGS.items():
        if flag not in _NOT_TRAIN_FLAGS:
            p.add_argument(flag, dest=key, default=None, **kwargs)
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    from cnnray.config import ConfigError
    from cnnray.cli.flags import TRAIN_FLAGS, config_from_args
    from cnnray.tune.space import default_space, load_space
    from cnnray.tune.sweep import run_sweep
    from cnnray.tune.sweep_config import SweepConfig

    base = config_from_args(args).validate()
    space, fixed = load_space(args.space, base) if args.space else (default_space(), {})
    if args.scheduler == "pbt" and not args.space:  # PBT evolves only what it can change mid-run
        from cnnray.tune.pbt import PBT_FIELDS

        space = {k: d for k, d in space.items() if k in PBT_FIELDS}
    given = {key: flag for flag, (key, _) in TRAIN_FLAGS.items() if getattr(args, key, None) is not None}
    clash = [given[k] for k in space if k in given]
    if clash:
        raise ConfigError(f"{', '.join(clash)} is swept by the search space: drop the flag or fix the field in --space")
    # Flags win over fixed values in the space file, as they win over --config.
    base = base.replace(**{k: v for k, v in fixed.items() if k not in given})
    sweep = SweepConfig(
        train=base,
        space=space,
        samples=args.samples,
        max_concurrent=args.max_concurrent,
        scheduler=args.scheduler,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        out=args.out,
        model_store=args.model_store,
        name=args.name,
        resume=args.resume,
        search=args.search,
        perturbation_interval=args.perturbation_interval,
        budget=args.budget,
        gpus_per_trial=args.gpus_per_trial,
        register=args.register,
    )
    try:
        run_sweep(sweep)
    except KeyboardInterrupt as e:  # SweepInterrupted (cnnray.tune.interrupts), or Ctrl-C before it was installed
        import signal
        import sys

        from cnnray.tune.interrupts import continue_line

        signum = getattr(e, "signum", signal.SIGINT)
        print(continue_line(signum, getattr(args, "argv", sys.argv[1:]), sweep.out), file=sys.stderr, flush=True)
        return 128 + signum
    return 0
