"""Latency models: contract over the registry, closed-form prices, modifiers, keyed draws."""
from __future__ import annotations

import copy
import math

import pytest

from simulator import latency as L
from simulator.config import Constant, Exponential
from simulator.errors import CostError, ScenarioError
from simulator.scenario import apply_overrides, validate

COMPUTE = L.Op(L.CLIENT_COMPUTE, "client_forward", client=1, flops=2e9, seq=0)
MESSAGE = L.Op(L.UPLINK, "activation", client=1, nbytes=1_000_000, seq=0)


def _instances():
    """One instance of every registry entry (the contract test runs them all)."""
    link = L.Link([1e8, 2e7], [0.01, 0.02])
    compute = L.ClientCompute([1e9, 5e8], Exponential(dist="exponential", mean=0.1), seed=7)
    made = {
        "client_compute": (compute, COMPUTE),
        "server_compute": (L.ServerCompute(1e11), L.Op(L.SERVER_COMPUTE, "server_step", flops=1e9)),
        "link": (link, MESSAGE),
        "slowdown": (L.Slowdown(compute, frozenset({1}), 3.0, 0.0, 10.0), COMPUTE),
        "unreachable": (L.Unreachable(link, frozenset({1}), 0.0, 5.0), MESSAGE),
        "bandwidth_change": (L.BandwidthChange(link, frozenset({1}), 1e6, [0.01, 0.02], 0.0, 10.0), MESSAGE),
        "trace_speed": (L.TraceSpeed(compute, [(1, 0.0, 10.0, 0.5)]), COMPUTE),
        "trace_bandwidth": (L.TraceBandwidth(link, [(1, 0.0, 10.0, 5e6)], [0.01, 0.02]), MESSAGE),
    }
    assert set(made) == set(L.LATENCY_MODELS), "a registry entry has no contract instance"
    return made


@pytest.mark.parametrize("name", sorted(L.LATENCY_MODELS))
def test_contract_positive_finite_deterministic(name):
    """Every latency model returns positive, finite durations, the same for the same op and time."""
    model, op = _instances()[name]
    for now in (0.0, 3.0, 20.0):
        a, b = model.duration(op, now), model.duration(op, now)
        assert a == b
        assert a > 0 and math.isfinite(a)


def test_client_compute_closed_form():
    """flops / speed, plus nothing when the delay is 0."""
    m = L.ClientCompute([1e9, 4e9], Constant(value=0.0), seed=0)
    assert m.duration(L.Op(L.CLIENT_COMPUTE, "f", client=1, flops=2e9), 0.0) == pytest.approx(0.5)


def test_link_closed_form():
    """latency + 8 * bytes / bandwidth."""
    m = L.Link([8e6, 8e6], [0.25, 0.5])
    assert m.duration(MESSAGE, 0.0) == pytest.approx(0.5 + 8 * 1e6 / 8e6)


def test_delays_are_keyed_by_client_and_sequence():
    """The k-th delay of a client does not depend on the op kind or on other clients."""
    m = L.ClientCompute([1e9] * 3, Exponential(dist="exponential", mean=1.0), seed=5)
    a = m.duration(L.Op(L.CLIENT_COMPUTE, "client_forward", client=2, flops=0, seq=4), 0.0)
    b = m.duration(L.Op(L.CLIENT_COMPUTE, "zo_probe", client=2, flops=0, seq=4), 99.0)
    c = m.duration(L.Op(L.CLIENT_COMPUTE, "client_forward", client=2, flops=0, seq=5), 0.0)
    d = m.duration(L.Op(L.CLIENT_COMPUTE, "client_forward", client=1, flops=0, seq=4), 0.0)
    assert a == b and a != c and a != d


def test_slowdown_window():
    """A slowdown multiplies durations of ops that start inside its window, for its clients only."""
    base = L.ClientCompute([1e9, 1e9], Constant(value=0.0), seed=0)
    m = L.Slowdown(base, frozenset({1}), 5.0, 10.0, 20.0)
    op = L.Op(L.CLIENT_COMPUTE, "f", client=1, flops=1e9)
    assert m.duration(op, 9.9) == pytest.approx(1.0)
    assert m.duration(op, 10.0) == pytest.approx(5.0)
    assert m.duration(op, 20.0) == pytest.approx(1.0)
    assert m.duration(L.Op(L.CLIENT_COMPUTE, "f", client=0, flops=1e9), 15.0) == pytest.approx(1.0)


def test_unreachable_waits_for_the_end():
    """A message starting during an outage waits until it ends, then takes its usual time."""
    link = L.Link([8e6, 8e6], [0.0, 0.0])
    m = L.Unreachable(link, frozenset({1}), 100.0, 200.0)
    assert m.duration(MESSAGE, 150.0) == pytest.approx(50.0 + 1.0)
    assert m.duration(MESSAGE, 99.0) == pytest.approx(1.0)


