"""The servers of the load benchmarks (serve_load.py, serve_concurrency.py): start, wait, measure, stop.

`cnnray serve` runs as the real command in a subprocess, on a private local Ray; the plain
baseline is `python -m benchmarks.serve_load --plain-server` (`serve_plain` below).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


# --- servers ----------------------------------------------------------------------------------
def tree_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` and all its descendants now alive (Linux
    /proc; None elsewhere). Children that already exited are not counted."""
    proc = Path("/proc")
    if not (proc / str(pid)).is_dir():
        return None
    parents: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += times.get(p, 0.0)
        todo.extend(parents.get(p, []))
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no answer from {url}/healthz after {timeout_s:.0f} s")


def stop(proc: subprocess.Popen, timeout_s: float = 90.0) -> int:
    """Ctrl-C the server (it cleans up what it started), then wait; kill only if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def start_plain(checkpoint: str, name: str, port: int, log: Any, threads: int = 1, gpu: bool = False,
                runtime: str = "torch") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "benchmarks.serve_load", "--plain-server", "--checkpoint", checkpoint,
           "--name", name, "--port", str(port), "--threads", str(threads), "--runtime", runtime,
           *(["--gpu"] if gpu else [])]
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def start_cnnray(checkpoint: str, name: str, port: int, log: Any, extra: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private local Ray
    cmd = [sys.executable, "-m", "cnnray.cli", "serve", "--checkpoint", checkpoint, "--name", name,
           "--port", str(port), "--watch-s", "0", *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)


def serve_plain(checkpoint: str, name: str, port: int, threads: int, gpu: bool = False, runtime: str = "torch") -> None:
    """The baseline: one uvicorn process, the same FastAPI routes (through FastAPI's router: no lean
    path), no Ray, no batching."""
    import torch
    import uvicorn

    # As many torch threads as a cnnray replica gets (--cpus-per-replica, default 1): on a
    # busy machine, more threads than free cores make every small forward pass far slower.
    torch.set_num_threads(threads)

    from cnnray.serve.api import build_http_app
    from cnnray.serve.engine import LocalBackend
    from cnnray.serve.schemas import ModelRef

    backend = LocalBackend({name: ModelRef(path=str(Path(checkpoint).resolve()), version=1)},
                           device="cuda" if gpu else "cpu", runtime=runtime)
    uvicorn.run(build_http_app(backend, lean=False), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def batch_stats(url: str) -> dict[str, float]:
    """Mean images per forward pass, from the server's own /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        text = r.read().decode()
    total = count = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name == "cnnray_serve_batch_size":
            for s in fam.samples:
                if s.name.endswith("_sum"):
                    total += s.value
                elif s.name.endswith("_count"):
                    count += s.value
    return {"forward_passes": count, "images": total, "mean_batch_size": round(total / count, 2) if count else 0.0}


def served_replicas_when_all_pushed(url: str, asked: str, timeout_s: float = 30.0) -> int:
    """The replica count, once every replica has pushed its metrics (each does every 2 s)."""
    deadline = time.monotonic() + timeout_s
    n = served_replicas(url)
    while (asked == "auto" or n < int(asked)) and time.monotonic() < deadline:
        time.sleep(2.5)
        m = served_replicas(url)
        if asked == "auto" and m == n:
            return n  # stable over one push interval
        n = m
    return n


def served_replicas(url: str) -> int:
    """Replicas whose metrics one scrape includes."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        text = r.read().decode()
    for fam in text_string_to_metric_families(text):
        if fam.name == "cnnray_serve_replicas":
            return int(fam.samples[0].value)
    return 0
