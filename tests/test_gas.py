"""GAS: online statistics vs closed form, top-up, sampling, logit adjustment, async timeline, runs."""
from __future__ import annotations

import copy
import csv
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from simulator import rng
from simulator.algorithms.common import params_of
from simulator.algorithms.gas import la_gradient, label_log_prior, top_up
from simulator.errors import ScenarioError
from simulator.gaussian_stats import (
    ClassGaussian,
    GaussianStats,
    merge_moments,
    top_up_counts,
    weighted_moments,
)
from simulator.latency import build_time_model, gas_wireless_distances, shannon_rate_bps
from simulator.runner import run_scenario
from simulator.scenario import apply_overrides, validate

TINY_GAS = {
    "name": "tiny_gas", "seed": 3, "threads": 1,
    "data": {"dataset": "digits", "num_clients": 4, "partition": "iid"},
    "model": {"name": "mlp", "cut": 1},
    "algorithm": {"name": "gas", "batch_size": 16, "active_clients": 2, "local_steps": 2,
                  "activation_buffer": 2, "model_buffer": 2, "lr_client": 0.05, "lr_server": 0.05},
    "time": {"client": {"flops_per_s": {"dist": "uniform", "low": 1e6, "high": 4e6}},
             "server": {"flops_per_s": 1e8}},
    "stop": {"rounds": 2},
}


def _run(overrides=(), out=None, base=None):
    return run_scenario(validate(apply_overrides(copy.deepcopy(base or TINY_GAS), list(overrides))), out)


def _batch_stats(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy's weighted mean and biased weighted covariance (the closed form)."""
    mean = np.average(x, axis=0, weights=w)
    cov = np.cov(x, rowvar=False, aweights=w, bias=True)
    return mean, np.atleast_2d(cov)


def _buffers(seed=0, d=5, classes=3, sizes=(7, 11, 4, 9)):
    g = rng.generator(seed, "algo", "test_gas_buffers")
    out = []
    for n in sizes:
        x = g.normal(size=(n, d)) * np.arange(1, d + 1) + g.normal(size=d)
        y = g.integers(0, classes, n)
        y[:classes] = np.arange(classes)  # every class in every buffer
        w = g.uniform(0.5, 3.0, n)
        out.append((x, y, w))
    return out


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_online_statistics_equal_batch_statistics(covariance):
    """After several merges, each class's mean/cov equal numpy's weighted stats of all its rows."""
    bufs = _buffers()
    stats = GaussianStats(3, 5, covariance, torch.float64)
    for x, y, w in bufs:
        stats.update(torch.tensor(x), torch.tensor(y), torch.tensor(w))
    X = np.concatenate([b[0] for b in bufs])
    Y = np.concatenate([b[1] for b in bufs])
    W = np.concatenate([b[2] for b in bufs])
    for c in range(3):
        mean, cov = _batch_stats(X[Y == c], W[Y == c])
        got_mean, got_cov = stats.mean_cov(c)
        np.testing.assert_allclose(got_mean.numpy(), mean, rtol=1e-10, atol=1e-12)
        want = np.diag(cov) if covariance == "diagonal" else cov
        np.testing.assert_allclose(got_cov.numpy(), want, rtol=1e-10, atol=1e-12)
        assert stats.classes[c].weight == pytest.approx(W[Y == c].sum())
        assert stats.classes[c].merges == len(bufs) - 1


def test_literal_merge_formula_equals_batch_statistics():
    """The paper's merge, applied literally buffer by buffer, gives the batch statistics."""
    bufs = [(x[y == 0], w[y == 0]) for x, y, w in _buffers(seed=1)]
    mu, s, wt = None, None, None
    for x, w in bufs:
        m_new, s_new, w_new = weighted_moments(torch.tensor(x), torch.tensor(w))
        if mu is None:
            mu, s, wt = m_new, s_new, w_new
        else:
            mu, s, wt = merge_moments(mu, s, wt, m_new, s_new, w_new)
    mean, cov = _batch_stats(np.concatenate([b[0] for b in bufs]), np.concatenate([b[1] for b in bufs]))
    np.testing.assert_allclose(mu.numpy(), mean, rtol=1e-10)
    np.testing.assert_allclose(s.numpy(), cov, rtol=1e-10, atol=1e-12)


def test_merge_ridge_is_added_at_each_merge():
    """merge_ridge (the code's 1e-5 I) adds ridge*I on a merge, not on a class's first buffer."""
    (x1, y1, w1), (x2, y2, w2) = _buffers(seed=2, sizes=(6, 8))[:2]
    plain = GaussianStats(3, 5, "full", torch.float64)
    ridged = GaussianStats(3, 5, "full", torch.float64, ridge=1e-3)
    for st in (plain, ridged):
        st.update(torch.tensor(x1), torch.tensor(y1), torch.tensor(w1))
    assert torch.equal(plain.classes[0].cov, ridged.classes[0].cov)
    for st in (plain, ridged):
        st.update(torch.tensor(x2), torch.tensor(y2), torch.tensor(w2))
    diff = ridged.classes[0].cov - plain.classes[0].cov
    torch.testing.assert_close(diff, 1e-3 * torch.eye(5, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# Sampling and top-up
# --------------------------------------------------------------------------------------------
def _known_gaussian(covariance="full"):
    a = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.6, 0.8, 0.0, 0.0], [-0.3, 0.2, 0.5, 0.0], [0.1, 0.4, -0.2, 0.3]],
                     dtype=torch.float64)
    cov = a @ a.T
    mean = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    stats = GaussianStats(1, 4, covariance, torch.float64)
    stats.classes[0] = ClassGaussian(mean, cov if covariance == "full" else torch.diagonal(cov).clone(), 1.0)
    return stats, mean, cov


