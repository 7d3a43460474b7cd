"""analysis.traces: loading run folders, time/rounds to target, CIs and curves over seeds."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis.traces import (
    add_labels,
    curve_rows,
    final_rows,
    final_values,
    find_runs,
    group_columns,
    interpolate_runs,
    load_events,
    load_runs,
    load_summaries,
    mean_ci,
    mean_curve,
    rounds_to_target,
    run_columns,
    time_to_target,
)
from simulator.errors import UserError

# Student t quantiles t_{0.975, dof}, from printed tables.
T975 = {1: 12.706, 2: 4.303, 3: 3.182}


def write_fake_run(root: Path, run_id: str, *, algorithm: str, seed: int, times, accs, rounds=None,
                   variant: str = "", params: dict | None = None, status: str = "completed",
                   events: list[tuple] | None = None, capacity: int | None = 1,
                   target: float | None = None, server_busy_fraction: float = 0.5,
                   full_acc: float | None = None) -> Path:
    """A run folder as the batch runner leaves it (metrics, events, summary, run.json, scenario).

    Without ``full_acc`` metrics.csv has no eval marks (a run of an older version: all full);
    with it, ``accs`` are 100-sample subset evaluations and a full row (1,000 samples) of
    ``full_acc`` follows at the last time and round."""
    d = root / run_id
    d.mkdir(parents=True)
    rounds = list(range(len(times))) if rounds is None else rounds
    m = pd.DataFrame({"sim_time_s": times, "round": rounds, "test_accuracy": accs,
                      "test_loss": [1.0] * len(times), "bytes_up": [100 * r for r in rounds],
                      "bytes_down": [200 * r for r in rounds]})
    if full_acc is not None:
        m["eval_set"], m["eval_samples"] = "subset", 100
        m = pd.concat([m, m.iloc[[-1]].assign(test_accuracy=full_acc, eval_set="full", eval_samples=1000)])
    m.to_csv(d / "metrics.csv", index=False)
    ev = events if events is not None else [
        (0, "client", "client_forward", 0, 0, 0.0, 0.5, 0.0, 1.0, 0),
        (0, "uplink", "activation", 0, 0, 0.5, 0.6, 0.0, 0.0, 10),
        (0, "server", "server_step", 0, 0, 0.6, 0.9, 0.1, 1.0, 0),
        (0, "downlink", "gradient", 0, 1, 0.9, 1.0, 0.0, 0.0, 10),
        (1, "client", "client_forward", 0, 0, 0.0, 0.8, 0.0, 1.0, 0),
        (None, "fed", "aggregate", 0, 0, 1.0, 1.1, 0.0, 1.0, 0),
        (0, "client", "client_forward", 1, 1, 1.1, 1.6, 0.0, 1.0, 0),
    ]
    cols = ["client", "party", "kind", "round", "seq", "start_s", "end_s", "wait_s", "flops", "nbytes"]
    pd.DataFrame(ev, columns=cols).to_csv(d / "events.csv", index=False)
    summary = {"scenario": "fake", "algorithm": algorithm, "seed": seed, "status": status, "stop_reason": "rounds",
               "final_accuracy": accs[-1] if full_acc is None else full_acc, "best_accuracy": max(accs),
               "sim_time_s": times[-1],
               "rounds": rounds[-1], "bytes_up": 100 * rounds[-1], "bytes_down": 200 * rounds[-1],
               "server_busy_s": server_busy_fraction * times[-1], "server_busy_fraction": server_busy_fraction,
               "host_runtime_s": 1.0, "threads": 1}
    (d / "summary.json").write_text(json.dumps(summary))
    meta = {"run_id": run_id, "algorithm": algorithm, "variant": variant, "seed": seed,
            "params": params or {}, "dropped_keys": [], "fingerprint": "x", "status": status}
    (d / "run.json").write_text(json.dumps(meta))
    scen = {"name": "fake", "seed": seed, "data": {"dataset": "digits", "num_clients": 2, "partition": "iid"},
            "model": {"name": "mlp", "cut": 1}, "algorithm": {"name": algorithm},
            "time": {"server": {"capacity": capacity}}, "stop": {"rounds": rounds[-1], "target_accuracy": target}}
    (d / "scenario.yaml").write_text(yaml.safe_dump(scen))
    return d


def frame(rows: list[tuple]) -> pd.DataFrame:
    """A metrics frame from (algorithm, seed, time, round, accuracy) rows."""
    df = pd.DataFrame(rows, columns=["algorithm", "seed", "sim_time_s", "round", "test_accuracy"])
    df["run_id"] = df["algorithm"] + "-seed" + df["seed"].astype(str)
    return df


RUNS = frame([
    ("a", 0, 0.0, 0, 0.10), ("a", 0, 1.0, 1, 0.50), ("a", 0, 2.0, 2, 0.80), ("a", 0, 3.0, 3, 0.90),
    ("a", 1, 0.0, 0, 0.10), ("a", 1, 2.0, 1, 0.70), ("a", 1, 4.0, 2, 0.85),
    ("b", 0, 0.0, 0, 0.10), ("b", 0, 5.0, 1, 0.60),
])


def test_time_to_target_is_first_evaluation_at_or_above():
    """Time to 0.8 is the time of the first evaluation >= 0.8; NaN when never reached."""
    t = time_to_target(RUNS, 0.8).set_index("run_id")
    assert t.loc["a-seed0", "time_to_target"] == 2.0  # 0.80 >= 0.80 at t=2
    assert t.loc["a-seed1", "time_to_target"] == 4.0
    assert math.isnan(t.loc["b-seed0", "time_to_target"]) and not t.loc["b-seed0", "reached"]


def test_rounds_to_target_uses_the_round_column():
    """Rounds to 0.7: run a-seed0 reaches it at round 2, a-seed1 at round 1."""
    r = rounds_to_target(RUNS, 0.7).set_index("run_id")
    assert r.loc["a-seed0", "rounds_to_target"] == 2
    assert r.loc["a-seed1", "rounds_to_target"] == 1
    assert math.isnan(r.loc["b-seed0", "rounds_to_target"])


def test_mean_ci_matches_student_t_by_hand():
    """[1, 2, 3]: mean 2, sd 1, half-width t(0.975, 2) * 1 / sqrt(3) = 2.484."""
    mean, half, n = mean_ci([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(T975[2] / math.sqrt(3), rel=1e-3)
    m2, h2, n2 = mean_ci([4.0, float("nan"), 6.0])  # NaN left out: [4, 6], sd sqrt(2)
    assert (m2, n2) == (5.0, 2) and h2 == pytest.approx(T975[1] * math.sqrt(2) / math.sqrt(2), rel=1e-3)
    assert math.isnan(mean_ci([0.7])[1]) and mean_ci([])[2] == 0


def test_interpolation_is_linear_and_holds_the_last_value():
    """Between evaluations the value is linear; after a run's end its last value is held."""
    one = RUNS[RUNS["run_id"] == "a-seed1"]
    out = interpolate_runs(one, [0.0, 1.0, 3.0, 6.0])
    assert out["test_accuracy"].tolist() == pytest.approx([0.10, 0.40, 0.775, 0.85])
    assert out["active"].tolist() == [True, True, True, False]


