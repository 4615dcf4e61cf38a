"""What the tests share (no test module imports another): the checkout's paths here;
processes.py (starting `cnnray`, servers, ports, logs), serve.py (checkpoints, images and
models for the serving tests), report.py (a run folder to report on), images.py (every
image variant the decoder handles), multinode.py (a Ray cluster of several nodes)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
