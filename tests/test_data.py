"""Tests for simulator/data/ (images, formats, locate, partitions): readers, lookup order, partitions."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from simulator import data
from simulator.data import locate, partitions
from simulator.rng import generator
from simulator.data import (
    DatasetFormatError,
    DatasetNotFoundError,
    label_histogram,
    load_dataset,
    partition,
    read_idx,
)

FMNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No test sees the caller's SFLSIM_DATA, the Debian folder, or another test's cache."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(locate, "DEBIAN_DATASETS_DIR", tmp_path / "no-debian")
    data.clear_cache()
    yield
    data.clear_cache()


# --------------------------------------------------------------------------------------------
# Writers for tiny files in the real formats
# --------------------------------------------------------------------------------------------
def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_idx_set(folder: Path, n_train: int = 20, n_test: int = 10, *, gz: bool = True,
                   dotted: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """Four MNIST-style IDX files; returns the arrays written."""
    rng = generator(seed, "data", "test-fixture")
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for stem, arr in arrays.items():
        kind = "idx3-ubyte" if arr.ndim == 3 else "idx1-ubyte"
        fname = f"{stem}.{kind}" if dotted else f"{stem}-{kind}"
        payload = _idx_bytes(arr)
        if gz:
            (folder / f"{fname}.gz").write_bytes(gzip.compress(payload))
        else:
            (folder / fname).write_bytes(payload)
    return arrays


def _write_cifar10(folder: Path, per_batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """data_batch_1..5 and test_batch as protocol-2 pickles with bytes keys, like the original."""
    rng = generator(1, "data", "test-fixture")
    folder.mkdir(parents=True)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": b"x", b"data": x, b"labels": y,
                         b"filenames": [b"a.png"] * per_batch}, f, protocol=2)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs[:5]), np.concatenate(ys[:5])


def _write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# --------------------------------------------------------------------------------------------
# IDX
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_idx_gz_and_plain_load_with_header_dims(tmp_path, gz):
    """Gzipped and plain IDX files load with the dimensions their headers give."""
    arrays = _write_idx_set(tmp_path / "fashion-mnist", gz=gz)
    ds = load_dataset("fashion_mnist", root=tmp_path)
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["train-labels"])
    # Normalised with train statistics: x = (raw/255 - mean) / std.
    raw = arrays["train-images"].astype(np.float64) / 255
    mean, std = raw.mean(), raw.std()
    np.testing.assert_allclose(ds.channel_mean[0], mean, rtol=1e-12)
    np.testing.assert_allclose(ds.x_train[:, 0].numpy(), (raw - mean) / std, atol=1e-5)
    test_raw = arrays["t10k-images"].astype(np.float64) / 255
    np.testing.assert_allclose(ds.x_test[:, 0].numpy(), (test_raw - mean) / std, atol=1e-5)


def test_idx_dotted_spelling_in_an_mnist_raw_folder(tmp_path):
    """'train-images.idx3-ubyte' names in MNIST/raw are found."""
    _write_idx_set(tmp_path / "MNIST" / "raw", dotted=True, gz=False)
    ds = load_dataset("mnist", root=tmp_path)
    assert len(ds.y_train) == 20 and len(ds.y_test) == 10


def test_read_idx_parses_header(tmp_path):
    """read_idx returns the header's shape and the data bytes, whatever the file is called."""
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "x-idx3-ubyte").write_bytes(_idx_bytes(arr))
    (tmp_path / "y-idx3-ubyte").write_bytes(gzip.compress(_idx_bytes(arr)))  # gz, no .gz name
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "y-idx3-ubyte"), arr)


