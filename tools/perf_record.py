"""Shared by the benchmarks in tools/: append a measured table to docs/PERFORMANCE.md."""

from __future__ import annotations

from pathlib import Path

PERFORMANCE_MD = Path(__file__).resolve().parent.parent / "docs" / "PERFORMANCE.md"


def record(text: str) -> None:
    """Append ``text`` (markdown, starting with its own ``##`` heading) after a blank line."""
    with PERFORMANCE_MD.open("a", encoding="utf-8") as fh:
        fh.write("\n" + text.rstrip("\n") + "\n")