def test_mean_curve_averages_seeds_per_group():
    """At t=3 algorithm a is the mean of 0.90 and 0.775; n_active counts runs still going."""
    c = mean_curve(RUNS, grid=[0.0, 3.0, 5.0])
    a = c[c["algorithm"] == "a"].set_index("sim_time_s")
    assert a.loc[3.0, "mean"] == pytest.approx((0.90 + 0.775) / 2)
    assert a.loc[3.0, "n"] == 2 and a.loc[3.0, "n_active"] == 2 and a.loc[5.0, "n_active"] == 0
    d = np.array([0.90, 0.775])
    assert a.loc[3.0, "ci"] == pytest.approx(T975[1] * d.std(ddof=1) / math.sqrt(2), rel=1e-3)
    assert set(c["algorithm"]) == {"a", "b"}


def test_group_columns_leave_out_seed_and_run_id():
    """Runs are told apart by seed/run_id; groups are not."""
    assert run_columns(RUNS) == ["algorithm", "seed", "run_id"]
    assert group_columns(RUNS) == ["algorithm"]
    sweep = RUNS.assign(**{"model.cut": 1})
    assert group_columns(sweep) == ["algorithm", "model.cut"]


def test_labels_show_only_what_varies():
    """A label names the algorithm/variant and the grid keys that differ between groups."""
    df = pd.DataFrame({"algorithm": ["x", "x"], "variant": ["", "t2"], "model.cut": [1, 2]})
    assert add_labels(df, ["algorithm", "variant", "model.cut"])["label"].tolist() == ["x model.cut=1",
                                                                                       "x/t2 model.cut=2"]


