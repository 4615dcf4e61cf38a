"""Run a hyperparameter sweep as a Ray job: `cnnray tune` with the same flags, on the cluster.

From the repository root, against a running cluster (RAY_ADDRESS and RAY_AUTH_MODE=token
as for jobs/train.py; `cluster/local.sh env` prints them for the local head):

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/tune.py --config jobs/configs/mnist_cnn.yaml --space jobs/configs/mnist_cnn_sweep.yaml \\
            --samples 8 --data-dir "$PWD/../shared/datasets/mnist"

`--config` is the TrainConfig every trial starts from, `--space` the search space (see
jobs/configs/mnist_cnn_sweep.yaml); any `cnnray tune` flag works (`cnnray tune --help`).
The job runs in a temporary copy of the working directory on the head node: relative
paths read that copy, and an output inside it (`--out sweeps/x`) is refused with exit 2
(the job FAILS, one line in `ray job logs`); give outputs absolute (or `'~/...'`).

- `--out`: the sweep folder (table, plot, best.json, every trial's Ray Train run and the
  model store the best checkpoint is exported to). Default
  `$CNNRAY_RUNS/<space name>-<UTC time>`, with CNNRAY_RUNS defaulting to ~/cnnray-runs.
  Trials run on every node, so on several nodes `--out` (or CNNRAY_RUNS) must be a shared
  file system mounted at the same path on all of them.
"""

from __future__ import annotations

import sys
from typing import Sequence

from _defaults import with_run_defaults


def main(argv: Sequence[str] | None = None) -> int:
    from cnnray.cli import main as cnnray_main

    args = sys.argv[1:] if argv is None else argv
    return cnnray_main(["tune", *with_run_defaults("tune", args)], program=argv is None)


if __name__ == "__main__":
    sys.exit(main())
