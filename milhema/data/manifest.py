"""The cohort manifest: ``patients.csv`` and ``slides.csv`` in one folder (see docs/FORMAT.md).

Rows are numbered as a spreadsheet shows them: the header is row 1, the first patient row 2.
Every violation raises :class:`~milhema.errors.ManifestError` naming the file, the row and the
value. Excel exports are accepted as they come: a UTF-8 byte-order mark, ``;`` as separator and
decimal commas (``12,5``) in that case.
"""

from __future__ import annotations

import csv
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from milhema.data.cbc import is_cbc_quantity
from milhema.errors import ManifestError, did_you_mean

PATIENTS_FILE = "patients.csv"
SLIDES_FILE = "slides.csv"
# A slide whose source has one of these suffixes is already embedded: the file is its bag.
BAG_SUFFIXES = (".h5", ".hdf5")
# What a slide's source is (the optional `kind` column): one scanned file, a folder of single-cell
# crops, or a folder of photographed fields of view. Without the column a folder is crops and a file a scan.
SOURCE_KINDS = ("scan", "crops", "fields")

# Patient features whose names start so are computed from the bags' predicted cells
# (milhema.differential: diff_<type>, anomaly_<attribute>), never read from patients.csv.
DERIVED_PREFIXES = ("diff_", "anomaly_")

# Slide ids become file names (bags/<slide_id>.h5): no separators, no leading dot, no "..".
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class MissingFeatureWarning(UserWarning):
    """A patient feature the model reads is not a column of patients.csv: missing for everyone."""


@dataclass(frozen=True)
class Patient:
    """One row of patients.csv. ``values`` holds the patient features read (CBC ...): floats, ``nan`` where missing."""

    patient_id: str
    label: str | None
    values: dict[str, float]
    age: float | None = None
    sex: str | None = None
    time: float | None = None
    event: int | None = None
    row: int = 0


@dataclass(frozen=True)
class Slide:
    """One row of slides.csv; ``source`` is absolute (resolved against the CSV's folder).

    ``kind`` is the ``kind`` column (one of :data:`SOURCE_KINDS`), None where it is not given.
    """

    slide_id: str
    patient_id: str
    source: Path
    view: str | None = None
    mpp: float | None = None
    row: int = 0
    kind: str | None = None

    @property
    def source_kind(self) -> str:
        """``scan``, ``crops`` or ``fields``: the ``kind`` column, else ``crops`` for a folder and ``scan`` for a file."""
        return self.kind or ("crops" if self.source.is_dir() else "scan")

    @property
    def is_crop_folder(self) -> bool:
        return self.source_kind == "crops"

    @property
    def is_bag_file(self) -> bool:
        """Whether ``source`` is itself a bag: a feature file embedded elsewhere (``milhema import embeddings``)."""
        return self.source.suffix.lower() in BAG_SUFFIXES

    def bag_path(self, bags: str | Path | None) -> Path:
        """Where the slide's bag is: its source when that is a feature file, else ``bags/<slide_id>.h5``.

        Raises:
            ManifestError: the slide needs a bag folder and ``bags`` is None.
        """
        if self.is_bag_file:
            return self.source
        if bags is None:
            raise ManifestError(f"slide {self.slide_id}: its source is not a feature file, so its bag is in the "
                                "folder milhema embed wrote: pass it with --bags")
        return Path(bags) / f"{self.slide_id}.h5"


