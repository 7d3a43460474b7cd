"""Tests of simulator.algorithms.mu_splitfed: MU-SplitFed and splitfed_zo in simulated time."""
from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch
from torch import nn

from models.profile import profile_cut
from models.split import split
from models.zoo import build_model
from simulator import rng, zo
from simulator.algorithms import ALGORITHMS
from simulator.algorithms import mu_splitfed as mu
from simulator.algorithms.common import params_of
from simulator.errors import ScenarioError
from simulator.measure.memory import StorageTracker
from simulator.runner import run_scenario
from simulator.scenario import validate


def _mlp_profile(batch: int = 16):
    """The digits MLP at cut 1: the numbers the golden timelines are built from."""
    parts = split(build_model("mlp", 1, 10, (8, 8), seed=0), 1)
    return profile_cut(parts, (1, 8, 8), batch)


PROF = _mlp_profile()
N_C = PROF.client_params  # 8320 client parameters
N_S = PROF.server_params  # 8906 server parameters
# Elementwise ops priced at 1 FLOP each (the scenario below): a server ZO step (P = 1) is 2
# forwards + 6 ops over its parameters (zo.step_work), a client pass 2 ops (zo.pass_work).
# (server_forward_flops includes fc2's ReLU, 30 FLOP-eq per element since 2026-12-02: 313344)
ZO_STEP_FLOPS = 2 * PROF.server_forward_flops + 6 * N_S  # 2*313344 + 6*8906 = 680124
SERVER_FLOPS_PER_S = 4 * ZO_STEP_FLOPS  # a server ZO step takes exactly 0.25 s


def _scenario(**algo) -> dict:
    """A constant-latency digits/MLP scenario: 1 s client forward, 0.25 s server ZO step."""
    # Links: 0.1 s latency and 1 Tbit/s, so a message of b bytes takes L(b) = 0.1 + 8b/1e12 s.
    return {
        "name": "golden", "seed": 1, "threads": 1,
        "data": {"dataset": "digits", "num_clients": 3, "partition": "iid"},
        "model": {"name": "mlp", "cut": 1},
        "algorithm": {"name": "mu_splitfed", "batch_size": 16, "participation": 1.0, **algo},
        "time": {
            "client": {"flops_per_s": PROF.client_forward_flops, "delay_s": 0},
            "server": {"flops_per_s": SERVER_FLOPS_PER_S, "capacity": 1},
            "network": {"uplink": {"bandwidth_mbps": 1e6, "latency_s": 0.1},
                        "downlink": {"bandwidth_mbps": 1e6, "latency_s": 0.1}},
            "zo_rng_flops_per_element": 0,  # the hand arithmetic below prices FLOPs only
            "zo_elementwise_flops_per_element": 1,  # ... and one FLOP per elementwise op
        },
        "eval": {"every_rounds": 1},
        "stop": {"rounds": 1},
    }


def L(nbytes: int) -> float:
    return 0.1 + 8 * nbytes / 1e12


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
def test_registry_and_paper_defaults():
    """Both names are registered and the defaults are the paper's Table 6."""
    assert ALGORITHMS["mu_splitfed"].config is mu.MUSplitFedConfig
    assert ALGORITHMS["splitfed_zo"].config is mu.SplitFedZOConfig
    cfg = mu.MUSplitFedConfig(name="mu_splitfed")
    assert (cfg.lr_global, cfg.lr_server, cfg.lr_client, cfg.zo.lam) == (0.3, 0.01, 0.005, 0.005)
    assert (cfg.batch_size, cfg.zo.perturbations, cfg.participation, cfg.local_steps) == (32, 1, 0.5, 1)
    assert (cfg.zo.direction, cfg.client_optimizer, cfg.server_optimizer, cfg.tau) == ("gaussian", "zo", "zo", 2)
    assert "tau" not in mu.SplitFedZOConfig.model_fields


