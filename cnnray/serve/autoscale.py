"""`--replicas MIN-MAX`: Ray Serve's autoscaling between MIN and MAX replicas, by load.

Serve adds a replica when the requests in flight per replica (averaged over
`LOOK_BACK_S`) stay above `target_ongoing_requests` for `UPSCALE_DELAY_S`, and removes one
when they stay below for `DOWNSCALE_DELAY_S`. The target was chosen by measurement
(docs/serving-protocols.md, "Autoscaling"): one replica at rising client concurrency on
the shared 2-core machine; a replica's throughput stops growing once its batches are
full enough, and more requests in flight then only add latency. The target is that knee.

    cnnray serve --model-store runs/store --replicas 1-4
"""

from __future__ import annotations

from typing import Any

# Requests in flight per replica that Serve aims for. Measured (docs/serving-protocols.md,
# benchmarks/serve_concurrency.py): one replica's throughput grew up to 32 in flight (a full
# batch: 1067 requests/s, p99 44 ms) and fell past it (64: 777/s, p99 269 ms); at 16 it gave
# 75% of that (804/s, p99 50 ms). Half the knee leaves a replica room for a burst while the
# next one starts (30-90 s on the shared 2-core machine). Ray's default, 2, would add
# replicas while each one's batches are nearly empty.
TARGET_ONGOING_REQUESTS = 16.0
UPSCALE_DELAY_S = 10.0  # seconds of load above the target before a replica is added (Ray: 30)
DOWNSCALE_DELAY_S = 60.0  # seconds below the target before one is removed (Ray: 600)
# Seconds of load averaged per decision (Ray: 30); Serve wants it over its 10 s metrics interval.
LOOK_BACK_S = 12.0


def parse_range(text: str) -> tuple[int, int] | None:
    """"MIN-MAX" -> (MIN, MAX), 1 <= MIN <= MAX <= 4096; None when `text` is no range.
    ValueError with one line for a range that is wrong."""
    if "-" not in text:
        return None
    lo, _, hi = text.strip().partition("-")
    if not (lo.isascii() and lo.isdigit() and hi.isascii() and hi.isdigit()):
        raise ValueError(f"{text!r} is not MIN-MAX (two whole numbers, e.g. 1-4)")
    low, high = int(lo), int(hi)
    if not 1 <= low <= high <= 4096:
        raise ValueError(f"{text!r}: need 1 <= MIN <= MAX <= 4096")
    return low, high


def autoscaling_config(auto: Any) -> dict[str, Any]:
    """ServeArgs.autoscaling -> Serve's autoscaling_config (plain data)."""
    return {
        "min_replicas": auto.min_replicas,
        "initial_replicas": auto.min_replicas,
        "max_replicas": auto.max_replicas,
        "target_ongoing_requests": auto.target_ongoing_requests,
        "upscale_delay_s": auto.upscale_delay_s,
        "downscale_delay_s": auto.downscale_delay_s,
        "look_back_period_s": auto.look_back_period_s,
    }