def test_idx_bad_magic_truncation_and_count_mismatch(tmp_path):
    """Corrupt IDX files raise DatasetFormatError naming the file and the problem."""
    arr = np.zeros((3, 28, 28), dtype=np.uint8)
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x02" + _idx_bytes(arr)[2:])
    with pytest.raises(DatasetFormatError, match="not an IDX file"):
        read_idx(bad_magic)
    truncated = tmp_path / "short.gz"
    truncated.write_bytes(gzip.compress(_idx_bytes(arr)[:-5]))
    with pytest.raises(DatasetFormatError, match="truncated"):
        read_idx(truncated)
    broken_gz = tmp_path / "broken.gz"
    broken_gz.write_bytes(gzip.compress(_idx_bytes(arr))[:40])
    with pytest.raises(DatasetFormatError, match="gzip"):
        read_idx(broken_gz)

    folder = tmp_path / "mnist"
    _write_idx_set(folder, n_train=20)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(_idx_bytes(np.zeros(19, dtype=np.uint8)))
    )
    with pytest.raises(DatasetFormatError, match="20 images but .* 19 labels"):
        load_dataset("mnist", root=tmp_path)


# --------------------------------------------------------------------------------------------
# CIFAR and CINIC
# --------------------------------------------------------------------------------------------
def test_cifar10_pickle_batches(tmp_path):
    """CIFAR-10 python batches load as channel-major (3, 32, 32) with all five train batches."""
    x, y = _write_cifar10(tmp_path / "cifar-10-batches-py")
    ds = load_dataset("cifar10", root=tmp_path)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(ds.y_train.numpy(), y)
    # Pixel (row 1, col 2) of channel 1 of sample 3 is byte 1024 + 32 + 2 of its row.
    px = x[3, 1024 + 32 + 2] / 255
    expect = (px - ds.channel_mean[1]) / ds.channel_std[1]
    assert ds.x_train[3, 1, 1, 2].item() == pytest.approx(expect, abs=1e-5)
    assert torch.allclose(ds.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)


def test_cifar100_fine_labels(tmp_path):
    """CIFAR-100 'train'/'test' pickles use fine_labels and give 100 classes."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split, n in (("train", 6), ("test", 3)):
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": np.full((n, 3072), 7, np.uint8),
                         b"fine_labels": [99 - i for i in range(n)],
                         b"coarse_labels": [0] * n}, f)
    ds = load_dataset("cifar100", root=tmp_path)
    assert ds.num_classes == 100 and ds.y_train.tolist() == [99, 98, 97, 96, 95, 94]
    assert ds.x_test.shape == (3, 3, 32, 32)


def test_cifar_batch_with_numpy1_module_names_loads(tmp_path):
    """Batches pickled by old numpy (numpy.core.multiarray) still load."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split in ("train", "test"):
        blob = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [3, 4]},
                            protocol=2)
        assert b"numpy._core.multiarray" in blob
        (folder / split).write_bytes(blob.replace(b"numpy._core.multiarray",
                                                  b"numpy.core.multiarray"))
    assert load_dataset("cifar100", root=tmp_path).y_test.tolist() == [3, 4]


