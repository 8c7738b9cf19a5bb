"""Human units at the edge: "2g" -> bytes, "20m" -> seconds, and back. Pure."""

from __future__ import annotations

import math
import re

_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|b)?\s*$", re.IGNORECASE)  # 2, 2b, 2g, 2gb, 2GiB
_MEMORY_SCALE = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", re.IGNORECASE)
_DURATION_SCALE = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_memory(value: object) -> int:
    """Bytes from an int or a string such as "512m", "2g", "1.5GiB" (binary multiples, as Docker uses)."""
    if isinstance(value, bool):
        raise ValueError(f"not a memory size: {value!r}")  # noqa: TRY004 - pydantic reports only ValueError
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"memory must be positive, got {value}")
        return value
    if not isinstance(value, str) or not (m := _MEMORY.match(value)):
        raise ValueError(f"not a memory size: {value!r} (use e.g. 512m, 2g)")
    size = int(float(m.group(1)) * _MEMORY_SCALE[(m.group(2) or "").lower()])
    if size <= 0:
        raise ValueError(f"memory must be positive, got {value!r}")
    return size


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as "90", "20m", "1h30m", "500ms"."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")  # noqa: TRY004 - pydantic reports only ValueError
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        else:
            parts = _DURATION.findall(text)
            if not parts or _DURATION.sub("", text).strip():
                raise ValueError(f"not a duration: {value!r} (use e.g. 90s, 20m, 1h30m)")
            seconds = sum(float(n) * _DURATION_SCALE[u.lower()] for n, u in parts)
    else:
        raise ValueError(f"not a duration: {value!r}")  # noqa: TRY004 - pydantic reports only ValueError
    if not seconds > 0 or math.isinf(seconds):  # `not >` also refuses nan
        raise ValueError(f"duration must be positive and finite, got {value!r}")
    return seconds


def format_bytes(size: float) -> str:
    """1536 -> "1.5 KiB"; 268435456 -> "256 MiB"."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """0.42 -> "0.42s"; 75 -> "1m15s"; 3700 -> "1h01m"."""
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
