"""Training and target data memory-mapped from .npy files: read by batch ids, never loaded whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import diffin
from _cli_project import inside, make_project
from _tiny import assert_close, record
from diffin import _data
from diffin._data import DataSource, fingerprint
from diffin._measure import Measure
from diffin.cli import main

CPU = torch.device("cpu")


def _save(folder, **arrays):
    folder.mkdir(parents=True, exist_ok=True)
    for k, a in arrays.items():
        np.save(folder / f"{k}.npy", np.asarray(a))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return record(tmp_path_factory.mktemp("mm") / "r", n=18, epochs=2, every=3)


@pytest.mark.parametrize("method", ["diffin-exact", "diffin-closed-form", "tracin"])
def test_memmapped_scores_equal_in_memory(tmp_path, tiny, method):
    folder = _save(tmp_path / "npy", x_train=tiny.X, y_train=tiny.Y, x_val=tiny.Xv, y_val=tiny.Yv)
    train, val = diffin.memmap_arrays(folder), diffin.memmap_arrays(folder, part="val")
    assert all(isinstance(a, np.memmap) for a in (*train, *val))
    got = diffin.influence(tiny.run, tiny.make(), tiny.loss, train=train, target=val, method=method,
                           progress=False)
    want = diffin.influence(tiny.run, tiny.make(), tiny.loss, train=(tiny.X, tiny.Y), target=(tiny.Xv, tiny.Yv),
                            method=method, progress=False)
    assert_close(got, want)
    # the two .npy paths, self-influence
    pair = diffin.memmap_arrays([folder / "x_train.npy", folder / "y_train.npy"])
    got = diffin.influence(tiny.run, tiny.make(), tiny.loss, train=pair, target="self", method="tracin",
                           progress=False)
    want = diffin.influence(tiny.run, tiny.make(), tiny.loss, train=(tiny.X, tiny.Y), target="self",
                            method="tracin", progress=False)
    assert_close(got, want)


class _Counting(np.ndarray):
    """An array view that records every index it is read with (rows asked of it)."""

    reads: list

    def __getitem__(self, key):
        type(self).reads.append(key)
        return np.asarray(self)[key]


def test_only_the_fetched_rows_are_read(tmp_path):
    folder = _save(tmp_path / "npy", x_train=np.arange(40.0).reshape(20, 2), y_train=np.arange(20))
    x, y = diffin.memmap_arrays(folder)
    src = DataSource((x, y), torch.float64, CPU)
    assert src.x is x and src.y is y  # the memmaps themselves, no tensor copy of all rows
    _Counting.reads = []
    src.x, src.y = x.view(_Counting), y.view(_Counting)
    bx, by = src.get([3, 17, 5])
    assert [np.asarray(k).tolist() for k in _Counting.reads] == [[3, 17, 5], [3, 17, 5]]
    np.testing.assert_array_equal(bx.numpy(), [[6, 7], [34, 35], [10, 11]])
    np.testing.assert_array_equal(by.numpy(), [3, 17, 5])
    assert bx.dtype == torch.float64 and by.dtype == torch.int64
    _Counting.reads = []
    chunks = list(src.chunks(8))
    assert _Counting.reads == [slice(0, 8), slice(0, 8), slice(8, 16), slice(8, 16), slice(16, 20), slice(16, 20)]
    np.testing.assert_array_equal(torch.cat([c[1] for c in chunks]).numpy(), np.arange(40.0).reshape(20, 2))


def test_memmap_rows_are_cast_to_the_model_dtype(tmp_path):
    folder = _save(tmp_path / "npy", x_train=np.ones((5, 3), np.float32), y_train=np.zeros(5, np.int32))
    src = DataSource(diffin.memmap_arrays(folder), torch.float64, CPU)
    x, y = src.get(np.array([0, 4]))
    assert x.dtype == torch.float64 and y.dtype == torch.int32 and x.shape == (2, 3)
    assert src.x.dtype == np.float32  # the file's array is untouched


def test_fingerprint_and_finiteness_stream_a_memmap(tmp_path, monkeypatch):
    X = np.random.default_rng(0).normal(size=(300, 4))
    Y = np.arange(300)
    folder = _save(tmp_path / "npy", x_train=X, y_train=Y)
    monkeypatch.setattr(_data, "MMAP_RESIDENT_BYTES", 1024)  # many small blocks, each released
    pair = diffin.memmap_arrays(folder)
    assert fingerprint(pair) == fingerprint((X, Y)) == fingerprint((X.copy(), Y.copy()))
    X[7, 2] = np.nan
    assert fingerprint(pair) != fingerprint((X, Y))
    _save(folder, x_train=X)
    src = DataSource(diffin.memmap_arrays(folder), torch.float64, CPU)
    with pytest.raises(diffin.NonFiniteDataError, match=r"first ids: \[7\]"):
        src.check_finite(16)


def test_memmap_of_another_length_is_refused(tmp_path, tiny):
    short = _save(tmp_path / "short", x_train=tiny.X[:15], y_train=tiny.Y[:15])
    with pytest.raises(diffin.DataMismatchError, match="recorded with n_train=18 but the training data given has 15"):
        diffin.influence(tiny.run, tiny.make(), tiny.loss, train=diffin.memmap_arrays(short), target="self",
                         progress=False)
    longer = _save(tmp_path / "long", x_train=torch.cat([tiny.X, tiny.X[:2]]), y_train=torch.cat([tiny.Y, tiny.Y[:2]]))
    with pytest.raises(diffin.DataMismatchError, match="recorded with n_train=18 but the training data given has 20"):
        diffin.influence(tiny.run, tiny.make(), tiny.loss, train=diffin.memmap_arrays(longer), target="self",
                         progress=False)


def test_memmap_arrays_refuses_bad_files(tmp_path):
    with pytest.raises(diffin.DataMismatchError, match="is not a folder"):
        diffin.memmap_arrays(tmp_path / "nowhere")
    folder = _save(tmp_path / "a", x_train=np.zeros((4, 2)))
    with pytest.raises(diffin.DataMismatchError, match="y_train.npy does not exist"):
        diffin.memmap_arrays(folder)
    _save(folder, y_train=np.zeros(3))
    with pytest.raises(diffin.DataMismatchError, match="has 4 rows but .*y_train.npy has 3"):
        diffin.memmap_arrays(folder)
    np.save(folder / "y_train.npy", np.array([object(), 1, 2, 3], dtype=object))
    with pytest.raises(diffin.DataMismatchError, match="cannot memory-map"):
        diffin.memmap_arrays(folder)
    (folder / "y_train.npy").write_bytes(b"not an array")
    with pytest.raises(diffin.DataMismatchError, match="cannot memory-map"):
        diffin.memmap_arrays(folder)
    with pytest.raises(diffin.DataMismatchError, match="two .npy paths"):
        diffin.memmap_arrays([folder / "x_train.npy"])


def test_cli_data_folder_is_memory_mapped(tmp_path, monkeypatch, capsys):
    with inside(tmp_path, monkeypatch) as folder:
        make_project(folder)
        with np.load(folder / "data.npz") as f:
            _save(folder / "npy", **{k: f[k] for k in f.files})
        assert main(["score", "run", "--model", "mymodels:build", "--data", "data.npz", "--out", "a", "--quiet"]) == 0
        assert main(["score", "run", "--model", "mymodels:build", "--data", "npy", "--out", "b", "--quiet"]) == 0
        want, got = np.load(folder / "a" / "scores.npy"), np.load(folder / "b" / "scores.npy")
        assert_close(got, want)
        from diffin.cli import _user

        d = _user.load_npz(folder / "npy")
        assert isinstance(d["x_train"], np.memmap) and isinstance(d["y_train"], torch.Tensor)
        assert _user.split(d, "train", torch.float64, "cross_entropy")[0] is d["x_train"]
        (folder / "npy" / "y_val.npy").unlink()
        np.save(folder / "npy" / "y_val.npy", np.zeros(2, np.int64))
        assert main(["score", "run", "--model", "mymodels:build", "--data", "npy", "--quiet"]) == 2
        assert "x_val.npy has 6 rows but y_val.npy has 2" in capsys.readouterr().err
        (folder / "npy" / "y_train.npy").unlink()
        assert main(["score", "run", "--model", "mymodels:build", "--data", "npy", "--quiet"]) == 2
        assert "lacks ['y_train.npy']" in capsys.readouterr().err


def _big_memmap_run(tmp_path, n: int, d: int = 64, k: int = 10):
    """A float32 (n, d) memmap written chunk by chunk (never whole in memory) and a tiny linear
    model trained on it for 6 steps of 256, recorded."""
    x = np.lib.format.open_memmap(tmp_path / "x_train.npy", mode="w+", dtype=np.float32, shape=(n, d))
    y = np.lib.format.open_memmap(tmp_path / "y_train.npy", mode="w+", dtype=np.int64, shape=(n,))
    rng = np.random.default_rng(0)
    for s in range(0, n, 50_000):
        e = min(s + 50_000, n)
        x[s:e] = rng.normal(size=(e - s, d)).astype(np.float32)
        y[s:e] = rng.integers(0, k, e - s)
    x.flush(), y.flush()
    del x, y
    train = diffin.memmap_arrays(tmp_path)
    torch.manual_seed(0)
    model = nn.Linear(d, k)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with diffin.Recorder(tmp_path / "run", model, optimizer=opt, checkpoint_every=3, n_train=n) as rec:
        for _ in range(6):
            ids = torch.from_numpy(rng.choice(n, 256, replace=False))
            xb = torch.from_numpy(np.asarray(train[0][ids.numpy()]))
            yb = torch.from_numpy(np.asarray(train[1][ids.numpy()]))
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            rec.step(ids)
    val = (torch.randn(32, d), torch.randint(0, k, (32,)))
    return diffin.memmap_arrays(tmp_path), val  # fresh mappings: none of the array resident


def _memory_check(tmp_path, n: int) -> None:
    train, val = _big_memmap_run(tmp_path, n)
    size_mb = train[0].nbytes / 2**20
    loss = lambda o, t: nn.functional.cross_entropy(o, t, reduction="none")  # noqa: E731
    torch.manual_seed(0)
    with Measure() as m:
        scores = diffin.influence(tmp_path / "run", nn.Linear(64, 10), loss, train=train, target=val,
                                  method="diffin-exact", progress=False)
    assert scores.shape == (n,) and np.isfinite(scores).all()
    # the whole array was read (fingerprint, finiteness, the per-sample pass), its pages handed back
    print(f"N={n}: array {size_mb:.1f} MiB, scoring raised the RSS by {m.rise_mb:.1f} MiB")
    assert m.rise_mb < size_mb, (m.rise_mb, size_mb)
    with Measure() as control:  # reading it whole through the mapping does show in the RSS
        float(np.asarray(train[0]).sum(dtype=np.float64))
    assert control.rise_mb > 0.8 * size_mb, (control.rise_mb, size_mb)


@pytest.mark.filterwarnings("ignore::diffin.UntrainedRowsWarning")  # 6 steps of 256 rows trained
def test_memmap_scoring_memory_stays_below_the_array(tmp_path):
    """200,000 × 64 float32 (49 MiB) memory-mapped: the whole array is read (fingerprint,
    finiteness, the per-sample pass) but the RSS rises by less than its size (measured: 7–28 MiB,
    bounded by MMAP_RESIDENT_BYTES plus one batch of scattered rows with the pages mapped around them)."""
    _memory_check(tmp_path, 200_000)


def test_get_many_reads_the_rows_of_several_batches_once(tmp_path, monkeypatch):
    """DataSource.get_many: the same rows as one get per batch (repeated ids, batches that share
    rows), read in pieces of the page budget's span; the memory-mapped replay reads ahead."""
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(500, 3)).astype(np.float32), rng.integers(0, 4, 500)
    folder = _save(tmp_path / "npy", x_train=X, y_train=Y)
    monkeypatch.setattr(_data, "MMAP_RESIDENT_BYTES", 256)  # budget: a quarter of the array; pieces of 62 rows
    src = DataSource(diffin.memmap_arrays(folder), torch.float64, CPU)
    assert src.mapped and not DataSource((torch.as_tensor(X), torch.as_tensor(Y)), torch.float64, CPU).mapped
    batches = [rng.integers(0, 500, 32) for _ in range(5)] + [np.array([7, 7, 3])]
    for (x, y), ids in zip(src.get_many(batches), batches, strict=True):
        want_x, want_y = src.get(ids)
        assert torch.equal(x, want_x) and torch.equal(y, want_y) and x.dtype == torch.float64
