"""What ``inference-client classify`` reads and writes: the files, the results, the summary.

Pure functions on paths and result records, so they are tested without a reactor.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

from attrs import frozen

from client.codec import Classification

__all__ = [
    "IMAGE_SUFFIXES",
    "FileResult",
    "collect_images",
    "metric_sum",
    "output_format",
    "summary",
    "write_results",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"})


@frozen
class FileResult:
    """One file's outcome: its ranked labels, or the error that stopped it."""

    path: str
    predictions: tuple[Classification, ...] = ()
    error: str | None = None
    error_type: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def collect_images(paths: Iterable[str]) -> tuple[list[Path], list[str]]:
    """The files to classify, in order, without duplicates: files as given, folders searched
    (recursively, in sorted order) for image suffixes. Also the problems (missing paths)."""
    found: list[Path] = []
    seen: set[Path] = set()
    problems: list[str] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            candidates = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not candidates:
                problems.append(f"{name}: no image files in this folder")
        elif path.is_file():
            candidates = [path]
        else:
            problems.append(f"{name}: no such file or folder")
            continue
        for candidate in candidates:
            key = candidate.resolve()
            if key not in seen:
                seen.add(key)
                found.append(candidate)
    return found, problems


def output_format(requested: str | None, out: str | None) -> str:
    """``csv`` or ``json``: as requested, else from the ``--out`` suffix, else csv."""
    if requested:
        return requested
    if out and Path(out).suffix.lower() == ".json":
        return "json"
    return "csv"


def write_results(results: Sequence[FileResult], stream: TextIO, fmt: str) -> None:
    """CSV: one row per (file, rank), and one row with the error for a failed file. JSON: a list."""
    if fmt == "json":
        doc = [
            {"path": r.path, "predictions": [p._asdict() for p in r.predictions]}
            if r.ok
            else {"path": r.path, "error": r.error, "error_type": r.error_type}
            for r in results
        ]
        json.dump(doc, stream, indent=2)
        stream.write("\n")
        return
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["path", "rank", "label", "score", "error"])
    for r in results:
        if not r.ok:
            writer.writerow([r.path, "", "", "", r.error])
        for rank, p in enumerate(r.predictions, 1):
            writer.writerow([r.path, rank, p.label, f"{p.score:.6g}", ""])


def summary(results: Sequence[FileResult], seconds: float, examples: int = 3) -> str:
    """``classified 8 of 10 files in 2.1 s (4.8 files/s); 2 failed`` and the failures by kind."""
    failed = [r for r in results if not r.ok]
    rate = len(results) / seconds if seconds > 0 else 0.0
    lines = [
        f"classified {len(results) - len(failed)} of {len(results)} files in {seconds:.1f} s "
        f"({rate:.1f} files/s)" + (f"; {len(failed)} failed:" if failed else "")
    ]
    by_kind: dict[str, list[FileResult]] = {}
    for r in failed:
        by_kind.setdefault(r.error_type or "Error", []).append(r)
    for kind, group in sorted(by_kind.items(), key=lambda item: -len(item[1])):
        lines.append(f"  {kind}: {len(group)} file(s)")
        lines.extend(f"    {r.path}: {r.error}" for r in group[:examples])
        if len(group) > examples:
            lines.append(f"    … and {len(group) - examples} more")
    return "\n".join(lines)


def metric_sum(text: str, name: str) -> float | None:
    """The sum of every sample of metric ``name`` in Prometheus text, None if it has none."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        rest = line[len(name) :]
        if rest[:1] not in ("{", " "):
            continue  # another metric whose name starts the same
        try:
            total += float(line.rsplit(None, 1)[1])
        except (IndexError, ValueError):
            continue
        found = True
    return total if found else None
