"""Tests for models.profile: measured FLOPs against hand arithmetic, bytes, and no side effects."""
from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from models import MODELS, CutProfile, build_model, profile_cut, split
from models.profile import NON_MATMUL_FLOPS

B = 32
IMAGE_MODELS = sorted(name for name, spec in MODELS.items() if spec.kind == "image")


def _linear(n_in: int, n_out: int, batch: int = B) -> int:
    """FLOPs of one Linear forward: one multiply-add per weight per sample, 2 FLOPs each."""
    return 2 * batch * n_in * n_out


def _conv(c_in: int, c_out: int, k: int, h_out: int, w_out: int, batch: int = B) -> int:
    """FLOPs of one Conv2d forward: 2 * c_in * k * k multiply-adds per output element."""
    return 2 * batch * c_in * k * k * c_out * h_out * w_out


def _op(name: str, elements: int) -> int:
    """FLOP-equivalents of a non-matmul op over ``elements`` (models.profile.NON_MATMUL_FLOPS;
    the element count is the op's input: the pooling input, the ReLU tensor)."""
    return NON_MATMUL_FLOPS[name] * elements


def _relu(n: int) -> int:
    return _op("relu", n)


def _relu_bwd(n: int) -> int:
    return _op("threshold_backward", n)


def _pool(n_in: int) -> int:
    return _op("max_pool2d_with_indices", n_in)


def _pool_bwd(n_in: int) -> int:
    return _op("max_pool2d_with_indices_backward", n_in)


# Since 2026-12-02 the profile prices max-pooling and ReLU (forward and backward) per element
# (NON_MATMUL_FLOPS, measured host costs; FlopCounterMode alone counts them 0), and measures
# the server backward also without dL/dh (server_backward_params_flops): the hand arithmetic
# below adds those terms deliberately.
def test_mlp_cut1_matches_hand_arithmetic():
    """MLP on 8x8x1 at cut 1: client fc1 64->128 + ReLU; server fc2 128->64 + ReLU, fc3 64->10."""
    p = profile_cut(split(build_model("mlp", 1, 10, (8, 8), seed=0), 1), (1, 8, 8), B)
    assert p.client_forward_flops == _linear(64, 128) + _relu(B * 128)  # 524,288 + ReLU
    # fc1's input (the data) needs no gradient: autograd computes only dL/dW (one matmul of
    # the same size as the forward), and the bias gradient is a sum that is not counted.
    assert p.client_backward_flops == _linear(64, 128) + _relu_bwd(B * 128)
    server_fwd = _linear(128, 64) + _linear(64, 10)  # cross-entropy counts 0
    assert p.server_forward_flops == server_fwd + _relu(B * 64)
    # Both server layers need dL/dW and dL/d(input) (fc2's input is h): 2x forward.
    assert p.server_backward_flops == 2 * server_fwd + _relu_bwd(B * 64)
    # Without dL/dh, fc2 costs its weight gradient only.
    assert p.server_backward_params_flops == _linear(128, 64) + 2 * _linear(64, 10) + _relu_bwd(B * 64)
    assert p.activation_shape == (B, 128)
    assert p.activation_bytes == B * 128 * 4
    assert p.label_bytes == B * 8


def test_mlp_cut2_client_backward_has_input_grad_only_after_first_layer():
    """MLP at cut 2: client backward = dW of fc1 + (dW and dX) of fc2."""
    p = profile_cut(split(build_model("mlp", 1, 10, (8, 8), seed=0), 2), (1, 8, 8), B)
    assert p.client_forward_flops == _linear(64, 128) + _linear(128, 64) + _relu(B * 128) + _relu(B * 64)
    assert p.client_backward_flops == (_linear(64, 128) + 2 * _linear(128, 64)
                                       + _relu_bwd(B * 128) + _relu_bwd(B * 64))
    assert p.server_forward_flops == _linear(64, 10)
    assert p.server_backward_flops == 2 * _linear(64, 10)
    assert p.server_backward_params_flops == _linear(64, 10)
    assert p.activation_shape == (B, 64)


