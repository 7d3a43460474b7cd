"""Evaluation during training on a fixed, stratified, keyed subset of the test set; the full set at the end."""
from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from simulator.data import stratified_subset
from simulator.errors import ScenarioError
from simulator.preflight import preflight
from simulator.rng import generator
from simulator.runner import eval_subset, run_scenario
from simulator.scenario import DEFAULT_EVAL_SUBSET, validate

# 1,000 labels over 4 classes, one of them rare (3 samples): proportional rounding alone gives it none.
LABELS = np.repeat(np.arange(4), [500, 300, 197, 3])


def _scenario(raw: dict, **eval_keys):
    raw = copy.deepcopy(raw)
    raw["eval"] = {**raw["eval"], **eval_keys}
    return validate(raw)


def _rows(folder) -> list[dict]:
    with (folder / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_subset_is_stratified_with_every_class(tiny_raw):
    """50 of 1,000: largest-remainder shares of the classes (25, 15, 10 -> one given to the rare
    class by the largest), every class present, sorted and distinct."""
    idx = eval_subset(_scenario(tiny_raw, subset=50), LABELS)
    assert len(idx) == 50 and np.all(np.diff(idx) > 0)
    counts = np.bincount(LABELS[idx], minlength=4)
    assert counts.tolist() == [24, 15, 10, 1]  # proportional 25/15/9.85/0.15 -> 25/15/10/0, then 1 from the largest


def test_every_class_keeps_the_proportional_draw_when_it_already_covers_them():
    """every_class changes nothing when proportional rounding gives every class a sample."""
    labels = np.repeat(np.arange(3), [40, 40, 20])
    a = stratified_subset(labels, 10, generator(5, "eval", "subset"))
    b = stratified_subset(labels, 10, generator(5, "eval", "subset"), every_class=True)
    assert a.tolist() == b.tolist()


def test_subset_is_keyed_by_the_seed_only(tiny_raw):
    """Same seed: the same subset for every algorithm; another seed: another subset."""
    base = eval_subset(_scenario(tiny_raw, subset=100), LABELS)
    other_alg = copy.deepcopy(tiny_raw)
    other_alg["algorithm"] = {"name": "mu_splitfed", "batch_size": 16}
    assert eval_subset(_scenario(other_alg, subset=100), LABELS).tolist() == base.tolist()
    assert eval_subset(_scenario(tiny_raw, subset=100), LABELS).tolist() == base.tolist()  # deterministic
    reseeded = copy.deepcopy(tiny_raw)
    reseeded["seed"] = 4
    assert eval_subset(_scenario(reseeded, subset=100), LABELS).tolist() != base.tolist()
    expected = stratified_subset(LABELS, 100, generator(tiny_raw["seed"], "eval", "subset"), every_class=True)
    assert base.tolist() == expected.tolist()


def test_auto_null_and_whole_set_mean_the_full_test_set(tiny_raw):
    """auto is 1,000 samples or the whole set when it has fewer; null, or a subset covering the
    whole set, evaluates the full set (None)."""
    assert DEFAULT_EVAL_SUBSET == 1000
    assert eval_subset(_scenario(tiny_raw), LABELS[:999]) is None
    assert len(eval_subset(_scenario(tiny_raw), np.tile(LABELS, 2))) == 1000
    assert eval_subset(_scenario(tiny_raw, subset=None), LABELS) is None
    assert eval_subset(_scenario(tiny_raw, subset=1000), LABELS) is None


def test_subset_larger_than_the_loaded_test_set_names_the_key(tiny_raw):
    """The runner's own check (for test sets pre-flight cannot size): ScenarioError on eval.subset."""
    with pytest.raises(ScenarioError, match=r"^eval\.subset: 1,001 is more than the 1,000 samples"):
        eval_subset(_scenario(tiny_raw, subset=1001), LABELS)
    with pytest.raises(ScenarioError, match=r"^eval\.subset: 3 samples: .*4 classes"):
        eval_subset(_scenario(tiny_raw, subset=3), LABELS)


def test_training_evaluates_the_subset_and_the_end_the_full_set(tiny_raw, tmp_path):
    """Subset rows during training, one full row at the end at the same time and round; the
    summary reads final accuracy from the full row and best/last subset accuracy from the rest."""
    result = run_scenario(_scenario(tiny_raw, subset=100), tmp_path)
    rows = _rows(tmp_path)
    assert [r["eval_set"] for r in rows] == ["subset", "subset", "subset", "full"]
    assert [int(r["eval_samples"]) for r in rows] == [100, 100, 100, 359]  # digits holds out 359 test samples
    assert (rows[-1]["sim_time_s"], rows[-1]["round"]) == (rows[-2]["sim_time_s"], rows[-2]["round"])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert float(rows[-1]["sim_time_s"]) == s["sim_time_s"]  # free in simulated time
    assert s["final_accuracy"] == float(rows[-1]["test_accuracy"])
    assert s["final_loss"] == float(rows[-1]["test_loss"])
    assert s["final_subset_accuracy"] == float(rows[-2]["test_accuracy"])
    assert s["best_accuracy"] == max(float(r["test_accuracy"]) for r in rows[:-1])
    assert (s["eval_subset_samples"], s["eval_test_samples"], s["evaluations"]) == (100, 359, 4)
    assert 0 < s["eval_host_s"] < s["host_runtime_s"]
    assert result.summary["final_accuracy"] == s["final_accuracy"]


def test_full_every_time_has_no_extra_row(tiny_raw, tmp_path):
    """eval.subset null: every row is full, none added at the end, no subset accuracy."""
    run_scenario(_scenario(tiny_raw, subset=None), tmp_path)
    rows = _rows(tmp_path)
    assert [(r["round"], r["eval_set"], r["eval_samples"]) for r in rows] == [
        ("0", "full", "359"), ("1", "full", "359"), ("2", "full", "359")]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["final_subset_accuracy"] is None and s["eval_subset_samples"] is None
    assert s["final_accuracy"] == float(rows[-1]["test_accuracy"])


def test_every_algorithm_sees_the_same_subset(tiny_raw):
    """The initial model depends only on the seed: its subset evaluation is the same for two algorithms."""
    first = []
    for alg in ({"name": "splitfed_v1", "batch_size": 16}, {"name": "splitfed_v2", "batch_size": 16}):
        raw = copy.deepcopy(tiny_raw)
        raw["algorithm"] = alg
        first.append(run_scenario(_scenario(raw, subset=50)).recorder.metrics[0])
    assert first[0] == first[1] and first[0]["eval_set"] == "subset"


def test_target_accuracy_is_checked_on_the_subset(tiny_raw, tmp_path):
    """The run stops at the first subset evaluation at or above the target, then evaluates the full set."""
    raw = copy.deepcopy(tiny_raw)
    raw["stop"] = {"rounds": 6}
    curve = [m for m in run_scenario(_scenario(raw, subset=100)).recorder.metrics if m["eval_set"] == "subset"]
    accs = [m["test_accuracy"] for m in curve]
    k = next(i for i in range(1, len(accs)) if accs[i] > max(accs[:i]))  # the first new best after round 0
    raw["stop"]["target_accuracy"] = accs[k]
    result = run_scenario(_scenario(raw, subset=100), tmp_path)
    rows = result.recorder.metrics
    assert result.summary["stop_reason"] == "target_accuracy" and result.summary["rounds"] == k
    assert [m["eval_set"] for m in rows] == ["subset"] * (k + 1) + ["full"]
    assert rows[-2]["test_accuracy"] == accs[k]


def test_preflight_bounds_the_subset_by_the_test_set(tiny_raw):
    """Larger than the test set (or data.test_limit), or fewer samples than classes: eval.subset."""
    with pytest.raises(ScenarioError, match=r"^eval\.subset: 360 is more than the test samples \(the test set of "
                                            r"digits has 359"):
        preflight(_scenario(tiny_raw, subset=360))
    limited = copy.deepcopy(tiny_raw)
    limited["data"]["test_limit"] = 200
    with pytest.raises(ScenarioError, match=r"data\.test_limit is 200"):
        preflight(_scenario(limited, subset=250))
    with pytest.raises(ScenarioError, match=r"^eval\.subset: 9 samples cannot hold one of each of the 10 classes"):
        preflight(_scenario(tiny_raw, subset=9))
    preflight(_scenario(tiny_raw, subset=359))
    preflight(_scenario(tiny_raw, subset=10))


def test_cli_exits_2_naming_eval_subset(tiny_raw, tmp_path):
    """sflsim run with a subset larger than the test set: exit 2, one line naming eval.subset, no output."""
    raw = copy.deepcopy(tiny_raw)
    raw["eval"]["subset"] = 5000
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    p = subprocess.run([sys.executable, "-m", "simulator", "run", str(path), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert "eval.subset: 5,000 is more than the test samples" in p.stderr
    assert not (tmp_path / "out").exists()
