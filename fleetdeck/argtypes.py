"""argparse types for numbers: a bad value is a usage error (exit 2) that names what was expected.

`float()` accepts "nan", "inf" and "1e999"; none of them is a GPU size, a fraction or a time.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def number(lo: float | None = None, hi: float | None = None, *, above: bool = False, what: str = "a number"
           ) -> Callable[[str], float]:
    """A finite float within [lo, hi] (or above lo when `above`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r} (not a finite number)")
        if lo is not None and (value <= lo if above else value < lo):
            raise argparse.ArgumentTypeError(f"expected {what} {'above' if above else 'of at least'} {lo:g}, got {text!r}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"expected {what} of at most {hi:g}, got {text!r}")
        return value

    return parse


def integer(lo: int = 1, hi: int = 2**31 - 1, what: str = "a whole number") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected {what} from {lo} to {hi}, got {text!r}")
        return value

    return parse


positive_seconds = number(0, 86400, above=True, what="seconds")
