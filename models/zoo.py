"""Vision split networks: each model is an ``nn.Sequential`` of named blocks plus its cut table.

A model here never knows where it will be cut and never has a mode-dependent ``forward``:
``models.split.split`` cuts it between blocks. ``BUILDERS`` has one builder per network; its
catalogue entry (``IMAGE_MODELS`` in the torch-free ``models.specs``, re-exported here) holds
its cut table (the user-facing cut number, the papers' L1..L4 -> 1..4, to the number of leading
blocks that go to the client), the smallest input it takes and one line for ``sflsim list``.
Every model ``build_model`` returns carries that table as ``cuts``. Adding an image model is a
builder function here and one entry in ``models.specs``. Initialisation randomness comes only
from ``simulator.rng.seeded_torch``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from models.specs import IMAGE_MODELS, ImageModel  # noqa: F401 - the catalogue entries (torch-free)
from simulator import rng

ModelBuilder = Callable[[int, int, tuple[int, int]], nn.Sequential]


def _feature_numel(
    features: OrderedDict[str, nn.Module],
    in_channels: int,
    input_hw: tuple[int, int],
    model_name: str,
) -> int:
    """Elements per sample after the feature blocks, from a real forward of one zero sample.

    ``features`` are the model's own blocks, already built: the forward draws nothing from
    torch's generator (no dropout in feature blocks), so the initialisation that follows is
    unaffected, and it costs about a millisecond on the CPU. (A forward on the meta device
    would import sympy and torch._dynamo, seconds of start-up.)
    """
    probe = torch.zeros(1, in_channels, *input_hw)
    try:
        with torch.no_grad():
            out = nn.Sequential(features)(probe)
    except RuntimeError as err:
        raise ValueError(
            f"{model_name}: input {in_channels}x{input_hw[0]}x{input_hw[1]} is too small "
            f"for this network ({err})"
        ) from err
    return math.prod(out.shape[1:])


def _alexnet_features(in_channels: int) -> OrderedDict[str, nn.Module]:
    # Layer order and padding follow the public GAS code (AlexNetDown / AlexNetUp): conv 3x3,
    # stride 1, padding 1; max-pool BEFORE ReLU (equivalent to ReLU-then-pool, cheaper).
    # No ReLU after conv3 and conv4 and none between the linears: that is how the public code
    # is (algorithms.md, "Models and cuts"); we keep it so results stay comparable.
    return OrderedDict(
        conv1=nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, stride=1, padding=1),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.ReLU(),
        ),
        conv2=nn.Sequential(
            nn.Conv2d(32, 64, kernel_size=3, stride=1, padding=1),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.ReLU(),
        ),
        conv3=nn.Sequential(nn.Conv2d(64, 128, kernel_size=3, stride=1, padding=1)),
        conv4=nn.Sequential(nn.Conv2d(128, 256, kernel_size=3, stride=1, padding=1)),
        conv5=nn.Sequential(
            nn.Conv2d(256, 256, kernel_size=3, stride=1, padding=1),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.ReLU(),
        ),
    )


def alexnet(in_channels: int, num_classes: int, input_hw: tuple[int, int]) -> nn.Sequential:
    """The AlexNet-style split network of GAS and MU-SplitFed (needs inputs of at least 12x12).

    Cuts: 1 -> [conv1], 2 -> [conv1, conv2] (the papers' default; 64x7x7 on 28x28 inputs,
    64x8x8 on 32x32), 3 -> + conv3, 4 -> all five conv blocks (server = flatten + 3 linears).
    The public code hard-codes the flatten size 256*3*3 (right for 28x28 and 32x32); here it is
    computed from ``input_hw``.
    """
    blocks = _alexnet_features(in_channels)
    flat = _feature_numel(blocks, in_channels, input_hw, "alexnet")
    blocks["flatten"] = nn.Sequential(nn.Flatten())
    blocks["fc1"] = nn.Sequential(nn.Linear(flat, 1024))
    blocks["fc2"] = nn.Sequential(nn.Linear(1024, 512))
    blocks["fc3"] = nn.Sequential(nn.Linear(512, num_classes))
    return nn.Sequential(blocks)


def _small_cnn_features(in_channels: int) -> OrderedDict[str, nn.Module]:
    # 5x5 convs with padding 2 keep the spatial size, so two 2x2 pools work down to 4x4 inputs
    # (8x8 digits -> 32x2x2, 28x28 -> 32x7x7).
    return OrderedDict(
        conv1=nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        ),
        conv2=nn.Sequential(
            nn.Conv2d(16, 32, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        ),
    )


def small_cnn(in_channels: int, num_classes: int, input_hw: tuple[int, int]) -> nn.Sequential:
    """A fast two-conv network for tests and quick runs (needs inputs of at least 4x4).

    Cuts: 1 -> [conv1], 2 -> [conv1, conv2].
    """
    blocks = _small_cnn_features(in_channels)
    flat = _feature_numel(blocks, in_channels, input_hw, "small_cnn")
    blocks["flatten"] = nn.Sequential(nn.Flatten())
    blocks["fc1"] = nn.Sequential(nn.Linear(flat, 64), nn.ReLU())
    blocks["fc2"] = nn.Sequential(nn.Linear(64, num_classes))
    return nn.Sequential(blocks)


def mlp(in_channels: int, num_classes: int, input_hw: tuple[int, int]) -> nn.Sequential:
    """A tiny multilayer perceptron for unit tests.

    Cuts: 1 -> [flatten, fc1], 2 -> [flatten, fc1, fc2].
    """
    n_in = in_channels * input_hw[0] * input_hw[1]
    blocks: OrderedDict[str, nn.Module] = OrderedDict(
        flatten=nn.Sequential(nn.Flatten()),
        fc1=nn.Sequential(nn.Linear(n_in, 128), nn.ReLU()),
        fc2=nn.Sequential(nn.Linear(128, 64), nn.ReLU()),
        fc3=nn.Sequential(nn.Linear(64, num_classes)),
    )
    return nn.Sequential(blocks)


#: The builder of every ``IMAGE_MODELS`` entry (models.specs: cuts, input sizes, summary).
BUILDERS: dict[str, ModelBuilder] = {"alexnet": alexnet, "small_cnn": small_cnn, "mlp": mlp}


def build_model(
    name: str,
    in_channels: int,
    num_classes: int,
    input_hw: tuple[int, int],
    *,
    seed: int,
) -> nn.Sequential:
    """Build registry model ``name`` with torch's default init under the keyed seed (init, name).

    Raises ValueError for an unknown name, non-positive sizes, or an input too small for the
    network. The result has a ``cuts`` attribute, a copy of the entry's cut table.
    """
    if name not in IMAGE_MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(IMAGE_MODELS))}")
    if in_channels < 1 or num_classes < 1:
        raise ValueError(
            f"{name}: in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}"
        )
    hw = tuple(int(v) for v in input_hw)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"{name}: input_hw must be two positive ints, got {input_hw!r}")
    entry = IMAGE_MODELS[name]
    entry.check_input((in_channels, *hw))
    with rng.seeded_torch(seed, "init", name):
        model = BUILDERS[name](in_channels, num_classes, hw)  # type: ignore[arg-type]
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model builder {name!r} must return an nn.Sequential of named blocks")
    model.cuts = dict(entry.cuts)
    return model
