"""How the report writes models, numbers and tables (``report.py`` and ``report_peers.py``)."""

from __future__ import annotations

from collections.abc import Sequence

TITLES = {"digits": "digits CNN", "mobilenet": "MobileNetV2"}
CONFIG_ORDER = ("off", "on", "on-2t", "on-3t", "on-4t", "empty")


def title(model: str) -> str:
    return TITLES.get(model, model)


def num(x: float | None) -> str:
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*headers), *(fmt.format(*row) for row in rows)])