def test_cifar_pickle_with_foreign_objects_is_refused(tmp_path):
    """A 'batch' that pickles anything but arrays/lists is refused, not executed."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split in ("train", "test"):
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": Path("/etc"), b"fine_labels": [0]}, f)
    with pytest.raises(DatasetFormatError, match="refusing"):
        load_dataset("cifar100", root=tmp_path)


def test_cinic10_png_folders(tmp_path):
    """CINIC-10 PNG folders: classes sorted, gray PNGs become RGB, valid/ is ignored."""
    root = tmp_path / "CINIC-10"
    classes = ["truck", "airplane", "cat"]  # sorted: airplane=0, cat=1, truck=2
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 200
    for split, n in (("train", 2), ("test", 1), ("valid", 5)):
        for cls in classes:
            for i in range(n):
                _write_png(root / split / cls / f"{cls}-{i}.png", rgb)
    _write_png(root / "train" / "cat" / "gray.png", np.full((32, 32), 50, np.uint8))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    ds = load_dataset("cinic10", root=tmp_path)
    assert ds.num_classes == 3 and ds.input_shape == (3, 32, 32)
    assert ds.y_train.tolist() == [0, 0, 1, 1, 1, 2, 2] and ds.y_test.tolist() == [0, 1, 2]
    gray_index = 4  # 2 airplanes, then cat/ sorted: cat-0, cat-1, gray
    g = ds.x_train[gray_index]
    raw = (g * torch.tensor(ds.channel_std)[:, None, None]
           + torch.tensor(ds.channel_mean)[:, None, None]) * 255
    assert torch.allclose(raw, torch.full_like(raw, 50.0), atol=1e-3)
    limited = load_dataset("cinic10", root=tmp_path, train_limit=3, seed=1)
    assert sorted(limited.y_train.tolist()) == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# Lookup order and missing data
# --------------------------------------------------------------------------------------------
def test_missing_dataset_message_names_every_path(tmp_path, monkeypatch):
    """DatasetNotFoundError's one-line message names each folder tried and how to get the data."""
    env = tmp_path / "env"
    monkeypatch.setenv(data.ENV_VAR, str(env))
    (tmp_path / "root" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "root" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", root=tmp_path / "root")
    msg = str(info.value)
    assert "\n" not in msg
    for folder in (tmp_path / "root", tmp_path / "root" / "cifar-10-batches-py", env,
                   env / "cifar-10-batches-py", tmp_path / "no-debian" / "cifar10"):
        assert str(folder) in msg
    assert "lacks data_batch_2" in msg
    assert "cifar-10-python.tar.gz" in msg and "SFLSIM_DATA" in msg


def test_sflsim_data_env_is_honoured(tmp_path, monkeypatch):
    """$SFLSIM_DATA is searched when no root is given, and root comes first when it has the data."""
    _write_idx_set(tmp_path / "env" / "fashion_mnist", n_train=30)
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))
    assert len(load_dataset("fashion_mnist").y_train) == 30
    assert data.locate_dataset("fashion_mnist") == tmp_path / "env" / "fashion_mnist"
    _write_idx_set(tmp_path / "root", n_train=40)  # files directly in the root
    assert len(load_dataset("fashion_mnist", root=tmp_path / "root").y_train) == 40


def test_unknown_dataset_and_bad_limit():
    """Unknown names and non-positive limits are ValueErrors."""
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="train_limit"):
        load_dataset("digits", train_limit=0)


# --------------------------------------------------------------------------------------------
# Bundled datasets and limits
# --------------------------------------------------------------------------------------------
def test_digits_loads_with_fixed_stratified_split():
    """digits: 8x8 single channel, ~80/20 split per class, same split for any seed."""
    ds = load_dataset("digits")
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.y_train) + len(ds.y_test) == 1797
    test_counts = np.bincount(ds.y_test.numpy(), minlength=10)
    all_counts = test_counts + np.bincount(ds.y_train.numpy(), minlength=10)
    np.testing.assert_array_equal(test_counts, np.round(0.2 * all_counts))
    assert abs(ds.x_train.mean().item()) < 1e-5
    assert ds.x_train.std().item() == pytest.approx(1, abs=1e-3)
    again = load_dataset("digits", seed=5)
    assert torch.equal(ds.x_test, again.x_test)


def test_train_limit_is_stratified_and_keyed_by_seed():
    """train_limit keeps class proportions; the subset depends on seed and only on seed."""
    a = load_dataset("digits", train_limit=100, test_limit=50, seed=1)
    b = load_dataset("digits", train_limit=100, test_limit=50, seed=1)
    c = load_dataset("digits", train_limit=100, test_limit=50, seed=2)
    assert len(a.y_train) == 100 and len(a.y_test) == 50
    assert np.bincount(a.y_train.numpy(), minlength=10).min() >= 9
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)


def test_stratified_subset_rounding():
    """Largest-remainder rounding hits the limit exactly."""
    labels = np.array([0] * 5 + [1] * 3 + [2] * 2)
    idx = data.stratified_subset(labels, 7, generator(0, "data", "test-fixture"))
    assert len(idx) == 7 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx]).tolist() == [4, 2, 1]


