"""sflsim study: tuning grids, the selection, experiments with the selected step sizes, reports."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from simulator import rundir
from simulator.cli import main
from simulator.errors import UserError
from simulator.experiments.study import load_study, run_study, select_point, selection_overrides


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def study_dir(tmp_path, tiny_raw):
    """A tiny study on digits: a 2 x 2 step grid for splitfed_v1, a comparison that uses it."""
    raw = copy.deepcopy(tiny_raw)
    raw["stop"] = {"rounds": 2}
    _write(tmp_path / "base.yaml", raw)
    _write(tmp_path / "grid.yaml", {
        "base": "base.yaml", "grid": {"algorithm.lr_client": [0.02, 0.1], "algorithm.lr_server": [0.02, 0.1]},
        "seeds": 1, "set": {"data.validation": 200}})
    _write(tmp_path / "cmp.yaml", {
        "base": "base.yaml", "algorithms": ["splitfed_v1", "splitfed_v2"], "seeds": 2,
        "variants": {"splitfed_v1": {"a": {"algorithm.momentum": 0.0}}}})
    _write(tmp_path / "study.yaml", {
        "name": "tiny_study",
        "tuning": {"v1": {"grid": "grid.yaml", "apply_to": ["splitfed_v1"]}},
        "experiments": {"cmp": {"compare": "cmp.yaml", "use": ["v1"], "targets": [0.3]}},
    })
    return tmp_path


def test_study_tunes_selects_and_applies_the_selection(study_dir):
    study = load_study(study_dir / "study.yaml")
    out = study_dir / "out"
    result = run_study(study, out, workers=1, threads=1, progress=False, say=lambda s: None)
    sel = yaml.safe_load((out / "selected.yaml").read_text())["v1"]
    # the selection is the grid point with the best final accuracy
    accs = {}
    for run in json.loads((out / "tuning" / "v1" / rundir.BATCH_META).read_text())["runs"]:
        s = json.loads((out / "tuning" / "v1" / "runs" / run["run_id"] / "summary.json").read_text())
        accs[(run["params"]["algorithm.lr_client"], run["params"]["algorithm.lr_server"])] = s["final_accuracy"]
    best = max(accs.values())
    assert accs[(sel["params"]["algorithm.lr_client"], sel["params"]["algorithm.lr_server"])] == best
    assert sel["final_accuracy"] == best and result["selected"]["v1"]["params"] == sel["params"]
    assert sel["eval_data"] == "validation"
    # splitfed_v1 runs got the selected step sizes; splitfed_v2 runs kept the base's
    for run in json.loads((out / "cmp" / rundir.BATCH_META).read_text())["runs"]:
        scen = run["scenario"]["algorithm"]
        if run["algorithm"] == "splitfed_v1":
            assert (scen["lr_client"], scen["lr_server"]) == (sel["params"]["algorithm.lr_client"],
                                                              sel["params"]["algorithm.lr_server"])
        else:
            assert (scen["lr_client"], scen["lr_server"]) == (0.1, 0.1)
    assert (out / "cmp" / "report" / "report.md").is_file()
    # a second run reuses everything
    again = run_study(study, out, workers=1, threads=1, progress=False, say=lambda s: None)
    assert all(o["status"] == "reused" for b in again["batches"].values() for o in b.outcomes)


def test_selection_never_picks_a_diverged_point(study_dir):
    """A point with a diverged run is ruled out even when its accuracy would win."""
    raw = yaml.safe_load((study_dir / "base.yaml").read_text())
    raw["algorithm"]["lr_client"] = 0.1
    _write(study_dir / "base.yaml", raw)
    _write(study_dir / "grid.yaml", {"base": "base.yaml", "grid": {"algorithm.lr_server": [0.05, 1.0e6]}, "seeds": 1,
                                     "set": {"data.validation": 200}})
    study = load_study(study_dir / "study.yaml")
    run_study(study, study_dir / "out", stages=["tuning"], workers=1, threads=1, progress=False, say=lambda s: None)
    choice = select_point(study_dir / "out" / "tuning" / "v1")
    assert choice["params"] == {"algorithm.lr_server": 0.05}
    assert any("diverged" in why for why in choice["ruled_out"].values())


def test_a_grid_scored_on_test_is_refused(study_dir):
    """Tuning on test accuracy would tune on the test set: the selection refuses it."""
    doc = yaml.safe_load((study_dir / "grid.yaml").read_text())
    del doc["set"]
    _write(study_dir / "grid.yaml", doc)
    with pytest.raises(UserError, match="validation"):
        run_study(load_study(study_dir / "study.yaml"), study_dir / "out", stages=["tuning"], workers=1, threads=1,
                  progress=False, say=lambda s: None)


def test_experiments_need_their_tuning_first(study_dir):
    study = load_study(study_dir / "study.yaml")
    with pytest.raises(UserError, match="run the tuning stage first"):
        selection_overrides(study, {}, study.experiments["cmp"])


@pytest.mark.parametrize("doc, match", [
    ({"experiments": {}}, "at least one experiment"),
    ({"experiments": {"e": {"compare": "cmp.yaml", "sweep": "grid.yaml"}}}, "exactly one of"),
    ({"experiments": {"e": {"compare": "nope.yaml"}}}, "does not exist"),
    ({"experiments": {"e": {"compare": "cmp.yaml", "use": ["x"]}}}, "not a tuning"),
    ({"experiments": {"e": {"compare": "cmp.yaml", "colour": 1}}}, "experiments.e.colour: unknown key"),
    ({"tuning": {"t": {"grid": "grid.yaml"}}, "experiments": {"e": {"compare": "cmp.yaml"}}}, "required"),
])
def test_bad_study_files_are_one_line_errors(study_dir, capsys, doc, match):
    _write(study_dir / "bad.yaml", doc)
    assert main(["study", str(study_dir / "bad.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err, err


def test_shipped_study_plans(capsys):
    """The shipped study file loads, and every experiment plans (dry run: nothing runs)."""
    root = Path(__file__).resolve().parents[1]
    assert main(["study", str(root / "scenarios/paper/study.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "experiment hybrid" in out and "tuning mu_allzo" in out
    from simulator.experiments import plan_compare, plan_sweep

    study = load_study(root / "scenarios/paper/study.yaml")
    for e in study.experiments.values():
        plan = plan_compare(e.file) if e.kind == "compare" else plan_sweep(e.file)
        assert len(plan.specs) >= 15  # 3 seeds of at least 5 methods or points
    for t in study.tuning.values():
        assert plan_sweep(t.grid).specs


def test_a_missing_dataset_is_refused_before_anything_runs(study_dir, capsys, monkeypatch):
    """A study-level set: data.dataset=cifar10 without the files: one line naming where it looked, no output."""
    monkeypatch.setenv("SFLSIM_DATA", str(study_dir / "nodata"))
    doc = yaml.safe_load((study_dir / "study.yaml").read_text())
    doc["set"] = {"data.dataset": "cifar10"}
    _write(study_dir / "c10.yaml", doc)
    assert main(["study", str(study_dir / "c10.yaml"), "--out", str(study_dir / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cifar10" in err and "looked in" in err, err
    assert not (study_dir / "out").exists()


def test_cli_set_applies_to_every_run_and_bad_keys_are_refused(study_dir, capsys, monkeypatch):
    """study --set KEY=VALUE reaches every run (tuning and experiments); a wrong key is one line, exit 2."""
    out = study_dir / "out"
    assert main(["study", str(study_dir / "study.yaml"), "--out", str(out), "--set", "stop.rounds=1",
                 "--workers", "1", "--no-progress"]) == 0
    metas = [json.loads((out / sub / rundir.BATCH_META).read_text()) for sub in ("tuning/v1", "cmp")]
    assert all(run["scenario"]["stop"]["rounds"] == 1 for m in metas for run in m["runs"])
    capsys.readouterr()
    assert main(["study", str(study_dir / "study.yaml"), "--out", str(study_dir / "o2"), "--set", "stop.roundz=1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stop.roundz" in err, err
