"""Numbers as text: the one NaN-aware formatter of tables, console lines and headers."""

import math
from typing import Any

import numpy as np

MISSING = "n/a"


def to_float(x: Any) -> float:
    """A number read from JSON or CSV; undefined values (written as null / empty) are NaN."""
    if x is None or x in ("", "None", "null"):
        return float("nan")
    return float(x)


def number(x: Any, fmt: str = ".3f") -> str:
    """`format(x, fmt)`, or 'n/a' for an undefined value (None or NaN).

    Args:
      x: a number, None or NaN.
      fmt: a format spec such as '.4f' or '+.3f'.

    Returns:
      The text.
    """
    if x is None or (isinstance(x, (int, float, np.floating)) and math.isnan(x)):
        return MISSING
    return format(x, fmt)


def mean_std(mean: float, std: float, digits: int, n: int = 2) -> str:
    """'mean ± std'; the mean alone when it comes from one value (no spread to show); 'n/a'
    when there is no value (n = 0) or the mean is not finite."""
    if not n or not math.isfinite(mean):
        return MISSING
    if n < 2:
        return number(mean, f".{digits}f")
    return f"{number(mean, f'.{digits}f')} ± {number(std, f'.{digits}f')}"