def test_sampling_from_cached_factor_reproduces_covariance():
    """Draws mu + L z match the covariance within sampling error; the factor is computed once."""
    stats, mean, cov = _known_gaussian()
    assert stats.needs_factor(0)
    n = 40_000
    x, report = stats.sample(0, n, rng.torch_generator(0, "algo", "test"))
    assert report is not None and report.attempts == 1 and report.jitter == 0.0  # PD: no jitter
    assert not stats.needs_factor(0)
    L = stats.classes[0].factor
    _, again = stats.sample(0, 10, rng.torch_generator(1, "algo", "test"))
    assert again is None and stats.classes[0].factor is L and stats.factorisations == 1
    emp = torch.cov(x.T, correction=0)
    se = torch.sqrt((torch.outer(torch.diagonal(cov), torch.diagonal(cov)) + cov**2) / n)
    assert torch.all((emp - cov).abs() < 6 * se)
    assert torch.all((x.mean(0) - mean).abs() < 6 * torch.sqrt(torch.diagonal(cov) / n))


def test_diagonal_sampling_reproduces_variances():
    """Diagonal mode: draws have the stored per-feature variances and no correlation."""
    stats, mean, cov = _known_gaussian("diagonal")
    x, _ = stats.sample(0, 40_000, rng.torch_generator(0, "algo", "test"))
    var = torch.diagonal(cov)
    assert torch.all((x.var(0, correction=0) - var).abs() < 6 * var * math.sqrt(2 / 40_000))


def test_jitter_only_when_factorisation_fails():
    """A singular covariance gets the smallest jitter 1e-6 * 10^k that factorises; stale on merge."""
    stats = GaussianStats(1, 3, "full", torch.float64)
    v = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    stats.classes[0] = ClassGaussian(torch.zeros(3, dtype=torch.float64), torch.outer(v, v), 1.0)
    L, report = stats.factor(0)
    assert report.attempts > 1 and report.jitter >= 1e-6
    torch.testing.assert_close(L @ L.T, torch.outer(v, v) + report.jitter * torch.eye(3, dtype=torch.float64))
    assert stats.failed_factorisations == report.attempts - 1
    stats.update(torch.randn(4, 3, dtype=torch.float64, generator=rng.torch_generator(0, "algo", "test_merge")),
                 torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.float64))
    assert stats.needs_factor(0)


def test_top_up_counts_pure():
    """B - n for classes below B, 0 at or above B."""
    assert top_up_counts([5, 0, 12, 8], 8) == [3, 8, 0, 0]