def test_bandwidth_changes_stack_later_wins():
    """A later bandwidth change wraps an earlier one and wins where windows overlap."""
    link = L.Link([8e6, 8e6], [0.0, 0.0])
    first = L.BandwidthChange(link, frozenset({1}), 4e6, [0.0, 0.0], 0.0, 100.0)
    second = L.BandwidthChange(first, frozenset({1}), 1e6, [0.0, 0.0], 50.0, 60.0)
    assert second.duration(MESSAGE, 10.0) == pytest.approx(2.0)
    assert second.duration(MESSAGE, 55.0) == pytest.approx(8.0)
    assert second.duration(MESSAGE, 200.0) == pytest.approx(1.0)


def test_zero_speed_fails_loudly():
    """No silent zero-cost or infinite fallback: pricing with zero speed raises CostError."""
    with pytest.raises(CostError):
        L.ClientCompute([0.0, 1.0], Constant(value=0.0), seed=0).duration(
            L.Op(L.CLIENT_COMPUTE, "f", client=0, flops=1.0), 0.0
        )
    with pytest.raises(CostError):
        L.ServerCompute(0.0).duration(L.Op(L.SERVER_COMPUTE, "s", flops=1.0), 0.0)


def test_tiers_by_share_are_the_same_for_every_algorithm(tiny_raw):
    """Tier membership depends only on (seed, shares), and counts follow the shares."""
    tiny_raw["data"]["num_clients"] = 10
    tiny_raw["time"]["client"]["tiers"] = [{"name": "slow", "share": 0.2, "speed_factor": 0.125}]
    s1 = validate(tiny_raw)
    s2 = validate(apply_overrides(tiny_raw, ["algorithm.name=splitfed_v2"]))
    t1 = L.build_time_model(s1.time, 10, s1.seed)
    t2 = L.build_time_model(s2.time, 10, s2.seed)
    assert t1.tiers == t2.tiers and t1.client_speeds == t2.client_speeds
    assert t1.tiers.count("slow") == 2


def test_explicit_tier_clients(tiny_raw):
    """A tier with a client list puts exactly those clients in it."""
    tiny_raw["time"]["client"]["flops_per_s"] = 1e9
    tiny_raw["time"]["client"]["tiers"] = [{"name": "slow", "clients": [2], "speed_factor": 0.5}]
    s = validate(tiny_raw)
    tm = L.build_time_model(s.time, 4, s.seed)
    assert tm.tiers == ["", "", "slow", ""]
    assert tm.client_speeds == [1e9, 1e9, 5e8, 1e9]


def test_speeds_change_with_seed(tiny_raw):
    """Different seeds draw different device speeds (the draws are keyed, not constant)."""
    s = validate(tiny_raw)
    a = L.build_time_model(s.time, 4, 1).client_speeds
    b = L.build_time_model(s.time, 4, 2).client_speeds
    assert a != b


def test_trace_csv(tiny_raw, tmp_path):
    """A trace table scales compute by its speed factor and replaces bandwidth in its window."""
    p = tmp_path / "trace.csv"
    p.write_text("client,start_s,end_s,speed_factor,bandwidth_mbps\n0,0,10,0.5,\n1,5,15,,1\n")
    tiny_raw["time"]["client"] = {"flops_per_s": 1e9}
    tiny_raw["time"]["network"] = {"uplink": {"bandwidth_mbps": 8, "latency_s": 0}}
    tiny_raw["time"]["trace_csv"] = str(p)
    s = validate(tiny_raw)
    tm = L.build_time_model(s.time, 4, s.seed)
    op = L.Op(L.CLIENT_COMPUTE, "f", client=0, flops=1e9)
    assert tm.duration(op, 1.0) == pytest.approx(2.0)
    assert tm.duration(op, 11.0) == pytest.approx(1.0)
    msg = L.Op(L.UPLINK, "a", client=1, nbytes=1_000_000)
    assert tm.duration(msg, 6.0) == pytest.approx(8.0)
    assert tm.duration(msg, 0.0) == pytest.approx(1.0)


def test_trace_csv_bad_columns(tiny_raw, tmp_path):
    """A trace CSV without the needed columns is a ScenarioError on time.trace_csv."""
    p = tmp_path / "t.csv"
    p.write_text("who,when\n1,2\n")
    tiny_raw["time"]["trace_csv"] = str(p)
    s = validate(tiny_raw)
    with pytest.raises(ScenarioError) as ei:
        L.build_time_model(s.time, 4, s.seed)
    assert ei.value.key == "time.trace_csv"


# --------------------------------------------------------------------------------------------
# The engine's pricing functions: the same floats as duration(), bit for bit
# --------------------------------------------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from simulator.config import LogNormal, Normal, ShiftedExponential, Uniform  # noqa: E402

_PRICED = [L.CLIENT_COMPUTE, L.SERVER_COMPUTE, L.UPLINK, L.DOWNLINK]


