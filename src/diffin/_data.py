"""Uniform access by id to training / target data given as tensors, arrays or a Dataset, and the
checks diffin runs on that data before scoring (finite values, the model and loss callable on it)."""

# Long file: DataSource and the code that reads training data by row beside it (the model/loss probe,
# memory-mapped arrays with their page budget, fingerprints, id-group checks) share the row access
# helpers (_as_rows, _row_blocks, _mapping).

from __future__ import annotations

import hashlib
import logging
import mmap
import operator
import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from ._errors import (
    BatchLossWeightsWarning,
    DataMismatchError,
    DatasetIdError,
    InvalidIdsError,
    LossShapeError,
    ModelCallError,
    NonFiniteDataError,
)
from ._tree import batch_len, call_model, is_leaf, leaves, place, tree_map

if TYPE_CHECKING:
    from ._functional import FlatModel

log = logging.getLogger("diffin")

MAX_NAMED_IDS = 10  # ids named in an error message
MMAP_RESIDENT_BYTES = 1 << 23  # pages of a memory-mapped array read before they are handed back to the OS ...
MMAP_RESIDENT_MAX = 1 << 26  # ... or up to a quarter of the array, at most this (fewer releases, fewer re-faults)
FAULT_AROUND_BYTES = 1 << 16  # what Linux maps around a page fault of a file mapping (fault_around_bytes)


class LoaderData:
    """A map-style Dataset read through a DataLoader for the streamed passes over every row (the
    per-sample passes, the input checks): worker processes decode items in parallel and batches
    can be pinned for the GPU; single batches by id (a step's batch) are read directly. See
    :func:`loader`."""

    def __init__(self, dataset: Dataset, make_loader: Callable[[Dataset, int], Iterable[Any]]) -> None:
        if not isinstance(dataset, Dataset) or isinstance(dataset, (tuple, list)):
            raise DataMismatchError(f"diffin.loader needs a map-style Dataset, got {type(dataset).__name__}")
        self.dataset = dataset
        self.make_loader = make_loader


def loader(
    dataset: Dataset, make_loader: Callable[[Dataset, int], Iterable[Any]] | None = None, *,
    num_workers: int = 0, pin_memory: bool = False,
) -> LoaderData:
    """``train=`` / ``target=`` for a Dataset whose items are costly to load (files, decoding).

    The passes over every row go through ``make_loader(indexed_dataset, batch_size)``, which must
    return an iterable of batches in order (no shuffling, no sampler); the dataset it gets yields
    ``(id, input, target)`` so diffin checks the order. Default: ``DataLoader(indexed_dataset,
    batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
    persistent_workers=num_workers > 0)``, built once per batch size and reused.
    """
    if make_loader is None:
        def make_loader(ds: Dataset, batch_size: int) -> Iterable[Any]:
            return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                              pin_memory=pin_memory, persistent_workers=num_workers > 0)
    return LoaderData(dataset, make_loader)


