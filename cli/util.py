"""Small parsing and formatting helpers shared by the commands."""

from __future__ import annotations

import click


def parse_floats(text: str, option: str) -> list[float]:
    """``"0.5,0.3,0.2"`` -> ``[0.5, 0.3, 0.2]``; a usage error naming ``option`` otherwise."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers like 0.5,0.3,0.2, got {text!r}",
                                 param_hint=option) from None


def format_bytes(n: float) -> str:
    """Human-readable size in powers of 1000 (as disk sizes are sold), e.g. ``1.23 GB``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
