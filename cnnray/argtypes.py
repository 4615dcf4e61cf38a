"""Value types shared by the typed config and every command-line flag: numeric ranges, and
the coercion of a config value to its field's type.

A `Range` is the one statement of what values a number may take: `TrainConfig` checks its
fields with it (YAML files and dicts) and argparse uses `Range.argtype(...)` as the `type=`
of the matching flag, so `--lr nan`, `--epochs 0` or `--port 70000` end in one line and
exit 2 before anything starts:

    parser.add_argument("--lr", type=Range(0, lo_open=True).argtype(float))
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
import types
import typing
from typing import Any, Callable

from cnnray.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Closed (or, with *_open, open) bounds on a finite number; None: unbounded there."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        """'at least 1', 'in [0, 1)', 'positive', ... (for error messages)."""
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            if self.lo == 0:
                return "positive" if self.lo_open else "at least 0"
            return f"greater than {self.lo:g}" if self.lo_open else f"at least {self.lo:g}"
        if self.hi is not None:
            return f"less than {self.hi:g}" if self.hi_open else f"at most {self.hi:g}"
        return "finite"

    def contains(self, value: float) -> bool:
        """True when `value` is finite and within the bounds."""
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True

    def argtype(self, kind: type = float) -> Callable[[str], float]:
        """An argparse `type=`: parses `kind` (int or float) and checks the range; a bad
        value raises ArgumentTypeError, which argparse turns into one line and exit 2."""
        return _ArgType(self, kind)


@dataclass(frozen=True)
class _ArgType:
    range: Range
    kind: type

    @property
    def __name__(self) -> str:  # argparse names the type in its "invalid ... value" message
        return self.kind.__name__

    def __call__(self, text: str) -> float:
        try:
            value = self.kind(text)
        except (TypeError, ValueError, OverflowError):
            what = "an integer" if self.kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not self.range.contains(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {self.range.describe()}")
        return value


# Ranges of flags that are not config fields.
POSITIVE_INT = Range(1)  # counts: replicas, samples, ...
NON_NEGATIVE = Range(0)  # durations that may be 0 (off)
POSITIVE = Range(0, lo_open=True)  # sizes and timeouts
TCP_PORT = Range(1, 65535)


def coerce(key: str, value: Any, hint: Any) -> Any:
    """A config value (YAML, JSON, a dict) checked against its field's type annotation `hint`,
    converting only lossless cases; ConfigError naming `key` otherwise."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(key, value, inner[0])
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, not {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, not {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"{key} must be a finite number, not {value!r}")
            return value
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" as a string
                return coerce(key, float(value), float)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, not {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, not {value!r}")
    if origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(coerce(key, v, args[0]) for v in value)
        raise ConfigError(f"{key} must be a list, not {value!r}")
    raise TypeError(f"no coercion for {key}: {hint}")  # a programming error, not user input
