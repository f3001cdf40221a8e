"""Patient bags for training: all cells of a patient's slides, padded batches with a mask.

A patient's slides form one bag (slide and view of every cell are kept so scores map back).
Batches are length-bucketed (bags of similar size together) so padding stays small; during
training each bag is randomly subsampled to ``data.max_cells``, at evaluation the whole bag is
used. With ``data.cache: false`` bags are streamed from their HDF5 files on every access, so a
cohort larger than memory trains in bounded RAM; loader workers open the files lazily, once each.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import h5py
import numpy as np
import torch

from milhema.bags import Bag, open_bag, read_bag_attrs, read_open_bag
from milhema.data.manifest import Cohort
from milhema.errors import BagError, ManifestError
from milhema.train.distributed import Ranks, shard


class EmptyBagWarning(UserWarning):
    """Patients whose slides yielded no cells take part with their patient features (CBC) only."""


@dataclass
class PatientBag:
    """The cells of one patient (or of one slide, for slide-level predictions).

    Attributes:
        features: ``[N, D]`` float16/32 cell features.
        slide_index: ``[N]`` index into ``slide_ids`` of each cell's slide.
        view_index: ``[N]`` view of each cell (index into the configured views).
        coords: ``[N, 2]`` level-0 pixel centres (NaN for crops).
        cell_ids: ``[N]`` cell ids within their slide.
        cbc: ``[C]`` raw CBC values, NaN = missing.
        label: class index, -1 if unknown.
        time, event: follow-up (NaN when the patient has none).
        diagnostic: ``[N]`` bool per-cell truth when every slide's bag carries it, else None.
    """

    patient_id: str
    label: int
    features: np.ndarray
    slide_index: np.ndarray
    view_index: np.ndarray
    coords: np.ndarray
    cell_ids: np.ndarray
    slide_ids: list[str]
    cbc: np.ndarray
    time: float = math.nan
    event: float = math.nan
    diagnostic: np.ndarray | None = None

    @property
    def n_cells(self) -> int:
        return int(self.features.shape[0])

    def slide(self, i: int) -> PatientBag:
        """The bag restricted to the cells of slide ``i``."""
        sel = np.flatnonzero(self.slide_index == i)
        one = self.cells(sel)
        one.slide_index = np.zeros(len(sel), np.int64)
        one.slide_ids = [self.slide_ids[i]]
        return one

    def cells(self, rows: np.ndarray) -> PatientBag:
        """The bag restricted to the cells at ``rows`` (a training subsample, one slide)."""
        return PatientBag(self.patient_id, self.label, self.features[rows], self.slide_index[rows],
                          self.view_index[rows], self.coords[rows], self.cell_ids[rows], self.slide_ids, self.cbc,
                          self.time, self.event, None if self.diagnostic is None else self.diagnostic[rows])


@dataclass(frozen=True)
class BagInfo:
    """What every bag of a folder must share with the model: backbone and feature size.

    ``columns`` are the feature columns used (None = all) when ``data.feature_blocks`` selects
    some of the blocks a bag was embedded with; ``feature_dim`` counts the used columns.
    """

    backbone: str
    weights_sha256: str
    feature_dim: int
    columns: tuple[int, ...] | None = None
    # Cells per patient, read from the files' shapes while checking them (not part of the identity).
    n_cells: Mapping[str, int] = field(default_factory=dict, compare=False)


def block_columns(attrs: Mapping[str, object], wanted: Sequence[str] | None, where: str) -> tuple[int, ...] | None:
    """Column indices of the feature blocks ``wanted`` (e.g. ``["morphology"]``), in bag order.

    A bag from ``milhema embed`` records its blocks as ``"timm/resnet18:512,morphology:16"``.
    """
    if not wanted:
        return None
    layout = str(attrs.get("feature_blocks", ""))
    blocks: dict[str, range] = {}
    start = 0
    for item in filter(None, layout.split(",")):
        name, _, size = item.rpartition(":")
        blocks[name] = range(start, start + int(size))
        start += int(size)
    missing = [w for w in wanted if w not in blocks]
    if missing:
        have = ", ".join(blocks) or "no named blocks (not embedded by milhema)"
        raise BagError(f"{where}: data.feature_blocks asks for {', '.join(missing)} but the bag holds {have}")
    return tuple(i for name in blocks if name in wanted for i in blocks[name])


def resolve_views(cohort: Cohort, configured: Sequence[str] | None) -> list[str]:
    """The view names models use: the config's ``data.views``, else slides.csv's distinct ``view`` values."""
    if configured:
        return list(configured)
    found = sorted({s.view for s in cohort.slides if s.view})
    return found or ["all"]


def check_views(cohort: Cohort, patient_ids: Sequence[str], views: Sequence[str]) -> None:
    """Refuse a slide whose ``view`` is not one of ``views`` (when there are several to tell apart).

    Raises:
        ManifestError: naming the slide, its view and the views the model knows.
    """
    if len(views) < 2:
        return
    for pid in patient_ids:
        for slide in cohort.slides_of(pid):
            if slide.view not in views:
                raise ManifestError(f"slides.csv row {slide.row}: slide {slide.slide_id} has view {slide.view or '(empty)'!r}, "
                                    f"not one of the model's views {', '.join(views)} (data.views); give it one of "
                                    "them or add it to data.views")


def inspect_bags(cohort: Cohort, bags: Path | None, patient_ids: Sequence[str],
                 feature_blocks: Sequence[str] | None = None) -> BagInfo:
    """Check that every slide of the patients has a bag and all bags share backbone and size."""
    info: BagInfo | None = None
    first = ""
    counts: dict[str, int] = {}
    for pid in patient_ids:
        cells = 0
        for slide in cohort.slides_of(pid):
            path = slide.bag_path(bags)
            if not path.exists():
                raise BagError(f"slide {slide.slide_id}: no bag file {path} (run milhema embed first)")
            attrs = read_bag_attrs(path)
            cells += int(attrs["n_cells"])
            columns = block_columns(attrs, feature_blocks, f"slide {slide.slide_id}")
            here = BagInfo(str(attrs.get("backbone", "unknown")), str(attrs.get("weights_sha256", "none")),
                           len(columns) if columns is not None else int(attrs["feature_dim"]), columns)
            if info is None:
                info, first = here, slide.slide_id
            elif here != info:
                raise BagError(f"slide {slide.slide_id}: bag made with {here.backbone} ({here.feature_dim} features) "
                               f"but slide {first} with {info.backbone} ({info.feature_dim}); re-embed one of them")
        counts[pid] = cells
    if info is None:
        raise BagError(f"no slides to train on in {bags}")
    empty = [pid for pid, n in counts.items() if n == 0]
    if len(empty) == len(counts):  # a model of cells cannot learn (or predict) from no cell at all
        who = f"any of the {len(counts)} patients" if len(counts) > 1 else f"patient {empty[0]}"
        raise BagError(f"no cell in the bags of {who} in {bags}: fix the crop folders or scans of slides.csv "
                       "and run milhema embed again")
    if empty:
        warnings.warn(f"{len(empty)} patient{'s' if len(empty) > 1 else ''} without any cell in their bags "
                      f"({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}): their predictions rest on "
                      "their patient features (CBC) alone", EmptyBagWarning, stacklevel=2)
    return dataclasses.replace(info, n_cells=counts)


class BagStore:
    """Loads patient bags from a bag folder.

    With ``cache`` each bag is read from disk once and kept; without it every access reads the
    HDF5 files again (bounded memory for cohorts larger than RAM). Open files are kept per
    process (at most ``max_open``), so loader workers each open a file once, lazily, and never
    share a handle with the process that forked them. ``checked``: :func:`inspect_bags` has
    checked the structure of every bag file (reads then skip that check).
    """

    def __init__(self, cohort: Cohort, bags: str | Path | None, views: Sequence[str], cache: bool = True,
                 columns: Sequence[int] | None = None, max_open: int = 64,
                 n_cells: Mapping[str, int] | None = None, feature_dim: int | None = None,
                 checked: bool = False) -> None:
        self.cohort = cohort
        # inspect_bags checked every file's structure (prepare passes True): a read need not
        # check it again (about a third of reading a small bag; issue 19, start-up).
        self.checked = checked
        self.feature_dim = feature_dim  # the width of an empty bag (a patient without slides)
        self.bags = None if bags is None else Path(bags)
        self.views = list(views)
        self.cache = cache
        self.columns = None if columns is None else np.asarray(columns)
        self.max_open = max_open
        self._cached: dict[str, PatientBag] = {}
        self._n_cells: dict[str, int] = dict(n_cells or {})  # known counts spare re-reading the files
        self._files: OrderedDict[Path, h5py.File] = OrderedDict()
        self._pid = os.getpid()

    def get(self, patient_id: str) -> PatientBag:
        if patient_id in self._cached:
            return self._cached[patient_id]
        bag = self._load(patient_id)
        if self.cache:
            self._cached[patient_id] = bag
        return bag

    def many(self, patient_ids: Sequence[str]) -> BagSequence:
        """The bags of ``patient_ids``, loaded when accessed."""
        return BagSequence(self, list(patient_ids))

    def n_cells(self, patient_id: str) -> int:
        """Cells in the patient's bag, from the files' shapes (no features read)."""
        if patient_id in self._cached:
            return self._cached[patient_id].n_cells
        if patient_id not in self._n_cells:
            self._n_cells[patient_id] = sum(int(read_bag_attrs(s.bag_path(self.bags))["n_cells"])
                                            for s in self.cohort.slides_of(patient_id))
        return self._n_cells[patient_id]

    def close(self) -> None:
        """Close the open bag files (before forking loader workers; they open their own)."""
        if self._pid == os.getpid():
            for handle in self._files.values():
                handle.close()
        self._files.clear()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_files"] = OrderedDict()  # a handle never travels to another process
        return state

    def _read(self, path: Path) -> Bag:
        if self._pid != os.getpid():  # a forked worker: the parent's handles are not ours to use
            self._files = OrderedDict()
            self._pid = os.getpid()
        handle = self._files.pop(path, None)
        if handle is None:
            handle = open_bag(path)
            while len(self._files) >= self.max_open:
                self._files.popitem(last=False)[1].close()
        self._files[path] = handle
        return read_open_bag(handle, path, thumbnails=False, checked=self.checked)

    def _load(self, patient_id: str) -> PatientBag:
        view_of = {v: i for i, v in enumerate(self.views)}
        parts = []
        slide_ids = []
        for i, slide in enumerate(self.cohort.slides_of(patient_id)):
            bag = self._read(slide.bag_path(self.bags))
            if self.columns is not None:
                bag.features = bag.features[:, self.columns]
            view = view_of.get(slide.view or "", 0) if len(self.views) > 1 else 0
            parts.append((bag, i, view))
            slide_ids.append(slide.slide_id)
        if parts:
            dim = parts[0][0].feature_dim
        else:  # no slide: an empty bag as wide as the others, so it batches with them
            dim = self.feature_dim if self.feature_dim is not None else 0 if self.columns is None else len(self.columns)
        label = self.cohort.labels([patient_id])[0]
        cbc = self.cohort.patient_matrix([patient_id])[0].astype(np.float32)
        time, event = self.cohort.follow_up([patient_id])
        follow_time, follow_event = float(time[0]), float(event[0])
        if not parts:
            return PatientBag(patient_id, int(label), np.zeros((0, dim), np.float16), np.zeros(0, np.int64),
                              np.zeros(0, np.int64), np.zeros((0, 2), np.float32), np.zeros(0, object), [], cbc,
                              time=follow_time, event=follow_event)
        return PatientBag(
            patient_id=patient_id, label=int(label),
            features=np.concatenate([b.features for b, _, _ in parts]),
            slide_index=np.concatenate([np.full(b.n_cells, i, np.int64) for b, i, _ in parts]),
            view_index=np.concatenate([np.full(b.n_cells, v, np.int64) for b, _, v in parts]),
            coords=np.concatenate([b.coords for b, _, _ in parts]).astype(np.float32),
            cell_ids=np.concatenate([np.asarray(b.cell_ids, dtype=object) for b, _, _ in parts]),
            slide_ids=slide_ids, cbc=cbc, time=follow_time, event=follow_event,
            diagnostic=(np.concatenate([b.diagnostic for b, _, _ in parts]).astype(bool)
                        if all(b.diagnostic is not None for b, _, _ in parts) else None),
        )


class BagSequence(Sequence[PatientBag]):
    """Patient bags by position, loaded on access.

    ``lengths``, ``labels``, ``times`` and ``events`` (``[P]`` each) are known without loading a bag.

    Built by :meth:`BagStore.many`, or around bags already in memory by :func:`as_bags`.
    """

    def __init__(self, source: BagStore | Sequence[PatientBag], ids: Sequence[str] | None = None) -> None:
        self._source = source
        if isinstance(source, BagStore):
            self.ids = list(ids or [])
            self.lengths = np.array([source.n_cells(p) for p in self.ids], np.int64)
            self.labels = np.asarray(source.cohort.labels(self.ids), np.int64).reshape(-1)
            self.times, self.events = (np.asarray(a, np.float64).reshape(-1) for a in source.cohort.follow_up(self.ids))
        else:
            self.ids = [b.patient_id for b in source]
            self.lengths = np.array([b.n_cells for b in source], np.int64)
            self.labels = np.array([b.label for b in source], np.int64)
            self.times = np.array([b.time for b in source], np.float64)
            self.events = np.array([b.event for b in source], np.float64)

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, i: int) -> PatientBag: ...

    @overload
    def __getitem__(self, i: slice) -> list[PatientBag]: ...

    def __getitem__(self, i: int | slice) -> PatientBag | list[PatientBag]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if isinstance(self._source, BagStore):
            return self._source.get(self.ids[i])
        return self._source[i]

    def close(self) -> None:
        """Close open bag files (see :meth:`BagStore.close`)."""
        if isinstance(self._source, BagStore):
            self._source.close()


def as_bags(bags: Sequence[PatientBag]) -> BagSequence:
    """``bags`` as a :class:`BagSequence` (unchanged if it already is one)."""
    return bags if isinstance(bags, BagSequence) else BagSequence(bags)


@dataclass
class Batch:
    """A padded batch. ``index[b, j]`` is the position of cell j in bag b (-1 = padding)."""

    x: torch.Tensor        # [B, N, D] float32
    mask: torch.Tensor     # [B, N] bool
    cbc: torch.Tensor      # [B, C] float32 raw, NaN = missing
    coords: torch.Tensor   # [B, N, 2]
    view: torch.Tensor     # [B, N] long
    y: torch.Tensor        # [B] long, -1 = no label
    index: np.ndarray      # [B, N]
    time: torch.Tensor     # [B] float32 follow-up, NaN = none
    event: torch.Tensor    # [B] float32 1 = event, 0 = censored, NaN = none
    slide: torch.Tensor    # [B, N] long: each cell's slide within its bag (0 at padding)

    def pin_memory(self) -> Batch:
        """Page-locked copies, so copies to the GPU can overlap compute (DataLoader ``pin_memory``)."""
        return Batch(self.x.pin_memory(), self.mask.pin_memory(), self.cbc.pin_memory(), self.coords.pin_memory(),
                     self.view.pin_memory(), self.y.pin_memory(), self.index, self.time.pin_memory(),
                     self.event.pin_memory(), self.slide.pin_memory())

    def to(self, device: torch.device) -> Batch:
        non_blocking = device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return Batch(move(self.x), move(self.mask), move(self.cbc), move(self.coords), move(self.view), move(self.y),
                     self.index, move(self.time), move(self.event), move(self.slide))


def collate(bags: Sequence[PatientBag]) -> Batch:
    """Pad bags to the longest one (training subsamples them first: :class:`TrainingBags`)."""
    width = max(1, max(bag.n_cells for bag in bags))
    dim = bags[0].features.shape[1]
    b = len(bags)
    x = np.zeros((b, width, dim), np.float32)
    mask = np.zeros((b, width), bool)
    coords = np.full((b, width, 2), np.nan, np.float32)
    view = np.zeros((b, width), np.int64)
    slide = np.zeros((b, width), np.int64)
    index = np.full((b, width), -1, np.int64)
    for i, bag in enumerate(bags):
        n = bag.n_cells
        x[i, :n] = bag.features
        mask[i, :n] = True
        coords[i, :n] = bag.coords
        view[i, :n] = bag.view_index
        slide[i, :n] = bag.slide_index
        index[i, :n] = np.arange(n)
    return Batch(torch.from_numpy(x), torch.from_numpy(mask), torch.from_numpy(np.stack([bag.cbc for bag in bags])),
                 torch.from_numpy(coords), torch.from_numpy(view),
                 torch.tensor([bag.label for bag in bags], dtype=torch.long), index,
                 torch.tensor([bag.time for bag in bags], dtype=torch.float32),
                 torch.tensor([bag.event for bag in bags], dtype=torch.float32), torch.from_numpy(slide))


def bucketed_batches(lengths: Sequence[int] | np.ndarray, batch_size: int, rng: np.random.Generator | None,
                     max_cells: int | None = None, bucketing: bool = True) -> Iterator[list[int]]:
    """Indices of bags grouped by similar length; shuffled when ``rng`` is given.

    ``lengths[i]`` is the number of cells of bag i. Bags are shuffled, cut into pools of 50
    batches, sorted by length within a pool and batched; the batches are then shuffled. Without
    ``rng`` the order is by length (evaluation). ``bucketing=False`` (``train.bucketing``) cuts
    the shuffled bags into batches as they come: each batch is a random draw of bags, whatever
    their lengths (more padding; a Cox loss then compares random patients).
    """
    lens = np.asarray(lengths)
    if max_cells:
        lens = np.minimum(lens, max_cells)
    if rng is None:
        order = np.argsort(lens, kind="stable")
        yield from (order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size))
        return
    order = rng.permutation(len(lens))
    if not bucketing:
        yield from (order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size))
        return
    pool = batch_size * 50
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start:start + pool]
        chunk = chunk[np.argsort(lens[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    for i in rng.permutation(len(batches)):
        yield batches[i]


@dataclass
class EpochSampler:
    """The training batches of one epoch for this rank, as ``(epoch, bag index)`` keys.

    The same on every rank and in every loader worker: the shuffle is drawn from
    ``(seed, epoch)``, then :func:`~milhema.train.distributed.shard` gives each rank its share.
    Set :attr:`epoch` before iterating (like ``DistributedSampler.set_epoch``).
    """

    lengths: np.ndarray
    batch_size: int
    max_cells: int | None
    seed: int
    ranks: Ranks = field(default_factory=Ranks)
    epoch: int = 0
    bucketing: bool = True

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = list(bucketed_batches(self.lengths, self.batch_size, rng, self.max_cells, self.bucketing))
        for batch in shard(batches, self.ranks):
            yield [(self.epoch, i) for i in batch]

    def __len__(self) -> int:
        total = n_batches(len(self.lengths), self.batch_size)
        return -(-total // self.ranks.world)


class TrainingBags(torch.utils.data.Dataset):
    """Bag ``i`` at ``epoch``, subsampled to ``max_cells`` cells by a generator keyed by
    ``(seed, epoch, i)``: the same cells whichever worker or rank loads it."""

    def __init__(self, bags: Sequence[PatientBag], max_cells: int | None, seed: int) -> None:
        self.bags = bags
        self.max_cells = max_cells
        self.seed = seed

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, key: tuple[int, int]) -> PatientBag:
        epoch, i = key
        bag = self.bags[i]
        if self.max_cells is None or bag.n_cells <= self.max_cells:
            return bag
        rng = np.random.default_rng([self.seed, epoch, i])
        return bag.cells(np.sort(rng.choice(bag.n_cells, self.max_cells, replace=False)))


def training_loader(bags: Sequence[PatientBag], batch_size: int, max_cells: int | None, seed: int, *,
                    ranks: Ranks | None = None, workers: int = 0, pin_memory: bool = False,
                    bucketing: bool = True) -> tuple[torch.utils.data.DataLoader, EpochSampler]:
    """Batches of subsampled training bags, read by ``workers`` processes (0 = this process).

    Returns the loader and its sampler; set ``sampler.epoch`` before each epoch. Workers stay
    alive across epochs, so each opens a bag file at most once. ``bucketing``: see
    :func:`bucketed_batches`.
    """
    seq = as_bags(bags)
    sampler = EpochSampler(seq.lengths, batch_size, max_cells, seed, ranks or Ranks(), bucketing=bucketing)
    if workers > 0:
        seq.close()
    # The loader's own generator: drawing its worker seeds from the global one would shift dropout
    # and make runs with and without workers differ.
    loader = torch.utils.data.DataLoader(TrainingBags(seq, max_cells, seed), batch_sampler=sampler,
                                         collate_fn=collate, num_workers=workers,
                                         persistent_workers=workers > 0, pin_memory=pin_memory,
                                         generator=torch.Generator().manual_seed(seed))
    return loader, sampler


def n_batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)
