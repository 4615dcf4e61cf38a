"""Ctrl-C and SIGTERM in the `cnnray` program: one exception, whatever the moment.

    from cnnray import interrupts
    interrupts.install()            # the program's start (cnnray.cli.main)
    try:
        ...                         # Ray start-up, training, checkpointing, serving
    except KeyboardInterrupt as e:  # Interrupted is a KeyboardInterrupt
        return interrupts.exit_status(e)   # 130 (SIGINT) or 143 (SIGTERM), as a shell reports it

Python turns SIGINT into KeyboardInterrupt, but SIGTERM's default ends the process at
once: nothing is cleaned up. A driver with Ray is worse: Ray's core worker installs a C++
failure handler (absl's, for SIGSEGV and friends) that also takes SIGTERM, prints a stack
dump ("*** SIGTERM received ***") and aborts (exit 134), leaving the private Ray the
program started to its fate. Here both signals raise `Interrupted` in the main thread, so
the same `finally` blocks that stop Ray after an error also run after a signal. A second
signal while that clean-up runs is not raised again (a KeyboardInterrupt in the middle of
`ray.shutdown()` would leave half of Ray running and print a traceback): it prints one
line and the clean-up goes on. SIGKILL still stops the program at once.

A signal the program was started with ignored (a shell's background job ignores SIGINT,
`nohup` SIGHUP) stays ignored. Only the standard library is imported here.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM received by the `cnnray` program (`signum`); a KeyboardInterrupt,
    so every `except KeyboardInterrupt` treats both alike."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


# What install() set up: the signals it handles, and whether a first one was already raised.
_state: dict[str, Any] = {"handled": (), "stopping": False, "told": False, "received": None}


def _handler(signum: int, frame: Any) -> None:
    if _state["stopping"]:
        if not _state["told"]:
            _state["told"] = True
            print(f"[cnnray] {signal.Signals(signum).name} while stopping: still cleaning up what this "
                  "command started (SIGKILL stops at once but may leave Ray processes running)",
                  file=sys.stderr, flush=True)
        return
    _state.update(stopping=True, received=int(signum))
    raise Interrupted(signum)


def install() -> None:
    """Make SIGINT and SIGTERM raise Interrupted in this (main) thread, from now on; a
    signal that is ignored now stays ignored. Only the program calls this, never a
    library call (tests, notebooks keep Python's own handling)."""
    if threading.current_thread() is not threading.main_thread():
        return
    handled = []
    for s in SIGNALS:
        if signal.getsignal(s) != signal.SIG_IGN:
            signal.signal(s, _handler)
            handled.append(s)
    _state.update(handled=tuple(handled), stopping=False, told=False, received=None)
    if handled:
        # Registered first, so it runs last of the exit handlers (after Ray's shutdown): at
        # finalization Python resets a handled signal to its default, and a late second
        # signal would then kill the ending program (status -15) after all its clean-up.
        import atexit

        atexit.register(_ignore_from_now_on)


def _ignore_from_now_on() -> None:
    if threading.current_thread() is threading.main_thread():
        for s in _state["handled"]:
            signal.signal(s, signal.SIG_IGN)


def installed() -> bool:
    """Whether install() runs this process's SIGINT/SIGTERM handling."""
    return bool(_state["handled"])


def stopping(quiet: bool = False) -> None:
    """From now on a SIGINT or SIGTERM only prints a line (`quiet`: not even that): the
    program is ending on its own (a command that finished, or a clean-up after an error)
    and must not be cut short. Quiet once the program has printed its last line."""
    _state["stopping"] = True
    if quiet:
        _state["told"] = True


def reinstall() -> None:
    """Handle the signals again after a library replaced the handlers (Ray's start-up:
    see kept_through_ray_start). No-op unless install() ran, or outside the main thread."""
    if threading.current_thread() is threading.main_thread():
        for s in _state["handled"]:
            signal.signal(s, _handler)


@contextmanager
def kept_through_ray_start() -> Iterator[None]:
    """Around `ray.init()`: keep Interrupted for SIGTERM while Ray starts, and afterwards.

    ray.init() first sets a SIGTERM handler of its own (`sys.exit(15)`), then its new node
    sets one that drains the node for up to RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s)
    and exits 1, and finally the driver's core worker installs the C++ handler that aborts
    (ray/_private/worker.py `init`, ray/_private/node.py `_register_shutdown_hooks`). Both
    Python ones go through `ray._private.utils.set_sigterm_handler`, which is a no-op
    during this block when the program handles the signals itself; the C++ one is replaced
    when the block ends. The processes Ray started before a signal cut ray.init() short
    are stopped by the node's own exit hook (and share the program's fate: Ray starts
    them with PR_SET_PDEATHSIG). Without install() this changes nothing."""
    if not installed() or threading.current_thread() is not threading.main_thread():
        yield
        return
    import ray._private.utils as ray_utils

    original = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = original
        reinstall()


def signal_number(e: BaseException) -> int:
    """The signal behind a KeyboardInterrupt: its own for Interrupted; else the one the
    handler received (Ray's blocking calls re-raise a pending Interrupted as a plain
    KeyboardInterrupt, losing its class), else SIGINT (Python's own Ctrl-C)."""
    return getattr(e, "signum", None) or _state["received"] or signal.SIGINT


def exit_status(e: BaseException) -> int:
    """128 + the signal number: 130 for SIGINT, 143 for SIGTERM (what a shell reports)."""
    return 128 + signal_number(e)


def signal_name(e: BaseException) -> str:
    return signal.Signals(signal_number(e)).name