class _Indexed(Dataset):
    """Item i of a dataset as ``(i, input, target)`` (items that carry an id keep theirs)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        item = self.dataset[i]
        if isinstance(item, (tuple, list)) and len(item) == 3:
            return tuple(item)
        if isinstance(item, (tuple, list)) and len(item) == 2:
            return (i, item[0], item[1])
        raise DataMismatchError("Dataset items must be (input, target) pairs or (id, input, target) triples")


class WithIds(Dataset):
    """A map-style Dataset whose item ``i`` is ``(i, input, target)``; see :func:`with_ids`."""

    def __init__(self, dataset: Dataset) -> None:
        if not _is_item_dataset(dataset):
            raise DataMismatchError(
                f"with_ids needs a map-style torch.utils.data.Dataset, got {type(dataset).__name__}; "
                "for tensors X, Y use diffin.with_ids(TensorDataset(X, Y))"
            )
        try:
            self._n = len(dataset)  # type: ignore[arg-type]
        except TypeError as e:
            raise DataMismatchError("with_ids needs a Dataset that defines __len__ (a map-style Dataset)") from e
        self.dataset = dataset

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> tuple[int, Any, Any]:
        i = operator.index(index)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"index {index} out of range for a dataset of {self._n} items")
        item = self.dataset[i]
        if isinstance(item, Mapping):  # tokenized text: the label under "labels" (or "label", "label_ids")
            key = next((k for k in LABEL_KEYS if k in item), None)
            if key is None:
                raise DataMismatchError(f"with_ids: item {i} is a dict without a label ({sorted(item)}); put the "
                                        "target under 'labels'")
            return i, {k: v for k, v in item.items() if k not in LABEL_KEYS}, item[key]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataMismatchError(
                f"with_ids: item {i} of the wrapped dataset is a {type(item).__name__}"
                f"{f' of length {len(item)}' if isinstance(item, (tuple, list)) else ''}; "
                "items must be (input, target) pairs"
            )
        return i, item[0], item[1]


def with_ids(dataset: Dataset) -> WithIds:
    """Wrap a map-style Dataset of ``(input, target)`` items so that item ``i`` is ``(i, input, target)``.

    A ``DataLoader`` over it (``shuffle=True`` or any sampler) yields ``(ids, x, y)`` batches,
    ``ids`` an int64 tensor of shape (B,) holding each sample's index in ``dataset``: exactly
    what ``Recorder.step(ids)`` records. Pass the same wrapped dataset (or the plain one) as
    ``train=`` when scoring; score ``i`` belongs to ``dataset[i]``::

        loader = DataLoader(diffin.with_ids(TensorDataset(X, Y)), batch_size=64, shuffle=True)
        for ids, x, y in loader:
            ...
            rec.step(ids)
    """
    return WithIds(dataset)


class DataSource:
    """Rows of a dataset fetched by integer ids, cast to the model's dtype and device.

    Args:
        data: ``(inputs, targets)`` tensors or numpy arrays with a common first dimension, or a
            map-style ``torch.utils.data.Dataset`` whose item ``i`` is ``(input, target)`` or
            ``(i, input, target)`` (e.g. :func:`with_ids`; an item whose id is not its index
            raises :class:`DatasetIdError`).
        dtype: floating inputs are cast to it (the model's dtype); integer inputs are left alone.
        device: where batches are placed.
        name: used in error messages ("train", "target").

    ``target_dtype`` (set by :func:`probe_model_and_loss` when the loss needs it, e.g. int32
    class labels for cross-entropy) casts the targets of every batch.

    Numpy arrays stay numpy arrays (``self.x`` / ``self.y``): only the rows fetched are copied
    into tensors, so a memory-mapped array (``np.load(path, mmap_mode="r")``, see
    :func:`memmap_arrays`) is read by batch ids and never loaded whole; the pages it reads are
    handed back to the OS every ``MMAP_RESIDENT_BYTES`` (they stay in the page cache), so the
    resident memory it adds is bounded, independent of N.
    """

    _loader: LoaderData | None = None  # class defaults: views built without __init__ (subsets) have none
    _identity: tuple[Any, ...] | None = None

    def __init__(self, data: Any, dtype: torch.dtype, device: torch.device, name: str = "train"):
        self.name = name
        self.dtype = dtype
        self.device = device
        self.target_dtype: torch.dtype | None = None
        self._ds: Dataset | None = None
        self._loader: LoaderData | None = None
        self._loaders: dict[int, Iterable[Any]] = {}
        self._identity = data_identity(data)
        if isinstance(data, LoaderData):
            self._loader, data = data, data.dataset
        if isinstance(data, WithIds):
            data = data.dataset  # ids are positions by construction: read the (input, target) items
        if _is_item_dataset(data):
            self._ds = data
            try:
                self._n = len(data)  # type: ignore[arg-type]
            except TypeError as e:
                raise DataMismatchError(f"{name} Dataset must define __len__") from e
            self.x = self.y = None
        elif isinstance(data, (tuple, list)) and len(data) == 2:
            self.x, self.y = (tree_map(lambda a, w=w: _as_rows(a, f"{name} {w}"), part)
                              for part, w in zip(data, ("inputs", "targets")))
            self._pages = _PageBudget(leaves(self.x) + leaves(self.y))
            n_x, n_y = batch_len(self.x), batch_len(self.y)
            if n_x != n_y:
                raise DataMismatchError(f"{name} inputs have {n_x} rows but targets have {n_y}")
            self._n = n_x
        else:
            raise DataMismatchError(
                f"{name} data must be an (inputs, targets) pair of tensors/arrays or a "
                f"torch.utils.data.Dataset, got {type(data).__name__}"
            )
        if self._n == 0:
            raise DataMismatchError(f"{name} data is empty")

    def __len__(self) -> int:
        return self._n

    def get(self, ids: np.ndarray | Tensor | list[int]) -> tuple[Tensor, Tensor]:
        """Inputs and targets of the rows ``ids`` (shape (B, ...) each)."""
        idx = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        if self._ds is not None:
            items = [self._ds[int(i)] for i in idx]
            if items and isinstance(items[0], Mapping):
                x, y = collate_dicts(items, self.name)
                return self._place(x), self._place_targets(y)
            try:
                batch = default_collate(items)
            except (RuntimeError, TypeError) as e:
                raise DataMismatchError(
                    f"the {self.name} Dataset's items {idx[:5].tolist()}... cannot be collated into one batch "
                    f"({type(e).__name__}: {e}). Every item's inputs must have the same structure and shapes "
                    "(a tensor, or a tuple/list/dict of tensors): pad variable-length parts (e.g. token ids) to a "
                    "fixed length"
                ) from e
            if isinstance(batch, (tuple, list)) and len(batch) == 3:
                self._check_item_ids(batch[0], idx)
                x, y = batch[1], batch[2]
            elif isinstance(batch, (tuple, list)) and len(batch) == 2:
                x, y = batch
            else:
                raise DataMismatchError(
                    f"{self.name} Dataset items must be (input, target) pairs or (id, input, target) "
                    "triples (diffin.with_ids(dataset) makes the latter)"
                )
        else:
            x, y = self._rows(self.x, idx), self._rows(self.y, idx)
        return self._place(x), self._place_targets(y)

    @property
    def mapped(self) -> bool:
        """Whether rows come from read-only memory-mapped arrays (reads of many batches at once,
        :meth:`get_many`, then cost fewer page faults than one read per batch)."""
        return getattr(self, "_ds", None) is None and bool(getattr(self, "_pages", None) and self._pages.mapped)

    def get_many(self, id_lists: Sequence[np.ndarray]) -> list[tuple[Tensor, Tensor]]:
        """:meth:`get` of several id arrays in one read: the rows they hold, each once, in file
        order (memory-mapped arrays: each page is mapped once, not once per row and batch), then
        split into the batches. Same values as one :meth:`get` per array."""
        lists = [np.asarray(i, dtype=np.int64).reshape(-1) for i in id_lists]
        if self._ds is not None or self.x is None or self.y is None or len(lists) < 2:
            return [self.get(i) for i in lists]
        every = np.concatenate(lists)
        uniq, inverse = np.unique(every, return_inverse=True)
        idx = torch.from_numpy(uniq)
        x, y = self._sorted_rows(self.x, idx), self._sorted_rows(self.y, idx)
        x, y = self._place(x), self._place_targets(y)
        out, off = [], 0
        inverse = torch.from_numpy(inverse.reshape(-1))
        for ids in lists:
            take = inverse[off:off + len(ids)].to(x.device if isinstance(x, Tensor) else self.device)
            out.append((tree_map(lambda a, take=take: a.index_select(0, take), x),
                        tree_map(lambda a, take=take: a.index_select(0, take), y)))
            off += len(ids)
        return out

    def _sorted_rows(self, a: Any, idx: Tensor) -> Any:
        """Rows ``idx`` (sorted) of one array as a tensor; a memory-mapped array is read in pieces
        of at most its page budget of file span (:class:`_PageBudget`), so what a read leaves
        resident stays bounded whatever the number of rows."""
        if not is_leaf(a):
            return tree_map(lambda leaf: self._sorted_rows(leaf, idx), a)
        span = self._pages.span_rows(a)
        if span is None or len(idx) == 0:
            return self._rows(a, idx)
        window = idx.numpy() // span  # pieces: the rows in one window of `span` rows each
        cuts = torch.as_tensor(np.flatnonzero(np.diff(window)) + 1)
        return torch.cat([self._rows(a, p, span_bytes=span * a.strides[0]) for p in torch.tensor_split(idx, cuts)])

    def all(self) -> tuple[Tensor, Tensor]:
        return self.get(np.arange(self._n))

    def chunks(self, size: int) -> Iterator[tuple[np.ndarray, Tensor, Tensor]]:
        """Consecutive chunks ``(ids, x, y)`` covering every row once (tensor data: views)."""
        if self._loader is not None:
            yield from self._loader_chunks(size)
            return
        for start in range(0, self._n, size):
            stop = min(start + size, self._n)
            ids = np.arange(start, stop)
            if self._ds is None and self.x is not None and self.y is not None:
                x, y = self._rows(self.x, slice(start, stop)), self._rows(self.y, slice(start, stop))
                yield ids, self._place(x), self._place_targets(y)
            else:
                x, y = self.get(ids)
                yield ids, x, y

    def _loader_chunks(self, size: int) -> Iterator[tuple[np.ndarray, Tensor, Tensor]]:
        """The chunks through the user's DataLoader (see :func:`loader`), checked to come in order."""
        assert self._loader is not None and self._ds is not None
        if size not in self._loaders:
            self._loaders[size] = self._loader.make_loader(_Indexed(self._ds), size)
        start = 0
        for batch in self._loaders[size]:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 3):
                raise DataMismatchError(f"{self.name}: the DataLoader must yield the (id, input, target) batches "
                                        "of the dataset it is given (default collate)")
            got = np.asarray(torch.as_tensor(batch[0]).cpu(), dtype=np.int64)
            want = np.arange(start, start + len(got))
            if not np.array_equal(got, want):
                raise DataMismatchError(
                    f"{self.name}: the DataLoader gave rows {got[:5].tolist()}... where rows {want[:5].tolist()}... "
                    "were next; diffin.loader's make_loader must keep the dataset's order (shuffle=False, no sampler)"
                )
            start += len(got)
            yield got, self._place(batch[1]), self._place_targets(batch[2])
        if start != self._n:
            raise DataMismatchError(f"{self.name}: the DataLoader gave {start} rows of {self._n} (drop_last?)")

    def check_finite(self, chunk: int) -> None:
        """Raise :class:`NonFiniteDataError` if any floating input or target is NaN or ±Inf.

        Streams over the data in chunks of ``chunk`` rows (memory independent of N); values are
        checked as the model will see them (cast to its dtype, so an overflow to Inf counts).
        The message names up to ``MAX_NAMED_IDS`` offending ids. Data found finite once is not
        read again while it is the same, unchanged objects (:func:`data_identity`).
        """
        key = self._identity
        if key is not None:
            key = (key, self.dtype, self.target_dtype)
            if _CHECKED_FINITE.get(key):
                return
        self._check_finite(chunk)
        if key is not None:
            _remember(_CHECKED_FINITE, key, True)

    def _check_finite(self, chunk: int) -> None:
        counts = {"inputs": 0, "targets": 0}
        named: list[int] = []
        for ids, x, y in self.chunks(chunk):
            bad_x, bad_y = _nonfinite_rows(x, len(ids)), _nonfinite_rows(y, len(ids))
            counts["inputs"] += int(bad_x.sum())
            counts["targets"] += int(bad_y.sum())
            bad = (bad_x | bad_y).cpu().numpy()
            if bad.any() and len(named) < MAX_NAMED_IDS:
                named += ids[bad][: MAX_NAMED_IDS - len(named)].tolist()
        if not named:
            return
        where = " and ".join(f"{k} of {v} rows" for k, v in counts.items() if v)
        what = "training" if self.name == "train" else self.name
        fix = ("fix or replace those values (e.g. torch.nan_to_num), keeping every row at the id it had "
               "during training" if self.name == "train" else "drop or fix those rows")
        raise NonFiniteDataError(
            f"the {what} data holds NaN or Inf (as {self.dtype} where floating) in the {where}; "
            f"first ids: {named}. Every score would be NaN: {fix}, then score again."
        )

    def _check_item_ids(self, got: Any, idx: Tensor) -> None:
        if not isinstance(got, Tensor) or got.dtype.is_floating_point or got.is_complex() or got.ndim != 1:
            raise DataMismatchError(
                f"{self.name} Dataset items have three parts but the first is not an integer id; items "
                "must be (input, target) pairs or (id, input, target) triples"
            )
        got = got.to(device="cpu", dtype=torch.long)
        wrong = (got != idx).nonzero().reshape(-1)
        if wrong.numel():
            k = int(wrong[0])
            raise DatasetIdError(
                f"{self.name} Dataset item {int(idx[k])} carries id {int(got[k])}: an (id, input, target) "
                "Dataset must give item i the id i, the row number the run recorded. Wrap the plain "
                "(input, target) Dataset with diffin.with_ids(dataset) instead"
            )

    def _rows(self, a: Any, idx: Tensor | slice, span_bytes: int | None = None) -> Any:
        """Rows ``idx`` of one array as a tensor (of every array, for inputs made of several): a view
        for a tensor or a writable in-memory array, a copy of those rows only for a read-only or
        memory-mapped one. ``span_bytes``: the rows lie within that many bytes of the file."""
        if not is_leaf(a):
            return tree_map(lambda leaf: self._rows(leaf, idx, span_bytes), a)
        if isinstance(a, Tensor):  # index_select: a gather, several times faster than a[idx] on CPU
            return a[idx] if isinstance(idx, slice) or a.ndim == 0 else a.index_select(0, idx.to(a.device))
        if isinstance(idx, slice):
            rows = a[idx]
            if isinstance(a, np.memmap) or not rows.flags.writeable:
                rows = np.array(rows)
            else:
                rows = np.ascontiguousarray(rows)
        else:
            rows = np.asarray(a[idx.numpy()])  # fancy indexing: a fresh array of those rows
        self._pages.read(a, rows, scattered=not isinstance(idx, slice), span_bytes=span_bytes)
        return torch.from_numpy(rows)

    def _place(self, x: Any) -> Any:
        """Inputs (a tensor, or a tuple/list/dict of them) on the model's device, floating parts in
        its dtype (docs/method.md §4.7, "Inputs")."""
        return place(x, self.dtype, self.device)

    def _place_targets(self, y: Any) -> Any:
        if not is_leaf(y):
            return tree_map(self._place_targets, y)
        if self.target_dtype is not None:
            return y.to(device=self.device, dtype=self.target_dtype)
        return y.to(self.device)


