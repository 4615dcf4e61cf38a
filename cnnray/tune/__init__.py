"""Hyperparameter sweeps with Ray Tune over Ray Train runs (`cnnray tune`; the subcommand
is cnnray/cli/tune.py).

`sweep_config` (SweepConfig, checked whole), `space` (search spaces over TrainConfig
fields; `space_effects`: fields that would change nothing), `search` (random, grid,
Optuna), `schedulers` (ASHA, HyperBand, PBT, budgets), `pbt` (exploits and their record),
`resources` (fractional GPUs), `sweep` (the Tuner and the trial function), `interrupts`
(Ctrl-C and SIGTERM), `history` (each trial's per-epoch file), `results` (the table, histories, best.json, export), `plots`
(sweep.png). Nothing is imported or started here.
"""
