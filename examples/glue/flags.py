"""Argument types that refuse bad numbers while the command line is parsed.

Each returns a converter for ``argparse``'s ``type=``: a value that is not a number, not
finite, or outside its range becomes a usage error naming the flag, before any work.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, Optional


def positive_int(text: str) -> int:
  """An integer >= 1."""
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
  return int(text)


def finite_float(text: str) -> float:
  """Any finite float (``nan`` and ``inf`` are refused)."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
  return value


def float_in(low: float, high: Optional[float] = None, *, low_open: bool = False,
             high_open: bool = False) -> Callable[[str], float]:
  """A finite float in the interval from ``low`` to ``high`` (``None``: unbounded).

  Args:
    low: the lower end.
    high: the upper end, or ``None``.
    low_open: whether ``low`` itself is excluded.
    high_open: whether ``high`` itself is excluded.

  Returns:
    The converter; its name describes the interval in usage errors.
  """
  interval = (("(" if low_open else "[") + f"{low:g}, "
              + ("inf)" if high is None else f"{high:g}" + (")" if high_open else "]")))

  def convert(text: str) -> float:
    value = finite_float(text)
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
      raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}")
    return value

  convert.__name__ = f"number in {interval}"
  return convert
