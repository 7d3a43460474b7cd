"""Datasets from local files, and how their samples are shared out among clients.

``DATASETS`` is the one list of dataset names: the scenario's ``data.dataset`` values, its
image/text pairing check and ``sflsim list`` all read it. Each entry has ``name``, ``kind``
(``"image"`` or ``"text"``: which models it goes with), ``summary`` (one line) and
``load(root, ...)``. The entries live next to their code:

- ``images.py``: ``IMAGE_DATASETS`` (files, format reader, classes), ``Dataset``, ``load_dataset``;
  the readers of each file format are in ``formats.py``;
- ``text.py``: ``TEXT_DATASETS``, ``TextDataset``, ``load_text_dataset``;
- ``locate.py``: where files are looked for (``data.root``, ``$SFLSIM_DATA``, Debian's folder);
- ``partitions.py``: class-stratified subsets and the client partitions (iid, dirichlet, shards).

To add a dataset: write its reader (a function in ``formats.py``, or a ``read`` for a text
dataset) and add one entry to ``IMAGE_DATASETS`` or ``TEXT_DATASETS``.

Nothing here downloads: a missing dataset raises ``DatasetNotFoundError`` naming every place
looked at and how to get the files. No module of this package imports this one. Settings
that tests change live in their module: ``locate.DEBIAN_DATASETS_DIR``,
``partitions.DIRICHLET_MAX_ATTEMPTS``.
"""
from __future__ import annotations

from typing import Any, Protocol

from simulator.data.formats import DatasetFormatError, read_idx
from simulator.data.images import (
    IMAGE_DATASETS,
    Dataset,
    clear_cache,
    load_dataset,
    locate_dataset,
)
from simulator.data.locate import ENV_VAR, search_roots
from simulator.data.partitions import (
    PARTITIONS,
    check_limit,
    label_histogram,
    partition,
    stratified_subset,
)
from simulator.data.text import TEXT_DATASETS, TextDataset, TextFormatError, load_text_dataset
from simulator.errors import DatasetNotFoundError


class DatasetSpec(Protocol):
    """What every ``DATASETS`` entry has."""

    kind: str  # "image" (load -> Dataset) or "text" (load(..., tokenizer, max_len) -> TextDataset)
    name: str
    summary: str  # one line for `sflsim list` and docs/scenarios.md

    def load(self, root: Any = None, **options: Any) -> Any: ...


#: Every dataset, images first, in the order `sflsim list` and the schema show them.
DATASETS: dict[str, DatasetSpec] = {**IMAGE_DATASETS, **TEXT_DATASETS}

__all__ = [
    "DATASETS",
    "ENV_VAR",
    "IMAGE_DATASETS",
    "PARTITIONS",
    "TEXT_DATASETS",
    "Dataset",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "TextDataset",
    "TextFormatError",
    "check_limit",
    "clear_cache",
    "label_histogram",
    "load_dataset",
    "load_text_dataset",
    "locate_dataset",
    "partition",
    "read_idx",
    "search_roots",
    "stratified_subset",
]
