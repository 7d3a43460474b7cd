"""The shared optimizer vocabulary: one key, one meaning, in every algorithm (honoured or refused)."""
from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from models.split import split
from models.zoo import build_model
from simulator.algorithms import ALGORITHMS
from simulator.algorithms.common import RENAMED, TrainConfig, params_of
from simulator.errors import ScenarioError
from simulator.runner import run_scenario
from simulator.scenario import validate
from tests.conftest import TINY

SHARED = set(TrainConfig.model_fields)
ROUND_BASED = ("splitfed_v1", "splitfed_v2", "splitfed_zo", "mu_splitfed")


def _raw(name: str, **algo) -> dict:
    raw = copy.deepcopy(TINY)
    raw["algorithm"] = {"name": name, "batch_size": 16, "local_steps": 2, **algo}
    if name == "gas":
        raw["algorithm"].update(active_clients=2)
    raw["stop"] = {"rounds": 1}
    return raw


def _error(raw: dict) -> ScenarioError:
    with pytest.raises(ScenarioError) as e:
        validate(raw)
    return e.value


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_declares_the_shared_vocabulary(name):
    """Every registered algorithm's config has every shared key (same field, same meaning)."""
    fields = ALGORITHMS[name].config.model_fields
    assert SHARED <= set(fields), SHARED - set(fields)


@pytest.mark.parametrize("old,new", sorted(RENAMED.items()))
def test_old_names_say_what_they_are_called_now(old, new):
    """eta_c, lam, zo_lam, ... fail with 'renamed to' and the new dotted key."""
    for name in ("mu_splitfed", "gas"):
        err = _error(_raw(name, **{old: 0.1}))
        assert err.key == f"algorithm.{old}"
        assert f"renamed to algorithm.{new}" in str(err)


@pytest.mark.parametrize("name,algo,key", [
    ("splitfed_v1", {"client_optimizer": "fo", "server_optimizer": "zo"}, "algorithm.server_optimizer"),
    ("splitfed_v2", {"client_optimizer": "fo", "server_optimizer": "zo"}, "algorithm.server_optimizer"),
    ("gas", {"server_optimizer": "zo", "momentum": 0.0, "weight_decay": 0.0}, "algorithm.server_optimizer"),
    ("mu_splitfed", {"tau": "adaptive", "client_optimizer": "fo"}, "algorithm.tau"),
    ("mu_splitfed", {"momentum": 0.9}, "algorithm.momentum"),
    ("splitfed_zo", {"weight_decay": 1e-4}, "algorithm.weight_decay"),
    ("mu_splitfed", {"local_epochs": 1}, "algorithm.local_steps"),
])
def test_values_an_algorithm_cannot_honour_are_refused_with_the_key(name, algo, key):
    """A combination an algorithm cannot run is an error naming the key, never ignored."""
    assert _error(_raw(name, **algo)).key == key


def test_gas_has_no_participation_key():
    """GAS has active clients, not a per-round fraction: participation is an unknown key there."""
    err = _error(_raw("gas", participation=0.5))
    assert err.key == "algorithm.participation" and "unknown key" in str(err)


CASES = [(n, c, s) for n in sorted(ALGORITHMS) for c in ("fo", "zo") for s in ("fo", "zo")
         if not (s == "zo" and (n == "gas" or (c == "fo" and n.startswith("splitfed_v"))))]


@pytest.mark.parametrize("name,client,server", CASES)
def test_every_allowed_optimizer_pair_runs_and_shows_in_the_trace(name, client, server):
    """Each honoured (client, server) optimizer pair runs a round; the events show which ran."""
    algo = {"client_optimizer": client, "server_optimizer": server, "lr_client": 0.01, "lr_server": 0.01}
    if client == server == "zo":
        algo.update(momentum=0.0, weight_decay=0.0)
    res = run_scenario(validate(_raw(name, **algo)))
    assert res.summary["status"] == "completed"
    kinds = set(res.events.kind)
    if client == "zo":
        assert kinds & {"client_forward_plus", "client_zo_probe"}
        assert "client_backward" not in kinds
    else:
        assert "client_backward" in kinds and "gradient" in kinds
    if name in ("mu_splitfed", "splitfed_zo"):
        assert ("server_zo_step" if server == "zo" else "server_fo_step") in kinds
    ev = res.events
    zo_ops = ev[ev.kind.isin(["client_forward_plus", "client_forward_minus", "client_zo_update",
                              "client_zo_probe", "server_zo_step"])]
    assert (zo_ops.rng_elements > 0).all() and (ev[~ev.index.isin(zo_ops.index)].rng_elements == 0).all()