def test_conv_flops_match_hand_arithmetic():
    """small_cnn on 8x8x1 at cut 1: conv1 on the client, conv2 + two linears on the server."""
    p = profile_cut(split(build_model("small_cnn", 1, 10, (8, 8), seed=0), 1), (1, 8, 8), B)
    conv1 = _conv(1, 16, 5, 8, 8)  # padding 2 keeps 8x8; then ReLU and a 2x2 pool on 16x8x8
    assert p.client_forward_flops == conv1 + _relu(B * 16 * 64) + _pool(B * 16 * 64)
    # weight gradient only (input needs none), behind the pool's and the ReLU's backward
    assert p.client_backward_flops == conv1 + _pool_bwd(B * 16 * 64) + _relu_bwd(B * 16 * 64)
    conv2 = _conv(16, 32, 5, 4, 4)  # after the 2x2 pool
    server_mm = conv2 + _linear(32 * 2 * 2, 64) + _linear(64, 10)
    assert p.server_forward_flops == server_mm + _relu(B * 32 * 16) + _pool(B * 32 * 16) + _relu(B * 64)
    elementwise_bwd = _relu_bwd(B * 64) + _pool_bwd(B * 32 * 16) + _relu_bwd(B * 32 * 16)
    assert p.server_backward_flops == 2 * server_mm + elementwise_bwd
    assert p.server_backward_params_flops == 2 * server_mm - conv2 + elementwise_bwd  # no dL/dh
    assert p.activation_shape == (B, 16, 4, 4)


def test_alexnet_cut2_on_28x28():
    """AlexNet at L2 on 28x28x1: h is (B, 64, 7, 7); client FLOPs are conv1 + conv2."""
    model = build_model("alexnet", 1, 10, (28, 28), seed=0)
    p = profile_cut(split(model, 2), (1, 28, 28), B)
    assert p.activation_shape == (B, 64, 7, 7)
    assert p.activation_bytes == B * 64 * 7 * 7 * 4
    # conv1: conv, 2x2 pool on 32x28x28, ReLU on 32x14x14; conv2: the same on 64x14x14.
    assert p.client_forward_flops == (_conv(1, 32, 3, 28, 28) + _conv(32, 64, 3, 14, 14)
                                      + _pool(B * 32 * 28 * 28) + _relu(B * 32 * 14 * 14)
                                      + _pool(B * 64 * 14 * 14) + _relu(B * 64 * 7 * 7))
    server_mm = (
        _conv(64, 128, 3, 7, 7) + _conv(128, 256, 3, 7, 7) + _conv(256, 256, 3, 7, 7)
        + _linear(256 * 3 * 3, 1024) + _linear(1024, 512) + _linear(512, 10)
    )
    # conv5: 3x3/2 pool on 256x7x7, ReLU on 256x3x3
    assert p.server_forward_flops == server_mm + _pool(B * 256 * 49) + _relu(B * 256 * 9)
    elementwise_bwd = _pool_bwd(B * 256 * 49) + _relu_bwd(B * 256 * 9)
    assert p.server_backward_flops == 2 * server_mm + elementwise_bwd
    assert p.server_backward_params_flops == 2 * server_mm - _conv(64, 128, 3, 7, 7) + elementwise_bwd


@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.float16, 2), (torch.float64, 8)])
def test_activation_bytes_follow_the_wire_dtype(dtype, size):
    """activation_bytes = batch * prod(shape) * itemsize of the given dtype; FLOPs do not change."""
    parts = split(build_model("small_cnn", 3, 10, (32, 32), seed=0), 2)
    p = profile_cut(parts, (3, 32, 32), 16, dtype=dtype)
    assert p.activation_bytes == math.prod(p.activation_shape) * size == 16 * 32 * 8 * 8 * size
    ref = profile_cut(parts, (3, 32, 32), 16)
    assert p.client_forward_flops == ref.client_forward_flops


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_param_counts_and_bytes_add_up(name):
    """Client + server parameters are the model's parameters; bytes are 4 per fp32 element."""
    model = build_model(name, 1, 10, (28, 28), seed=0)
    total = sum(p.numel() for p in model.parameters())
    for cut in model.cuts:
        parts = split(model, cut)
        p = profile_cut(parts, (1, 28, 28), 4)
        assert p.client_params == sum(t.numel() for t in parts.client.parameters())
        assert p.client_params + p.server_params == total
        assert p.client_param_bytes == 4 * p.client_params
        assert p.server_param_bytes == 4 * p.server_params
        assert p.client_trainable_params == p.client_params


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_meta_device_counts_equal_a_real_cpu_run(name):
    """Profiling on the meta device gives exactly the numbers of a real CPU forward/backward."""
    model = build_model(name, 3, 10, (32, 32), seed=0)
    for cut in model.cuts:
        parts = split(model, cut)
        assert profile_cut(parts, (3, 32, 32), 2, device="meta") == profile_cut(
            parts, (3, 32, 32), 2, device="cpu"
        )


