"""cnnray.tune.interrupts without Ray: a fake Tuner whose fit installs a SIGINT handler the
way Tune's does (stop at the end of the current step, hand SIGINT back to the previous
handler), and signals sent to this process."""

from __future__ import annotations

import signal

import pytest

from cnnray.tune.interrupts import Interrupts, SweepInterrupted, continue_line


class FakeTuner:
    """Tune's _setup_signal_catching: its handler sets a flag and restores the previous one."""

    def __init__(self, send: int | None = None, times: int = 1) -> None:
        self.send, self.times, self.stopped = send, times, False

    def fit(self) -> None:
        previous = signal.getsignal(signal.SIGINT)

        def tune_handler(signum, frame):
            self.stopped = True
            signal.signal(signal.SIGINT, previous)

        signal.signal(signal.SIGINT, tune_handler)
        for _ in range(self.times if self.send else 0):
            signal.raise_signal(self.send)


@pytest.fixture
def interrupts():
    i = Interrupts()
    i.install()
    yield i
    i.restore()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_fit_stops_tune_gracefully_and_is_remembered(interrupts, signum):
    tuner = FakeTuner(send=signum)
    interrupts.fit(tuner)
    assert tuner.stopped and interrupts.signum == signum


def test_a_fit_that_ends_is_not_an_interrupt_and_gives_sigint_back(interrupts):
    interrupts.fit(FakeTuner())
    assert interrupts.signum is None
    with pytest.raises(SweepInterrupted) as e:  # after the fit (the export): raises at once
        signal.raise_signal(signal.SIGINT)
    assert e.value.signum == signal.SIGINT


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_while_tune_stops_raises_at_once(interrupts, signum):
    with pytest.raises(SweepInterrupted):
        interrupts.fit(FakeTuner(send=signum, times=2))
    assert interrupts.signum == signum


def test_sigterm_before_the_fit_raises_with_143(interrupts):
    with pytest.raises(SweepInterrupted) as e:
        signal.raise_signal(signal.SIGTERM)
    assert 128 + e.value.signum == 143 and isinstance(e.value, KeyboardInterrupt)


def test_restore_gives_back_the_previous_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    i = Interrupts()
    i.install()
    i.install()  # again after ray.init: the handlers from before the first install are kept
    i.restore()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_the_last_line_gives_the_command_that_continues(tmp_path):
    (tmp_path / "sweep.json").write_text("{}")
    line = continue_line(signal.SIGTERM, ["tune", "--out", str(tmp_path), "--lr", "0.1"], str(tmp_path))
    assert line == f"cnnray: interrupted (SIGTERM); continue with: cnnray tune --out {tmp_path} --lr 0.1 --resume"
    assert continue_line(signal.SIGINT, ["tune", "--resume"], str(tmp_path)).endswith("cnnray tune --resume")
    fresh = continue_line(signal.SIGINT, ["tune", "--out", str(tmp_path / "new")], str(tmp_path / "new"))
    assert "nothing was kept" in fresh and not fresh.endswith("--resume")
