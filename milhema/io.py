"""Writing outputs so that nothing half-written ever appears under its final name.

Files go to a temporary name in the same folder and are renamed; folders (a cohort, a run)
are built as a hidden ``.<name>.partial`` sibling and renamed when complete. While a process
builds a partial folder it holds an exclusive lock on it, so a second process started on the
same output (a requeued job, say) can neither clear nor reuse it under the first one's feet.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from milhema.errors import MilhemaError

try:  # POSIX only; elsewhere partial folders are simply not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def write_text(path: Path, text: str, *, durable: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename.

    ``durable=True`` also flushes the file to disk before the rename, so even a power cut never
    leaves a marker file (such as a finished fold's ``done.json``) that points at lost data.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A CSV file with ``\\n`` line ends (byte-identical for identical rows), written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def partial_folder(out: Path) -> Path:
    """Where :func:`atomic_folder` builds ``out``: the hidden sibling ``.<name>.partial``."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


def check_new_folder(out: Path, *, overwrite: bool = False, what: str = "folder",
                     hint: str = "choose another folder or pass --overwrite") -> None:
    """Refuse to write into ``out`` if it is a file, or a non-empty folder and ``overwrite`` is false.

    Called before any work starts, so a command never computes for hours and then refuses.

    Raises:
        MilhemaError: ``out`` is a file, or an existing non-empty folder without ``overwrite``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MilhemaError(f"{what} {out} is a file, not a folder; choose another name")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MilhemaError(f"{what} {out} already exists and is not empty; {hint}")


@contextmanager
def atomic_folder(out: Path, *, overwrite: bool = False, what: str = "folder",
                  hint: str = "choose another folder or pass --overwrite", reuse_partial: bool = False,
                  keep_partial: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``out`` only when the block completes.

    Args:
        reuse_partial: keep what an interrupted earlier call left in the temporary folder
            (``cv --resume``) instead of starting from an empty one.
        keep_partial: called with the temporary folder when the block fails; if it returns
            true the folder is left in place for a later resume instead of being deleted.

    Raises:
        MilhemaError: ``out`` exists and is not empty, and ``overwrite`` is false; or another
            process is writing the same folder right now.
    """
    out = Path(out)
    check_new_folder(out, overwrite=overwrite, what=what, hint=hint)
    tmp = partial_folder(out)
    if tmp.exists():
        # Locked first: never clear or reuse the folder of a process that is still writing it.
        _release(_lock(tmp, what, out))
        if not reuse_partial:
            shutil.rmtree(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    lock = _lock(tmp, what, out)
    keep = False
    try:
        yield tmp
        _replace(out, tmp)
    except BaseException:
        keep = keep_partial is not None and tmp.exists() and keep_partial(tmp)
        raise
    finally:
        _release(lock)
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def _replace(out: Path, tmp: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _lock(folder: Path, what: str, out: Path) -> int | None:
    """An exclusive lock on ``folder`` (released by the kernel if the holder is killed)."""
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MilhemaError(f"{what} {out} is being written by another milhema process right now "
                           f"(its work in progress is {folder}); wait for it to finish or choose another folder"
                           ) from None
    return fd


def _release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock
