"""Timing-only runs: the training run's timeline with no tensor work (docs/timing-only.md)."""
from __future__ import annotations

import copy
import json

import pytest

from simulator.algorithms.gas import GASSteps, NoGASSteps
from simulator.algorithms.mu_splitfed import NoRoundSteps, RoundSteps
from simulator.cli import main
from simulator.errors import ScenarioError
from simulator.runner import run_scenario
from simulator.scenario import to_yaml, validate

# Stragglers of every kind at once: tiers, random delays, a slowdown, an outage, a bandwidth
# drop; two server slots and partial participation where the algorithm has it.
STRAGGLERS = {
    "client": {
        "flops_per_s": {"dist": "uniform", "low": 1.0e6, "high": 4.0e6},
        "delay_s": {"dist": "exponential", "mean": 0.05},
        "tiers": [{"name": "slow", "clients": [1, 4], "speed_factor": 0.25}],
    },
    "server": {"flops_per_s": 2.0e7, "capacity": 2},
    "network": {"uplink": {"bandwidth_mbps": {"dist": "uniform", "low": 2.0, "high": 20.0}}},
    "episodes": [
        {"kind": "slowdown", "clients": [0], "start_s": 0.5, "end_s": 4.0, "factor": 6.0},
        {"kind": "unreachable", "clients": [2], "start_s": 1.0, "end_s": 2.0},
        {"kind": "bandwidth", "clients": [3], "start_s": 0.0, "end_s": 3.0, "bandwidth_mbps": 0.5},
    ],
}

ALGORITHMS = {
    "splitfed_v1": {"name": "splitfed_v1", "participation": 0.8},
    "splitfed_v2": {"name": "splitfed_v2", "participation": 0.8, "momentum": 0.5},
    "splitfed_v1_zo": {"name": "splitfed_v1", "client_optimizer": "zo", "lr_client": 0.005, "participation": 0.8},
    "splitfed_zo": {"name": "splitfed_zo", "participation": 0.6},
    "mu_splitfed": {"name": "mu_splitfed", "tau": 3, "participation": 0.6, "zo": {"perturbations": 2}},
    "mu_splitfed_fo": {"name": "mu_splitfed", "tau": 2, "client_optimizer": "fo", "server_optimizer": "fo",
                       "lr_client": 0.05, "lr_server": 0.05, "participation": 0.6},
    "mu_splitfed_adaptive": {"name": "mu_splitfed", "tau": "adaptive", "tau_max": 5, "participation": 0.6},
    "mu_splitfed_sphere": {"name": "mu_splitfed", "tau": 2, "zo": {"direction": "sphere"}, "participation": 0.6},
    "gas_diagonal": {"name": "gas", "active_clients": 3, "local_steps": 3, "covariance": "diagonal",
                     "activation_buffer": 2, "truncate_to_batch": True},
    "gas_no_generation": {"name": "gas", "active_clients": 3, "local_steps": 2, "generate": False},
    "gas_zo": {"name": "gas", "active_clients": 2, "local_steps": 2, "client_optimizer": "zo",
               "covariance": "diagonal"},
}


def _scenario(tiny_raw, algo: dict, rounds: int = 3):
    raw = copy.deepcopy(tiny_raw)
    raw["data"]["num_clients"] = 6
    raw["algorithm"] = {"batch_size": 16, "local_steps": 2, **algo}
    raw["time"] = copy.deepcopy(STRAGGLERS)
    raw["stop"] = {"rounds": rounds}
    return raw


@pytest.mark.parametrize("which", sorted(ALGORITHMS))
def test_events_equal_training_run(tiny_raw, which, tmp_path):
    """events.csv of a timing-only run is the training run's, byte for byte (stragglers, 2 slots, partial)."""
    raw = _scenario(tiny_raw, ALGORITHMS[which])
    trained = run_scenario(validate(raw), tmp_path / "train")
    assert trained.summary["status"] == "completed"
    timed = run_scenario(validate({**raw, "timing_only": True}), tmp_path / "timing")
    a = (tmp_path / "train" / "events.csv").read_bytes()
    b = (tmp_path / "timing" / "events.csv").read_bytes()
    assert trained.recorder.event_count > 40
    assert a == b
    for key in ("sim_time_s", "rounds", "bytes_up", "bytes_down", "server_busy_s", "events", "evaluations"):
        assert timed.summary[key] == trained.summary[key], key


@pytest.mark.parametrize("which", ["mu_splitfed", "gas_diagonal"])
def test_a_run_into_a_folder_keeps_no_rows_in_memory(tiny_raw, which, tmp_path):
    """Into a folder, spans and table rows are streamed and let go, and MU-SplitFed keeps its
    finished local iterations as compact columns: nothing grows with the run but those columns.
    The files and the summary are those of the same run kept in memory."""
    raw = _scenario(tiny_raw, ALGORITHMS[which], rounds=4)
    raw["timing_only"] = True
    on_disk = run_scenario(validate(raw), tmp_path / "run")
    kept = run_scenario(validate(raw))
    rec = on_disk.recorder
    assert rec._spans == [] and all(rows == [] for rows in rec.tables.values()) and rec.tables
    assert rec.event_count == len(kept.recorder.events) > 40
    assert rec.table_counts() == {name: len(rows) for name, rows in kept.recorder.tables.items()}
    assert (tmp_path / "run" / "events.csv").read_text() == kept.recorder.events_csv_text()
    host = {"host_runtime_s", "eval_host_s"}
    assert {k: v for k, v in on_disk.summary.items() if k not in host} == \
        {k: v for k, v in kept.summary.items() if k not in host}
    if which == "mu_splitfed":
        st = on_disk.algorithm.state
        assert st.records == [] and len(st.finished.cols["round"]) == on_disk.summary["mu_splitfed"]["local_iterations"]
        lines = (tmp_path / "run" / "client_rounds.csv").read_text().splitlines()
        assert len(lines) - 1 == rec.table_counts()["client_rounds"] == len(st.finished.cols["round"])


