"""Argument types for the command lines: numbers checked at parse time, with argparse's one-line message.

``medcl-predict`` and ``medcl-serve`` share them, so a bad value reads the same in every command
("--jobs: must be at least 1, got 0").
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def whole_number(
    low: int | None = None, high: int | None = None, *, what: str = "a whole number", none: bool = False
) -> Callable[[str], int | None]:
    """A type for ints in [low, high] (either end open when None); with ``none``, the word 'none' gives None."""

    def parse(text: str) -> int | None:
        if none and text.strip().lower() == "none":
            return None
        try:
            value = int(text)
        except ValueError:
            accepted = f"{what} or 'none'" if none else what
            raise argparse.ArgumentTypeError(f"not {accepted}: {text!r}") from None
        _check(value, low, high, high_open=False)
        return value

    return parse


def real_number(
    low: float, high: float | None = None, *, what: str = "a number", low_open: bool = False
) -> Callable[[str], float]:
    """A type for floats from ``low`` (excluded when ``low_open``) up to ``high`` (excluded; None: no end)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if low_open and not value > low:
            raise argparse.ArgumentTypeError(f"must be more than {low:g}, got {value}")
        _check(value, low, high, high_open=True)
        return value

    return parse


def _check(value: float, low: float | None, high: float | None, *, high_open: bool) -> None:
    if low is not None and high is not None:
        inside = low <= value < high if high_open else low <= value <= high
        if not inside:
            closing = ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}{closing}, got {value}")
    elif low is not None and value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low:g}, got {value}")
