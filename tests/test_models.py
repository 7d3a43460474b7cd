"""Tests for models.zoo, models.split and models.registry: registry contract, cuts, sharing, seeding."""
from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import torch
from torch import nn

from models import MODELS, SplitModel, build_model, split
from simulator import rng

# The image entries of the registry (text models: tests/test_text_models.py).
IMAGE_MODELS = sorted(name for name, spec in MODELS.items() if spec.kind == "image")
# (in_channels, input_hw): a Fashion-MNIST-like and a CIFAR-like input.
INPUTS = [(1, (28, 28)), (3, (32, 32))]
CASES = [
    (name, channels, hw, cut)
    for name in IMAGE_MODELS
    for channels, hw in INPUTS
    for cut in sorted(build_model(name, channels, 10, hw, seed=0).cuts)
]


def _input(channels: int, hw: tuple[int, int], batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, channels, *hw, generator=rng.torch_generator(0, "data", "test"))


@pytest.mark.parametrize("name,channels,hw,cut", CASES)
def test_split_parts_compose_to_the_model_exactly(name, channels, hw, cut):
    """server(client(x)) is bit-for-bit model(x) for every registry model, cut and channel count."""
    model = build_model(name, channels, 10, hw, seed=1)
    parts = split(model, cut)
    x = _input(channels, hw)
    with torch.no_grad():
        assert torch.equal(parts.server(parts.client(x)), model(x))
        assert model(x).shape == (4, 10)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_cut_table_is_well_formed(name):
    """Cuts are 1..n, leave each part a block, and give the client more blocks as the cut grows."""
    model = build_model(name, 1, 10, (28, 28), seed=0)
    n_blocks = len(list(model.children()))
    assert sorted(model.cuts) == list(range(1, len(model.cuts) + 1))
    sizes = [model.cuts[c] for c in sorted(model.cuts)]
    assert all(0 < s < n_blocks for s in sizes)
    assert sizes == sorted(set(sizes))


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_blocks_are_named(name):
    """Every block has a readable name, not an index, and parameter names start with it."""
    model = build_model(name, 3, 10, (32, 32), seed=0)
    names = [n for n, _ in model.named_children()]
    assert all(not n.isdigit() for n in names)
    assert {k.split(".")[0] for k in model.state_dict()} <= set(names)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registry_entry_keeps_the_contract(name):
    """Each MODELS entry is named by its key, is image or text, has a one-line summary and cuts,
    and its check names model.cut for a cut that cannot work."""
    from simulator.errors import ScenarioError

    spec = MODELS[name]
    assert spec.name == name and spec.kind in ("image", "text")
    assert spec.summary and "\n" not in spec.summary and spec.cut_range()
    with pytest.raises(ScenarioError) as err:
        spec.check(0 if spec.kind == "image" else 10_000, {"preset": "opt-125m"} if name == "opt" else None, None)
    assert err.value.key == "model.cut"


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_image_entries_accept_exactly_their_built_cuts(name):
    """An image model's check accepts the cuts of the built model and only those."""
    from simulator.errors import ScenarioError

    cuts = build_model(name, 1, 10, (28, 28), seed=0).cuts
    assert dict(MODELS[name].cuts) == cuts
    for cut in range(0, max(cuts) + 2):
        if cut in cuts:
            MODELS[name].check(cut, None, None)
        else:
            with pytest.raises(ScenarioError, match="model.cut"):
                MODELS[name].check(cut, None, None)


def test_alexnet_blocks_follow_the_gas_code():
    """AlexNet: 3x3 pad-1 convs, pool-then-ReLU in conv1/2/5, no ReLU in conv3, conv4 or linears."""
    model = build_model("alexnet", 3, 10, (32, 32), seed=0)
    assert [n for n, _ in model.named_children()] == [
        "conv1", "conv2", "conv3", "conv4", "conv5", "flatten", "fc1", "fc2", "fc3",
    ]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (3, 32), (32, 64), (64, 128), (128, 256), (256, 256),
    ]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    for name in ("conv3", "conv4", "fc1", "fc2", "fc3"):
        assert not any(isinstance(m, nn.ReLU) for m in getattr(model, name).modules())
    assert [type(m) for m in model.conv1] == [nn.Conv2d, nn.MaxPool2d, nn.ReLU]
    pool5 = model.conv5[1]
    assert (pool5.kernel_size, pool5.stride) == (3, 2)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [
        (256 * 3 * 3, 1024), (1024, 512), (512, 10),
    ]


