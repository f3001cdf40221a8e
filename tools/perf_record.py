"""Shared by the benchmarks in tools/: append a measured table to docs/PERFORMANCE.md (or docs/RESULTS.md)."""

from __future__ import annotations

from pathlib import Path

PERFORMANCE_MD = Path(__file__).resolve().parent.parent / "docs" / "PERFORMANCE.md"
RESULTS_MD = Path(__file__).resolve().parent.parent / "docs" / "RESULTS.md"


def record(text: str, path: Path = PERFORMANCE_MD) -> None:
    """Append ``text`` (markdown, starting with its own ``##`` heading) to ``path`` after a blank line."""
    with path.open("a", encoding="utf-8") as fh:
        fh.write("\n" + text.rstrip("\n") + "\n")


def report(lines: list[str], save: bool, path: Path = PERFORMANCE_MD) -> str:
    """Print the table ``lines`` and, when ``save`` (the benchmarks' --record), append it to ``path``."""
    text = "\n".join(lines) + "\n"
    print(text)
    if save:
        record(text, path)
    return text