def test_gas_full_covariance_prices_one_attempt_per_factorisation(tiny_raw):
    """GAS with full covariances: timing-only prices each Cholesky at one attempt (training may retry with jitter)."""
    raw = _scenario(tiny_raw, {"name": "gas", "active_clients": 3, "local_steps": 3})
    trained = run_scenario(validate(raw))
    timed = run_scenario(validate({**raw, "timing_only": True}))
    tr, tm = trained.recorder.tables["gas_server_steps"], timed.recorder.tables["gas_server_steps"]
    assert min(len(tr), len(tm)) > 3
    n = 3  # after the first updates the two timelines part (longer updates in training)
    # The same generation (counts and which classes are factorised) ...
    assert [r["generated"] for r in tr[:n]] == [r["generated"] for r in tm[:n]]
    assert [r["factorisations"] for r in tr[:n]] == [r["factorisations"] for r in tm[:n]]
    # ... but one attempt each: a lower bound of the training run's attempts.
    assert all(r["factor_attempts"] == r["factorisations"] for r in tm)
    assert all(a["factor_attempts"] >= b["factor_attempts"] for a, b in zip(tr[:n], tm[:n]))


def test_outputs_say_timing_only(tiny_raw, tmp_path):
    """metrics.csv keeps the evaluation rows with round times and NaN accuracy; no figure; summary says so."""
    raw = _scenario(tiny_raw, ALGORITHMS["splitfed_v1"])
    raw["timing_only"] = True
    res = run_scenario(validate(raw), tmp_path / "run")
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("sim_time_s,round,test_accuracy,test_loss")
    assert len(lines) == 1 + 4  # time 0 and each of 3 rounds
    assert all(",nan,nan," in line for line in lines[1:])
    assert not (tmp_path / "run" / "accuracy_vs_time.png").exists()
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["timing_only"] is True and s["final_accuracy"] is None and s["best_accuracy"] is None
    assert s["status"] == "completed" and s["rounds"] == 3 and res.summary["sim_time_s"] > 0
    assert "timing_only: true" in (tmp_path / "run" / "scenario.yaml").read_text()


def test_training_scenario_yaml_has_no_timing_key(tiny_raw):
    """A training run's scenario.yaml and batch spec do not mention timing_only (fingerprints unchanged)."""
    from simulator.experiments.plan import make_spec

    assert "timing_only" not in to_yaml(validate(tiny_raw))
    assert "timing_only" not in make_spec("a", tiny_raw).scenario
    assert make_spec("b", {**tiny_raw, "timing_only": True}).scenario["timing_only"] is True


def test_target_accuracy_refused(tiny_raw):
    """stop.target_accuracy cannot be honoured without accuracy: refused naming the key."""
    raw = {**tiny_raw, "timing_only": True, "stop": {"rounds": 3, "target_accuracy": 0.5}}
    with pytest.raises(ScenarioError, match=r"stop\.target_accuracy"):
        validate(raw)


def test_cli_timing_only_flag(tiny_raw, tmp_path, capsys):
    """run --timing-only writes a timing-only run; with a target accuracy it exits 2 naming the key."""
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    assert main(["run", str(path), "--timing-only", "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert "timing only" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["timing_only"] is True
    code = main(["run", str(path), "--timing-only", "--set", "stop.target_accuracy=0.9",
                 "--out", str(tmp_path / "o2"), "--no-progress"])
    assert code == 2
    assert "stop.target_accuracy" in capsys.readouterr().err


def test_many_clients_quickly(tiny_raw):
    """A timing-only run of 200 clients and 20 rounds finishes (and has every round)."""
    raw = copy.deepcopy(tiny_raw)
    raw["data"] = {"dataset": "digits", "num_clients": 200, "partition": "iid"}
    raw["algorithm"] = {"name": "splitfed_v1", "batch_size": 4, "local_steps": 2}
    raw["timing_only"] = True
    raw["stop"] = {"rounds": 20}
    raw["eval"] = {"every_rounds": 5}
    res = run_scenario(validate(raw))
    assert res.summary["rounds"] == 20
    assert len(res.recorder.events) == 20 * (200 * (2 + 2 * 5) + 2)  # per client: model down/up, 5 per step


@pytest.mark.parametrize("real, noop", [(RoundSteps, NoRoundSteps), (GASSteps, NoGASSteps)])
def test_no_op_steps_cover_every_step(real, noop):
    """The no-op steps override every tensor step of the real ones (none runs real work by accident)."""
    names = {n for n in vars(real) if not n.startswith("__")}
    assert len(names) > 10
    assert sorted(n for n in names if n not in vars(noop)) == []
