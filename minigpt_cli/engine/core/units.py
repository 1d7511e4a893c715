"""How quantities read to a person: bytes, durations, speeds and speed ratios, spelt one way.

The engine's reports carry text (doctor's checks and advice, the precision decision's reason) and
the CLI prints figures beside them, so both format here and a size or a time never reads two ways
on one screen. Pure standard library: the CLI imports it without pulling in torch.
"""

from __future__ import annotations


def format_bytes(count: float) -> str:
    """Decimal units, as `--max-memory 1.5GB` reads them."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 1e3:.0f} kB"


def format_gflops(value: float) -> str:
    """GFLOP/s with sensible digits: 950 / 47.3 / 0.91."""
    if value >= 100:
        return f"{value:.0f} GFLOP/s"
    if value >= 10:
        return f"{value:.1f} GFLOP/s"
    return f"{value:.2g} GFLOP/s"


def format_ratio(value: float) -> str:
    """A speed relative to another: 2.5x, 0.031x."""
    return f"{value:.1f}x" if value >= 0.1 else f"{value:.2g}x"


def format_duration(seconds: float | None) -> str:
    """45s, 2m 31s, 30m, 1h 32m, 3d 4h: two units at most, a zero second unit left out.

    "?" when there is no figure to show (None or NaN).
    """
    if seconds is None or seconds != seconds:
        return "?"
    total = max(0, round(seconds))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s" if secs else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h" if hours else f"{days}d"