def test_local_steps_are_whole_exchanges_in_mu_splitfed():
    """local_steps: 3 gives each client 3 full exchanges (h, 2P perturbed, tau steps, scalars) per round."""
    res = run_scenario(validate(_raw("mu_splitfed", local_steps=3, tau=2, participation=1.0)))
    ev = res.events
    per_client = ev[ev.kind == "activation"].groupby("client").size()
    assert (per_client == 3).all() and len(per_client) == 4
    assert (ev[ev.kind == "loss_diff"].groupby("client").size() == 3).all()
    assert (ev[ev.kind == "server_zo_step"].groupby("client").size() == 3 * 2).all()
    assert (ev[ev.kind == "model_up"].groupby("client").size() == 1).all()  # one upload per round
    rows = pd.read_csv(res.out_dir / "client_rounds.csv") if res.out_dir else None
    assert rows is None
    assert res.summary["mu_splitfed"]["local_iterations"] == 12
    assert res.summary["mu_splitfed"]["client_rounds"] == 4


def test_local_epochs_mean_passes_over_the_client_data(tmp_path):
    """local_epochs: 1 gives floor(n_c / B) local iterations to client c, as in SplitFed V1."""
    raw = _raw("mu_splitfed", local_steps=None, local_epochs=1, participation=1.0, tau=1)
    res = run_scenario(validate(raw), tmp_path)
    rows = pd.read_csv(tmp_path / "client_rounds.csv")
    sizes = {c["client"]: c["samples"] for c in res.summary["clients"]}
    for c, n in rows.groupby("client").size().items():
        assert n == sizes[c] // 16
        assert sorted(rows[rows.client == c].local_step) == list(range(n))


def test_first_order_client_gets_dh_from_the_updated_server_copy():
    """mu_splitfed with client_optimizer fo: tau server steps, then a server_gradient job, then dL/dh."""
    res = run_scenario(validate(_raw("mu_splitfed", client_optimizer="fo", server_optimizer="fo", tau=3,
                                     participation=1.0, lr_client=0.05, lr_server=0.05)))
    ev = res.events
    for c, g in ev[ev.party.isin(["server", "downlink"]) & ev.client.notna()].groupby("client"):
        kinds = [k for k in g.sort_values("start_s").kind if k != "model_down"]
        assert kinds == ["server_fo_step"] * 3 + ["server_gradient", "gradient"] + \
                        ["server_fo_step"] * 3 + ["server_gradient", "gradient"]


def test_lr_global_steps_from_the_old_model_toward_the_average():
    """lr_global 0.5 lands halfway between the round's starting model and the plain average."""
    def client_after(lr_global):
        res = run_scenario(validate(_raw("splitfed_v1", lr_global=lr_global, lr_client=0.05)))
        return res.algorithm.state.client_global

    start = params_of(split(build_model("mlp", 1, 10, (8, 8), seed=TINY["seed"]), 1).client)
    full, half = client_after(1.0), client_after(0.5)
    for k in start:
        torch.testing.assert_close(half[k], start[k] + 0.5 * (full[k] - start[k]), rtol=1e-5, atol=1e-6)


def test_generating_directions_is_charged_per_element():
    """zo_rng_flops_per_element adds rng_elements * cost / speed to each ZO op, nothing to others."""
    def events(cost):
        raw = _raw("mu_splitfed", tau=1, participation=1.0)
        raw["time"]["client"]["delay_s"] = 0
        raw["time"]["zo_rng_flops_per_element"] = cost
        return run_scenario(validate(raw)).events

    a, b = events(0.0), events(1000.0)
    server = a[a.kind == "server_zo_step"].iloc[0]
    n_s = server.rng_elements  # the server draws each direction once (P = 1) and keeps it
    assert n_s == sum(p.numel() for p in split(build_model("mlp", 1, 10, (8, 8), seed=0), 1).server.parameters())
    key = ["client", "party", "kind", "round", "seq"]
    m = a.merge(b, on=key, suffixes=("_a", "_b"))
    assert len(m) == len(a) == len(b)  # the same operations, only their durations differ
    extra = (m.end_s_b - m.start_s_b) - (m.end_s_a - m.start_s_a)
    speed = m.party.map({"server": TINY["time"]["server"]["flops_per_s"]})
    srv = m.kind == "server_zo_step"
    assert extra[srv].to_numpy() == pytest.approx((m.rng_elements_a[srv] * 1000.0 / speed[srv]).to_numpy())
    assert (extra[m.rng_elements_a == 0].abs() < 1e-12).all()
    assert (extra[m.kind == "client_forward_plus"] > 0).all()