@pytest.mark.parametrize("truncate", [False, True])
def test_top_up_fills_classes_below_b_and_leaves_the_rest(truncate):
    """Every class reaches B; a class above B keeps its real rows (truncate: its first B)."""
    B, d = 8, 4
    stats = GaussianStats(3, d, "full", torch.float64)
    for c in range(3):
        stats.classes[c] = ClassGaussian(torch.full((d,), 10.0 * (c + 1), dtype=torch.float64),
                                         torch.eye(d, dtype=torch.float64) * 0.01, 1.0)
    y = torch.tensor([0] * 5 + [2] * 12)[torch.randperm(17, generator=rng.torch_generator(1, "algo", "test_perm"))]
    h = torch.arange(17 * d, dtype=torch.float32).reshape(17, 2, 2)  # real rows are recognisable
    out = top_up(h, y, stats, B, seed=0, step=1, truncate=truncate)
    counts = torch.bincount(out.y, minlength=3).tolist()
    assert counts == ([8, 8, 8] if truncate else [8, 8, 12])
    assert out.generated == 3 + 8 and out.h.shape[1:] == h.shape[1:]
    keep = torch.ones(17, dtype=torch.bool)
    if truncate:
        keep[torch.nonzero(y == 2).flatten()[B:]] = False
    n_real = int(keep.sum())
    assert out.real == n_real
    assert torch.equal(out.h[:n_real], h[keep]) and torch.equal(out.y[:n_real], y[keep])  # real first, in order
    gen_h, gen_y = out.h[n_real:], out.y[n_real:]
    for c in (0, 1):  # generated rows come from class c's Gaussian (mean 10(c+1), std 0.1)
        rows = gen_h[gen_y == c].reshape(-1, d)
        assert torch.all((rows - 10.0 * (c + 1)).abs() < 1.0)
    again = top_up(h, y, stats, B, seed=0, step=1, truncate=truncate)
    assert torch.equal(again.h, out.h)  # keyed draws


# --------------------------------------------------------------------------------------------
# Logit adjustment
# --------------------------------------------------------------------------------------------
def test_logit_adjusted_gradient_matches_closed_form():
    """dL/dh of CE(s + log p, y) for a linear server equals ((softmax(s + log p) - 1_y)/n) W."""
    g = rng.torch_generator(0, "algo", "test_la")
    with rng.seeded_torch(0, "init", "test_la"):
        server = nn.Sequential(nn.Linear(5, 3))
    params = params_of(server)
    h = torch.randn(4, 5, generator=g)
    y = torch.tensor([0, 2, 2, 1])
    log_p = label_log_prior(torch.tensor([0, 0, 0, 2, 2, 1, 0, 0]), 3)
    assert torch.allclose(log_p.exp(), torch.tensor([5 / 8, 1 / 8, 2 / 8]))
    dh, loss = la_gradient(server, params, h, y, log_p)
    W, b = params["0.weight"], params["0.bias"]
    z = h @ W.T + b + log_p
    expected = (torch.softmax(z, 1) - torch.eye(3)[y]) / len(y) @ W
    torch.testing.assert_close(dh, expected)
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(z, y)))
    plain, _ = la_gradient(server, params, h, y, None)
    assert not torch.allclose(plain, dh)  # the adjustment matters


# --------------------------------------------------------------------------------------------
# Asynchrony: a golden timeline
# --------------------------------------------------------------------------------------------
# MLP on digits, cut 1, B = 16 (tests/test_engine.py has the FLOP counts): client forward
# 323,584 FLOP-eq, client backward 303,104; server forward + backward (with dL/dh) 899,072.
# Since 2026-12-02 (ReLU priced per element, the server update charged the params-only
# backward) the client backward is BWD < 1 s and an update of 2 minibatches UPD < 2 s; the
# timeline keeps its order, its times are written in BWD and UPD.
CLIENT_FWD = 323_584
SERVER_STEP = 899_072
BWD = 303_104 / CLIENT_FWD  # 0.93671 s
UPD = 2 * (313_344 + 323_584) / SERVER_STEP  # forward + params-only backward, 2 minibatches: 1.41686 s


def _golden():
    return validate({
        "name": "gas_golden", "seed": 0, "threads": 1,
        "data": {"dataset": "digits", "num_clients": 2},
        "model": {"name": "mlp", "cut": 1},
        "algorithm": {"name": "gas", "batch_size": 16, "active_clients": 2, "local_steps": 3,
                      "activation_buffer": 2, "model_buffer": 1, "generate": False},
        "time": {
            # client 0: forward 1 s, backward BWD; client 1 (x 1/4 speed): 4 s, 4 BWD
            "client": {"flops_per_s": CLIENT_FWD, "delay_s": 0,
                       "tiers": [{"name": "slow", "clients": [1], "speed_factor": 0.25}]},
            # a dL/dh job = 1 s; a server update on a buffer of 2 minibatches (no generation) = UPD
            "server": {"flops_per_s": SERVER_STEP, "capacity": 1},
            # uplink 0.5 s, downlink 0.25 s; bytes cost ~1e-10 s
            "network": {"uplink": {"bandwidth_mbps": 1e9, "latency_s": 0.5},
                        "downlink": {"bandwidth_mbps": 1e9, "latency_s": 0.25}},
        },
        "eval": {"every_rounds": 1},
        "stop": {"sim_time_s": 15.5},
    })


