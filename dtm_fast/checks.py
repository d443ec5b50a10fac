"""Checks of single config values, each raising a DtmError that names the field: a whole number in a
range, a finite number in a range (NaN compares false with everything, so `value < 0` lets it
through: these checks test finiteness first), text, a true/false flag. Used by the config classes of
disperse, eval and run so that every field is checked the same way."""

from __future__ import annotations

import math
from typing import Any, Callable, TypeVar

T = TypeVar("T")

from dtm_fast.errors import DtmError


def whole_number(value: Any, field: str, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DtmError(f"'{field}' must be a whole number, got {value!r}")
    _check_range(value, field, minimum, maximum)
    return value


def finite_number(value: Any, field: str, minimum: float | None = None, maximum: float | None = None,
                  above_minimum: bool = False) -> float:
    """A finite int or float in [minimum, maximum] (or (minimum, maximum] with above_minimum)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DtmError(f"'{field}' must be a number, got {value!r}")
    if not math.isfinite(value):
        raise DtmError(f"'{field}' must be a finite number, got {value!r}")
    if above_minimum and minimum is not None and value <= minimum:
        raise DtmError(f"'{field}' must be greater than {minimum}, got {value!r}")
    _check_range(value, field, minimum, maximum)
    return float(value)


def _check_range(value: float, field: str, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise DtmError(f"'{field}' must be at least {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise DtmError(f"'{field}' must be at most {maximum}, got {value!r}")


def text(value: Any, field: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise DtmError(f"'{field}' must be {'text or empty' if optional else 'non-empty text'}, got {value!r}")
    return value


def flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise DtmError(f"'{field}' must be true or false, got {value!r}")
    return value


def choice(value: Any, field: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise DtmError(f"unknown {field} {value!r}; expected one of {', '.join(choices)}")
    return value


def prefixed(prefix: str, check: Callable[[], T]) -> T:
    """Run `check`; a DtmError it raises gets `prefix` (the config file, the section) unless its
    message already starts with it."""
    try:
        return check()
    except DtmError as error:
        message = str(error)
        raise DtmError(message if message.startswith(prefix) else f"{prefix}{message}") from None


def config_from_mapping(cls: type[T], values: Any, section: str, adjust: Callable[[dict], dict] | None = None) -> T:
    """A config dataclass from a mapping of its fields: not a mapping, an unknown key and a missing
    required key each raise one DtmError that names `section`; `adjust` may rewrite the values first."""
    from dataclasses import fields
    from collections.abc import Mapping

    if not isinstance(values, Mapping):
        raise DtmError(f"{section}: expected a mapping of keys to values, got {values!r}")
    known = {item.name for item in fields(cls)}
    unknown = sorted(repr(key) for key in set(values) - known)
    if unknown:
        raise DtmError(f"{section}: unknown config key(s) {', '.join(unknown)}; known keys are {', '.join(sorted(known))}")
    values = adjust(dict(values)) if adjust else dict(values)
    try:
        return cls(**values)
    except TypeError as error:  # a missing required key
        raise DtmError(f"{section}: {error}") from None
