"""Ctrl-C (SIGINT) and SIGTERM during `cnnray tune`: a short message, exit 130 or 143, Tune's
state saved for `--resume`, and no Ray process left behind.

During `Tuner.fit` Tune's own SIGINT handler stops the sweep gracefully (trials stopped,
experiment state saved); SIGTERM is forwarded to it, since Ray's core worker otherwise
answers SIGTERM with a stack dump and an abort. Before and after the fit (Ray start-up,
the final export and writes) either signal raises `SweepInterrupted`, so the process
unwinds and Ray's exit handler stops the local Ray it started. A second signal while Tune
is stopping raises at once (Tune gives SIGINT back to the previous handler: this one).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any


class SweepInterrupted(KeyboardInterrupt):
    """The sweep was stopped by `signum`; the CLI exits 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _NoTunerRestoreHint(logging.Filter):
    """Drops Tune's "Resume experiment with: Tuner.restore(...)" after an interrupt: a CLI
    user continues with `cnnray tune ... --resume` (the CLI's last line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Experiment has been interrupted")


class Interrupts:
    """Signal handlers for one sweep: `install()` (again after ray.init, which replaces
    SIGTERM's), `fitting` around Tuner.fit, `restore()` at the end. `signum` is the
    first signal received (None if none)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        tune_log = logging.getLogger("ray.tune.tune")
        if not any(isinstance(f, _NoTunerRestoreHint) for f in tune_log.filters):
            tune_log.addFilter(_NoTunerRestoreHint())
        if threading.current_thread() is not threading.main_thread():
            return  # Python runs signal handlers in the main thread only; nothing to do here
        for s in (signal.SIGINT, signal.SIGTERM):
            self._previous.setdefault(s, signal.getsignal(s))
            signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        tune_handler = signal.getsignal(signal.SIGINT)
        if first and callable(tune_handler) and tune_handler not in (self._handle, signal.default_int_handler):
            tune_handler(signal.SIGINT, frame)  # inside Tuner.fit: Tune's graceful stop
            return
        raise SweepInterrupted(signum)

    def fit(self, tuner: Any) -> None:
        """Tuner.fit; afterwards `signum` is set if Tune's SIGINT handler stopped it (Tune
        then hands SIGINT back to this handler; after a fit that ran to its end, Tune's
        handler stays installed)."""
        self.install()
        tuner.fit()
        tune_handled = not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))
        if self.signum is None and tune_handled and signal.getsignal(signal.SIGINT) == self._handle:
            self.signum = signal.SIGINT
        self.install()  # SIGINT's handler back to this one after a fit that ran to its end


def continue_line(signum: int, argv: list[str], out: str) -> str:
    """The CLI's last line after an interrupt: how to go on (the same command, --resume)."""
    import shlex
    from pathlib import Path

    from cnnray.tune.sweep_config import SWEEP_FILE

    name = signal.Signals(signum).name
    command = ["cnnray", *argv, *([] if "--resume" in argv else ["--resume"])]
    if not (Path(out) / SWEEP_FILE).is_file():  # stopped before the sweep wrote anything
        return f"cnnray: interrupted ({name}) before the sweep started; nothing was kept: rerun {shlex.join(['cnnray', *argv])}"
    return f"cnnray: interrupted ({name}); continue with: {shlex.join(command)}"
