"""Value types for the command line's options (argparse ``type=``): each turns one option's text into its value
or raises :class:`argparse.ArgumentTypeError`, which the parser reports as one ``error:`` line.

Shared by ``cimis`` (cli.py) and ``cimis bench`` (bench/command.py), so neither imports the other.
"""

from __future__ import annotations

import argparse
import math


def floats(text: str, n: int = 3) -> list[float]:
    try:
        values = [float(x) for x in text.replace("x", ",").split(",") if x]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * n
    if len(values) != n or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected {n} positive numbers like 1.5,1.5,2, got {text!r}")
    return values


def ints(text: str, n: int = 3) -> list[int]:
    values = floats(text, n)
    if any(v != int(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected {n} positive whole numbers like 96,96,64, got {text!r}")
    return [int(v) for v in values]


def window(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if len(values) != 2 or not all(math.isfinite(v) for v in values) or values[0] >= values[1]:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH in HU with LOW < HIGH, like -175,250, got {text!r}")
    return values


def count(minimum: int):
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer of at least {minimum}, got {text!r}")
        return value

    return parse


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, got {text!r}")
    return value


def names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def value_range(text: str) -> list[float]:
    """Two different numbers ``low,high`` (for example what a CT window is mapped onto)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if len(values) != 2 or not all(math.isfinite(v) for v in values) or values[0] == values[1]:
        raise argparse.ArgumentTypeError(f"expected two different numbers like 0,1, got {text!r}")
    return values