def _time_models(tmp_path_factory=None):
    """Time models whose categories take every branch of TimeModel.pricer: bare base models
    (zero delay, a drawn delay, a ZO rng cost) and wrapped ones (episodes, a trace table)."""
    from tests.conftest import TINY

    raws = {"bare": {"delay_s": 0}, "delay": {}, "rng": {"zo_rng_flops_per_element": 7.5}}
    models = {}
    for name, change in raws.items():
        raw = copy.deepcopy(TINY)
        if "delay_s" in change:
            raw["time"]["client"]["delay_s"] = change["delay_s"]
        if "zo_rng_flops_per_element" in change:
            raw["time"]["zo_rng_flops_per_element"] = change["zo_rng_flops_per_element"]
        models[name] = L.build_time_model(validate(raw).time, 4, 3)
    raw = copy.deepcopy(TINY)
    raw["time"]["episodes"] = [
        {"kind": "slowdown", "clients": [0, 2], "factor": 3, "start_s": 1.0, "end_s": 4.0},
        {"kind": "bandwidth", "clients": [1], "bandwidth_mbps": 0.5, "direction": "both", "start_s": 2.0},
        {"kind": "unreachable", "clients": [3], "start_s": 0.5, "end_s": 1.5}]
    models["episodes"] = L.build_time_model(validate(raw).time, 4, 3)
    return models


@settings(max_examples=300, deadline=None)
@given(
    model=st.sampled_from(["bare", "delay", "rng", "episodes"]),
    category=st.sampled_from(_PRICED),
    client=st.integers(0, 3),
    flops=st.floats(0, 1e15),
    nbytes=st.integers(0, 10**10),
    seq=st.integers(0, 2000),
    rng_elements=st.integers(0, 10**9),
    now=st.floats(0, 10),
)
def test_pricer_equals_duration_bit_for_bit(model, category, client, flops, nbytes, seq, rng_elements, now):
    """TimeModel.pricer(category) returns exactly duration(Op(...), now) on every kind of model."""
    tm = _MODELS[model]
    op = L.Op(category, "k", client, flops, nbytes, seq, 0, rng_elements)
    fast = tm.pricer(category)("k", client, flops, nbytes, seq, 0, rng_elements, now)
    assert fast == tm.duration(op, now) and math.copysign(1, fast) == math.copysign(1, tm.duration(op, now))


_MODELS = _time_models()


@pytest.mark.parametrize("flops", [math.nan, math.inf, -1e15])
def test_pricer_refuses_what_duration_refuses(flops):
    """A NaN, infinite or negative price is a CostError on the fast path too, with the same text."""
    for tm in _MODELS.values():
        for category in (L.CLIENT_COMPUTE, L.SERVER_COMPUTE):
            with pytest.raises(CostError) as slow:
                tm.duration(L.Op(category, "k", 1, flops, 0, 0, 0, 0), 0.0)
            with pytest.raises(CostError) as fast:
                tm.pricer(category)("k", 1, flops, 0, 0, 0, 0, 0.0)
            assert str(fast.value) == str(slow.value)


def test_pricer_keeps_the_models_errors_for_a_zero_speed():
    """A model the fast path cannot take (a zero speed) is priced through the model: CostError."""
    tm = L.TimeModel({L.CLIENT_COMPUTE: L.ClientCompute([0.0, 1e9], Constant(value=0.0), seed=0),
                      L.SERVER_COMPUTE: L.ServerCompute(0.0), L.UPLINK: L.Link([0.0], [0.0])}, [], [], [], [])
    for category, client in ((L.CLIENT_COMPUTE, 0), (L.SERVER_COMPUTE, None), (L.UPLINK, 0)):
        with pytest.raises(CostError, match="cannot price"):
            tm.pricer(category)("k", client, 1.0, 1, 0, 0, 0, 0.0)
    assert tm.pricer(L.CLIENT_COMPUTE)("k", 1, 1e9, 0, 0, 0, 0, 0.0) == 1.0


@pytest.mark.parametrize("dist", [
    Constant(value=0.25),
    Uniform(dist="uniform", low=0.1, high=2.0),
    Exponential(dist="exponential", mean=0.3),
    ShiftedExponential(dist="shifted_exponential", shift=0.05, mean=0.2),
    LogNormal(dist="lognormal", median=0.1, sigma=0.8),
    Normal(dist="normal", mean=0.1, std=0.2),  # truncated: drawn one at a time
], ids=lambda d: d.dist)
def test_delay_block_is_the_scalar_draws(dist):
    """draw_block gives the floats of DELAY_BLOCK calls of dist.sample on the same generator."""
    from simulator import rng

    a = L.draw_block(dist, rng.generator(5, "time", "delay", 1, 0), L.DELAY_BLOCK)
    g = rng.generator(5, "time", "delay", 1, 0)
    b = [dist.sample(g) for _ in range(L.DELAY_BLOCK)]
    assert a == b and all(type(v) is float for v in a)