def _nonfinite_rows(a: Any, b: int) -> Tensor:
    """(b,) bool: rows of a batch (tensor, or tuple / list / dict of tensors) holding NaN or Inf."""
    if isinstance(a, Tensor):
        if not (a.is_floating_point() or a.is_complex()) or a.ndim == 0 or a.shape[0] != b:
            return torch.zeros(b, dtype=torch.bool)
        return ~torch.isfinite(a).reshape(b, -1).all(dim=1).cpu()
    parts = a.values() if isinstance(a, dict) else a if isinstance(a, (tuple, list)) else ()
    out = torch.zeros(b, dtype=torch.bool)
    for p in parts:
        out |= _nonfinite_rows(p, b)
    return out


def _describe(a: Any) -> str:
    if isinstance(a, Tensor):
        return f"shape {tuple(a.shape)} (dtype {str(a.dtype).removeprefix('torch.')})"
    if isinstance(a, (tuple, list)):
        return f"a {type(a).__name__} of [{', '.join(_describe(p) for p in a)}]"
    return f"type {type(a).__name__}"


def probe_model_and_loss(src: DataSource, fm: FlatModel) -> None:
    """Call the model and the loss on the first (up to) 2 rows of ``src``, before any scoring.

    Any exception is re-raised as :class:`ModelCallError` saying what diffin was calling, on
    which shapes and dtypes (the original chained). Integer class labels of another integer
    dtype that the loss refuses (e.g. int32 for cross-entropy) are cast to int64 for every batch
    from then on. A loss that does not return one value per sample raises ``LossShapeError``.
    The model runs with its own parameter values here (only shapes and dtypes matter) and under
    ``torch.no_grad``; call it with the model in the mode scoring uses (eval).
    """
    ids = np.arange(min(2, len(src)))
    x, y = src.get(ids)
    who = "training" if src.name == "train" else src.name
    with torch.no_grad():
        try:
            out = call_model(fm.model, None, x)
        except Exception as e:
            raise ModelCallError(
                f"calling {_call_form(x)} on {len(ids)} {who} inputs of {_describe(x)} failed: "
                f"{type(e).__name__}: {e}. Pass data shaped as in training, and a model built like the "
                f"trained one (its parameters are {str(fm.dtype).removeprefix('torch.')})"
            ) from e
        if fm.coupled:
            _probe_batch_loss(fm, out, x, y, who)
            return
        try:
            fm.loss_fn(out, y)
        except Exception as e:
            if not _integer_labels_fixable(fm, out, y):
                raise ModelCallError(
                    f"calling loss_fn(outputs, targets) on model outputs of {_describe(out)} and {len(ids)} "
                    f"{who} targets of {_describe(y)} failed: {type(e).__name__}: {e}. loss_fn must take "
                    "(model outputs, targets) and return one loss per sample (reduction='none')"
                ) from e
            src.target_dtype = torch.int64
            log.info("%s targets of dtype %s cast to int64 for the loss", src.name, y.dtype)
            y = y.to(torch.int64)
    fm.losses(fm.theta_from_model(), x, y)  # LossShapeError unless one loss per sample


