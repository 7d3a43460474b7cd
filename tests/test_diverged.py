"""Divergence is a result: run_scenario returns it, `sflsim run` exits 3, batches record it, and
the report leaves diverged runs out of its means and says so."""
from __future__ import annotations

import json
import logging
import os

import pandas as pd
import pytest
import yaml

import simulator.algorithms.mu_splitfed as rounds  # where SplitFed's exchange calls server_step
from simulator import runner as runner_mod
from simulator.cli import main
from simulator.errors import Diverged
from simulator.experiments import plan_compare, run_batch
from simulator.runner import run_scenario
from simulator.scenario import apply_overrides, validate

OUTPUTS = ("scenario.yaml", "metrics.csv", "events.csv", "summary.json", "accuracy_vs_time.png")


def _diverge_when(monkeypatch, when):
    """Make SplitFed's server step raise Diverged (as the algorithms do on a NaN loss) when
    ``when(cfg, seed, call)`` is true; ``call`` counts server steps within the run."""
    original, seen = rounds.server_step, {"seed": None, "calls": 0}
    build = runner_mod.build_context

    def build_context(scenario, sim, device):
        seen.update(seed=scenario.seed, calls=0)
        return build(scenario, sim, device)

    def server_step(module, params, h, y, cfg, buffers, aux=None):
        seen["calls"] += 1
        if when(cfg, seen["seed"], seen["calls"]):
            raise Diverged("server loss (nan)", round=1, local_step=0, party="server", client=2)
        return original(module, params, h, y, cfg, buffers, aux)

    monkeypatch.setattr(runner_mod, "build_context", build_context)
    monkeypatch.setattr(rounds, "server_step", server_step)


def test_diverged_survives_simpys_copy():
    """SimPy hands a failed process's exception on as ``type(e)(*e.args)`` (simpy/events.py,
    Process._resume; simpy/core.py, Environment.step): for Diverged that must not raise, or a
    divergence inside an algorithm's process reaches the runner as a TypeError."""
    e = Diverged("loss (nan)", round=3, local_step=1, party="client", client=3)
    copy = type(e)(*e.args)
    assert isinstance(copy, Diverged) and str(copy) == str(e) and copy.info() == e.info()


def test_diverged_run_is_a_result_with_every_output(tiny_raw, tmp_path, monkeypatch, caplog):
    """status/stop_reason diverged, the where in summary.json, every file kept, no final
    evaluation of the NaN model, one warning line and no exception."""
    _diverge_when(monkeypatch, lambda cfg, seed, call: call > 8)  # 4 clients x 2 steps: in round 1
    with caplog.at_level(logging.WARNING, logger="simulator.runner"):
        result = run_scenario(validate(apply_overrides(tiny_raw, ["stop.rounds=5"])), tmp_path)
    s = result.summary
    assert (s["status"], s["stop_reason"], s["rounds"]) == ("diverged", "diverged", 1)
    assert s["diverged"] == {"what": "server loss (nan)", "round": 1, "local_step": 0, "party": "server",
                             "client": 2}
    assert isinstance(result.diverged, Diverged)
    assert json.loads((tmp_path / "summary.json").read_text())["diverged"] == s["diverged"]
    for f in OUTPUTS:
        assert (tmp_path / f).is_file(), f
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics["round"].tolist() == [0, 1]  # initial model, after round 0; no final evaluation
    assert len(pd.read_csv(tmp_path / "events.csv")) > 0
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0].startswith("diverged: server loss (nan) is not finite at round 1")


def test_cli_run_exits_3_with_one_line(tiny_raw, tmp_path, monkeypatch, capsys):
    """`sflsim run` on a diverging scenario: exit code 3, one line on stderr, no traceback."""
    _diverge_when(monkeypatch, lambda cfg, seed, call: call > 8)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--no-progress", "--set", "stop.rounds=5"]) == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"sflsim: diverged: server loss (nan) is not finite at round 1, local step 0, on the server (client 2); "
        f"outputs kept in {out}/"]
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"


