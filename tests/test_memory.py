"""simulator.measure.memory: accounting on meta against measured peaks of the algorithms' own steps."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from simulator import zo  # noqa: E402
from simulator.algorithms import mu_splitfed, splitfed  # noqa: E402
from simulator.measure.memory import (  # noqa: E402
    METHODS,
    ZO_DELTA,
    ZO_LR,
    StepSetting,
    StorageTracker,
    account,
    build_client,
    measure_rss,
    memory_table,
    zo_chunk_bytes,
    zo_settings,
    zo_step_seeds,
)

# D=32, 4 blocks, vocab 500: every category is a few hundred KB.
TINY = dict(hidden_size=32, num_hidden_layers=4, ffn_dim=64, num_attention_heads=4,
            vocab_size=500, max_position_embeddings=32)
D, LAYERS, FFN, VOCAB, POS = 32, 4, 64, 500, 32 + 2
# Parameters of one OPT block: q,k,v,out (D*D + D each), fc1, fc2, two LayerNorms.
BLOCK = 4 * (D * D + D) + (D * FFN + FFN) + (FFN * D + D) + 2 * 2 * D
EMBED = VOCAB * D + POS * D


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls on a shared 2-core machine are far faster on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def table():
    """The tiny OPT table, measured with the in-process tensor tracker."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    df = memory_table("opt", cut=2, batch=4, seq_len=8, config=TINY, measure=True,
                      how="tracker").set_index("method")
    torch.set_num_threads(n)
    return df


def test_parameter_and_gradient_bytes_are_exact_arithmetic(table):
    """params/grads/optimizer bytes equal hand counts of the tiny model (fp32, plain SGD)."""
    whole = EMBED + LAYERS * BLOCK + 2 * D + D * 2  # + final LayerNorm + head (no bias)
    client = EMBED + 2 * BLOCK
    lora = LAYERS * 2 * (D * 8 + 8 * D)  # q and v adapters, rank 8
    assert table.loc["fedavg", "params_bytes"] == 4 * whole
    assert table.loc["fedavg", "grads_bytes"] == 4 * whole
    assert table.loc["fedlora", "params_bytes"] == 4 * (whole + lora)
    assert table.loc["fedlora", "grads_bytes"] == 4 * (lora + D * 2)
    assert table.loc["splitfed", "params_bytes"] == 4 * client == table.loc["splitfed", "grads_bytes"]
    assert table.loc["mu_splitfed", "params_bytes"] == 4 * client
    assert table.loc["mu_splitfed", "grads_bytes"] == 0
    assert (table.loc[["fedavg", "fedlora", "splitfed"], "optimizer_bytes"] == 0).all()
    # ZO: one chunk of u (the largest parameter is smaller than a chunk) and h, h+, h-.
    assert table.loc["mu_splitfed", "optimizer_bytes"] == 4 * VOCAB * D
    assert table.loc["mu_splitfed", "activation_bytes"] == 3 * 4 * 4 * 8 * D
    cols = ["params_bytes", "grads_bytes", "optimizer_bytes", "activation_bytes"]
    assert (table[cols].sum(axis=1) == table["total_bytes"]).all()


def test_meta_peak_equals_measured_cpu_peak(table):
    """The step simulated on meta peaks where the real CPU step peaks (tolerance 1%).

    Both count live tensor storages; they can only differ where a CPU kernel and its meta
    kernel allocate different intermediates, which these ops do not (the match is exact).
    """
    for method in METHODS:
        peak, measured = table.loc[method, "peak_bytes"], table.loc[method, "measured_peak_bytes"]
        assert abs(measured - peak) <= 0.01 * peak, method


def test_sum_brackets_the_measured_peak(table):
    """First-order: P+O+max(A,G) <= peak <= 1.10*total; ZO: total <= peak <= 1.15*total.

    The lower bounds are exact (all activations coexist at the end of forward, all gradients
    at the optimizer step; ZO holds h, h+, h- and a chunk of u at the update). The upper
    margins are the short-lived intermediates the sum leaves out (backward's activation
    gradients, the largest block's forward temporaries), observed at 6% and 9% up to OPT-1.3B.
    """
    for method in ("fedavg", "fedlora", "splitfed"):
        r = table.loc[method]
        floor = r.params_bytes + r.optimizer_bytes + max(r.activation_bytes, r.grads_bytes)
        assert floor <= r.measured_peak_bytes <= 1.10 * r.total_bytes, method
    r = table.loc["mu_splitfed"]
    assert r.total_bytes <= r.measured_peak_bytes <= 1.15 * r.total_bytes


