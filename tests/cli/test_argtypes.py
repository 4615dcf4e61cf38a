"""Every numeric flag of every subcommand takes only finite, in-range values (issue 13).

In-process: argparse is driven through `build_parser`, so no subprocess or Ray starts.
"""

from __future__ import annotations

import argparse

import pytest

from cnnray.argtypes import Range
from cnnray.cli import build_parser
from cnnray.config import FIELD_RANGES, ConfigError, TrainConfig

# What a user can type that int()/float() accept but no flag should.
NON_FINITE = ("nan", "inf", "-inf", "1e999")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _numeric_flags() -> list[tuple[str, argparse.Action]]:
    """(subcommand, action) for every flag that takes a number (int or float parsing)."""
    found = []
    for name, p in _subparsers().items():
        for action in p._actions:
            kind = getattr(action.type, "kind", action.type)
            if kind in (int, float) and action.option_strings:
                found.append((name, action))
    return found


def _minimal_args(command: str) -> list[str]:
    """The required positionals/flags of `command`, so only the flag under test can fail."""
    return {"predict": ["--model", "m", "x.png"], "report": ["dir"]}.get(command, [])


def test_every_numeric_flag_is_range_checked():
    flags = _numeric_flags()
    commands = {name for name, _ in flags}
    assert {"train", "tune", "serve", "predict"} <= commands
    plain = [f"{name} {a.option_strings[0]}" for name, a in flags if a.type in (int, float)]
    assert not plain, f"numeric flags without a range: {plain}"


@pytest.mark.parametrize("value", [*NON_FINITE, "-1", "0", "abc"])
def test_bad_numbers_exit_2_with_one_line(value, capsys):
    """On main, `--lr nan`, `--momentum inf`, `--port 0`, `--timeout -1` ... were accepted
    by argparse (and some reached Ray or a socket before failing)."""
    checked = 0
    for command, action in _numeric_flags():
        allowed = action.type.range
        kind = action.type.kind
        try:
            parsed = kind(value)
        except (ValueError, OverflowError):
            parsed = None
        if parsed is not None and allowed.contains(parsed):
            continue  # e.g. "0" is a fine --seed
        flag = action.option_strings[0]
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([command, *_minimal_args(command), flag, value])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"argument {flag}" in err[0], (command, flag, err)
        checked += 1
    assert checked > 20


def test_good_numbers_parse():
    args = build_parser().parse_args(["train", "--lr", "0.05", "--epochs", "2", "--seed", "0", "--max-failures", "-1"])
    assert (args.lr, args.epochs, args.seed, args.max_failures) == (0.05, 2, 0, -1)
    args = build_parser().parse_args(["serve", "--model-store", "s", "--port", "65535", "--watch-s", "0"])
    assert (args.port, args.watch_s) == (65535, 0.0)


def test_train_flags_use_the_config_ranges():
    """A flag and its YAML key accept the same values: one range, stated in config.py."""
    train = _subparsers()["train"]
    for action in train._actions:
        if action.dest in FIELD_RANGES and action.option_strings:
            assert action.type.range == FIELD_RANGES[action.dest], action.dest


@pytest.mark.parametrize("key", sorted(FIELD_RANGES))
def test_config_rejects_out_of_range_and_non_finite(key):
    allowed = FIELD_RANGES[key]
    for bad in (allowed.lo - 1 if allowed.lo is not None else None, allowed.hi + 1 if allowed.hi is not None else None):
        if bad is not None:
            with pytest.raises(ConfigError, match=f"{key}="):
                TrainConfig.from_dict({key: bad})


def test_range_describe_and_contains():
    assert Range(0, 1, hi_open=True).describe() == "in [0, 1)"
    assert Range(0, lo_open=True).describe() == "positive"
    assert not Range(0, lo_open=True).contains(0.0)
    assert not Range().contains(float("nan"))
    assert Range(1).contains(10**30)