def test_load_runs_reads_a_batch_folder(tmp_path):
    """load_runs: one row per evaluation with labels and grid keys; unfinished runs left out."""
    runs = tmp_path / "batch" / "runs"
    write_fake_run(runs, "k=1,seed=0", algorithm="splitfed_v1", seed=0, times=[0, 1], accs=[0.1, 0.6],
                   params={"model.cut": 1})
    write_fake_run(runs, "k=2,seed=0", algorithm="splitfed_v1", seed=0, times=[0, 2], accs=[0.1, 0.7],
                   params={"model.cut": 2})
    write_fake_run(runs, "k=3,seed=0.partial", algorithm="splitfed_v1", seed=0, times=[0], accs=[0.1])
    write_fake_run(runs, "k=3,seed=0.failed", algorithm="splitfed_v1", seed=0, times=[0], accs=[0.1])
    write_fake_run(runs, "k=4,seed=0", algorithm="splitfed_v1", seed=0, times=[0], accs=[0.1], status="interrupted")
    df = load_runs(tmp_path / "batch")
    assert df["run_id"].unique().tolist() == ["k=1,seed=0", "k=2,seed=0"]
    assert df.attrs["params"] == ["model.cut"] and df["model.cut"].tolist() == [1, 1, 2, 2]
    assert list(df.columns[:7]) == ["scenario", "algorithm", "variant", "seed", "run_id", "run_dir", "model.cut"]
    assert group_columns(df) == ["scenario", "algorithm", "variant", "model.cut"]
    s = load_summaries(tmp_path / "batch")
    assert s["final_accuracy"].tolist() == [0.6, 0.7] and s["server_busy_fraction"].tolist() == [0.5, 0.5]
    assert len(find_runs(tmp_path / "batch", complete_only=False)) == 3
    assert len(load_events(runs / "k=1,seed=0")) == 7


def test_load_runs_accepts_a_single_run_folder_and_rejects_others(tmp_path):
    """A plain run folder (sflsim run) loads with its folder name as run id; junk is a UserError."""
    d = write_fake_run(tmp_path, "single", algorithm="splitfed_v2", seed=3, times=[0, 1], accs=[0.2, 0.3])
    (d / "run.json").unlink()
    df = load_runs(d)
    assert df["run_id"].unique().tolist() == ["single"] and df["variant"].unique().tolist() == [""]
    with pytest.raises(UserError):
        load_runs(tmp_path / "nothing")


# --------------------------------------------------------------------------------------------
# Evaluation marks: training-time subset rows and the full row at the end
# --------------------------------------------------------------------------------------------
def _marked(tmp_path):
    """Run a: subset 0.1 -> 0.7, full 0.85 at its end; run b: an older run, all full (0.1 -> 0.9)."""
    write_fake_run(tmp_path, "a", algorithm="a", seed=0, times=[0, 1, 2], accs=[0.1, 0.5, 0.7], full_acc=0.85)
    write_fake_run(tmp_path, "b", algorithm="b", seed=0, times=[0, 1, 2], accs=[0.1, 0.5, 0.9])
    return load_runs([tmp_path / "a", tmp_path / "b"])


def test_load_runs_marks_older_runs_full(tmp_path):
    """A metrics.csv without eval_set loads as full rows with unknown sample counts."""
    df = _marked(tmp_path)
    b = df[df["run_id"] == "b"]
    assert b["eval_set"].tolist() == ["full"] * 3 and b["eval_samples"].isna().all()
    assert df[df["run_id"] == "a"]["eval_set"].tolist() == ["subset"] * 3 + ["full"]


def test_curve_and_final_rows(tmp_path):
    """The curve of a subset run is its subset rows; of a full run, all rows. Final: the last full row."""
    df = _marked(tmp_path)
    curve = curve_rows(df)
    assert curve.groupby("run_id")["eval_set"].apply(list).to_dict() == {"a": ["subset"] * 3, "b": ["full"] * 3}
    final = final_rows(df).set_index("run_id")["test_accuracy"]
    assert final.to_dict() == {"a": 0.85, "b": 0.9}
    assert final_rows(df, only_subset_runs=True)["run_id"].tolist() == ["a"]


def test_time_to_target_never_reads_the_final_full_row(tmp_path):
    """Run a's full row (0.85) reaches 0.8 but its training-time curve does not: never reached."""
    t = time_to_target(_marked(tmp_path), 0.8).set_index("run_id")
    assert math.isnan(t.loc["a", "time_to_target"]) and t.loc["b", "time_to_target"] == 2


def test_final_values_split_full_and_subset(tmp_path):
    """final_accuracy: the full row; final_subset_accuracy and best_accuracy: the subset rows."""
    v = final_values(_marked(tmp_path)).set_index("run_id")
    assert v.loc["a", ["final_accuracy", "final_subset_accuracy", "best_accuracy"]].tolist() == [0.85, 0.7, 0.7]
    assert v.loc["b", "final_accuracy"] == 0.9 and math.isnan(v.loc["b", "final_subset_accuracy"])
    assert v.loc["a", "rounds"] == 2 and v.loc["a", "sim_time_s"] == 2


def test_mean_curve_ends_at_the_last_subset_value(tmp_path):
    """The full row at the same time as the last subset row does not bend the curve."""
    df = _marked(tmp_path)
    curve = mean_curve(df[df["run_id"] == "a"], grid=[0, 2])
    assert curve["mean"].tolist() == pytest.approx([0.1, 0.7])