def _call_form(x: Any) -> str:
    """How diffin calls the model on inputs ``x`` (docs/method.md §4.7, "Inputs")."""
    return "model(**x)" if isinstance(x, dict) else "model(*x)" if isinstance(x, (tuple, list)) else "model(x)"


def _probe_batch_loss(fm: FlatModel, out: Any, x: Any, y: Any, who: str) -> None:
    """A batch loss on a small batch: it must run, return a scalar and depend on its weights."""
    B = batch_len(x)
    ones = torch.ones(B, dtype=fm.dtype, device=fm.device)
    try:
        L = fm.loss_fn(out, y, ones)
    except Exception as e:
        raise ModelCallError(
            f"calling the batch loss {fm.loss_fn!r} on model outputs of {_describe(out)}, {B} {who} targets of "
            f"{_describe(y)} and weights of shape ({B},) failed: {type(e).__name__}: {e}. A batch loss takes "
            "(model outputs, targets, weights) and returns the batch's training loss as a scalar"
        ) from e
    if not isinstance(L, Tensor) or L.numel() != 1:
        shape = tuple(L.shape) if isinstance(L, Tensor) else type(L).__name__
        raise LossShapeError(
            f"the batch loss {fm.loss_fn!r} returned {shape} for a batch of {B}; it must return one scalar, "
            "the batch's training loss (e.g. the mean over the batch)"
        )
    with torch.enable_grad():
        shares = fm.losses(fm.theta_from_model(), x, y)
    if B > 1 and not bool((shares != 0).any()):
        warnings.warn(
            f"the batch loss {fm.loss_fn!r} does not depend on its weights: removing a member changes nothing, "
            "so every score is 0. Multiply each member's terms by its weight (weight 0 = the member removed, "
            "also from in-batch negatives), e.g. (weights * per_member).sum() / len(weights)",
            BatchLossWeightsWarning, stacklevel=3,
        )


