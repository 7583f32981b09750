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


def ago(seconds: float) -> str:
    """How long ago, as a chart's axis says it: "now", "45m ago", "6h ago", "30d ago" (never "-720.0 hours")."""
    s = abs(seconds)
    if s < 30:
        return "now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            n = s / size
            return f"{n:.0f}{unit} ago" if n >= 10 or n == int(n) else f"{n:.1f}{unit} ago"
    return f"{s:.0f}s ago"


def ago_ticks(window_s: float, count: int = 5) -> tuple[list[float], list[str]]:
    """Tick positions (hours before now, negative) and their labels for a chart of the last `window_s`."""
    positions = [-window_s / 3600 * (1 - i / (count - 1)) for i in range(count)]
    return positions, [ago(p * 3600) for p in positions]
