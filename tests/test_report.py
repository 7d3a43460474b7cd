"""analysis.report: the report folder of a compare or sweep (figures, tables, report.md/.html)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from analysis.report import default_targets, write_report
from simulator.errors import UserError
from tests.test_traces import write_fake_run


def _compare_dir(tmp_path):
    """Two algorithms x three seeds, one failed run listed in runs.csv."""
    root = tmp_path / "cmp"
    runs = root / "runs"
    rows = []
    for alg, times in (("splitfed_v1", [0, 10, 20, 30]), ("splitfed_v2", [0, 5, 10, 15])):
        for seed in (0, 1, 2):
            rid = f"{alg}-seed{seed}"
            write_fake_run(runs, rid, algorithm=alg, seed=seed, times=times,
                           accs=[0.1, 0.5 + 0.01 * seed, 0.8, 0.9], target=0.9)
            rows.append({"run_id": rid, "status": "completed", "error": ""})
    rows.append({"run_id": "splitfed_v2-seed3", "status": "failed", "error": "RuntimeError: boom"})
    pd.DataFrame(rows).to_csv(root / "runs.csv", index=False)
    batch = {"kind": "compare", "source": "/x/s.yaml", "algorithms": ["splitfed_v1", "splitfed_v2"],
             "seeds": [0, 1, 2, 3], "runs": [{"run_id": r["run_id"], "algorithm": r["run_id"].split("-")[0],
                                               "dropped_keys": []} for r in rows],
             "execution": {"workers": 2, "threads_per_run": 1, "in_process": False}}
    (root / "batch.json").write_text(json.dumps(batch))
    return root


def test_report_of_a_compare(tmp_path):
    """Figures, tables and both pages are written; the numbers are the ones in the runs."""
    root = _compare_dir(tmp_path)
    md = write_report(root, targets=[0.8], baseline="splitfed_v1")
    out = root / "report"
    assert md == out / "report.md"
    figs = {p.name for p in (out / "figures").glob("*.png")}
    assert {"accuracy_vs_time.png", "accuracy_vs_rounds.png", "server_utilisation.png",
            "timeline_splitfed_v1.png", "timeline_splitfed_v2.png"} <= figs
    summary = pd.read_csv(out / "tables" / "summary.csv").set_index("label")
    assert summary.loc["splitfed_v1", "time_to_0.8_mean"] == 20 and summary.loc["splitfed_v2", "time_to_0.8_mean"] == 10
    assert summary.loc["splitfed_v2", "speedup_0.8"] == 2.0
    assert summary.loc["splitfed_v1", "final_accuracy_ci95"] == 0  # all seeds end at 0.9
    paired = pd.read_csv(out / "tables" / "paired.csv")
    assert paired[paired["metric"] == "time_to_0.8"]["mean_diff"].tolist() == [-10]
    assert len(pd.read_csv(out / "tables" / "per_run.csv")) == 6
    text = md.read_text()
    assert "![" in text and "(figures/accuracy_vs_time.png)" in text and "2.00x" in text
    assert "splitfed_v2-seed3" in text and "boom" in text  # the failed run is listed
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(figs) and "<table>" in page


def test_report_default_targets_and_bad_baseline(tmp_path):
    """Without --targets: the scenario's target (0.9) and the highest 5% step all runs reached."""
    root = _compare_dir(tmp_path)
    write_report(root)
    summary = pd.read_csv(root / "report" / "tables" / "summary.csv")
    assert "time_to_0.9_mean" in summary.columns and summary["label"].tolist() == ["splitfed_v1", "splitfed_v2"]
    assert default_targets(pd.DataFrame({"best_accuracy": [0.87, 0.93]}), [0.9]) == [0.85, 0.9]
    with pytest.raises(UserError, match="matches no row"):
        write_report(root, baseline="nope")


def test_report_of_a_sweep_has_heatmaps(tmp_path):
    """Two swept keys give heatmaps of final accuracy and time/rounds to target."""
    runs = tmp_path / "sweep" / "runs"
    for cut in (1, 2):
        for tau in (1, 2):
            for seed in (0, 1):
                t = 10.0 * cut / tau
                write_fake_run(runs, f"model.cut={cut},algorithm.tau={tau},seed={seed}", algorithm="mu_splitfed",
                               seed=seed, times=[0, t, 2 * t], accs=[0.1, 0.7, 0.75],
                               params={"model.cut": cut, "algorithm.tau": tau})
    md = write_report(tmp_path / "sweep", targets=[0.7])
    figs = {p.name for p in (tmp_path / "sweep" / "report" / "figures").glob("heatmap_*.png")}
    assert figs == {"heatmap_final_accuracy_mean.png", "heatmap_time_to_0.7_mean.png",
                    "heatmap_rounds_to_0.7_mean.png"}
    summary = pd.read_csv(tmp_path / "sweep" / "report" / "tables" / "summary.csv")
    assert summary["label"].tolist()[0] == "model.cut=1,algorithm.tau=1"
    assert summary.set_index(["model.cut", "algorithm.tau"]).loc[(2, 2), "time_to_0.7_mean"] == 10.0
    assert "Over the grid" in md.read_text()


def test_report_leaves_out_runs_not_in_batch_json(tmp_path):
    """A run folder left by an earlier command into the same folder is not part of this batch."""
    root = _compare_dir(tmp_path)
    write_fake_run(root / "runs", "old-seed0", algorithm="splitfed_v1", seed=9, times=[0, 1], accs=[0.1, 0.2])
    md = write_report(root, targets=[0.8])
    per_run = pd.read_csv(root / "report" / "tables" / "per_run.csv")
    assert "old-seed0" not in set(per_run["run_id"]) and len(per_run) == 6
    assert "not in batch.json" in md.read_text()


def test_report_reads_final_accuracy_from_the_full_row(tmp_path):
    """Subset runs: final accuracy is the full-set row, times to target come from the subset rows,
    and the page says which samples each number used."""
    root = tmp_path / "cmp"
    for seed in (0, 1):
        write_fake_run(root / "runs", f"splitfed_v1-seed{seed}", algorithm="splitfed_v1", seed=seed,
                       times=[0, 10, 20], accs=[0.1, 0.6, 0.7], full_acc=0.8 + 0.02 * seed)
    md = write_report(root, targets=[0.75])
    per_run = pd.read_csv(root / "report" / "tables" / "per_run.csv")
    assert per_run["final_accuracy"].tolist() == pytest.approx([0.8, 0.82])
    assert per_run["final_subset_accuracy"].tolist() == [0.7, 0.7]
    assert per_run["time_to_0.75"].isna().all()  # only the full rows reach 75%
    summary = pd.read_csv(root / "report" / "tables" / "summary.csv")
    assert summary["final_accuracy_mean"].tolist() == pytest.approx([0.81])
    text = md.read_text()
    assert "full test set (1,000 samples)" in text and "fixed subset of 100 test samples" in text
