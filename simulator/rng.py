"""Keyed random generators: every random draw in sflsim comes from here.

A generator is a pure function of (seed, stream, *key). Streams separate concerns so that
changing the time model never changes what the model learns, and vice versa
(see docs/time-model.md, "common random numbers"):

- ``time``  device speeds, per-operation delays, wireless distances (latency models)
- ``data``  partitions, minibatch order, ``train_limit``/``test_limit`` subsets, the validation split
- ``init``  model initialisation
- ``zo``    zeroth-order directions
- ``algo``  algorithm choices (client sampling per round, GAS replacement, generated samples)
- ``eval``  the training-time evaluation subset of the test set (``runner.eval_subset``)

Key parts may be ints or strings. Strings are mapped to ints with a stable digest, never with
Python's ``hash()`` (salted per process). This module is the only place that touches torch's
global RNG (``seeded_torch``), and it restores it afterwards.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator, Union

import numpy as np

KeyPart = Union[int, str]

_MASK64 = (1 << 64) - 1


def _as_int(part: KeyPart) -> int:
    if isinstance(part, (bool, np.bool_)):
        return int(part)
    if isinstance(part, (int, np.integer)):
        v = int(part)
        # SeedSequence needs non-negative entries; keep negatives distinct from positives.
        return v if v >= 0 else (1 << 63) + (-v)
    if isinstance(part, str):
        return int.from_bytes(hashlib.blake2b(part.encode(), digest_size=8).digest(), "little")
    raise TypeError(f"rng key parts must be int or str, got {type(part).__name__}: {part!r}")


def seed_sequence(seed: int, stream: str, *key: KeyPart) -> np.random.SeedSequence:
    """The SeedSequence for (seed, stream, *key)."""
    return np.random.SeedSequence([_as_int(seed), _as_int(stream), *(_as_int(k) for k in key)])


def generator(seed: int, stream: str, *key: KeyPart) -> np.random.Generator:
    """A numpy Generator that depends only on (seed, stream, *key)."""
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, stream, *key)))


def int_seed(seed: int, stream: str, *key: KeyPart) -> int:
    """A 63-bit integer seed derived from (seed, stream, *key), for torch generators."""
    return int(seed_sequence(seed, stream, *key).generate_state(1, dtype=np.uint64)[0]) & (
        (1 << 63) - 1
    )


def torch_generator(seed: int, stream: str, *key: KeyPart, device: str = "cpu"):
    """A torch.Generator that depends only on (seed, stream, *key)."""
    import torch

    g = torch.Generator(device=device)
    g.manual_seed(int_seed(seed, stream, *key))
    return g


@contextlib.contextmanager
def seeded_torch(seed: int, stream: str, *key: KeyPart) -> Iterator[None]:
    """Run a block (e.g. building a model with torch's default init) under a keyed seed.

    torch's global RNG state is saved and restored, so nothing outside the block is affected.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int_seed(seed, stream, *key))
        yield