def test_batch_records_diverged_runs_and_report_excludes_them(tmp_path, tiny_raw, monkeypatch, capsys):
    """compare: diverged runs are outcome 'diverged' (landed, reused, exit 0 with a note);
    the report counts them per row, leaves them out of means and says so."""
    _diverge_when(monkeypatch, lambda cfg, seed, call: cfg.name == "splitfed_v2" or (seed == 4 and call > 3))
    tiny_raw["stop"] = {"rounds": 1}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    out = tmp_path / "out"
    rc = main(["compare", str(path), "--algorithms", "splitfed_v1,splitfed_v2", "--seeds", "3,4", "--out", str(out),
               "--workers", "1", "--threads", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "note: 3 of 4 runs diverged: a result, not a failure" in err and "Traceback" not in err
    assert "  splitfed_v1-seed4: diverged: server loss (nan) is not finite at round 1" in err
    table = pd.read_csv(out / "runs.csv").set_index("run_id")
    assert table["status"].to_dict() == {"splitfed_v1-seed3": "completed", "splitfed_v1-seed4": "diverged",
                                         "splitfed_v2-seed3": "diverged", "splitfed_v2-seed4": "diverged"}
    assert table.loc["splitfed_v2-seed3", "error"].startswith("diverged: server loss (nan)")
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(table.index)  # landed, none .failed
    meta = json.loads((out / "runs" / "splitfed_v1-seed4" / "run.json").read_text())
    assert meta["status"] == "diverged" and meta["diverged"]["party"] == "server"
    stamp = os.path.getmtime(out / "runs" / "splitfed_v1-seed4" / "metrics.csv")
    plan = plan_compare(path, ["splitfed_v1", "splitfed_v2"], "3,4")
    again = run_batch(plan, out, workers=1, threads=1, progress=False)  # a result: reused, not retried
    assert [o["status"] for o in again.outcomes] == ["reused", "diverged", "diverged", "diverged"]
    assert os.path.getmtime(out / "runs" / "splitfed_v1-seed4" / "metrics.csv") == stamp

    assert main(["report", str(out), "--targets", "0.05"]) == 0
    summary = pd.read_csv(out / "report" / "tables" / "summary.csv").set_index("label")
    assert summary.loc["splitfed_v1", ["n", "diverged"]].tolist() == [1, 1]
    assert summary.loc["splitfed_v2", ["n", "diverged"]].tolist() == [0, 2]
    completed = json.loads((out / "runs" / "splitfed_v1-seed3" / "summary.json").read_text())
    assert summary.loc["splitfed_v1", "final_accuracy_mean"] == pytest.approx(completed["final_accuracy"])
    assert pd.isna(summary.loc["splitfed_v2", "final_accuracy_mean"])
    per_run = pd.read_csv(out / "report" / "tables" / "per_run.csv")
    assert per_run["run_id"].tolist() == ["splitfed_v1-seed3"]
    assert len(pd.read_csv(out / "report" / "tables" / "diverged.csv")) == 3
    md = (out / "report" / "report.md").read_text()
    assert ("Excluded from means and CIs: 3 diverged run(s) (`splitfed_v1-seed4`, `splitfed_v2-seed3`, "
            "`splitfed_v2-seed4`)") in md
    assert "| run | seeds | diverged |" in (out / "report" / "tables" / "summary.md").read_text()


@pytest.mark.parametrize("algo", [
    {"name": "mu_splitfed", "server_optimizer": "zo", "lr_server": 1.0e4, "tau": 4},
    {"name": "splitfed_zo", "server_optimizer": "fo", "lr_server": 1.0e6, "lr_client": 1.0e6},
    {"name": "splitfed_v1", "lr_server": 1.0e6, "lr_client": 1.0e6},
    {"name": "gas", "active_clients": 2, "lr_server": 1.0e6, "lr_client": 1.0e6, "clip_norm": None,
     "covariance": "diagonal"},
])
def test_real_divergence_stops_the_run_where_it_happened(tiny_raw, algo):
    """Huge step sizes really produce NaN/inf: the run stops at once with status diverged."""
    tiny_raw["algorithm"] = {"batch_size": 16, "local_steps": 2, **algo}
    tiny_raw["stop"] = {"rounds": 30}
    s = run_scenario(validate(tiny_raw)).summary
    assert s["status"] == "diverged", s["final_accuracy"]
    info = s["diverged"]
    assert info["party"] in ("server", "client", "fed server", "split server") and info["round"] < 30
    assert s["rounds"] == info["round"]  # the round it diverged in did not complete