def test_flops_scale_linearly_with_batch():
    """Every FLOP and byte count of a batch of 8 is 4x that of a batch of 2 (params unchanged)."""
    parts = split(build_model("alexnet", 1, 10, (28, 28), seed=0), 3)
    a = profile_cut(parts, (1, 28, 28), 2)
    b = profile_cut(parts, (1, 28, 28), 8)
    for field in ("client_forward_flops", "client_backward_flops", "server_forward_flops",
                  "server_backward_flops", "server_backward_params_flops", "activation_bytes", "label_bytes"):
        assert getattr(b, field) == 4 * getattr(a, field)
    assert b.client_param_bytes == a.client_param_bytes


def _model_with_state() -> nn.Sequential:
    """A model with batch-norm buffers and dropout, to catch hidden side effects."""
    model = nn.Sequential(OrderedDict(
        conv=nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        flatten=nn.Sequential(nn.Flatten(), nn.Dropout(0.5)),
        fc=nn.Sequential(nn.Linear(4 * 6 * 6, 3)),
    ))
    model.cuts = {1: 1, 2: 2}
    return model


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_profiling_leaves_model_grads_buffers_and_rng_untouched(device):
    """After profiling: same parameters and buffers, no .grad set, torch's global RNG unchanged."""
    model = _model_with_state().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_state = torch.random.get_rng_state()
    for cut in model.cuts:
        profile_cut(split(model, cut), (1, 6, 6), 5, device=device)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert model.training


def test_frozen_client_has_no_backward():
    """With every client parameter frozen, client backward costs 0 and trainable counts say so."""
    model = build_model("mlp", 1, 10, (8, 8), seed=0)
    parts = split(model, 1)
    for p in parts.client.parameters():
        p.requires_grad_(False)
    prof = profile_cut(parts, (1, 8, 8), B)
    assert prof.client_backward_flops == 0
    assert prof.client_trainable_params == 0 and prof.client_params == 64 * 128 + 128
    # fc2 + ReLU, fc3: dL/dW and dL/dx of both layers (2x their matmuls) + ReLU's backward
    assert prof.server_backward_flops == 2 * (_linear(128, 64) + _linear(64, 10)) + _relu_bwd(B * 64)


def test_profile_is_frozen_and_validates_inputs():
    """CutProfile is immutable; a non-positive batch size or input size is a ValueError."""
    parts = split(build_model("mlp", 1, 10, (8, 8), seed=0), 1)
    p = profile_cut(parts, (1, 8, 8), 1)
    assert isinstance(p, CutProfile)
    with pytest.raises(AttributeError):
        p.batch_size = 2  # type: ignore[misc]
    with pytest.raises(ValueError, match="batch_size"):
        profile_cut(parts, (1, 8, 8), 0)
    with pytest.raises(ValueError, match="input_shape"):
        profile_cut(parts, (1, 0, 8), 4)


def test_a_cached_profile_from_before_the_non_matmul_prices_is_not_served(tmp_path, monkeypatch):
    """An entry written before 2026-12-02 (no server_backward_params_flops, matmul-only counts)
    is never served: the code digest and CACHE_FORMAT are in the key, and even an entry under
    the current key with the old field set is rejected (measured again)."""
    import hashlib
    import json

    from models import profile as mp

    assert mp.CACHE_FORMAT >= 2
    parts = split(build_model("small_cnn", 1, 10, (8, 8), seed=0), 1)
    model = {"name": "small_cnn", "in_channels": 1, "num_classes": 10, "input_hw": [8, 8]}
    good = mp.cached_profile_cut(parts, (1, 8, 8), B, model=model, folder=tmp_path)
    (path,) = tmp_path.glob("*.json")
    entry = json.loads(path.read_text())
    old = dict(entry["profile"])
    del old["server_backward_params_flops"]
    old["client_forward_flops"] = _conv(1, 16, 5, 8, 8)  # what FlopCounterMode alone counted
    entry["profile"] = old
    entry["checksum"] = hashlib.sha256(mp._canonical([entry["key"], old]).encode()).hexdigest()
    path.write_text(json.dumps(entry))
    again = mp.cached_profile_cut(parts, (1, 8, 8), B, model=model, folder=tmp_path)
    assert again == good and again.client_forward_flops > _conv(1, 16, 5, 8, 8)
    # A code edit moves the key: the same call then looks for another file.
    monkeypatch.setattr(mp, "_code_digest", lambda: "an older digest")
    mp.cached_profile_cut(parts, (1, 8, 8), B, model=model, folder=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 2
