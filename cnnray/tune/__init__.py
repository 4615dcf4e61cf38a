"""Hyperparameter sweeps with Ray Tune over Ray Train runs (`cnnray tune`).

`space` (search spaces over TrainConfig fields), `sweep` (the Tuner and the trial
function), `results` (the table, histories, best.json, export), `plots` (sweep.png),
`cli` (the subcommand). Nothing is imported or started here.
"""
