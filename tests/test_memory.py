"""Client memory: accounting on meta against measured peaks, and the in-place ZO step."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from simulator.memory import (  # noqa: E402
    METHODS,
    LiveTensorTracker,
    StepSetting,
    account,
    build_client,
    measure_rss,
    memory_table,
    perturb_in_place,
    zo_chunk_bytes,
    zo_client_step,
)
from simulator.rng import torch_generator  # noqa: E402

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
    assert row["optimizer_bytes"] == 4 * (1 << 16)
    assert row["total_bytes"] < row["peak_bytes"] < 1.15 * row["total_bytes"]


def test_half_precision_halves_parameter_and_activation_bytes():
    """dtype=float16 stores parameters and cut activations in 2 bytes."""
    s32 = StepSetting("opt", cut=2, batch=2, seq_len=4, config=TINY)
    s16 = StepSetting("opt", cut=2, batch=2, seq_len=4, config=TINY, dtype="float16")
    full, half = account("mu_splitfed", s32), account("mu_splitfed", s16)
    assert half["params_bytes"] * 2 == full["params_bytes"]
    assert half["activation_bytes"] * 2 == full["activation_bytes"]


def test_zo_probes_restore_parameters_in_place_up_to_rounding():
    """+lam*u, -2lam*u, +lam*u leaves every parameter where it was, to float rounding.

    Bit-identical restoration is impossible for in-place float perturbation (x + d rounds
    away low bits of x whenever |x + d| is in a higher binade than |x|); MeZO accepts this.
    The bound is three roundings at the magnitude of |x| + 2|lam*u|.
    """
    work = build_client("mu_splitfed", StepSetting("opt", cut=2, batch=2, seq_len=4, config=TINY))
    params = list(work.module.parameters())
    before = [p.detach().clone() for p in params]
    ptrs = [p.data_ptr() for p in params]
    lam = 0.005

    def gen():
        return torch_generator(0, "zo", "test", 1)

    for scale in (lam, -2 * lam, lam):
        perturb_in_place(params, gen, scale, chunk_elems=1000)
    g = gen()
    eps = torch.finfo(torch.float32).eps
    for p, b in zip(params, before):
        u = torch.cat([torch.randn(min(1000, p.numel() - i), generator=g)
                       for i in range(0, p.numel(), 1000)]).view_as(p)
        bound = 3 * eps * (b.abs() + 2 * lam * u.abs())
        assert ((p - b).abs() <= bound).all()
    assert [p.data_ptr() for p in params] == ptrs


def test_zo_step_allocates_no_parameter_sized_buffer():
    """The whole ZO step never creates a storage as large as its largest parameter."""
    work = build_client("mu_splitfed", StepSetting("opt", cut=2, batch=2, seq_len=4, config=TINY))
    params = list(work.module.parameters())
    largest = max(p.numel() * p.element_size() for p in params)
    ids = work.inputs[0]
    tracker = LiveTensorTracker()
    tracker.track(*params, ids)
    with tracker:
        h, hp, hm, delta = zo_client_step(work.module, ids, seed=0, chunk_elems=256)
    assert tracker.largest_new < largest
    assert tracker.largest_new <= max(256 * 4, h.numel() * 4 * 4)
    assert not h.requires_grad and delta == 1.0
    assert not torch.equal(hp, hm)
    assert zo_chunk_bytes(params, 256) == 256 * 4


def test_zo_update_moves_along_the_regenerated_direction():
    """After the step, x_new - x = -eta*delta/(2 lam) * u with u regenerated from the key."""
    work = build_client("mu_splitfed", StepSetting("opt", cut=1, batch=2, seq_len=4, config=TINY))
    p = work.module.blocks[0].fc1.weight
    before = p.detach().clone()
    zo_client_step(work.module, work.inputs[0], seed=3, step_index=7, lam=0.01, eta=0.02,
                   server_delta=lambda h, hp, hm: 0.5, chunk_elems=10**9)
    g = torch_generator(3, "zo", "client", 7)
    for q in work.module.parameters():  # u is drawn parameter after parameter
        u = torch.randn(q.numel(), generator=g).view_as(q)
        if q is p:
            break
    torch.testing.assert_close(p - before, -0.02 * 0.5 / 0.02 * u, rtol=1e-3, atol=1e-6)


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