def test_golden_async_timeline_follows_arrival_order():
    """Server jobs run in simulated arrival order, updates queue behind gradients; no barrier.

    b = BWD, u = UPD:
    c0: down 0-.25, fwd .25-1.25, up -1.75, G 1.75-2.75, down -3, bwd -3+b, fwd -4+b, up -4.5+b
        (server busy with c1's G until 5.75: waits 1.25-b) G 5.75-6.75, down -7, bwd -7+b,
        fwd -8+b, up -8.5+b, G 8.5+b-9.5+b (buffer full: c0, c0 -> U2), down -9.75+b,
        bwd -9.75+2b, model_up -10.25+2b, aggregate + 33,280/899,072 s (global iteration 0),
        replaced by itself (K = C): down +.25, fwd +1, up +.5, G.
    c1: down 0-.25, fwd .25-4.25, up -4.75, G 4.75-5.75 (buffer full: c0, c1 -> U1 asks at
        5.75, behind c0's request of 4.5+b), so U1 runs 6.75-6.75+u (waited 1.0); down -6,
        bwd -6+4b, fwd -10+4b, up -10.5+4b, then waits for the server.
    """
    r = run_scenario(_golden())
    ev = r.events
    g = ev[ev.kind == "server_gradient"]
    agg = 2 * 8320 * 2 / SERVER_STEP
    assert list(g.client) == [0, 1, 0, 0, 0]
    b = BWD
    np.testing.assert_allclose(g.start_s, [1.75, 4.75, 5.75, 8.5 + b, 10.25 + 2 * b + agg + 1.75], atol=1e-6)
    np.testing.assert_allclose(g.wait_s, [0, 0, 1.25 - b, 0, 0], atol=1e-6)
    u = ev[ev.kind == "server_update"]
    np.testing.assert_allclose(u.start_s, [6.75, 9.5 + b], atol=1e-6)
    np.testing.assert_allclose(u.end_s, [6.75 + UPD, 9.5 + b + UPD], atol=1e-6)
    np.testing.assert_allclose(u.wait_s, [1.0, 0.0], atol=1e-6)
    steps = r.recorder.tables["gas_server_steps"]
    assert [s["clients"] for s in steps] == ["0 1", "0 0"]  # buffers hold arrival order
    np.testing.assert_allclose([s["trigger_s"] for s in steps], [5.75, 9.5 + b], atol=1e-6)
    it = r.recorder.tables["gas_iterations"]
    assert len(it) == 1 and it[0]["clients"] == "0"
    assert it[0]["sim_time_s"] == pytest.approx(10.25 + 2 * b + agg, abs=1e-6)
    # c1 computes through c0's whole local run and global iteration: no round barrier.
    c1 = ev[(ev.client == 1) & (ev.kind == "client_backward")]
    np.testing.assert_allclose(c1.start_s, [6.0], atol=1e-6)


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------
def test_two_iteration_smoke_run_writes_a_valid_trace(tmp_path):
    """Two global iterations: traces, GAS tables and summary; generation only once stats are ready."""
    r = _run(["stop.rounds=3"], tmp_path)
    for f in ("events.csv", "metrics.csv", "summary.json", "gas_iterations.csv", "gas_server_steps.csv"):
        assert (tmp_path / f).is_file(), f
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["rounds"] == 3 and s["stop_reason"] == "rounds"
    assert s["gas"]["global_iterations"] == 3 and s["gas"]["server_updates_done"] >= 1
    with (tmp_path / "gas_iterations.csv").open() as f:
        assert [int(row["iteration"]) for row in csv.DictReader(f)] == [0, 1, 2]
    with (tmp_path / "gas_server_steps.csv").open() as f:
        steps = list(csv.DictReader(f))
    assert any(int(st["generated"]) > 0 for st in steps)
    for st in steps:
        if int(st["generated"]) > 0:
            assert int(st["stats_classes"]) == 10
    kinds = set(r.events.kind)
    assert kinds >= {"model_down", "client_forward", "activation", "server_gradient", "gradient",
                     "client_backward", "server_update", "model_up", "aggregate_client"}
    ev = r.events
    assert (ev.end_s >= ev.start_s).all()
    assert s["bytes_up"] == int(ev[ev.party == "uplink"].nbytes.sum())


