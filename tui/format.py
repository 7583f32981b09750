"""Formatting shared by screens and the CLI: every figure with its unit, "n/a" when unknown."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Iterable

GIB = 1024**3
NA = "n/a"
_SPARK = " ▁▂▃▄▅▆▇█"


def gib(value: int | float | None, digits: int = 1) -> str:
    return NA if value is None else f"{value / GIB:.{digits}f}"


def pct(value: float | None, digits: int = 0) -> str:
    return NA if value is None else f"{value:.{digits}f}%"


def watts(value: float | None) -> str:
    return NA if value is None else f"{value:.0f} W"


def celsius(value: float | None) -> str:
    return NA if value is None else f"{value:.0f}°C"


def usd(value: float | None) -> str:
    if value is None:
        return NA
    sign = "-" if value < 0 else ""
    return f"{sign}${abs(value):,.2f}"


def bar(fraction: float | None, width: int) -> str:
    """A text bar with eighth-block resolution; unknown is a dotted bar."""
    if fraction is None:
        return "·" * width
    fraction = max(0.0, min(1.0, fraction))
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    partial = " ▏▎▍▌▋▊▉"[part] if part and full < width else ""
    return ("█" * full + partial).ljust(width)


def sparkline(values: Iterable[float | None], width: int, top: float = 100.0) -> str:
    vals = list(values)[-width:]
    chars = []
    for v in vals:
        if v is None:
            chars.append(" ")
        else:
            level = max(0.0, min(1.0, v / top if top else 0.0))
            chars.append(_SPARK[round(level * (len(_SPARK) - 1))])
    return "".join(chars).rjust(width)


def local_time(ts: float, fmt: str = "%H:%M:%S") -> str:
    """Times are stored UTC and shown in the operator's zone."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).astimezone().strftime(fmt)