def _integer_labels_fixable(fm: FlatModel, out: Any, y: Any) -> bool:
    """True if ``y`` is an integer tensor other than int64 that the loss accepts as int64."""
    if not isinstance(y, Tensor) or y.dtype == torch.int64 or y.is_floating_point() or y.is_complex() \
            or y.dtype == torch.bool:
        return False
    try:
        fm.loss_fn(out, y.to(torch.int64))
    except Exception:
        return False
    return True


def _as_rows(a: Any, what: str) -> Tensor | np.ndarray:
    """A tensor (detached) or a numpy array (as given: a memmap stays one), checked to convert
    to torch row by row."""
    if isinstance(a, Tensor):
        return a.detach()
    if isinstance(a, np.ndarray):
        if a.ndim == 0:
            raise DataMismatchError(f"{what} must have one row per sample, got a 0-d array")
        try:
            torch.from_numpy(np.array(a[:0]))
        except TypeError as e:
            raise DataMismatchError(
                f"{what}: numpy dtype {a.dtype} has no torch equivalent ({e}); save the array as a numeric "
                "dtype in native byte order (e.g. a.astype(np.float32))"
            ) from e
        return a
    raise DataMismatchError(f"{what} must be a tensor or numpy array, got {type(a).__name__}")


def _mapping(a: Any) -> mmap.mmap | None:
    """The read-only file mapping behind a memory-mapped array (``np.load(..., mmap_mode="r")`` or
    ``np.memmap(..., mode="r")``), else ``None``. Only read-only mappings qualify: dropping their
    pages loses nothing (a copy-on-write mapping's written pages would be lost)."""
    if isinstance(a, np.memmap) and a.mode in ("r", "readonly") and isinstance(a.base, mmap.mmap):
        return a.base
    return None