def test_ordering_when_parameters_dominate():
    """With short sequences, FedAvg > FedLoRA > SplitFed > MU-SplitFed, accounted and measured.

    FedAvg holds P + G of the whole model, FedLoRA P + tiny adapters, SplitFed P_c + G_c of
    the client part, MU-SplitFed only P_c: with activations much smaller than P this order
    must hold.
    """
    df = memory_table("opt", cut=1, batch=2, seq_len=4, config=TINY, measure=True,
                      how="tracker").set_index("method")
    for col in ("total_bytes", "peak_bytes", "measured_peak_bytes"):
        v = df[col]
        assert v["fedavg"] > v["fedlora"] > v["splitfed"] > v["mu_splitfed"], col


def test_optimizer_state_bytes():
    """Adam keeps two states per trainable parameter, SGD with momentum one, ZO none."""
    adam = account("fedavg", StepSetting("opt", cut=2, batch=2, seq_len=4, config=TINY,
                                         optimizer="adam"))
    mom = account("splitfed", StepSetting("opt", cut=2, batch=2, seq_len=4, config=TINY,
                                          momentum=0.9))
    assert adam["optimizer_bytes"] == 2 * adam["grads_bytes"]
    assert mom["optimizer_bytes"] == mom["grads_bytes"]
    assert adam["peak_bytes"] >= adam["params_bytes"] + adam["optimizer_bytes"] + adam["grads_bytes"]


def test_full_size_opt13b_accounting_on_meta():
    """OPT-1.3B, cut 2, B=32, L=32 is accounted on meta without allocating memory."""
    s = StepSetting("opt-1.3b", cut=2, batch=32, seq_len=32)
    row = account("mu_splitfed", s)
    # Block: 4 attention DxD + D, fc1 Dx4D + 4D, fc2 4DxD + D, 2 LayerNorms of 2D.
    block = 4 * (2048 * 2048 + 2048) + (2048 * 8192 + 8192) + (8192 * 2048 + 2048) + 4 * 2048
    assert row["params_bytes"] == 4 * (50272 * 2048 + 2050 * 2048 + 2 * block)
    assert row["activation_bytes"] == 3 * 4 * 32 * 32 * 2048
    assert row["optimizer_bytes"] == 4 * zo.CHUNK_ELEMENTS
    assert row["total_bytes"] < row["peak_bytes"] < 1.15 * row["total_bytes"]


def test_half_precision_halves_parameter_and_activation_bytes():
    """dtype=float16 stores parameters and cut activations in 2 bytes."""
    s32 = StepSetting("opt", cut=2, batch=2, seq_len=4, config=TINY)
    s16 = StepSetting("opt", cut=2, batch=2, seq_len=4, config=TINY, dtype="float16")
    full, half = account("mu_splitfed", s32), account("mu_splitfed", s16)
    assert half["params_bytes"] * 2 == full["params_bytes"]
    assert half["activation_bytes"] * 2 == full["activation_bytes"]


