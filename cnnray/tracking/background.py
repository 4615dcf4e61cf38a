"""MLflow calls off the caller's thread: one worker thread, a bounded queue, in order.

    worker = BackgroundLogger(uri, goes_on="the sweep")
    worker.submit("trial metrics", client.log_batch, run_id, metrics=metrics)  # returns at once
    worker.close()        # at the sweep's end: waits for what is queued, FLUSH_TIMEOUT_S at most

Why: Tune's callbacks run on its driver loop, and that loop is what hands every trial its
next result; a synchronous HTTP call there (up to REQUEST_TIMEOUT_S x (RETRIES + 1) seconds
for a tracker that stopped answering) holds every trial of the sweep. MLflow's own async
logging (`synchronous=False`, $MLFLOW_ENABLE_ASYNC_LOGGING, mlflow/utils/async_logging)
does not fit: it covers log_batch/log_metric/log_param/set_tag only (creating a run, ending
it and artifacts stay synchronous), its queue is unbounded, its flush waits without a limit,
and each failed batch is an error line of its own. Here every call of the sweep's child
runs goes through one thread, in the order it was submitted (so per run: created, params,
metrics by epoch, stop reason, ended); the first failure is one `[cnnray] warning` line
that says what failed and why, and every later call is dropped (SafeLogger).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

from cnnray.tracking.client import SafeLogger

# Calls that may wait for the worker (each a few per trial result): a tracker this far
# behind the driver is treated as gone rather than holding the driver or growing memory.
QUEUE_SIZE = 1000
# The longest the sweep's end waits for queued calls (seconds): a tracker that stopped
# answering fails one call within REQUEST_TIMEOUT_S x (RETRIES + 1) = 40 s, then the rest are
# dropped at once.
FLUSH_TIMEOUT_S = 60.0
_CLOSE = object()  # the queue's last item


class BackgroundLogger:
    """Runs submitted MLflow calls on one daemon thread, in order; never raises to the caller.

    `goes_on` names the work in the warning ("the sweep": "...; the sweep goes on without it").
    """

    def __init__(self, uri: str, goes_on: str = "training", echo: Callable[[str], None] | None = None,
                 queue_size: int = QUEUE_SIZE) -> None:
        self.safe = SafeLogger(uri, echo, goes_on=goes_on)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._work, name="cnnray-mlflow", daemon=True)
        self._thread.start()
        self._closed = False
        self._marker = 0  # 1 once _CLOSE is in the queue

    @property
    def broken(self) -> bool:
        return self.safe.broken

    def submit(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Queue `fn(*args, **kwargs)`; returns at once. Dropped once tracking has stopped."""
        if self.safe.broken or self._closed:
            return
        try:
            self._queue.put_nowait((what, fn, args, kwargs))
        except queue.Full:
            self.safe.give_up(what, f"{self._queue.maxsize} calls waiting: the tracker is too slow for this sweep")

    def close(self, timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        """Wait at most `timeout_s` seconds for the queued calls; True when all were made.
        Calls still queued after that are left unsent and said so in one warning line."""
        deadline = time.monotonic() + timeout_s
        if not self._closed:
            self._closed = True
            try:
                self._queue.put(_CLOSE, timeout=timeout_s)
                self._marker = 1
            except queue.Full:
                pass  # still busy at the deadline: said below
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            unsent = self._queue.qsize() - self._marker
            self.safe.give_up("flush", f"{unsent} calls still queued after {timeout_s:g} s, left unsent")
            return False
        return not self.safe.broken

    def _work(self) -> None:
        while (item := self._queue.get()) is not _CLOSE:
            what, fn, args, kwargs = item
            self.safe.call(what, fn, *args, **kwargs)  # a no-op once broken: the queue just drains
