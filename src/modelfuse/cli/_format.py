"""Small formatting helpers shared by the subcommands' tables."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, like file managers and the Hugging Face hub)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    """22713216 -> '22.71M'."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)