@pytest.mark.parametrize(
    "channels,hw,cut,shape",
    [
        (1, (28, 28), 1, (32, 14, 14)),
        (1, (28, 28), 2, (64, 7, 7)),
        (1, (28, 28), 3, (128, 7, 7)),
        (1, (28, 28), 4, (256, 3, 3)),
        (3, (32, 32), 2, (64, 8, 8)),
        (3, (40, 48), 2, (64, 10, 12)),
    ],
)
def test_alexnet_activation_shapes(channels, hw, cut, shape):
    """AlexNet's activation has the papers' shape (64x7x7 at L2 on 28x28, 64x8x8 on 32x32)."""
    parts = split(build_model("alexnet", channels, 10, hw, seed=0), cut)
    with torch.no_grad():
        h = parts.client(torch.zeros(2, channels, *hw))
    assert tuple(h.shape) == (2, *shape)


def test_small_cnn_and_mlp_work_on_8x8_digits():
    """small_cnn and mlp accept 8x8 single-channel inputs (sklearn digits)."""
    for name in ("small_cnn", "mlp"):
        model = build_model(name, 1, 10, (8, 8), seed=0)
        with torch.no_grad():
            assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_too_small_input_fails_loudly():
    """AlexNet on 8x8 inputs raises a ValueError that says the input is too small."""
    with pytest.raises(ValueError, match="too small"):
        build_model("alexnet", 1, 10, (8, 8), seed=0)


def test_unknown_model_and_bad_sizes_fail():
    """An unknown name lists the known ones; non-positive sizes are rejected."""
    with pytest.raises(ValueError, match="known models: alexnet, mlp, small_cnn"):
        build_model("resnet", 1, 10, (28, 28), seed=0)
    with pytest.raises(ValueError, match="in_channels"):
        build_model("mlp", 0, 10, (28, 28), seed=0)
    with pytest.raises(ValueError, match="input_hw"):
        build_model("mlp", 1, 10, (28, 0), seed=0)


def test_split_shares_parameters_with_the_model():
    """split copies nothing: the parts hold the original blocks; changing one changes the model."""
    model = build_model("small_cnn", 1, 10, (28, 28), seed=0)
    parts = split(model, 1)
    assert isinstance(parts, SplitModel) and parts.cut == 1
    assert parts.client.conv1 is model.conv1
    assert parts.server.fc2 is model.fc2
    model_ptrs = {p.data_ptr() for p in model.parameters()}
    part_params = list(parts.client.parameters()) + list(parts.server.parameters())
    assert {p.data_ptr() for p in part_params} == model_ptrs
    assert len(part_params) == len(list(model.parameters()))
    before = model.conv1[0].weight.detach().clone()
    with torch.no_grad():
        parts.client.conv1[0].weight.add_(1.0)
    assert torch.equal(model.conv1[0].weight, before + 1.0)


def test_split_keeps_block_names():
    """Client and server state-dict keys are the model's own keys, split between them."""
    model = build_model("alexnet", 1, 10, (28, 28), seed=0)
    parts = split(model, 2)
    assert [n for n, _ in parts.client.named_children()] == ["conv1", "conv2"]
    keys = set(parts.client.state_dict()) | set(parts.server.state_dict())
    assert keys == set(model.state_dict())
    assert not set(parts.client.state_dict()) & set(parts.server.state_dict())


def test_invalid_cut_names_the_valid_cuts():
    """A cut the model does not define raises ValueError listing the valid cuts."""
    model = build_model("alexnet", 1, 10, (28, 28), seed=0)
    for bad in (0, 5, -1, True):
        with pytest.raises(ValueError, match="valid cuts: 1, 2, 3, 4"):
            split(model, bad)