def test_tau_values_are_validated_with_dotted_keys():
    """tau takes a positive int or 'adaptive'; splitfed_zo has no tau key."""
    for bad in (0, "fast", 1.5):
        with pytest.raises(ScenarioError, match=r"^algorithm\.tau"):
            validate(_scenario(tau=bad))
    assert validate(_scenario(tau="adaptive", tau_max=3)).algorithm.tau == "adaptive"
    raw = _scenario()
    raw["algorithm"] = {"name": "splitfed_zo", "tau": 2}
    with pytest.raises(ScenarioError, match=r"algorithm\.tau: unknown key"):
        validate(raw)


# --------------------------------------------------------------------------------------------
# Golden timeline (constant latencies): hand arithmetic
# --------------------------------------------------------------------------------------------
def test_golden_timeline_adaptive_tau_with_server_contention():
    """Round time and adaptive step counts of 2 fast clients and 1 slow one match hand arithmetic."""
    raw = _scenario(tau="adaptive", tau_max=10)
    raw["time"]["client"]["tiers"] = [{"name": "slow", "clients": [2], "speed_factor": 0.25}]
    res = run_scenario(validate(raw))
    rows = {r["client"]: r for r in res.recorder.tables["client_rounds"]}

    # Figures below: the profile since 2026-12-02 (ReLU priced per element: client forward 323584
    # FLOP-eq, server forward 313344); the timeline's shape and step counts are unchanged.
    fwd = 1.0                                # 323584 FLOP-eq at 323584 FLOP/s
    plus = (PROF.client_forward_flops + 2 * N_C) / PROF.client_forward_flops    # 1.05142405... s
    minus = (PROF.client_forward_flops + 4 * N_C) / PROF.client_forward_flops   # 1.10284810... s
    update = 2 * N_C / PROF.client_forward_flops                                # 0.05142405... s
    step = 0.25                              # 680124 / 2720496
    loss_diff = 2 * PROF.server_forward_flops / SERVER_FLOPS_PER_S              # 0.23035799... s
    act, lab, model = PROF.activation_bytes, PROF.label_bytes, PROF.client_param_bytes  # 8192, 128, 33280

    # Fast clients 0 and 1 (identical timelines):
    #   model down          0        -> L(33280)            = 0.10000026624
    #   forward h           +1                              = 1.10000026624
    #   h (+labels) arrives +L(8320)                        = 1.2000003328
    #   h+ computed         1.10000026624 + 1.05142405063   = 2.15142431687, arrives +L(8192)
    #   h- computed         2.15142431687 + 1.10284810127   = 3.25427241814, arrives 3.35427248367
    t_h = L(model) + fwd + L(act + lab)
    t_last = L(model) + fwd + plus + minus + L(act)
    assert rows[0]["h_arrival_s"] == pytest.approx(t_h, rel=1e-12)
    assert rows[0]["perturbed_arrival_s"] == pytest.approx(t_last, rel=1e-12)
    # Server (capacity 1): both h arrive at 1.2000003328; client 0 asked first, so steps
    # alternate 0,1,0,1,... each 0.25 s. Client 0's k-th step ends at 1.2000003328 + 0.5k - 0.25,
    # client 1's at 1.2000003328 + 0.5k. Adaptive rule: stop at the first step that ends at or
    # after 3.35427248367 -> client 0: k = 5 (ends 3.4500003328), client 1: k = 5 (ends 3.7000003328).
    assert rows[0]["tau_used"] == 5 and rows[1]["tau_used"] == 5
    assert rows[0]["server_idle_s"] == 0 and rows[1]["server_idle_s"] == 0
    # Client 0's loss differences queue behind client 1's 5th step: they run 3.70..3.93035833,
    # client 1's right after: 3.93035833..4.16071632. Each sends 4 bytes down (L(4)).
    done0 = t_h + 10 * step + loss_diff + L(4) + update + L(model)
    done1 = t_h + 10 * step + 2 * loss_diff + L(4) + update + L(model)
    assert rows[0]["end_s"] == pytest.approx(done0, rel=1e-12)        # 4.18178...
    assert rows[1]["end_s"] == pytest.approx(done1, rel=1e-12)        # 4.41214...
    assert rows[0]["client_wait_s"] == pytest.approx(t_h + 10 * step + loss_diff + L(4) - (t_last - L(act)))

    # Slow client 2 (4x: forward 4 s, h+ 4.20569620 s, h- 4.41139241 s, update 0.20569620 s):
    #   h arrives 0.10000026624 + 4 + L(8320) = 4.2000003328, the server is free (client 1's loss
    #   differences ended at 4.161); last perturbed arrival 0.10000026624 + 4 + 4.20569620
    #   + 4.41139241 + L(8192) = 12.81708893937; it would take ceil(34.47) = 35 steps: capped at
    #   tau_max = 10 (ends 6.7000003328), then the server copy idles 6.11708860657 s.
    t_h2 = L(model) + 4 * fwd + L(act + lab)
    t_last2 = L(model) + 4 * (fwd + plus + minus) + L(act)
    assert rows[2]["tau_used"] == 10
    assert rows[2]["server_idle_s"] == pytest.approx(t_last2 - (t_h2 + 10 * step), rel=1e-12)
    done2 = t_last2 + loss_diff + L(4) + 4 * update + L(model)       # 13.45314...
    assert rows[2]["end_s"] == pytest.approx(done2, rel=1e-12)
    # Round end: Fed Server (2*8320*4 FLOPs) and Split Server (2*8906*4 = 71248 FLOPs) average
    # in parallel; the longer is the server's: 71248 / 2720496 s. Round time 13.47933... s.
    round_time = done2 + 2 * N_S * 4 / SERVER_FLOPS_PER_S
    assert res.summary["sim_time_s"] == pytest.approx(round_time, rel=1e-12)
    # Server capacity 1: no two server spans overlap.
    ev = res.events[res.events.party == "server"].sort_values("start_s")
    assert (ev.start_s.values[1:] >= ev.end_s.values[:-1] - 1e-12).all()


