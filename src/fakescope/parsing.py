"""One set of value checks for the command line and configuration files alike.

Each function takes what a user wrote (a string from the command line, or a value a YAML/TOML/JSON
file produced: ``1e-3`` in YAML is the *string* ``"1e-3"``), returns the checked value, and raises
:class:`ValueError` whose message says what was expected and what was got. The command line turns it
into an argparse error; a configuration file names the key (see :func:`checked`)."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from fractions import Fraction

from fakescope.errors import ArgumentError, FakescopeError


def number(v) -> float:
    """A real number; strings may be fractions like ``2/255`` or ``1e-3``."""
    if isinstance(v, bool):
        raise ValueError(f"expected a number or fraction like 2/255, got {v!r}")
    if isinstance(v, numbers.Real):
        return float(v)
    try:
        return float(Fraction(str(v).strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected a number or fraction like 2/255, got {v!r}") from None


def fraction(v) -> float:
    """A number in [0, 1] (a probability or a share of a batch)."""
    x = number(v)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"expected a number in [0, 1], got {v}")
    return x


def threshold(v) -> float:
    """A decision threshold on ``p_ai``, in [0, 1] (``p_ai >= threshold`` is called AI)."""
    try:
        x = number(v)
    except ValueError:
        raise ValueError(f"expected a threshold in [0, 1], got {v!r}") from None
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"expected a threshold in [0, 1], got {v}")
    return x


def check_threshold(v) -> float:
    """The library's one threshold check (metrics, attacks, decisions): :func:`threshold` raising
    :class:`~fakescope.errors.ArgumentError` (a FakescopeError and a ValueError) instead of a bare ValueError."""
    try:
        return threshold(v)
    except ValueError as e:
        raise ArgumentError(str(e)) from None


def integer(v) -> int:
    if isinstance(v, bool):
        raise ValueError(f"expected an integer, got {v!r}")
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    raise ValueError(f"expected an integer, got {v!r}")


def positive_int(v) -> int:
    try:
        x = integer(v)
    except ValueError:
        raise ValueError(f"expected a positive integer, got {v!r}") from None
    if x <= 0:
        raise ValueError(f"expected a positive integer, got {v}")
    return x


def nonneg_int(v) -> int:
    try:
        x = integer(v)
    except ValueError:
        raise ValueError(f"expected an integer >= 0, got {v!r}") from None
    if x < 0:
        raise ValueError(f"expected an integer >= 0, got {v}")
    return x


def quality(v) -> int:
    """A JPEG quality in [1, 100]."""
    try:
        x = integer(v)
    except ValueError:
        raise ValueError(f"expected a JPEG quality in [1, 100], got {v!r}") from None
    if not 1 <= x <= 100:
        raise ValueError(f"expected a JPEG quality in [1, 100], got {v}")
    return x


def boolean(v) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return v.strip().lower() in ("true", "yes", "on", "1")
    raise ValueError(f"expected true or false, got {v!r}")


def csv(v) -> list[str]:
    """A list of names: ``"a,b"`` or a list ``["a", "b"]``."""
    if isinstance(v, str):
        return [x.strip() for x in v.split(",") if x.strip()]
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        return [x.strip() for x in v if x.strip()]
    raise ValueError(f"expected a comma-separated list of names or a list of strings, got {v!r}")


def value_range(v, kind: Callable = number) -> tuple:
    """``"lo,hi"`` or ``[lo, hi]`` with ``lo <= hi``."""
    parts = v.split(",") if isinstance(v, str) else v
    try:
        lo, hi = (kind(x) for x in parts)
    except (TypeError, ValueError):
        raise ValueError(f"expected a range lo,hi, got {v!r}") from None
    if lo > hi:
        raise ValueError(f"expected a range lo,hi with lo <= hi, got {v!r}")
    return lo, hi


def checked(key: str, value, check: Callable, *, source: str = "config") -> object:
    """``check(value)``, with a failure turned into a one-line :class:`FakescopeError` naming the key."""
    try:
        return check(value)
    except ValueError as e:
        raise FakescopeError(f"{source}: {key}: {e}") from None


DEFAULT_CONFIDENCE = 0.95  # of the false-positive promise (fakescope.calibration); the one place it is set


def confidence(v) -> float:
    """The confidence of a statistical promise, in [0, 1) (0: no promise, the empirical rule)."""
    try:
        x = number(v)
    except ValueError:
        raise ValueError(f"expected a confidence in [0, 1) like 0.95, got {v!r}") from None
    if not 0.0 <= x < 1.0:
        raise ValueError(f"expected a confidence in [0, 1) like 0.95, got {v}")
    return x
