"""Where dataset files are looked for: one search order for image and text datasets alike.

Nothing here downloads or reads a dataset. In order (the first folder holding a complete copy
wins):

1. the ``root`` argument (a scenario's ``data.root``),
2. the environment variable ``SFLSIM_DATA``,
3. Debian's ``/usr/share/datasets/<name-with-dashes>`` (``apt-get install dataset-fashion-mnist``).

Within each of these a dataset's usual subfolder names are tried first (``fashion-mnist``,
``FashionMNIST/raw``, ``cifar-10-batches-py``, ...), then the folder itself. A dataset that is
nowhere raises ``DatasetNotFoundError`` naming every place looked at and how to get the files.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from simulator.errors import DatasetNotFoundError

ENV_VAR = "SFLSIM_DATA"
#: Read at call time, through ``debian_dir()`` (tests point it elsewhere).
DEBIAN_DATASETS_DIR = Path("/usr/share/datasets")

PathLike = Union[str, "os.PathLike[str]"]


def debian_dir() -> Path:
    """Debian's datasets folder (``DEBIAN_DATASETS_DIR``, read now)."""
    return DEBIAN_DATASETS_DIR


def search_roots(root: Optional[PathLike], fallbacks: bool = True) -> tuple[list[Path], list[str]]:
    """The roots to search in order, and notes on the sources that were not given.

    ``fallbacks=False`` with a root: that root only (``sflsim validate`` and ``run`` hold a
    scenario's ``data.root`` to its word instead of quietly reading another copy).
    """
    roots: list[Path] = []
    notes: list[str] = []
    if root is not None and str(root) != "":
        roots.append(Path(root).expanduser())
        if not fallbacks:
            return roots, [f"data.root is set, so ${ENV_VAR} and {debian_dir()} were not searched"]
    else:
        notes.append("data.root not given")
    env = os.environ.get(ENV_VAR, "")
    if env:
        roots.append(Path(env).expanduser())
    else:
        notes.append(f"${ENV_VAR} not set")
    return roots, notes


def not_found(name: str, looked: Sequence[str], notes: Sequence[str], how: str) -> DatasetNotFoundError:
    """The one-line error for a dataset that is nowhere: every place looked at, then ``how``."""
    noted = f" ({', '.join(notes)})" if notes else ""
    return DatasetNotFoundError(
        f"dataset {name!r} not found; looked in: {'; '.join(looked)}{noted}. To get it: {how}"
    )


def find_folder(
    name: str,
    root: Optional[PathLike],
    *,
    subdirs: Sequence[str],
    missing: Callable[[Path], list[str]],
    how_to_get: str,
    fallbacks: bool = True,
) -> Path:
    """The first folder holding a complete copy of ``name`` (``missing(folder)`` is empty).

    Each root (see the module docstring) is tried with each of ``subdirs`` ("" is the root
    itself), then Debian's folder for ``name`` (with ``fallbacks=False`` and a root: that
    root only). Raises DatasetNotFoundError otherwise.
    """
    roots, notes = search_roots(root, fallbacks)
    only_root = not fallbacks and root is not None and str(root) != ""
    debian = () if only_root else (debian_dir() / name.replace("_", "-"),)
    candidates = [r / sub if sub else r for r in (*roots, *debian) for sub in subdirs]
    looked: list[str] = []
    for folder in dict.fromkeys(candidates):
        if not folder.is_dir():
            looked.append(str(folder))
            continue
        lacks = missing(folder)
        if not lacks:
            return folder
        looked.append(f"{folder} (lacks {', '.join(lacks)})")
    raise not_found(
        name, looked, notes,
        f"{how_to_get}; or set data.root or ${ENV_VAR} to the folder that holds it.",
    )
