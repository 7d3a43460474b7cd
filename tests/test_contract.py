"""The contract every registered algorithm keeps (one test, parametrised over ALGORITHMS).

- It runs two rounds (GAS: global iterations) on a tiny model and writes a valid trace: finite
  spans with start <= end, sequence numbers rising per (client, party), summary totals equal to
  the sums over the events, metrics monotone in time and round.
- Every key of the shared vocabulary is honoured or refused: a changed value either changes
  what the run does (trace or final model) or is a ScenarioError naming that key. A key that
  is silently ignored fails here.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from simulator.algorithms import ALGORITHMS
from simulator.algorithms.common import TrainConfig
from simulator.errors import ScenarioError
from simulator.runner import run_scenario
from simulator.scenario import validate
from tests.conftest import TINY

NAMES = sorted(ALGORITHMS)


def _raw(name: str, rounds: int = 1, **algo) -> dict:
    raw = copy.deepcopy(TINY)
    raw["algorithm"] = {"name": name, "batch_size": 16, "local_steps": 2, **algo}
    if name == "gas":
        raw["algorithm"].setdefault("active_clients", 2)
        raw["algorithm"].setdefault("covariance", "diagonal")
    raw["stop"] = {"rounds": rounds}
    return raw


def _models(res) -> list[torch.Tensor]:
    st = res.algorithm.state
    server = st.server_global if hasattr(st, "server_global") else st.server
    return [*st.client_global.values(), *server.values()]


@pytest.mark.parametrize("name", NAMES)
def test_two_rounds_write_a_valid_trace(name):
    """Two rounds on a tiny model: finite ordered spans, consistent totals, monotone metrics."""
    res = run_scenario(validate(_raw(name, rounds=2)))
    s, ev, m = res.summary, res.events, res.metrics
    assert s["status"] == "completed" and s["rounds"] == 2
    assert all(math.isfinite(v) for v in ev.start_s) and all(math.isfinite(v) for v in ev.end_s)
    assert (ev.start_s <= ev.end_s).all() and (ev.wait_s >= 0).all() and (ev.flops >= 0).all()
    for _, g in ev.groupby([ev.client.fillna(-1), ev.party]):
        assert g.seq.is_monotonic_increasing or sorted(g.seq) == list(g.seq.sort_values())
        assert g.seq.nunique() == len(g)
    assert s["events"] == len(ev)
    assert s["bytes_up"] == int(ev[ev.party == "uplink"].nbytes.sum())
    assert s["bytes_down"] == int(ev[ev.party == "downlink"].nbytes.sum())
    assert s["sim_time_s"] == pytest.approx(float(ev.end_s.max()))
    assert m.sim_time_s.is_monotonic_increasing and m["round"].is_monotonic_increasing
    assert list(m["round"])[-1] == 2


def _variants(name: str) -> list[tuple[str, dict, dict]]:
    """(key, base overrides, changed overrides) for every shared key of the vocabulary."""
    fields = ALGORITHMS[name].config.model_fields
    d = {k: f.get_default(call_default_factory=True) for k, f in fields.items()}
    flip = {"fo": "zo", "zo": "fo"}
    zo_client = {"client_optimizer": "zo", "momentum": 0.0, "weight_decay": 0.0} if name != "gas" else \
        {"client_optimizer": "zo"}
    out = [
        ("batch_size", {}, {"batch_size": 8}),
        ("local_steps", {}, {"local_steps": 3}),
        ("local_epochs", {}, {"local_steps": None, "local_epochs": 1}),
        ("client_optimizer", {}, {"client_optimizer": flip[d["client_optimizer"]]}),
        ("server_optimizer", {}, {"server_optimizer": flip[d["server_optimizer"]]}),
        ("lr_client", {}, {"lr_client": 2 * d["lr_client"]}),
        ("lr_server", {}, {"lr_server": 2 * d["lr_server"]}),
        ("lr_global", {}, {"lr_global": 0.5 if d["lr_global"] == 1.0 else 1.0}),
        ("momentum", {}, {"momentum": 0.5 if d["momentum"] == 0 else 0.0}),
        ("weight_decay", {}, {"weight_decay": 0.01 if d["weight_decay"] == 0 else 0.0}),
        ("aggregation", {"aggregation": "equal"}, {"aggregation": "data_size"}),
        ("zo", zo_client, {**zo_client, "zo": {"lam": 0.05}}),
        ("zo", zo_client, {**zo_client, "zo": {"perturbations": 2}}),
        ("zo", zo_client, {**zo_client, "zo": {"direction": flip_dir(d["zo"].direction)}}),
        ("participation", {}, {"participation": 0.5 if d.get("participation", 1.0) == 1.0 else 1.0}),
    ]
    assert {k for k, _, _ in out} >= set(TrainConfig.model_fields)
    return out


def flip_dir(direction: str) -> str:
    return "sphere" if direction == "gaussian" else "gaussian"


CASES = [(n, key, base, changed) for n in NAMES for key, base, changed in _variants(n)]


@pytest.mark.parametrize("name,key,base,changed", CASES,
                         ids=[f"{n}-{k}-{sorted(c.items())[-1][0]}" for n, k, _, c in CASES])
def test_every_shared_key_is_honoured_or_refused(name, key, base, changed, tiny_raw):
    """A changed shared key changes the run, or is refused with an error naming it."""
    if name == "gas":  # data_size weights only differ with unequal client sizes
        tiny_raw["data"]["num_clients"] = 3
    try:
        scenario = validate(_raw(name, **changed))
    except ScenarioError as e:
        assert e.key.startswith(f"algorithm.{key}") or e.key.startswith("algorithm.momentum"), str(e)
        return
    a = run_scenario(validate(_raw(name, **base)))
    b = run_scenario(scenario)
    same_trace = a.recorder.events_csv_text() == b.recorder.events_csv_text()
    same_model = all(torch.equal(x, y) for x, y in zip(_models(a), _models(b)))
    assert not (same_trace and same_model), f"{name}: algorithm.{key} = {changed} changed nothing"
