"""Train one model as a Ray job: `cnnray train` with the same flags, run on the cluster.

From the repository root, against a running cluster: here a local head, else one from
cluster/aws-gpu.yaml or cluster/kuberay/ (RAY_ADDRESS is then its job API, forwarded to
127.0.0.1:8265). RAY_AUTH_MODE=token makes `ray job submit` send the cluster's token, read
from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token:

    cluster/local.sh up
    eval "$(cluster/local.sh env)"      # RAY_ADDRESS=http://127.0.0.1:<port> RAY_AUTH_MODE=token
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/train.py --config jobs/configs/mnist_cnn.yaml --data-dir "$PWD/../shared/datasets/mnist"

Any `cnnray train` flag overrides the config file (`--epochs 1 --workers 4 --gpu`); see
`cnnray train --help`. The job runs in a temporary copy of the working directory on the
head node: relative paths read that copy, and an output inside it (`--out runs/x`,
`--storage-path ckpts`) is refused with exit 2 (the job FAILS, one line in `ray job
logs`); give outputs absolute, `'~/...'`, or (storage) a URI.

- `--out`: where result.json goes, on the node that runs this driver (the head). Default
  `$CNNRAY_RUNS/<config name>-<UTC time>`, with CNNRAY_RUNS defaulting to ~/cnnray-runs.
- `--storage-path`: where Ray Train writes checkpoints. Default `<out>/ray`, right for one
  node. On several nodes every worker must reach it: a shared file system mounted at the
  same path everywhere, or an object store URI (s3://, gs://, read through pyarrow). Set
  it per job, or once for the cluster: CNNRAY_STORAGE exported on every node before
  `ray start` becomes the default (cluster/aws-gpu.yaml does this; on KubeRay the run
  folders themselves sit on a shared volume).

Exit status is the CLI's: 2 for bad input (the one-line reason is in `ray job logs`), 1
when training fails; either makes the Ray job FAILED.
"""

from __future__ import annotations

import sys
from typing import Sequence

from _defaults import with_run_defaults


def main(argv: Sequence[str] | None = None) -> int:
    from cnnray.cli import main as cnnray_main

    args = sys.argv[1:] if argv is None else argv
    return cnnray_main(["train", *with_run_defaults("train", args)], program=argv is None)


if __name__ == "__main__":
    sys.exit(main())
