"""Argument checks shared by the public API.

Every check raises `TypeError` (wrong kind of value) or `ValueError` (right kind, wrong range) with
one message form: "`max_norm` must be a number > 0. Received: max_norm=-1". They run in Python
before anything is traced, so a mistake never surfaces as a graph error on one rank.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from typing import Any

__all__ = ["check_int", "check_number", "check_bool", "check_callable", "check_strings", "check_patterns", "check_path"]


def _received(name: str, value: Any) -> str:
    return f"Received: {name}={value!r}"


def check_number(
    name: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> float:
    """Returns `value` as a float after checking its type and bounds."""
    bounds = " and ".join(
        f"{op} {bound}" for op, bound in ((">", gt), (">=", ge), ("<", lt), ("<=", le)) if bound is not None
    )
    what = f"a number {bounds}".strip()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be {what}. {_received(name, value)}")
    number = float(value)
    ok = math.isfinite(number)
    ok = ok and (gt is None or number > gt) and (ge is None or number >= ge)
    ok = ok and (lt is None or number < lt) and (le is None or number <= le)
    if not ok:
        raise ValueError(f"`{name}` must be {what}. {_received(name, value)}")
    return number


def check_int(name: str, value: Any, *, ge: int | None = None, le: int | None = None) -> int:
    """Returns `value` as an int after checking its type and bounds (bools are refused)."""
    bounds = " and ".join(f"{op} {bound}" for op, bound in ((">=", ge), ("<=", le)) if bound is not None)
    what = f"an integer {bounds}".strip()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be {what}. {_received(name, value)}")
    value = int(value)
    if (ge is not None and value < ge) or (le is not None and value > le):
        raise ValueError(f"`{name}` must be {what}. {_received(name, value)}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False. {_received(name, value)}")
    return value


def check_callable(name: str, value: Any) -> Any:
    if not callable(value):
        raise TypeError(f"`{name}` must be callable. {_received(name, value)}")
    return value


def check_strings(name: str, value: Any, what: str = "a tuple or list of str") -> tuple[str, ...]:
    """Returns a tuple or list of strings as a tuple; a bare string is refused, not split into characters."""
    if not isinstance(value, (tuple, list)) or not all(isinstance(item, str) for item in value):
        raise TypeError(f"`{name}` must be {what}. {_received(name, value)}")
    return tuple(value)


def check_patterns(name: str, value: Any) -> tuple[str, ...]:
    """Returns a tuple or list of regular-expression strings as a tuple, after compiling each."""
    what = "a tuple or list of str (regular expressions)"
    check_strings(name, value, what)
    for position, pattern in enumerate(value):
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(
                f"`{name}` must be {what}; {name}[{position}] is not one ({error}). {_received(name, value)}"
            ) from None
    return tuple(value)


def check_path(name: str, value: Any, what: str = "a path") -> str:
    """Returns a `str` or `os.PathLike` path as a `str`; the empty path (the working directory) is refused."""
    if not isinstance(value, (str, os.PathLike)) or not isinstance(os.fspath(value), str):
        raise TypeError(f"`{name}` must be {what}. {_received(name, value)}")
    if not os.fspath(value):
        raise ValueError(f"`{name}` must be {what}, not empty. {_received(name, value)}")
    return os.fspath(value)
