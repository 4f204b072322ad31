"""Ids from ordinary data: ``diffin.with_ids`` and the Datasets ``train=`` / ``target=`` accept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import diffin
from _tiny import ce
from diffin._data import DataSource, fingerprint


class _Triples(Dataset):
    """A user's own dataset yielding ``(id, x, y)``; ``shift`` gives item i the wrong id i + shift."""

    def __init__(self, X: torch.Tensor, Y: torch.Tensor, shift: int = 0) -> None:
        self.X, self.Y, self.shift = X, Y, shift

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int):
        return (i + self.shift) % len(self.X), self.X[i], self.Y[i]


def test_with_ids_items_and_a_shuffled_loader_yield_each_rows_own_index():
    X = torch.arange(40, dtype=torch.float64).reshape(20, 2)
    Y = torch.arange(20) % 3
    ds = diffin.with_ids(TensorDataset(X, Y))
    assert len(ds) == 20
    i, x, y = ds[7]
    assert i == 7 and torch.equal(x, X[7]) and int(y) == int(Y[7])
    assert ds[-1][0] == 19  # negative indices name the same row as the positive one
    with pytest.raises(IndexError):
        ds[20]
    seen = []
    for ids, x, y in DataLoader(ds, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(3)):
        assert ids.dtype == torch.int64 and ids.shape == (x.shape[0],)
        assert torch.equal(x, X[ids]) and torch.equal(y, Y[ids])
        seen += ids.tolist()
    assert sorted(seen) == list(range(20)) and seen != list(range(20))  # shuffled, every row once


def test_with_ids_refuses_what_it_cannot_wrap():
    with pytest.raises(diffin.DataMismatchError, match="TensorDataset"):
        diffin.with_ids((torch.zeros(3, 2), torch.zeros(3)))
    bad = diffin.with_ids(TensorDataset(torch.zeros(3, 2)))  # items are 1-tuples, not (input, target)
    with pytest.raises(diffin.DataMismatchError, match=r"\(input, target\) pairs"):
        bad[0]


def _train_with_loader(path, X, Y, *, batch: int, epochs: int) -> nn.Module:
    """The README loop: a shuffled DataLoader over with_ids(...), plain SGD, Recorder."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(X.shape[1], 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    loader = DataLoader(diffin.with_ids(TensorDataset(X, Y)), batch_size=batch, shuffle=True,
                        generator=torch.Generator().manual_seed(1))
    with diffin.Recorder(path, model, optimizer=opt, checkpoint_every=3) as rec:
        for _ in range(epochs):
            for ids, x, y in loader:
                loss = ce(model(x), y).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                rec.step(ids, lr=opt.param_groups[0]["lr"])
    return model


@pytest.fixture
def loader_run(tmp_path):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(22, 4, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (22,), generator=g)
    Xv = torch.randn(6, 4, generator=g, dtype=torch.float64)
    Yv = torch.randint(0, 3, (6,), generator=g)
    model = _train_with_loader(tmp_path / "run", X, Y, batch=5, epochs=2)
    return tmp_path / "run", model, X, Y, Xv, Yv


def test_train_accepts_the_wrapped_the_plain_and_an_id_dataset_alike(loader_run):
    run, model, X, Y, Xv, Yv = loader_run
    ref = diffin.influence(run, model, ce, train=(X, Y), target=(Xv, Yv), progress=False)
    assert ref.shape == (22,) and np.all(np.isfinite(ref)) and np.abs(ref).max() > 0
    tol = dict(rtol=1e-12, atol=1e-14 * np.abs(ref).max())
    for train in (diffin.with_ids(TensorDataset(X, Y)), TensorDataset(X, Y), _Triples(X, Y)):
        got = diffin.influence(run, model, ce, train=train, target=(Xv, Yv), progress=False)
        np.testing.assert_allclose(got, ref, **tol)
    # target= takes them too (the mean loss over the same rows)
    got = diffin.influence(run, model, ce, train=(X, Y), target=diffin.with_ids(TensorDataset(Xv, Yv)),
                           progress=False)
    np.testing.assert_allclose(got, ref, **tol)
    got = diffin.influence(run, model, ce, train=(X, Y), target=_Triples(Xv, Yv), progress=False)
    np.testing.assert_allclose(got, ref, **tol)


def test_an_id_dataset_whose_item_i_carries_another_id_is_refused_by_name(loader_run):
    run, model, X, Y, Xv, Yv = loader_run
    with pytest.raises(diffin.DatasetIdError, match=r"item 0 carries id 1.*with_ids"):
        diffin.influence(run, model, ce, train=_Triples(X, Y, shift=1), target=(Xv, Yv), progress=False)


def test_data_source_reads_triples_and_refuses_three_part_items_without_an_integer_id():
    X = torch.randn(5, 2, dtype=torch.float64)
    Y = torch.arange(5)
    src = DataSource(_Triples(X, Y), torch.float64, torch.device("cpu"))
    x, y = src.get([3, 1])
    assert torch.equal(x, X[[3, 1]]) and torch.equal(y, Y[[3, 1]])
    src = DataSource(TensorDataset(X, X, Y), torch.float64, torch.device("cpu"))  # (x, x2, y): no id
    with pytest.raises(diffin.DataMismatchError, match="not an integer id"):
        src.get([0])


def test_fingerprint_of_the_wrapped_dataset_is_the_fingerprint_of_the_plain_one():
    X = torch.randn(5, 2, dtype=torch.float64)
    Y = torch.arange(5)
    assert fingerprint(diffin.with_ids(TensorDataset(X, Y))) == fingerprint(TensorDataset(X, Y))
    Y2 = Y.clone()
    Y2[0] = 4
    assert fingerprint(TensorDataset(X, Y2)) != fingerprint(TensorDataset(X, Y))
    assert fingerprint((X, {"a": Y})) != fingerprint((X, {"a": Y2}))  # dict items hash by content


def test_fingerprint_hashes_tensors_in_bounded_blocks_with_the_same_result():
    from diffin._data import _row_blocks

    X = torch.randn(50, 3, dtype=torch.float64)
    blocks = list(_row_blocks(X, max_bytes=3 * 8 * 7))  # 7 rows per block
    assert [len(b) for b in blocks] == [7] * 7 + [1] and torch.equal(torch.cat(blocks), X)
    assert fingerprint((X, X[:, 0])) == fingerprint((X.numpy(), X[:, 0].numpy()))  # tensor or array alike
    assert fingerprint(X[:, ::2]) == fingerprint(X[:, ::2].contiguous())  # strided views by content
    assert fingerprint(X.float()) != fingerprint(X)  # the dtype is part of the hash
