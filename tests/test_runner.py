"""Runs: output contract, determinism, common random numbers, stop rules, interruption."""
from __future__ import annotations

import csv
import json

import pytest

from simulator import runner as runner_mod
from simulator.runner import run_scenario
from simulator.scenario import apply_overrides, validate
from simulator.trace import EVENT_COLUMNS, METRIC_COLUMNS


def _run(raw, out=None, overrides=()):
    return run_scenario(validate(apply_overrides(raw, list(overrides))), out)


def test_outputs_follow_the_contract(tiny_raw, tmp_path):
    """A run writes scenario.yaml, metrics.csv, events.csv, summary.json and the plot."""
    _run(tiny_raw, tmp_path)
    for f in ("scenario.yaml", "metrics.csv", "events.csv", "summary.json", "accuracy_vs_time.png"):
        assert (tmp_path / f).is_file(), f
    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == METRIC_COLUMNS
    assert [int(r["round"]) for r in rows] == [0, 1, 2]  # initial model, then every round
    assert all(0 <= float(r["test_accuracy"]) <= 1 for r in rows)
    with (tmp_path / "events.csv").open() as f:
        ev = list(csv.DictReader(f))
    assert tuple(ev[0]) == EVENT_COLUMNS
    assert all(float(e["end_s"]) >= float(e["start_s"]) for e in ev)
    assert {e["kind"] for e in ev} >= {"client_forward", "activation", "server_step", "gradient",
                                       "client_backward", "model_down", "model_up", "aggregate_client"}
    assert all(e["client"] == "" for e in ev if e["kind"] == "aggregate_client")
    s = json.loads((tmp_path / "summary.json").read_text())
    for key in ("final_accuracy", "sim_time_s", "rounds", "bytes_up", "bytes_down",
                "server_busy_fraction", "host_runtime_s", "versions"):
        assert key in s, key
    assert s["rounds"] == 2 and s["status"] == "completed" and s["stop_reason"] == "rounds"
    assert s["bytes_up"] == sum(int(e["nbytes"]) for e in ev if e["party"] == "uplink")
    assert 0 < s["server_busy_fraction"] < 1
    assert s["versions"]["torch"]


def test_same_seed_gives_identical_traces(tiny_raw, tmp_path):
    """Same scenario and seed: metrics.csv and events.csv are byte-identical."""
    _run(tiny_raw, tmp_path / "a")
    _run(tiny_raw, tmp_path / "b")
    for f in ("metrics.csv", "events.csv", "scenario.yaml"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_different_seed_changes_traces(tiny_raw):
    """A different seed draws different speeds and delays."""
    a = _run(tiny_raw).recorder.events_csv_text()
    b = _run(tiny_raw, overrides=["seed=4"]).recorder.events_csv_text()
    assert a != b


def _delays(result, speeds):
    """Per (client, k): the k-th compute op's duration minus its FLOPs/speed = its random delay."""
    out = {}
    for e in result.recorder.events:  # Span named tuples: read by name
        if e.party == "client":
            out[(e.client, e.seq)] = round((e.end_s - e.start_s) - e.flops / speeds[e.client], 9)
    return out


def test_common_random_numbers_across_algorithms(tiny_raw):
    """V1 and V2 on one scenario see the same device speeds and the same k-th delay per client."""
    a = _run(tiny_raw)
    b = _run(tiny_raw, overrides=["algorithm.name=splitfed_v2"])
    sa = [c["flops_per_s"] for c in a.summary["clients"]]
    assert sa == [c["flops_per_s"] for c in b.summary["clients"]]
    da, db = _delays(a, sa), _delays(b, sa)
    assert da and da == db
    assert len(set(da.values())) > 1  # delays really are random


def test_training_randomness_is_independent_of_the_time_model(tiny_raw):
    """Changing the time model never changes what the model learns (V1: no order dependence)."""
    a = _run(tiny_raw)
    b = _run(tiny_raw, overrides=["time.client.delay_s.mean=3.0", "time.server.capacity=null"])
    acc = lambda r: [m["test_accuracy"] for m in r.recorder.metrics]  # noqa: E731
    assert acc(a) == acc(b)
    assert a.summary["sim_time_s"] != b.summary["sim_time_s"]


def test_model_learns_on_digits(tiny_raw):
    """Real training: a few rounds of SplitFed on digits beat chance clearly."""
    r = _run(tiny_raw, overrides=["stop.rounds=6", "algorithm.local_steps=5"])
    assert r.summary["final_accuracy"] > 0.5


def test_stop_on_target_accuracy(tiny_raw):
    """stop.target_accuracy ends the run at the first evaluation that reaches it."""
    r = _run(tiny_raw, overrides=["stop.rounds=50", "algorithm.local_steps=5", "stop.target_accuracy=0.4"])
    assert r.summary["stop_reason"] == "target_accuracy"
    accs = [m["test_accuracy"] for m in r.recorder.metrics]
    assert accs[-1] >= 0.4 and all(a < 0.4 for a in accs[:-1])


def test_stop_on_simulated_time_and_eval_by_time(tiny_raw):
    """stop.sim_time_s ends the run at that time; eval.every_sim_s evaluates on a clock."""
    r = _run(tiny_raw, overrides=["stop.rounds=null", "stop.sim_time_s=3.0",
                                  "eval.every_rounds=null", "eval.every_sim_s=1.0"])
    assert r.summary["stop_reason"] == "sim_time_s"
    assert r.summary["sim_time_s"] == pytest.approx(3.0)
    times = [m["sim_time_s"] for m in r.recorder.metrics]
    assert times[:3] == [0.0, 1.0, 2.0]
    assert times[-1] == pytest.approx(3.0)


def test_episodes_change_the_timeline(tiny_raw):
    """A slowdown episode on client 0 lengthens its compute spans inside the window."""
    base = _run(tiny_raw)
    slow = _run(tiny_raw, overrides=['time.episodes=[{kind: slowdown, clients: [0], factor: 10}]'])
    dur = lambda r: sum(e.end_s - e.start_s for e in r.recorder.events  # noqa: E731
                        if e.client == 0 and e.party == "client")
    assert dur(slow) == pytest.approx(10 * dur(base))


def test_interrupt_keeps_what_was_written(tiny_raw, tmp_path, monkeypatch):
    """A KeyboardInterrupt mid-run flushes events, keeps metrics and marks the summary."""
    original = runner_mod._Controller.on_round

    def on_round(self, r):
        original(self, r)
        if r == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner_mod._Controller, "on_round", on_round)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_raw, tmp_path, overrides=["stop.rounds=10"])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "interrupted" and s["rounds"] == 2
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 3
    assert len((tmp_path / "events.csv").read_text().splitlines()) > 10
    assert (tmp_path / "accuracy_vs_time.png").is_file()