def test_split_needs_a_cut_table():
    """A plain nn.Sequential without `cuts` is rejected with a TypeError."""
    with pytest.raises(TypeError, match="cuts"):
        split(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 1)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_same_seed_same_parameters_different_seed_different(name):
    """Initialisation is a function of the seed: same seed equal, other seed different."""
    a = build_model(name, 1, 10, (28, 28), seed=7).state_dict()
    b = build_model(name, 1, 10, (28, 28), seed=7).state_dict()
    c = build_model(name, 1, 10, (28, 28), seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a)


def test_build_model_leaves_global_rng_alone():
    """Building a model neither reads nor advances torch's global generator."""
    state = torch.random.get_rng_state()
    build_model("alexnet", 3, 10, (32, 32), seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_built_models_deep_copy_with_their_cuts():
    """A deep copy (a per-client copy) keeps the cut table and can be split."""
    import copy

    model = build_model("mlp", 1, 10, (8, 8), seed=0)
    clone = copy.deepcopy(model)
    assert clone.cuts == model.cuts
    assert split(clone, 2).server.fc3 is clone.fc3


def _train_and_score(
    name: str, x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray,
    hw: tuple[int, int], epochs: int, lr: float,
) -> float:
    """Plain SGD training of the split model (client and server stepped together); test accuracy."""
    model = build_model(name, 1, 10, hw, seed=0)
    parts = split(model, 1)
    opt = torch.optim.SGD(
        list(parts.client.parameters()) + list(parts.server.parameters()), lr=lr, momentum=0.9
    )
    xt = torch.as_tensor(x_tr, dtype=torch.float32).reshape(-1, 1, *hw)
    yt = torch.as_tensor(y_tr, dtype=torch.int64)
    for epoch in range(epochs):
        order = torch.randperm(len(yt), generator=rng.torch_generator(0, "data", "order", epoch))
        for i in range(0, len(order), 32):
            idx = order[i : i + 32]
            loss = nn.functional.cross_entropy(parts.server(parts.client(xt[idx])), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        xe = torch.as_tensor(x_te, dtype=torch.float32).reshape(-1, 1, *hw)
        pred = model(xe).argmax(1).numpy()
    return float((pred == y_te).mean())


@pytest.fixture
def one_thread():
    """Train on one intra-op thread: many tiny ops on a shared, busy 2-core host run far
    faster without OpenMP hand-offs (measured 1.2 s vs 10 s under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_small_cnn_learns_digits(one_thread):
    """small_cnn split at cut 1 reaches > 90% test accuracy on sklearn's 8x8 digits in 5 epochs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images / 16.0
    y = digits.target
    perm = rng.generator(0, "data", "digits-split").permutation(len(y))
    tr, te = perm[:1400], perm[1400:]
    acc = _train_and_score("small_cnn", x[tr], y[tr], x[te], y[te], (8, 8), epochs=5, lr=0.05)
    assert acc > 0.9


FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _read_idx(path: str, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.exists(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")),
    reason="Fashion-MNIST not installed (Debian package dataset-fashion-mnist)",
)
def test_small_cnn_learns_fashion_mnist(one_thread):
    """small_cnn reaches > 85% test accuracy on Fashion-MNIST in 2 epochs (slow: real training)."""
    def load(kind: str) -> tuple[np.ndarray, np.ndarray]:
        y = _read_idx(os.path.join(FASHION_DIR, f"{kind}-labels-idx1-ubyte.gz"), 8)
        x = _read_idx(os.path.join(FASHION_DIR, f"{kind}-images-idx3-ubyte.gz"), 16)
        return (x.reshape(len(y), 28, 28) / 255.0 - 0.2860) / 0.3530, y.astype(np.int64)

    x_tr, y_tr = load("train")
    x_te, y_te = load("t10k")
    acc = _train_and_score("small_cnn", x_tr, y_tr, x_te, y_te, (28, 28), epochs=2, lr=0.01)
    assert acc > 0.85