def test_fixed_tau_counts_and_message_sizes():
    """Fixed tau: every client takes exactly tau steps; bytes per client round are as specified."""
    res = run_scenario(validate(_scenario(tau=3, zo={"perturbations": 2})))
    rows = res.recorder.tables["client_rounds"]
    assert [r["tau_used"] for r in rows] == [3, 3, 3]
    act, lab, model = PROF.activation_bytes, PROF.label_bytes, PROF.client_param_bytes
    for r in rows:
        assert r["bytes_up"] == act + lab + 2 * 2 * act + model   # h + labels, 2P perturbed, model
        assert r["bytes_down"] == model + 2 * mu.SCALAR_BYTES     # model, P float32 scalars
    ev = res.events
    assert (ev.kind == "client_forward_plus").sum() == 3 * 2
    assert (ev.kind == "server_zo_step").sum() == 3 * 3
    # A ZO server step with P = 2: 4 server forwards plus 6 elementwise ops per direction, one
    # draw per direction (zo.step_work).
    steps = ev[ev.kind == "server_zo_step"]
    assert set(steps.flops) == {4 * PROF.server_forward_flops + 12 * N_S}
    assert set(steps.rng_elements) == {2 * N_S}
    assert sum(r["bytes_up"] for r in rows) == res.summary["bytes_up"] == res.summary["mu_splitfed"]["bytes_up"]


# --------------------------------------------------------------------------------------------
# The paper's time claim
# --------------------------------------------------------------------------------------------
def _straggler_run(k: float, tau) -> tuple[float, list]:
    raw = _scenario(tau=tau, tau_max=1000) if tau == "adaptive" else _scenario(tau=tau)
    raw["data"]["num_clients"] = 2
    raw["time"]["server"]["capacity"] = None  # per-client server copies step in parallel
    raw["time"]["episodes"] = [{"kind": "slowdown", "clients": [1], "factor": k}]
    res = run_scenario(validate(raw))  # one round: constant latencies make every round alike
    return res.summary["sim_time_s"], res.recorder.tables["client_rounds"]


