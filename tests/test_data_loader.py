"""``diffin.loader``: a Dataset read through a DataLoader (worker processes) for the streamed passes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import diffin
from _tiny import assert_close, record
from diffin._data import DataSource
from diffin._errors import DataMismatchError


class Items(Dataset):
    """(x, y) items from tensors, counting the items read in this process."""

    def __init__(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        self.X, self.Y, self.reads = X, Y, 0

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        return self.X[i], self.Y[i]


@pytest.mark.parametrize("method", ["diffin-exact", "diffin-expected", "diffin-closed-form"])
def test_scores_through_a_loader_with_workers_equal_in_memory(tmp_path: Path, method: str) -> None:
    tiny = record(tmp_path / "run")
    ref = tiny.score(method).scores
    items = Items(tiny.X, tiny.Y)
    got = diffin.score(tiny.run, tiny.make(), tiny.loss, train=diffin.loader(items, num_workers=2),
                       target=(tiny.Xv, tiny.Yv), method=method, progress=False).scores
    assert_close(got, ref)


def test_passes_over_every_row_go_through_the_loader_in_order(tmp_path: Path) -> None:
    tiny = record(tmp_path / "run")
    items = Items(tiny.X, tiny.Y)
    made: list[int] = []

    def make(ds: Dataset, batch_size: int) -> DataLoader:
        made.append(batch_size)
        return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=2, persistent_workers=True)

    src = DataSource(diffin.loader(items, make), torch.float64, torch.device("cpu"))
    for _ in range(2):
        chunks = list(src.chunks(5))
        want = [list(range(s, min(s + 5, len(items)))) for s in range(0, len(items), 5)]
        assert [c[0].tolist() for c in chunks] == want
        assert torch.equal(torch.cat([c[1] for c in chunks]), tiny.X)
    assert made == [5]  # one loader per batch size, reused
    assert items.reads == 0  # the workers read the items, not this process
    x, y = src.get([3, 1])  # a step's batch by id: read here
    assert torch.equal(x, tiny.X[[3, 1]]) and items.reads == 2


def test_a_shuffling_or_dropping_loader_is_refused(tmp_path: Path) -> None:
    tiny = record(tmp_path / "run")
    items = Items(tiny.X, tiny.Y)
    shuffled = DataSource(diffin.loader(items, lambda ds, b: DataLoader(ds, batch_size=b, shuffle=True,
                                                                       generator=torch.Generator().manual_seed(0))),
                          torch.float64, torch.device("cpu"))
    with pytest.raises(DataMismatchError, match="order"):
        list(shuffled.chunks(4))
    dropping = DataSource(diffin.loader(items, lambda ds, b: DataLoader(ds, batch_size=b, drop_last=True)),
                          torch.float64, torch.device("cpu"))
    with pytest.raises(DataMismatchError, match="drop_last"):
        list(dropping.chunks(5))
    with pytest.raises(DataMismatchError):
        diffin.loader((tiny.X, tiny.Y))  # type: ignore[arg-type]


def test_loader_data_hashes_as_its_dataset(tmp_path: Path) -> None:
    from diffin._data import fingerprint

    X, Y = torch.arange(12.0).reshape(6, 2), torch.arange(6)
    items = Items(X, Y)
    assert fingerprint(diffin.loader(items, num_workers=0)) == fingerprint(items)
    assert fingerprint(diffin.loader(Items(X + 1, Y))) != fingerprint(items)
