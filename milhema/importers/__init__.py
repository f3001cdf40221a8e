"""``milhema import``: cohort manifests from the layouts users already hold.

Each layout is one module with one function ``(src, options, *, progress) -> ImportedCohort``,
registered below by name; :func:`import_cohort` runs one and writes the manifest folder. A new
layout is one module plus one line in :data:`IMPORTERS` (see docs/EXTENDING.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from milhema.errors import did_you_mean
from milhema.importers.aml_hehr import import_aml_hehr
from milhema.importers.cellavision import import_cellavision
from milhema.importers.common import ImportedCohort, ImportOptions, LayoutError, parse_class_map, write_cohort
from milhema.importers.embeddings import import_embeddings
from milhema.io import check_new_folder


@dataclass(frozen=True)
class Importer:
    """A registered layout: its reader and the one-line tree shown by ``milhema import --help``."""

    read: Callable[..., ImportedCohort]
    layout: str


IMPORTERS: dict[str, Importer] = {
    "aml-hehr": Importer(import_aml_hehr, "<root>/<label>/<patient_id>/*.tif (AML_Hehr / SCEMILA, TCIA)"),
    "cellavision": Importer(import_cellavision, "<root>/<patient>/[<slide>/]<cell type>/*.jpg (analyser export)"),
    "embeddings": Importer(import_embeddings, "<root>/<patient or slide>.h5 (features [N, D] made elsewhere)"),
}


def list_importers() -> list[str]:
    """The layout names ``milhema import`` takes."""
    return sorted(IMPORTERS)


def get_importer(name: str) -> Importer:
    """The importer of layout ``name``.

    Raises:
        LayoutError: no such layout (with the closest name).
    """
    if name not in IMPORTERS:
        raise LayoutError(f"unknown layout {name!r}; choose one of {', '.join(list_importers())}"
                          f"{did_you_mean(name, IMPORTERS)}")
    return IMPORTERS[name]


def read_layout(layout: str, src: str | Path, options: ImportOptions, *, out: str | Path | None = None,
                overwrite: bool = False, progress: bool = False) -> ImportedCohort:
    """Read ``src`` as ``layout`` (nothing is written). With ``out``, first check that it can be
    written: a new folder outside the source.

    Raises:
        LayoutError: the source does not have the layout, or its tables do not fit it.
        MilhemaError: ``out`` exists and ``overwrite`` is false.
    """
    importer = get_importer(layout)
    src = Path(src)
    if out is not None:
        check_new_folder(Path(out), overwrite=overwrite, what="cohort folder")
        if src.is_dir() and Path(out).resolve().is_relative_to(src.resolve()):
            raise LayoutError(f"--out {out} is inside the source {src}: the source is never written to; "
                              "choose a folder outside it")
    return importer.read(src, options, progress=progress)


def import_cohort(layout: str, src: str | Path, out: str | Path, options: ImportOptions | None = None, *,
                  overwrite: bool = False, progress: bool = False) -> ImportedCohort:
    """:func:`read_layout`, then write the manifest folder ``out`` (what ``milhema import`` does)."""
    options = options or ImportOptions()
    imported = read_layout(layout, src, options, out=out, overwrite=overwrite, progress=progress)
    write_cohort(imported, Path(out), options, Path(src), overwrite=overwrite)
    return imported


__all__ = ["IMPORTERS", "ImportOptions", "ImportedCohort", "Importer", "LayoutError", "get_importer",
           "import_cohort", "list_importers", "parse_class_map", "read_layout", "write_cohort"]
