"""Shared by the benchmarks in tools/: append a measured table to docs/PERFORMANCE.md."""

from __future__ import annotations

from pathlib import Path

PERFORMANCE_MD = Path(__file__).resolve().parent.parent / "docs" / "PERFORMANCE.md"


def record(text: str) -> None:
    """Append ``text`` (markdown, starting with its own ``##`` heading) after a blank line."""
    with PERFORMANCE_MD.open("a", encoding="utf-8") as fh:
        fh.write("\n" + text.rstrip("\n") + "\n")


def report(lines: list[str], save: bool) -> str:
    """Print the table ``lines`` and, when ``save`` (the benchmarks' --record), append it to PERFORMANCE.md."""
    text = "\n".join(lines) + "\n"
    print(text)
    if save:
        record(text)
    return text
