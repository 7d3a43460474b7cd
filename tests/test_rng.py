"""Keyed generators: pure functions of (seed, stream, key), independent across keys."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from simulator import rng


def test_same_key_same_draws():
    """The same (seed, stream, key) gives the same numbers, every time."""
    a = rng.generator(1, "time", "delay", 3, 7).random(5)
    b = rng.generator(1, "time", "delay", 3, 7).random(5)
    assert np.array_equal(a, b)


def test_any_key_part_changes_the_draws():
    """Changing the seed, the stream or any key part gives different numbers."""
    base = rng.generator(1, "time", "delay", 3, 7).random()
    for other in [(2, "time", "delay", 3, 7), (1, "data", "delay", 3, 7), (1, "time", "speed", 3, 7),
                  (1, "time", "delay", 4, 7), (1, "time", "delay", 3, 8), (1, "time", "delay", 3)]:
        assert rng.generator(*other).random() != base, other


def test_negative_and_positive_ints_differ():
    """-1 and 1 are different key parts."""
    assert rng.int_seed(0, "s", -1) != rng.int_seed(0, "s", 1)


def test_string_keys_are_stable_across_processes():
    """String key parts do not use Python's salted hash(): a fresh process draws the same value."""
    code = "from simulator import rng; print(rng.int_seed(5, 'zo', 'client', 2))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={"PYTHONHASHSEED": str(h), "PATH": ""}, cwd=".").stdout for h in (1, 2)}
    assert len(outs) == 1 and outs.pop().strip() == str(rng.int_seed(5, "zo", "client", 2))


def test_torch_generator_is_keyed():
    """torch generators are keyed the same way."""
    a = torch.randn(4, generator=rng.torch_generator(3, "zo", 1))
    b = torch.randn(4, generator=rng.torch_generator(3, "zo", 1))
    c = torch.randn(4, generator=rng.torch_generator(3, "zo", 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_seeded_torch_restores_global_state():
    """seeded_torch seeds a block and leaves torch's global RNG as it was."""
    state = torch.random.get_rng_state()
    with rng.seeded_torch(0, "init", "mlp"):
        x = torch.rand(3)
    with rng.seeded_torch(0, "init", "mlp"):
        y = torch.rand(3)
    assert torch.equal(x, y)
    assert torch.equal(state, torch.random.get_rng_state())
