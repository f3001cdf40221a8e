"""Writing outputs so that nothing half-written ever appears under its final name.

Files go to a temporary name in the same folder and are renamed; folders (a cohort, a run)
are built as a hidden ``.<name>.partial`` sibling and renamed when complete.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from milhema.errors import MilhemaError


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A CSV file with ``\\n`` line ends (byte-identical for identical rows), written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def check_free(out: Path, *, overwrite: bool = False, what: str = "folder",
               hint: str = "choose another folder or pass --overwrite") -> None:
    """Refuse to replace a non-empty ``out`` unless ``overwrite``.

    Raises:
        MilhemaError: ``out`` exists and is not empty, and ``overwrite`` is false.
    """
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MilhemaError(f"{what} {out} already exists and is not empty; {hint}")


@contextmanager
def atomic_folder(out: Path, *, overwrite: bool = False, what: str = "folder",
                  hint: str = "choose another folder or pass --overwrite") -> Iterator[Path]:
    """Yield a temporary folder that replaces ``out`` only when the block completes.

    Raises:
        MilhemaError: ``out`` exists and is not empty, and ``overwrite`` is false.
    """
    out = Path(out)
    check_free(out, overwrite=overwrite, what=what, hint=hint)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
