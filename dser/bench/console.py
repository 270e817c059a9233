"""The fixed-width text tables ``dser bench`` prints: one layout, and how sizes and shares are
written. Each section's ``table(result)`` builds its rows with these."""

from __future__ import annotations


def gib(n) -> str:
    """Bytes as ``1.23 GiB`` (``-`` when not measured)."""
    return "-" if n is None else f"{n / 2 ** 30:.2f} GiB"


def mib(n) -> str:
    """Bytes as ``12.3 MiB`` (``-`` when not measured)."""
    return "-" if n is None else f"{n / 2 ** 20:.1f} MiB"


def pct(x: float) -> str:
    """A share as ``95.5%``."""
    return f"{100 * x:.1f}%"


def text_table(title: str, header: list[str], rows: list[list]) -> list[str]:
    """A blank line, the title, then the header and rows: first column left-aligned, the others
    right-aligned."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["", title] + ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                           for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