def test_time_per_unit_of_server_progress_does_not_grow_with_straggler_delay():
    """With tau = floor(t_straggler / t_server), round time / tau stays flat as the delay grows."""
    # t_straggler is the time the server waits, after h, for the straggler's perturbed
    # activations: k * (1.0634765625 + 1.126953125) s (+ a few ns of transfer) for slowdown k;
    # t_server = 0.25 s, so tau(2) = 17, tau(4) = 35, tau(8) = 70. Vanilla (tau = 1) round time
    # grows about linearly in k; MU-SplitFed's round time is the same as vanilla's (the steps
    # fit in the idle window) while doing tau(k) steps, so time per server step stays flat.
    per_step, vanilla = {}, {}
    for k in (2, 4, 8):
        t_straggler = k * (PROF.client_forward_flops * 2 + 6 * N_C) / PROF.client_forward_flops
        tau = math.floor(t_straggler / 0.25)
        r_mu, _ = _straggler_run(k, tau)
        r_v, _ = _straggler_run(k, 1)
        assert r_mu == pytest.approx(r_v, rel=1e-9)  # the tau steps cost no wall-clock time
        per_step[k], vanilla[k] = r_mu / tau, r_v
        # Adaptive mode finds the same number: the step that ends just after the arrival.
        _, rows = _straggler_run(k, "adaptive")
        straggler = [r for r in rows if r["client"] == 1]
        assert {r["tau_used"] for r in straggler} == {tau + 1}
    assert vanilla[8] / vanilla[2] > 3.0
    assert per_step[8] <= per_step[4] <= per_step[2] * 1.001


# --------------------------------------------------------------------------------------------
# splitfed_zo is MU-SplitFed with tau = 1
# --------------------------------------------------------------------------------------------
def test_splitfed_zo_trace_equals_mu_splitfed_tau_1(tiny_raw, tmp_path):
    """splitfed_zo and mu_splitfed with tau 1 write byte-identical events.csv and metrics.csv."""
    outs = []
    for name, extra in (("splitfed_zo", {}), ("mu_splitfed", {"tau": 1})):
        raw = copy.deepcopy(tiny_raw)
        raw["algorithm"] = {"name": name, "batch_size": 16, "lr_server": 0.05, "lr_client": 0.02, **extra}
        out = tmp_path / name
        run_scenario(validate(raw), out)
        outs.append(out)
    for f in ("events.csv", "metrics.csv", "client_rounds.csv"):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    assert len((outs[0] / "events.csv").read_bytes()) > 1000


def test_runner_outputs_and_summary_totals(tiny_raw, tmp_path):
    """A run writes client_rounds.csv and summary.json totals that agree with it."""
    raw = copy.deepcopy(tiny_raw)
    raw["algorithm"] = {"name": "mu_splitfed", "batch_size": 16, "tau": "adaptive", "tau_max": 4}
    res = run_scenario(validate(raw), tmp_path)
    table = pd.read_csv(tmp_path / "client_rounds.csv")
    assert list(table.columns) == list(mu._ClientRound(0, 0, 0.0).row())
    assert len(table) == 2 * 2  # 2 rounds x half of 4 clients
    extra = res.summary["mu_splitfed"]
    assert extra["server_local_steps"] == table.tau_used.sum()
    assert extra["mean_tau_used"] == pytest.approx(table.tau_used.mean())
    assert extra["server_idle_s"] == pytest.approx(table.server_idle_s.sum())
    assert extra["client_wait_s"] == pytest.approx(table.client_wait_s.sum())
    assert (table.tau_used >= 1).all() and (table.tau_used <= 4).all()
    assert (tmp_path / "summary.json").exists() and (tmp_path / "accuracy_vs_time.png").exists()