# --------------------------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------------------------
LABELS = np.repeat(np.arange(10), 100)  # 10 balanced classes of 100
ARGS = {"iid": {}, "dirichlet": {"alpha": 0.5}, "shards": {"shards_per_client": 2}}


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
def test_partition_disjoint_cover_deterministic(kind):
    """Every kind gives sorted disjoint int64 parts covering all indices, fixed by the seed."""
    parts = partition(LABELS, 10, kind, seed=3, **ARGS[kind])
    assert len(parts) == 10
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(LABELS.size))
    again = partition(LABELS, 10, kind, seed=3, **ARGS[kind])
    assert all(np.array_equal(p, q) for p, q in zip(parts, again))
    other = partition(LABELS, 10, kind, seed=4, **ARGS[kind])
    assert any(not np.array_equal(p, q) for p, q in zip(parts, other))


def test_iid_sizes_differ_by_at_most_one():
    """iid parts are as equal as possible."""
    sizes = [len(p) for p in partition(np.zeros(103, np.int64), 10, "iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103


def test_shards_two_per_client_give_two_labels_when_aligned():
    """With class sizes a multiple of the shard size, s=2 gives each client at most 2 labels."""
    parts = partition(LABELS, 10, "shards", seed=0, shards_per_client=2)  # shards of 50
    hist = label_histogram(LABELS, parts, 10)
    assert ((hist > 0).sum(axis=1) <= 2).all()
    assert (hist.sum(axis=1) == 100).all()


def test_shards_label_bound_when_unaligned():
    """Unequal classes: a shard crosses at most the class boundaries, so labels <= M*s + C - 1."""
    rng = generator(0, "data", "test-fixture")
    labels = rng.permutation(np.repeat(np.arange(10), rng.integers(60, 140, 10)))
    for seed in range(5):
        parts = partition(labels, 20, "shards", seed=seed, shards_per_client=2)
        per_client = (label_histogram(labels, parts, 10) > 0).sum(axis=1)
        assert per_client.sum() <= 20 * 2 + 10 - 1
        # Every class is larger than a shard (~25), so a shard spans at most 2 classes.
        assert per_client.max() <= 4


def test_dirichlet_small_alpha_is_more_skewed():
    """Smaller alpha concentrates each client's labels (fewer labels, larger top share)."""
    labels = np.repeat(np.arange(10), 300)

    def skew(alpha: float) -> tuple[float, float]:
        hist = label_histogram(labels, partition(labels, 20, "dirichlet", seed=0, alpha=alpha), 10)
        share = hist / hist.sum(axis=1, keepdims=True)
        return share.max(axis=1).mean(), (hist > 0).sum(axis=1).mean()

    top_small, n_small = skew(0.1)
    top_large, n_large = skew(100.0)
    assert top_small > 0.5 > 0.2 > top_large
    assert n_small < n_large == 10


def test_dirichlet_min_size_and_bounded_retries(monkeypatch):
    """min_size is met when possible; an impossible request fails clearly after bounded draws."""
    parts = partition(LABELS, 10, "dirichlet", seed=0, alpha=0.3, min_size=20)
    assert min(len(p) for p in parts) >= 20
    monkeypatch.setattr(partitions, "DIRICHLET_MAX_ATTEMPTS", 50)
    # Tiny alpha gives each of the 10 classes to about one client: 20 clients cannot all get 40.
    with pytest.raises(ValueError, match="50 draws"):
        partition(LABELS, 20, "dirichlet", seed=0, alpha=0.01, min_size=40)


def test_partition_argument_errors():
    """Bad kinds and arguments raise ValueError with a clear message; unused ones are ignored."""
    with pytest.raises(ValueError, match="unknown partition kind"):
        partition(LABELS, 10, "random", seed=0)
    with pytest.raises(ValueError, match="alpha"):
        partition(LABELS, 10, "dirichlet", seed=0)
    with pytest.raises(ValueError, match="alpha"):
        partition(LABELS, 10, "dirichlet", seed=0, alpha=-1.0)
    with pytest.raises(ValueError, match="shards_per_client"):
        partition(LABELS, 10, "shards", seed=0, shards_per_client=0)
    with pytest.raises(ValueError, match="shards"):
        partition(LABELS[:15], 10, "shards", seed=0, shards_per_client=2)
    with pytest.raises(ValueError, match="num_clients"):
        partition(LABELS, 0, "iid", seed=0)
    with pytest.raises(ValueError, match="at least"):
        partition(LABELS[:5], 10, "iid", seed=0)
    with pytest.raises(ValueError, match="1-D"):
        partition(LABELS.reshape(10, 100), 2, "iid", seed=0)
    assert len(partition(LABELS, 5, "iid", seed=0, alpha=0.5, shards_per_client=2)) == 5


def test_label_histogram_counts():
    """label_histogram counts labels per client."""
    labels = np.array([0, 1, 1, 2, 2, 2])
    hist = label_histogram(labels, [np.array([0, 1]), np.array([2, 3, 4, 5])], 4)
    assert hist.tolist() == [[1, 1, 0, 0], [0, 1, 3, 0]] and hist.dtype == np.int64


def test_dataset_repr_is_short():
    """repr shows sizes, not tensors."""
    ds = load_dataset("digits", train_limit=20, test_limit=10)
    assert repr(ds) == (
        "Dataset(name='digits', train=20, test=10, input_shape=(1, 8, 8), num_classes=10)"
    )


# --------------------------------------------------------------------------------------------
# The real thing
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(
    not (FMNIST_DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_debian_fashion_mnist(monkeypatch):
    """The Debian package's Fashion-MNIST loads as 60000/10000 samples of (1, 28, 28)."""
    monkeypatch.setattr(locate, "DEBIAN_DATASETS_DIR", FMNIST_DEBIAN.parent)
    ds = load_dataset("fashion_mnist")
    assert (len(ds.y_train), len(ds.y_test)) == (60000, 10000)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert np.bincount(ds.y_train.numpy()).tolist() == [6000] * 10
    assert ds.channel_mean[0] == pytest.approx(0.2860, abs=1e-4)
    assert ds.channel_std[0] == pytest.approx(0.3530, abs=1e-4)


# --------------------------------------------------------------------------------------------
# The registry and the package's layering
# --------------------------------------------------------------------------------------------
def test_every_registry_entry_keeps_the_contract():
    """Each DATASETS entry is named by its key, is image or text, has a one-line summary and a
    loader; image entries are exactly what load_dataset accepts, and they come first."""
    for name, spec in data.DATASETS.items():
        assert spec.name == name and spec.kind in ("image", "text")
        assert spec.summary and "\n" not in spec.summary and callable(spec.load)
    kinds = [spec.kind for spec in data.DATASETS.values()]
    assert kinds == sorted(kinds)  # "image" < "text"
    assert [n for n in data.DATASETS if data.DATASETS[n].kind == "image"] == list(data.IMAGE_DATASETS)
    assert [n for n in data.DATASETS if data.DATASETS[n].kind == "text"] == list(data.TEXT_DATASETS)


# Each module of simulator/data/ may import only the modules before it in this list.
LAYERS = ["locate", "partitions", "formats", "images", "text"]


@pytest.mark.parametrize("module", LAYERS)
def test_data_modules_import_only_downwards(module):
    """No module of simulator/data/ imports the package itself or a module at or above its layer."""
    import ast

    path = Path(data.__file__).parent / f"{module}.py"
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("simulator.data"):
            if node.module == "simulator.data":
                imported.update(f"simulator.data.{a.name}" for a in node.names)
            else:
                imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names if a.name.startswith("simulator.data"))
    allowed = {f"simulator.data.{m}" for m in LAYERS[: LAYERS.index(module)]}
    assert imported <= allowed, f"{module}.py imports {sorted(imported - allowed)}"