@dataclass
class Cohort:
    """A validated manifest: patients in file order, slides in file order."""

    root: Path
    patients: dict[str, Patient]
    slides: list[Slide]
    classes: list[str]
    patient_features: list[str]
    _by_patient: dict[str, list[Slide]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_patient = {pid: [] for pid in self.patients}
        for slide in self.slides:
            self._by_patient[slide.patient_id].append(slide)

    @property
    def patient_ids(self) -> list[str]:
        return list(self.patients)

    def slides_of(self, patient_id: str) -> list[Slide]:
        """Slides of one patient in manifest order (empty if the patient has none)."""
        return list(self._by_patient[patient_id])

    def labels(self, patient_ids: Sequence[str] | None = None) -> np.ndarray:
        """Class indices ``[P]`` (int64) into :attr:`classes`; -1 where the label is empty."""
        ids = self.patient_ids if patient_ids is None else patient_ids
        index = {name: i for i, name in enumerate(self.classes)}
        return np.array([index.get(self.patients[p].label or "", -1) for p in ids], dtype=np.int64)

    def patient_matrix(self, patient_ids: Sequence[str] | None = None) -> np.ndarray:
        """Patient features ``[P, F]`` (float64, columns = :attr:`patient_features`), ``nan`` = missing."""
        ids = self.patient_ids if patient_ids is None else patient_ids
        return np.array(
            [[self.patients[p].values[c] for c in self.patient_features] for p in ids], dtype=np.float64
        ).reshape(len(ids), len(self.patient_features))


    def follow_up(self, patient_ids: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``time``, ``event`` ``[P]`` float64 from patients.csv, ``nan`` for a patient without follow-up."""
        ids = self.patient_ids if patient_ids is None else patient_ids

        def column(name: str) -> np.ndarray:
            values = [getattr(self.patients[p], name) for p in ids]
            return np.array([np.nan if v is None else v for v in values], dtype=np.float64)

        return column("time"), column("event")


def load_cohort(
    folder: str | Path,
    classes: Sequence[str],
    patient_features: Sequence[str] = (),
    *,
    require_labels: bool = False,
    check_sources: bool = True,
    absent_features: str = "error",
) -> Cohort:
    """Read and validate ``folder/patients.csv`` and ``folder/slides.csv``.

    Args:
        folder: the cohort folder.
        classes: allowed labels (from the config's ``data.classes``).
        patient_features: numeric columns of patients.csv to read (the config's
            ``data.patient_features``: CBC and other patient-level inputs); values may be empty.
        require_labels: refuse patients with an empty label (training needs them).
        check_sources: refuse slides whose ``source`` does not exist.
        absent_features: ``"error"``: a column of ``patient_features`` missing from the header is
            refused (training); ``"missing"``: it is read as missing for every patient, with one
            warning (predicting with a model whose inputs include missing-value indicators).

    Raises:
        ManifestError: on the first violation, naming file, row and value.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ManifestError(f"cohort folder {root} does not exist (expected {PATIENTS_FILE} and {SLIDES_FILE} in it)")
    patients = _read_patients(root / PATIENTS_FILE, list(classes), list(patient_features), require_labels,
                              absent_ok=absent_features == "missing")
    slides = _read_slides(root / SLIDES_FILE, patients, check_sources)
    return Cohort(root=root.resolve(), patients=patients, slides=slides, classes=list(classes),
                  patient_features=list(patient_features))


def read_table(path: Path, required: Iterable[str]) -> tuple[list[str], list[tuple[int, dict[str, str]]], bool]:
    """A CSV table (``,``-separated, or ``;`` as Excel writes it): its header, ``(row number, row)`` pairs
    (rows numbered as a spreadsheet shows them, the header being row 1; blank rows skipped) and whether
    decimals use commas.

    Raises:
        ManifestError: no such file, not UTF-8, no header, a required column missing, a row of the wrong length.
    """
    if path.is_dir():
        raise ManifestError(f"{path}: is a folder; expected a CSV file")
    if not path.is_file():
        raise ManifestError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path.name}: not UTF-8 text (byte {exc.start}); save it as CSV UTF-8") from exc
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ManifestError(f"{path.name}: file is empty (expected a header row)")
    header_line = lines[0]
    delimiter = ";" if header_line.count(";") > header_line.count(",") else ","
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
        body = list(reader)
    except csv.Error as exc:
        raise ManifestError(f"{path.name}: not a readable CSV ({exc})") from exc
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise ManifestError(f"{path.name} row 1: column {duplicated[0]!r} appears twice in the header")
    for column in required:
        if column not in header:
            hint, with_unit = _same_column(column, header)
            found = ", ".join(header[:8]) + (", ..." if len(header) > 8 else "")
            # A unit in the name may not be milhema's (Hb in g/L, not g/dL): renaming must not hide it.
            unit = ", with its values in the units of docs/DOMAIN.md" if with_unit else ""
            extra = f" (found {hint!r}; rename it{unit})" if hint else f"; the header has {_shown(found)}"
            raise ManifestError(f"{path.name} row 1: required column {column!r} is missing{extra}")
    rows = []
    for offset, values in enumerate(body):
        row_number = offset + 2
        if not any(v.strip() for v in values):
            continue  # blank lines at the end of spreadsheet exports
        if len(values) != len(header):
            raise ManifestError(
                f"{path.name} row {row_number}: {len(values)} values for {len(header)} columns "
                f"(a stray '{delimiter}' or a missing one?)"
            )
        rows.append((row_number, {h: v.strip() for h, v in zip(header, values, strict=True)}))
    return header, rows, delimiter == ";"


# "wbc (G/L)", "plt [10^9/L]": a name, then its unit in brackets.
_BRACKET_UNIT = re.compile(r"(?P<name>.+?)\s*[(\[](?P<unit>[^()\[\]]*)[)\]]")
# Units written without '/', '%' or a power of ten.
_BARE_UNITS = frozenset({"fl", "pg", "g", "mg", "l", "ul", "µl", "μl", "nl", "mm3", "giga", "tera"})


def _same_column(column: str, header: Sequence[str]) -> tuple[str | None, bool]:
    """The header entry that is ``column`` spelt another way, if any: other case, spaces, ``_`` or
    ``-``, or a unit after it (``WBC``, ``wbc (G/L)``, ``wbc_10^9/L``); and whether it has a unit.

    Only spellings: CBC names differ by one letter between quantities (``anc``, ``amc``,
    ``alc``), so a merely similar name is another measurement and is never suggested.
    """
    want = _letters(column)
    for entry in header:
        text = entry.strip()
        if _letters(text) == want:
            return entry, False
        names = [text[:i] for i, char in enumerate(text) if char in " _" and _is_unit(text[i + 1:])]
        bracket = _BRACKET_UNIT.fullmatch(text)
        if bracket and _is_unit(bracket["unit"]):
            names.append(bracket["name"])
        if any(_letters(name) == want for name in names):
            return entry, True
    return None, False


def _is_unit(text: str) -> bool:
    """Whether ``text`` reads as a unit (``G/L``, ``10^9/L``, ``%``, ``fL``, ``x10e9``), not a word such as ``a1c``."""
    unit = text.strip().lower()
    return bool(unit) and ("/" in unit or "%" in unit or "^" in unit or unit in _BARE_UNITS
                           or re.fullmatch(r"[x×*]?\s*10\s*(e|\*\*)?\s*\d+", unit) is not None)


def _letters(name: str) -> str:
    return re.sub(r"[\s_-]+", "", name).lower()


def _parse_number(raw: str, *, decimal_comma: bool, where: str, what: str) -> float:
    if not raw:
        return math.nan
    text = raw.replace(",", ".") if decimal_comma else raw
    try:
        value = float(text)
    except ValueError:
        raise ManifestError(f"{where}: {what} {_shown(raw)} is not a number (leave the cell empty if missing)") from None
    if not math.isfinite(value):
        raise ManifestError(f"{where}: {what} {_shown(raw)} is not a finite number (leave the cell empty if missing)")
    return value


def _check_id(value: str, where: str, what: str) -> None:
    if not value:
        raise ManifestError(f"{where}: {what} is empty")
    if not _SAFE_ID.match(value) or ".." in value:
        raise ManifestError(
            f"{where}: {what} {_shown(value)} is not safe as a file name "
            "(use letters, digits, '.', '_' or '-', starting with a letter or digit)"
        )


def is_derived_feature(name: str) -> bool:
    """Whether the patient feature ``name`` is computed from the bags (``diff_blast``), not read from patients.csv."""
    return name.startswith(DERIVED_PREFIXES)


def _read_patients(path: Path, classes: list[str], features: list[str], require_labels: bool,
                   absent_ok: bool = False) -> dict[str, Patient]:
    derived = [c for c in features if is_derived_feature(c)]
    features = [c for c in features if not is_derived_feature(c)]
    header, rows, decimal_comma = read_table(path, ["patient_id", "label", *([] if absent_ok else features)])
    name = path.name
    clash = [c for c in derived if c in header]
    if clash:
        raise ManifestError(f"{name} has a column {clash[0]!r}, but patient features named {' or '.join(DERIVED_PREFIXES)}"
                            "... are computed from the bags' predicted cells (milhema cells predict); rename the "
                            f"column (e.g. manual_{clash[0].split('_', 1)[1]}) to read it from {name}")
    absent = [c for c in features if c not in header]
    if absent:
        warnings.warn(f"{name} has no column {', '.join(repr(c) for c in absent)}, which the model reads: "
                      "treated as missing for every patient", MissingFeatureWarning, stacklevel=3)
    patients: dict[str, Patient] = {}
    first_row: dict[str, int] = {}
    for row_number, row in rows:
        where = f"{name} row {row_number}"
        pid = row["patient_id"]
        _check_id(pid, where, "patient_id")
        if pid in patients:
            raise ManifestError(f"{where}: patient_id {pid!r} already used in row {first_row[pid]}")
        label = row["label"] or None
        if label is None and require_labels:
            raise ManifestError(f"{where}: patient {pid!r} has no label; training needs one of {', '.join(classes)}")
        if label is not None and label not in classes:
            raise ManifestError(f"{where}: label {_shown(label)} is not one of {', '.join(classes)}"
                                f"{did_you_mean(label, classes, cutoff=0.5)}")
        values = dict.fromkeys(derived, math.nan)   # filled from the bags (milhema.differential)
        for column in features:
            value = _parse_number(row.get(column, ""), decimal_comma=decimal_comma, where=where, what=f"{column}")
            if value < 0 and is_cbc_quantity(column):
                raise ManifestError(f"{where}: {column} {_shown(row[column])} is negative")
            values[column] = value
        age = _optional_number(row, "age", decimal_comma, where)
        time = _optional_number(row, "time", decimal_comma, where)
        if time is not None and time <= 0:
            raise ManifestError(f"{where}: time {_shown(row['time'])} must be greater than 0 (or empty if not followed)")
        event = _optional_number(row, "event", decimal_comma, where)
        if event is not None and event not in (0.0, 1.0):
            raise ManifestError(f"{where}: event {_shown(row['event'])} must be 0 (censored) or 1 (event)")
        if (time is None) != (event is None):
            raise ManifestError(f"{where}: time and event must be both given or both empty")
        patients[pid] = Patient(
            patient_id=pid, label=label, values=values, age=age, sex=row.get("sex") or None,
            time=time, event=None if event is None else int(event), row=row_number,
        )
        first_row[pid] = row_number
    if not patients:
        raise ManifestError(f"{name}: no patient rows below the header")
    return patients


def _optional_number(row: dict[str, str], column: str, decimal_comma: bool, where: str) -> float | None:
    if column not in row or not row[column]:
        return None
    return _parse_number(row[column], decimal_comma=decimal_comma, where=where, what=column)


def _read_slides(path: Path, patients: dict[str, Patient], check_sources: bool) -> list[Slide]:
    _header, rows, decimal_comma = read_table(path, ["slide_id", "patient_id", "source"])
    name = path.name
    slides: list[Slide] = []
    first_row: dict[str, int] = {}
    for row_number, row in rows:
        where = f"{name} row {row_number}"
        sid = row["slide_id"]
        _check_id(sid, where, "slide_id")
        if sid in first_row:
            raise ManifestError(f"{where}: slide_id {sid!r} already used in row {first_row[sid]}")
        pid = row["patient_id"]
        if pid not in patients:
            raise ManifestError(f"{where}: patient_id {_shown(pid)} of slide {sid!r} is not in {PATIENTS_FILE}"
                                f"{did_you_mean(pid, patients, cutoff=0.5)}")
        source = _source_path(path.parent, row["source"], check_sources, where, sid)
        mpp = _optional_number(row, "mpp", decimal_comma, where)
        if mpp is not None and not 0.01 <= mpp <= 50:
            raise ManifestError(f"{where}: mpp {_shown(row['mpp'])} is not a plausible microns-per-pixel value")
        kind = _kind(row.get("kind", ""), source, mpp, where, sid)
        slides.append(Slide(slide_id=sid, patient_id=pid, source=source, view=row.get("view") or None,
                            mpp=mpp, row=row_number, kind=kind))
        first_row[sid] = row_number
    if not slides:
        raise ManifestError(f"{name}: no slide rows below the header")
    return slides


def _kind(raw: str, source: Path, mpp: float | None, where: str, slide_id: str) -> str | None:
    """The ``kind`` cell checked against the source: None when empty (inferred from the source)."""
    if not raw:
        return None
    if raw not in SOURCE_KINDS:
        raise ManifestError(f"{where}: kind {_shown(raw)} of slide {slide_id!r} is not one of "
                            f"{', '.join(SOURCE_KINDS)}{did_you_mean(raw, SOURCE_KINDS)}")
    if raw == "fields" and mpp is None:
        raise ManifestError(f"{where}: slide {slide_id!r} is a folder of fields and needs its microns per pixel "
                            "in the mpp column (a photograph does not carry them)")
    # A source that does not exist yet (check_sources=False) is judged when it is read.
    if source.is_file() and raw != "scan":
        raise ManifestError(f"{where}: slide {slide_id!r} has kind {raw!r} but its source is a file; "
                            f"{raw} are a folder (a single scanned file is kind 'scan')")
    if source.is_dir() and raw == "scan":
        raise ManifestError(f"{where}: slide {slide_id!r} has kind 'scan' but its source is a folder; a scan is "
                            "one file (a folder of photographed fields is kind 'fields', of single-cell crops 'crops')")
    return raw


def _source_path(folder: Path, raw: str, must_exist: bool, where: str, slide_id: str) -> Path:
    """``raw`` resolved against the CSV's folder."""
    if not raw:
        raise ManifestError(f"{where}: source of slide {slide_id!r} is empty; give the path of a scan or a "
                            "folder of crops")
    what = f"{where}: source {_shown(raw)} of slide {slide_id!r}"
    try:
        source = (folder / raw).resolve()
        exists = source.exists()
    except (OSError, ValueError) as exc:  # a NUL byte, a name longer than the file system allows
        raise ManifestError(f"{what} is not a usable path ({exc.strerror if isinstance(exc, OSError) else exc})") from None
    if must_exist and not exists:
        raise ManifestError(f"{what} does not exist ({source}); fix the path, relative to {folder}")
    return source


def _shown(value: str, limit: int = 200) -> str:
    """``repr`` of a cell value, shortened so one bad cell cannot flood the error line."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} characters)"