def test_split_steps_are_the_algorithms_own(monkeypatch):
    """The measured split steps call MU-SplitFed's and SplitFed's step functions, in order."""
    calls = []

    def spy(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for name in ("client_activation", "probe_plus", "probe_minus", "client_zo_update"):
        spy(mu_splitfed, name)
    spy(splitfed, "client_backward_step")
    s = StepSetting("opt", cut=1, batch=2, seq_len=4, config=TINY)
    build_client("mu_splitfed", s).step()
    assert calls == ["client_activation", "probe_plus", "probe_minus", "client_zo_update"]
    calls.clear()
    build_client("splitfed", s).step()
    assert calls == ["client_backward_step"]


def test_zo_step_allocates_no_parameter_sized_buffer():
    """The ZO step's largest new storage is one chunk of u, smaller than its largest parameter."""
    # Vocabulary 4096 x D 32: the token embedding (512 KiB) is larger than a chunk (256 KiB).
    s = StepSetting("opt", cut=2, batch=2, seq_len=4, config={**TINY, "vocab_size": 4096})
    work = build_client("mu_splitfed", s)
    params = list(work.params.values())
    largest = max(p.numel() * p.element_size() for p in params)
    tracker = StorageTracker(held=params + work.inputs)
    with tracker:
        work.step()
    assert tracker.largest == zo.CHUNK_ELEMENTS * 4 == zo_chunk_bytes(params) < largest
    assert tracker.held_bytes == sum(p.numel() * 4 for p in params) + sum(t.nbytes for t in work.inputs)


def test_zo_update_moves_along_the_regenerated_direction():
    """After one step, x_new - x = -lr * delta / (2 lam) * u, u regenerated from the step's seed."""
    s = StepSetting("opt", cut=1, batch=2, seq_len=4, config=TINY)
    work = build_client("mu_splitfed", s)
    before = [p.clone() for p in work.params.values()]
    work.step()
    zc = zo_settings()
    (seed,) = zo_step_seeds(s, 1)
    us = zo.materialize_direction(before, seed, zc.direction)
    coeff = ZO_LR * ZO_DELTA / (2 * zc.lam)
    for p, b, u in zip(work.params.values(), before, us):
        torch.testing.assert_close(p - b, -coeff * u, rtol=1e-3, atol=1e-6)


def test_storage_tracker_counts_held_and_new_storages():
    """Held storages count in held_bytes and peak_total only; views and in-place ops count nothing."""
    held = torch.zeros(1000)
    tracker = StorageTracker(held=[held, held[10:]])
    with tracker:
        held.add_(1.0)
        v = held.view(10, 100)
        a = torch.ones(500)
        b = torch.ones(250)
        del a
        c = torch.ones(100)
    assert tracker.held_bytes == 4000
    assert (tracker.current, tracker.peak, tracker.largest) == (1400, 3000, 2000)
    assert tracker.peak_total == 7000
    del v, b, c


def test_table_columns_and_unmeasured_nan():
    """Without measure, measured_peak_bytes is NaN; the setting is kept in attrs."""
    df = memory_table("opt", cut=1, batch=2, seq_len=4, config=TINY, measure=False,
                      methods=["mu_splitfed"])
    assert list(df.columns) == ["method", "params_bytes", "grads_bytes", "optimizer_bytes",
                                "activation_bytes", "total_bytes", "peak_bytes",
                                "measured_peak_bytes"]
    assert math.isnan(df.loc[0, "measured_peak_bytes"])
    assert df.attrs["cut"] == 1 and df.attrs["model_kind"] == "opt"


def test_bad_settings_raise():
    """Unknown methods, dtypes, optimizers and too-long sequences are ValueErrors."""
    with pytest.raises(ValueError, match="unknown method"):
        memory_table("opt", cut=1, batch=2, seq_len=4, config=TINY, methods=["fedprox"])
    with pytest.raises(ValueError, match="dtype"):
        StepSetting("opt", cut=1, batch=2, seq_len=4, config=TINY, dtype="int8")
    with pytest.raises(ValueError, match="optimizer"):
        StepSetting("opt", cut=1, batch=2, seq_len=4, config=TINY, optimizer="lion")
    with pytest.raises(ValueError, match="positions"):
        account("fedavg", StepSetting("opt", cut=1, batch=2, seq_len=64, config=TINY))
    with pytest.raises(ValueError, match=r"1\.\.3"):
        account("fedavg", StepSetting("opt", cut=4, batch=2, seq_len=4, config=TINY))


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_rss_of_a_real_step_matches_the_accounted_peak(method):
    """Peak RSS growth of a real step in a fresh process matches peak_bytes (1% + 2 MiB).

    A 46M-parameter OPT (D=256, 4 blocks, vocab 30522), B=16, L=32: the RSS method sees
    every byte the process maps, so it also catches memory the tensor count would miss;
    the margin covers 4 KiB pages and non-tensor allocations (observed: < 0.3 MiB).
    """
    s = StepSetting("opt", cut=2, batch=16, seq_len=32,
                    config=dict(hidden_size=256, num_hidden_layers=4, ffn_dim=1024,
                                num_attention_heads=4))
    peak = account(method, s)["peak_bytes"]
    rss = measure_rss(method, s, threads=1)
    assert abs(rss - peak) <= 0.01 * peak + 2 * 2**20
