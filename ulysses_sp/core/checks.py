"""Argument checks shared by every layer, so that one kind of mistake gets one message."""

from __future__ import annotations


def check_int(name: str, value, minimum: int = 1, note: str = "") -> int:
    """``value`` when it is an integer (not a bool) >= ``minimum``; else a ValueError naming ``name``
    and the value (``note`` goes after the bound, e.g. " (0 turns it off)")."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{note}, got {value!r}")
    return value