def _release(mapping: mmap.mmap) -> None:
    """Hand the pages of a read-only file mapping back to the OS: they leave this process's
    resident set and stay in the page cache (a later read maps them in again, same bytes)."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is not None:  # Linux, macOS; elsewhere the OS manages the pages alone
        mapping.madvise(advice)


class _PageBudget:
    """Counts the bytes read through the read-only file mappings of some arrays and releases a
    mapping's pages (:func:`_release`) once ``MMAP_RESIDENT_BYTES`` were read through it."""

    def __init__(self, arrays: Sequence[Any]) -> None:
        self._read: dict[int, int] = {}
        self._maps = {id(a): m for a in arrays if (m := _mapping(a)) is not None}
        # resident budget per array: a quarter of it, between MMAP_RESIDENT_BYTES and MMAP_RESIDENT_MAX
        self._budget = {id(a): min(max(MMAP_RESIDENT_BYTES, int(getattr(a, "nbytes", 0)) // 4), MMAP_RESIDENT_MAX)
                        for a in arrays if id(a) in self._maps}

    @property
    def mapped(self) -> bool:
        return bool(self._maps)

    def span_rows(self, a: Any) -> int | None:
        """Rows of ``a`` in half its budget of file span (None: not a read-only mapping)."""
        if id(a) not in self._maps or a.ndim == 0 or len(a) == 0:
            return None
        return max(1, self._budget[id(a)] // 2 // max(1, a.strides[0]))

    def read(self, a: Any, rows: np.ndarray, scattered: bool, span_bytes: int | None = None) -> None:
        """Account for ``rows`` just read from ``a``: their bytes and a page when read as one
        slice; ``scattered`` (rows by id) up to ``FAULT_AROUND_BYTES`` per row, the pages the OS
        maps around each page fault, and never more than the array or ``span_bytes`` (the rows
        lie within that many bytes) with the pages mapped around its ends."""
        m = self._maps.get(id(a))
        if m is None:
            return
        n = len(rows) if rows.ndim else 1
        touched = n * max(FAULT_AROUND_BYTES, rows.nbytes // max(n, 1)) if scattered else rows.nbytes + mmap.PAGESIZE
        touched = min(touched, int(a.nbytes) + mmap.PAGESIZE)
        if span_bytes is not None:
            touched = min(touched, span_bytes + 2 * FAULT_AROUND_BYTES)
        self._read[id(a)] = self._read.get(id(a), 0) + touched
        if self._read[id(a)] >= self._budget[id(a)]:
            _release(m)
            self._read[id(a)] = 0


def memmap_arrays(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], part: str = "train"
) -> tuple[np.memmap, np.memmap]:
    """Inputs and targets saved as ``.npy`` files, memory-mapped read-only: ``train=`` / ``target=``
    for data larger than memory, read by batch ids (never loaded whole).

    Args:
        source: a folder holding ``x_<part>.npy`` and ``y_<part>.npy``, or the two paths
            ``(inputs.npy, targets.npy)``.
        part: ``"train"``, ``"val"``, ... (with a folder).

    Returns ``(x, y)``, each an ``np.memmap`` of shape (N, ...). Raises
    :class:`DataMismatchError` for a missing or unreadable file (pickled object arrays are
    refused, never loaded) or inputs and targets of different lengths::

        train = diffin.memmap_arrays("data/")          # data/x_train.npy, data/y_train.npy
        np.save("data/x_train.npy", X)                  # how to write them (or np.lib.format.open_memmap)
    """
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise DataMismatchError(f"{folder} is not a folder; pass a folder holding x_{part}.npy and "
                                    f"y_{part}.npy, or the two .npy paths")
        paths = [folder / f"x_{part}.npy", folder / f"y_{part}.npy"]
    else:
        paths = [Path(p) for p in source]
        if len(paths) != 2:
            raise DataMismatchError(f"memmap_arrays takes a folder or two .npy paths (inputs, targets), got "
                                    f"{len(paths)} paths")
    x, y = (open_memmap(p) for p in paths)
    if x.shape[0] != y.shape[0]:
        raise DataMismatchError(f"{paths[0]} has {x.shape[0]} rows but {paths[1]} has {y.shape[0]}; "
                                "inputs and targets need one row per sample each")
    return x, y


def open_memmap(path: str | os.PathLike[str]) -> np.memmap:
    """One ``.npy`` file memory-mapped read-only (shape (N, ...)); :class:`DataMismatchError` if it
    is missing, not a .npy, holds objects (never unpickled) or no rows."""
    p = Path(path)
    if not p.is_file():
        raise DataMismatchError(f"{p} does not exist; save the array with numpy.save")
    try:
        a = np.load(p, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataMismatchError(f"{p}: cannot memory-map as a .npy array ({e}); save it with numpy.save "
                                "as a numeric array") from e
    if not isinstance(a, np.memmap) or a.ndim == 0:
        raise DataMismatchError(f"{p} holds no array of rows; save one row per sample with numpy.save")
    return a


def fingerprint(data: Any) -> str:
    """A content hash (sha256 hex) of training or target data, for cache keys of saved results.

    ``(inputs, targets)`` tensors / arrays: every byte, with shapes and dtypes. A ``Dataset``:
    its length and the bytes of up to 64 items spread over it (hashing millions of items would
    cost a pass over the data; a changed dataset of the same length that differs only between
    the sampled items is not detected); a :func:`with_ids` wrapper hashes as the dataset it
    wraps. ``None`` hashes to a fixed value.

    The hash of ``(inputs, targets)`` tensors or read-only memory-mapped arrays is computed once
    and cached by :func:`data_identity` (the same, unchanged objects): repeated calls on the same
    data cost nothing that grows with N.
    """
    key = data_identity(data)
    if key is not None:
        hit = _FINGERPRINTS.get(key)
        if hit is not None:
            return hit
    digest = _fingerprint(data)
    if key is not None:
        _remember(_FINGERPRINTS, key, digest)
    return digest


def _fingerprint(data: Any) -> str:
    h = hashlib.sha256()

    def add(a: Any) -> None:
        if isinstance(a, Tensor):
            a = a.detach()
            try:
                dtype_str = np.dtype(torch.empty(0, dtype=a.dtype).numpy().dtype).str
            except TypeError:  # a dtype numpy lacks (e.g. bfloat16): hash its raw bytes
                dtype_str = str(a.dtype)
            h.update(f"{dtype_str}{tuple(a.shape)}".encode())
            for part in _row_blocks(a):  # bounded memory: a GPU or strided tensor is copied block by block
                h.update(memoryview(part.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
        elif isinstance(a, np.ndarray):
            h.update(f"{a.dtype.str}{a.shape}".encode())
            mapping = _mapping(a)
            for part in _row_blocks(a, max_bytes=MMAP_RESIDENT_BYTES if mapping is not None else 1 << 26):
                h.update(memoryview(np.ascontiguousarray(part).reshape(-1).view(np.uint8)))
                if mapping is not None:  # a memory-mapped array streams: resident memory stays bounded
                    _release(mapping)
        elif isinstance(a, (tuple, list)):
            h.update(f"seq{len(a)}".encode())
            for item in a:
                add(item)
        elif isinstance(a, dict):
            h.update(f"dict{len(a)}".encode())
            for k in sorted(a, key=repr):
                add(repr(k))
                add(a[k])
        elif isinstance(a, (int, float, str, bool, np.generic)) or a is None:
            h.update(repr(a).encode())
        else:
            raise DataMismatchError(f"cannot fingerprint data of type {type(a).__name__}")

    if isinstance(data, LoaderData):
        data = data.dataset
    if isinstance(data, WithIds):
        data = data.dataset
    if _is_item_dataset(data):
        n = len(data)  # type: ignore[arg-type]
        h.update(f"dataset{type(data).__name__}{n}".encode())
        for i in sorted(set(np.linspace(0, max(n - 1, 0), num=min(n, 64)).astype(int).tolist())):
            add(data[i])
    else:
        add(data)
    return h.hexdigest()


_CACHE_SIZE = 32
_FINGERPRINTS: dict[tuple[Any, ...], str] = {}
_CHECKED_FINITE: dict[tuple[Any, ...], bool] = {}


def _remember(cache: dict[tuple[Any, ...], Any], key: tuple[Any, ...], value: Any) -> None:
    if len(cache) >= _CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[key] = value


def data_identity(data: Any) -> tuple[Any, ...] | None:
    """A key that stays equal while ``data`` is the same, unchanged objects; ``None`` where that
    cannot be told without reading it all (a writable numpy array, a ``Dataset``).

    ``(inputs, targets)`` (tuples, lists, dicts of them): a tensor by its storage, shape, strides,
    dtype, device and version counter (bumped by every in-place write), held by a weak reference
    so that a new tensor at a recycled address never matches; a read-only memory-mapped array by
    its file (path, inode, size, modification and change times), offset, shape and dtype. A file
    rewritten in place to the same size within the file system's timestamp resolution would be
    taken for the old one: write changed data under a new file name."""
    refs: list[Any] = []

    def leaf(a: Any) -> Any:
        if isinstance(a, Tensor):
            refs.append(weakref.ref(a))
            return ("t", id(a), a.data_ptr(), a._version, tuple(a.shape), a.stride(), str(a.dtype), str(a.device))
        if isinstance(a, np.memmap) and not a.flags.writeable and a.filename:
            st = os.stat(a.filename)
            return ("m", a.filename, st.st_ino, a.offset, st.st_size, st.st_mtime_ns, st.st_ctime_ns, a.shape,
                    a.strides, a.dtype.str)
        if isinstance(a, (tuple, list)):
            return ("s", *(leaf(b) for b in a))
        if isinstance(a, dict):
            return ("d", *((repr(k), leaf(a[k])) for k in sorted(a, key=repr)))
        if isinstance(a, (int, float, str, bool)) or a is None:
            return ("v", repr(a))
        raise _Uncacheable

    if isinstance(data, (LoaderData, WithIds)) or (isinstance(data, Dataset) and not isinstance(data, (tuple, list))):
        return None
    try:
        key = leaf(data)
    except (_Uncacheable, OSError):
        return None
    return (key, _Alive(refs))


class _Uncacheable(Exception):
    """A leaf whose content :func:`data_identity` cannot vouch for."""


class _Alive:
    """Part of a :func:`data_identity` key: equal to another while every tensor they refer to is
    alive and the same object (ids of dead objects are recycled)."""

    def __init__(self, refs: list[Any]) -> None:
        self.refs = refs

    def __hash__(self) -> int:
        return len(self.refs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Alive) or len(other.refs) != len(self.refs):
            return False
        for a, b in zip(self.refs, other.refs):
            x = a()
            if x is None or x is not b():
                return False
        return True


LABEL_KEYS = ("labels", "label", "label_ids")
"""Where a dict item keeps its target, first found first (Hugging Face's names; its data collators
rename ``label`` / ``label_ids`` to ``labels``)."""
PAD_LABEL = -100
"""Label of padded positions (ignored by the token losses of :mod:`diffin.integrations.huggingface`)."""


def _is_item_dataset(data: Any) -> bool:
    """A map-style dataset: a torch ``Dataset``, or a table of items such as a Hugging Face
    ``datasets.Dataset`` (``__getitem__``, ``__len__`` and ``column_names``)."""
    if isinstance(data, (tuple, list)):
        return False
    return isinstance(data, Dataset) or (
        hasattr(data, "column_names") and hasattr(data, "__getitem__") and hasattr(data, "__len__"))


def collate_dicts(items: Sequence[Mapping[str, Any]], name: str = "train") -> tuple[dict[str, Tensor], Tensor]:
    """Dict items (tokenized text: ``{"input_ids": [...], "attention_mask": [...], "labels": 3}``) as one
    batch ``(inputs, targets)``: the target is the item's ``labels`` (or ``label`` / ``label_ids``),
    the inputs every other numeric entry (strings and ``None`` are left out, as the model takes none).
    Sequences of different lengths are padded on the right to the longest of the batch, as
    ``DataCollatorWithPadding`` does: inputs with 0 (the attention mask then hides them), labels with
    -100 (ignored by the token losses)."""
    first = items[0]
    key = next((k for k in LABEL_KEYS if k in first), None)
    if key is None:
        raise DataMismatchError(
            f"the {name} items are dicts without a label ({sorted(first)}); put the target under 'labels' "
            "(or 'label' / 'label_ids')"
        )
    cols = [k for k, v in first.items() if k not in LABEL_KEYS and not isinstance(v, (str, bytes)) and v is not None]
    x = {k: _stack_padded([it[k] for it in items], 0, f"{name} column {k!r}") for k in cols}
    y = _stack_padded([it[key] for it in items], PAD_LABEL, f"{name} column {key!r}")
    return x, y


def _stack_padded(values: list[Any], pad: int, what: str) -> Tensor:
    ts = [v if isinstance(v, Tensor) else torch.as_tensor(np.asarray(v)) for v in values]
    shapes = {tuple(t.shape) for t in ts}
    if len(shapes) == 1:
        return torch.stack(ts)
    if any(t.ndim != 1 for t in ts):
        raise DataMismatchError(f"{what}: items of shapes {sorted(shapes)[:4]} cannot be padded into one batch; "
                                "only 1-D sequences of different lengths are padded")
    out = torch.full((len(ts), max(int(t.shape[0]) for t in ts)), pad, dtype=ts[0].dtype)
    for i, t in enumerate(ts):
        out[i, : t.shape[0]] = t
    return out


def _row_blocks(a: Any, max_bytes: int = 1 << 26) -> Iterator[Any]:
    """Consecutive blocks of rows of an array or tensor, each at most ``max_bytes`` (one row at least)."""
    if a.ndim == 0 or a.shape[0] == 0:
        yield a.reshape(-1)
        return
    row = max(1, a[:1].nbytes if isinstance(a, np.ndarray) else a[:1].numel() * a.element_size())
    step = max(1, max_bytes // row)
    for start in range(0, a.shape[0], step):
        yield a[start : start + step]


def check_id_groups(
    groups: Sequence[Any], n: int, what: str = "group", allow_empty: bool = False
) -> list[np.ndarray]:
    """Validate groups of training ids: each a non-empty 1-D integer array inside [0, n).

    Returns them as int64 arrays of unique sorted ids. Raises :class:`InvalidIdsError` naming
    the first bad group and its out-of-range ids. ``allow_empty``: an empty group is a removal of
    nothing (ground truth, group scores) instead of an error.
    """
    out = []
    for k, g in enumerate(groups):
        arr = np.asarray(g)
        if arr.size == 0:
            if allow_empty:
                out.append(np.zeros(0, dtype=np.int64))
                continue
            raise InvalidIdsError(f"{what} {k} is empty; every {what} needs at least one id")
        if arr.dtype.kind not in "iu":
            raise InvalidIdsError(f"{what} {k} holds non-integer ids (dtype {arr.dtype})")
        arr = np.unique(arr.astype(np.int64).reshape(-1))
        bad = arr[(arr < 0) | (arr >= n)]
        if bad.size:
            raise InvalidIdsError(
                f"{what} {k} holds ids outside [0, {n}): {bad[:5].tolist()}; ids are row numbers "
                "of the training data"
            )
        out.append(arr)
    return out