def test_first_order_server_option_runs_and_prices_a_backward(tiny_raw):
    """server_optimizer: fo takes first-order steps priced as forward + backward + SGD axpy; the
    backward is the params-only one (a local step computes no dL/dh: server_backward_params_flops,
    since 2026-12-02; it was server_backward_flops, which includes dL/dh)."""
    raw = copy.deepcopy(tiny_raw)
    raw["algorithm"] = {"name": "mu_splitfed", "batch_size": 16, "tau": 2, "server_optimizer": "fo",
                        "lr_server": 0.1}
    res = run_scenario(validate(raw))
    steps = res.events[res.events.kind == "server_fo_step"]
    assert len(steps) == 2 * 2 * 2
    assert set(steps.flops) == {PROF.server_forward_flops + PROF.server_backward_params_flops + 2 * N_S}
    assert PROF.server_backward_params_flops < PROF.server_backward_flops
    assert all(math.isfinite(r["server_loss"]) for r in res.recorder.tables["client_rounds"])


def test_server_steps_reduce_the_loss_on_a_fixed_activation():
    """ZO and first-order server steps, repeated on one (h, y), lower that minibatch's loss."""
    # The ZO step size is the paper's eta_s = 0.01: a ZO step's squared norm grows with the
    # dimension (E|lr (u^T g) u|^2 = lr^2 (d + 2) |g|^2), and 0.05 already diverges on this
    # 8906-parameter server part.
    parts = split(build_model("mlp", 1, 10, (8, 8), seed=0), 1)
    client, server = params_of(parts.client), params_of(parts.server)
    gen = rng.torch_generator(0, "test", "batch")
    x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    h = mu.client_activation(parts.client, client, x)
    for opt in ("zo", "fo"):
        s = {k: v.clone() for k, v in server.items()}
        first = last = None
        for t in range(60):
            if opt == "zo":
                loss = mu.server_zo_step(parts.server, s, h, y, [zo.zo_seed(0, "t", t)], 0.005, 0.01, "gaussian")
            else:
                loss = mu.server_fo_step(parts.server, s, h, y, 0.05)
            first = loss if first is None else first
            last = loss
        assert last < first, (opt, first, last)


# --------------------------------------------------------------------------------------------
# Memory of a ZO client step
# --------------------------------------------------------------------------------------------


def test_zo_client_step_allocates_no_parameter_sized_buffer():
    """A ZO client step (h, h+, h-, restore, update) holds at most a chunk of u beyond its outputs."""
    # Client part: 1024 -> 1024 -> 256 linear layers (1.31 M parameters, 5.2 MB); batch 8.
    # Measured: the largest new storage is one chunk of u (256 KiB); the peak of live new
    # storages stays under 10% of the parameter bytes. A first-order step on the same model, as
    # a check that the meter sees parameter-sized buffers, allocates at least the gradients.
    with rng.seeded_torch(0, "test", "memory"):
        model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 256))
        x = torch.randn(8, 1024)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    param_bytes = sum(v.nbytes for v in params.values())
    seeds = [zo.zo_seed(0, "mem", p) for p in range(2)]

    meter = StorageTracker(list(params.values()) + [x])
    with meter:
        h = mu.client_activation(model, params, x)
        pairs = []
        for s in seeds:
            hp = mu.probe_plus(model, params, x, s, 0.005, "sphere")
            hm = mu.probe_minus(model, params, x, s, 0.005, "sphere")
            pairs.append((hp, hm))
        mu.client_zo_update(params, seeds, [0.01, -0.02], 0.005, 0.005, "sphere")
    assert h.grad_fn is None and pairs[0][0].grad_fn is None
    assert meter.largest <= zo.CHUNK_ELEMENTS * 4
    assert meter.peak < 0.1 * param_bytes, (meter.peak, param_bytes)

    fo_meter = StorageTracker(list(params.values()) + [x])
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with fo_meter:
        out = torch.func.functional_call(model, leaves, (x,))
        grads = torch.autograd.grad(out.square().mean(), list(leaves.values()))
    assert fo_meter.peak >= param_bytes
    del grads
