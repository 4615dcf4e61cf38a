"""Serve models over HTTP as a Ray job: `cnnray serve` with the same flags, on the cluster.

From the repository root, against a running cluster (RAY_ADDRESS and RAY_AUTH_MODE=token
as for jobs/train.py; `cluster/local.sh env` prints them for the local head):

    ray job submit --no-wait --submission-id cnnray-serve --working-dir . --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/serve.py --model-store "$HOME/cnnray-runs/<sweep>/models" --port 8000
    ray job stop cnnray-serve      # stops serving: the job removes the app it deployed

The job stays RUNNING while it serves; every `--watch-s` seconds each replica swaps in new
versions from the model store. Any `cnnray serve` flag works (`cnnray serve --help`);
`--replicas auto` (the default) fills the cluster's CPUs, or GPUs with `--gpu`. The ingress
is the cluster's: a head started by `cluster/local.sh up` runs Ray Serve's fast ingress
(HAProxy, its stats and metrics ports on 127.0.0.1), as `cnnray serve` does on its own
local Ray. It listens on `--host` (default 127.0.0.1, the head alone; `--host 0.0.0.0` to
serve other machines). `--model-store`/`--checkpoint` are paths on the cluster: replicas on other
nodes read them too, so on several nodes they must be on a shared file system. For a
long-lived service on Kubernetes, use the RayService in cluster/kuberay/ instead.
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from cnnray.cli import main as cnnray_main

    args = sys.argv[1:] if argv is None else argv
    return cnnray_main(["serve", *args], program=argv is None)


if __name__ == "__main__":
    sys.exit(main())