def test_same_seed_same_trace_and_options_run():
    """Deterministic under a seed; the code's quirks, diagonal and ZO variants run."""
    a = _run(["stop.rounds=1"]).recorder.events_csv_text()
    assert a == _run(["stop.rounds=1"]).recorder.events_csv_text()
    code = _run(["stop.rounds=1", "algorithm.client_momentum=shared", "algorithm.weight_growth=code",
                 "algorithm.merge_ridge=1e-5", "algorithm.aggregation=equal", "algorithm.truncate_to_batch=true",
                 "algorithm.covariance=diagonal"])
    steps = code.recorder.tables["gas_server_steps"]
    assert steps[0]["weight_min"] == 1.0  # code counters start at 1 and grow per client iteration
    paper = _run(["stop.rounds=1"]).recorder.tables["gas_server_steps"]
    assert [(s["weight_min"], s["weight_max"]) for s in paper] == [(s["step"], s["step"]) for s in paper]
    zo = _run(["stop.rounds=1", "algorithm.client_optimizer=zo", "algorithm.lr_client=0.005"])
    kinds = set(zo.events.kind)
    assert {"client_zo_probe", "server_zo_eval", "zo_scalars", "client_zo_update"} <= kinds
    assert "client_backward" not in kinds


def test_too_many_active_clients_is_a_scenario_error():
    """active_clients > num_clients fails with the dotted key."""
    with pytest.raises(ScenarioError, match="algorithm.active_clients"):
        _run(["algorithm.active_clients=5"])


# --------------------------------------------------------------------------------------------
# The gas_wireless preset
# --------------------------------------------------------------------------------------------
def test_shannon_rate_reproduces_the_gas_code():
    """Rates for the positions printed in GAS_main.py equal its printed rates."""
    code = {0.6083754840266261: 25948858.23931885, 0.2831153426857548: 64992952.13823921,
            0.9374787633533964: 9941368.164306499}
    for d, rate in code.items():
        assert shannon_rate_bps(d) == pytest.approx(rate, rel=1e-12)


def test_gas_wireless_preset_builds_keyed_links_and_speeds():
    """Preset: speeds in U(1e9, 1e10), both links at the Shannon rate of a keyed distance, no latency."""
    raw = apply_overrides(TINY_GAS, ["time.network.preset=gas_wireless"])
    del raw["time"]["client"]["flops_per_s"]
    s = validate(raw)
    tm = build_time_model(s.time, 4, 7)
    assert all(1e9 <= v <= 1e10 for v in tm.client_speeds)
    rates = [shannon_rate_bps(d) for d in gas_wireless_distances(4, 7)]
    assert tm.uplink_bps == rates and tm.downlink_bps == rates
    assert all(0.1 <= d <= 1.0 for d in gas_wireless_distances(4, 7))
    from simulator.latency import UPLINK, Op

    assert tm.duration(Op(UPLINK, "activation", client=2, nbytes=1000), 0.0) == pytest.approx(8000 / rates[2])
    with pytest.raises(ScenarioError, match="time.client.flops_per_s"):
        build_time_model(validate(apply_overrides(TINY_GAS, ["time.network.preset=gas_wireless"])).time, 4, 7)
    with pytest.raises(ScenarioError, match="time.network"):
        validate(apply_overrides(raw, ["time.network.uplink.latency_s=0.2"]))


def test_gas_wireless_preset_runs_with_another_algorithm(tiny_raw):
    """The preset is a time model, not a GAS feature: SplitFed runs under it, links at Shannon rates."""
    raw = apply_overrides(tiny_raw, ["time.network.preset=gas_wireless"])
    del raw["time"]["client"]["flops_per_s"]
    r = run_scenario(validate(raw))
    assert r.summary["rounds"] == 2
    rates = [shannon_rate_bps(d) / 1e6 for d in gas_wireless_distances(4, raw["seed"])]
    assert [c["uplink_mbps"] for c in r.summary["clients"]] == pytest.approx(rates)
