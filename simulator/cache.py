"""Where sflsim keeps what it measures or computes once (cut profiles, tokenised text), and
how an entry names the code it came from.

``$SFLSIM_CACHE`` names the folder (``off``, ``0``, ``none`` or ``false`` turns caching off);
unset: ``$XDG_CACHE_HOME/sflsim``, else ``~/.cache/sflsim``. Each kind of entry has its own
subfolder (``profiles/``, ``tokens/``).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional

#: Environment variable naming the cache folder; ``off`` turns every cache off.
CACHE_ENV = "SFLSIM_CACHE"


def cache_folder(kind: str) -> Optional[Path]:
    """The folder of one kind of cached entry, or None when ``$SFLSIM_CACHE`` is ``off``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env.lower() in ("off", "0", "none", "false"):
        return None
    if env:
        return Path(env).expanduser() / kind
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "sflsim" / kind


def source_digest(base: Path, names: Iterable[str]) -> str:
    """SHA-256 of the named source files under ``base`` (name and bytes of each): an edit of
    that code changes it, so entries made by older code are not found."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + (base / name).read_bytes() + b"\0")
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync and a
    rename: a reader sees the old entry or the whole new one, never part of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
