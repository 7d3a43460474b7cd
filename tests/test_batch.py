"""simulator.experiments: planning compares and sweeps, running them (in-process and on Dask), resuming."""
from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import yaml

from simulator.experiments import Plan, plan_compare, plan_sweep, run_batch
from simulator.experiments.plan import parse_seeds, sanitize, split_overrides, switch_algorithm
from simulator.algorithms import ALGORITHMS
from simulator.cli import main
from simulator.errors import ScenarioError, UserError


@pytest.fixture
def scenario_file(tmp_path, tiny_raw):
    """The tiny scenario, one round, written to a YAML file."""
    tiny_raw["stop"] = {"rounds": 1}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    return path


def test_parse_seeds_count_or_list():
    """A count starts at the scenario's seed; a comma list is taken as is."""
    assert parse_seeds("3", 5) == [5, 6, 7]
    assert parse_seeds("0,4,7") == [0, 4, 7] and parse_seeds("7,") == [7] and parse_seeds([1, 2]) == [1, 2]
    for bad in ("0", "a", "1,1", "-1,2"):
        with pytest.raises(UserError):
            parse_seeds(bad)


def test_switch_algorithm_reports_undeclared_keys():
    """Switching algorithm keeps shared keys (``zo`` with its nested keys too) and returns the
    keys the target lacks, nested ones as dotted leaves, for the caller to say so."""
    raw = {"algorithm": {"name": "mu_splitfed", "lr_client": 0.3, "tau": 2, "zo": {"lam": 0.01}}}
    out, dropped = switch_algorithm(raw, "splitfed_v2")
    assert out["algorithm"] == {"name": "splitfed_v2", "lr_client": 0.3, "zo": {"lam": 0.01}}
    assert dropped == ["algorithm.tau"]
    _, nested = switch_algorithm({"algorithm": {"name": "gas", "generate": {"k": 1, "m": {"n": 2}}}}, "splitfed_v1")
    assert nested == ["algorithm.generate.k", "algorithm.generate.m.n"]
    same, none = switch_algorithm(raw, "mu_splitfed")  # unchanged name: nothing dropped, validation decides
    assert same == raw and none == []
    with pytest.raises(UserError, match="unknown algorithm"):
        switch_algorithm(raw, "splitfed_v3")


def test_a_key_set_for_every_algorithm_that_one_lacks_is_an_error(scenario_file):
    """A plain --set algorithm.X (or algorithm.zo.Y) that one compared algorithm does not declare
    names the dotted key, the algorithm and the prefix to use; it is never dropped silently."""
    algs = ["mu_splitfed", "splitfed_v1"]
    with pytest.raises(ScenarioError) as e:
        plan_compare(scenario_file, algs, None, ["algorithm.tau=2"])
    assert str(e.value) == ("algorithm.tau: splitfed_v1 has no key tau (use the prefix "
                            "mu_splitfed:algorithm.tau=... to set it for one algorithm)")
    with pytest.raises(ScenarioError, match=r"^algorithm.tau_max: gas has no key tau_max \(use the prefix mu_"):
        plan_compare(scenario_file, ["mu_splitfed", "gas"], None, ["algorithm.tau_max=3"])
    plan = plan_compare(scenario_file, algs, None, ["mu_splitfed:algorithm.tau=2", "algorithm.zo.lam=0.002"])
    by_alg = {s.algorithm: s for s in plan.specs}
    assert by_alg["mu_splitfed"].scenario["algorithm"]["tau"] == 2
    assert "tau" not in by_alg["splitfed_v1"].scenario["algorithm"]
    assert all(s.scenario["algorithm"]["zo"]["lam"] == 0.002 and s.dropped_keys == () for s in plan.specs)


def test_base_file_keys_a_target_lacks_are_dropped_with_a_note(tmp_path, scenario_file, capsys):
    """Keys of the base scenario's own algorithm section that a target lacks are not carried
    over, but recorded in dropped_keys (runs.csv/run.json) and named in a note line per algorithm."""
    raw = yaml.safe_load(scenario_file.read_text())
    raw["algorithm"].update(name="mu_splitfed", tau=2, tau_max=3)
    base = tmp_path / "mu.yaml"
    base.write_text(yaml.safe_dump(raw))
    plan = plan_compare(base, ["mu_splitfed", "splitfed_v1"], None)
    by_alg = {s.algorithm: s for s in plan.specs}
    assert by_alg["mu_splitfed"].dropped_keys == () and by_alg["mu_splitfed"].scenario["algorithm"]["tau"] == 2
    assert by_alg["splitfed_v1"].dropped_keys == ("algorithm.tau", "algorithm.tau_max")
    assert main(["compare", str(base), "--algorithms", "mu_splitfed,splitfed_v1", "--dry-run",
                 "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["note: splitfed_v1 does not take algorithm.tau, algorithm.tau_max from the base scenario; "
                   "not carried over (dropped_keys in run.json)"]
    assert main(["compare", str(base), "--algorithms", "mu_splitfed,splitfed_v1", "--set", "algorithm.tau=4",
                 "--dry-run", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "sflsim: error: algorithm.tau: splitfed_v1 has no key tau (use the prefix mu_splitfed:" in err
    assert "Traceback" not in err


def test_sweep_set_and_grid_keys_apply_to_every_algorithm(tmp_path, scenario_file):
    """In a sweep over algorithm.name, set: entries and grid keys reach every algorithm: one
    that an algorithm lacks is an error naming it; the ALG: prefix of --set sets it for one."""
    def grid(**doc):
        path = tmp_path / "grid.yaml"
        path.write_text(yaml.safe_dump({"base": scenario_file.name, **doc}))
        return path

    algs = {"algorithm.name": ["splitfed_v1", "mu_splitfed"]}
    with pytest.raises(ScenarioError, match="^algorithm.tau: splitfed_v1 has no key tau"):
        plan_sweep(grid(grid=algs, set={"algorithm.tau": 2}))
    with pytest.raises(ScenarioError, match="^algorithm.tau: splitfed_v1 has no key tau .a grid key"):
        plan_sweep(grid(grid={**algs, "algorithm.tau": [1, 2]}))
    plan = plan_sweep(grid(grid=algs), overrides=["mu_splitfed:algorithm.tau=2"])
    assert [s.scenario["algorithm"].get("tau") for s in plan.specs] == [None, 2]


@pytest.mark.parametrize("source", sorted(ALGORITHMS))
def test_switching_between_any_two_registered_algorithms_validates(source):
    """Contract over the registry: a section of one algorithm, switched to any other, has only
    keys the target declares. Its own settings (the non-default ones) validate; a full dump may
    carry a value the target rejects (e.g. a ZO server optimizer to gas), never an unknown key."""
    from pydantic import ValidationError

    for target, spec in ALGORITHMS.items():
        default = ALGORITHMS[source].config(name=source)
        own = default.model_dump(mode="json", by_alias=True, exclude_defaults=True) | {"name": source}
        out, dropped = switch_algorithm({"algorithm": own}, target)
        assert spec.config.model_validate(out["algorithm"]).name == target
        section = default.model_dump(mode="json", by_alias=True)
        out, dropped = switch_algorithm({"algorithm": section}, target)
        assert all(k.split(".")[1] not in out["algorithm"] for k in dropped)
        try:
            assert spec.config.model_validate(out["algorithm"]).name == target
        except ValidationError as e:
            assert all(err["type"] != "extra_forbidden" for err in e.errors()), (source, target, e)


def test_split_overrides_by_prefix():
    """'ALG:key=value' is algorithm-specific; colons in values do not count."""
    plain, pref = split_overrides(["stop.rounds=2", "splitfed_v2:algorithm.lr_client=0.2", "name=a:b"])
    assert plain == ["stop.rounds=2", "name=a:b"] and pref == [("splitfed_v2", "algorithm.lr_client=0.2")]


def test_plan_compare_pairs_seeds_across_algorithms(scenario_file):
    """Every (algorithm, seed); the same seed in both; prefixed --set reaches one algorithm only."""
    plan = plan_compare(scenario_file, ["splitfed_v1", "splitfed_v2"], "2",
                        ["stop.rounds=2", "splitfed_v2:algorithm.lr_client=0.2"])
    assert [s.run_id for s in plan.specs] == ["splitfed_v1-seed3", "splitfed_v1-seed4",
                                              "splitfed_v2-seed3", "splitfed_v2-seed4"]
    by_id = {s.run_id: s for s in plan.specs}
    assert by_id["splitfed_v1-seed4"].scenario["seed"] == by_id["splitfed_v2-seed4"].scenario["seed"] == 4
    assert by_id["splitfed_v1-seed3"].scenario["algorithm"]["lr_client"] == 0.1
    assert by_id["splitfed_v2-seed3"].scenario["algorithm"]["lr_client"] == 0.2
    assert all(s.scenario["stop"]["rounds"] == 2 for s in plan.specs)
    assert len({s.fingerprint for s in plan.specs}) == 4
    with pytest.raises(ScenarioError, match="matches no run"):
        plan_compare(scenario_file, ["splitfed_v1"], None, ["splitfed_v2:algorithm.lr_client=0.2"])
    with pytest.raises(ScenarioError, match=r"^algorithm.lr_clien: splitfed_v1 has no key lr_clien \(did you mean "
                                            r"lr_client\?\)$"):
        plan_compare(scenario_file, ["splitfed_v1"], None, ["algorithm.lr_clien=0.2"])
    with pytest.raises(ScenarioError, match="in run splitfed_v1-seed3"):
        plan_compare(scenario_file, ["splitfed_v1"], None, ["stop.round=2"])


def test_plan_compare_variants_from_a_compare_file(tmp_path, scenario_file):
    """A compare file: base + algorithms + seeds + variants (one row per variant label)."""
    cmp = tmp_path / "cmp.yaml"
    cmp.write_text(yaml.safe_dump({
        "base": scenario_file.name, "algorithms": ["splitfed_v1", "splitfed_v2"], "seeds": [0],
        "variants": {"splitfed_v2": {"slow": {"algorithm.lr_client": 0.01}, "fast": {"algorithm.lr_client": 0.5}}},
        "stop": {"rounds": 2},
    }, sort_keys=False))
    plan = plan_compare(cmp)
    assert [(s.run_id, s.variant) for s in plan.specs] == [
        ("splitfed_v1-seed0", ""), ("splitfed_v2-slow-seed0", "slow"), ("splitfed_v2-fast-seed0", "fast")]
    assert [s.scenario["algorithm"]["lr_client"] for s in plan.specs] == [0.1, 0.01, 0.5]
    assert all(s.scenario["stop"]["rounds"] == 2 for s in plan.specs)
    assert plan.info["variants"]["splitfed_v2"]["fast"] == {"algorithm.lr_client": 0.5}


def test_plan_sweep_is_a_cartesian_product(tmp_path, scenario_file):
    """A grid file: base relative to it, grid keys x seeds, readable ids, algorithm switches."""
    grid = tmp_path / "sub" / "grid.yaml"
    grid.parent.mkdir()
    grid.write_text(yaml.safe_dump({
        "base": "../tiny.yaml", "seeds": 2, "set": {"stop.rounds": 2},
        "grid": {"algorithm.name": ["splitfed_v1", "splitfed_v2"], "model.cut": [1, 2]},
    }, sort_keys=False))
    plan = plan_sweep(grid)
    assert len(plan.specs) == 8
    first = plan.specs[0]
    assert first.run_id == "algorithm.name=splitfed_v1,model.cut=1,seed=3"
    assert first.params == {"algorithm.name": "splitfed_v1", "model.cut": 1}
    last = plan.specs[-1]
    assert (last.algorithm, last.scenario["model"]["cut"], last.seed) == ("splitfed_v2", 2, 4)
    assert plan.info["grid"] == {"algorithm.name": ["splitfed_v1", "splitfed_v2"], "model.cut": [1, 2]}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": "tiny.yaml", "grid": {"model.cut": []}}))
    with pytest.raises(UserError, match="non-empty list"):
        plan_sweep(bad)


def test_sanitize_keeps_ids_readable():
    """Run ids keep letters, digits and . _ , = + -; anything else becomes '_'."""
    assert sanitize("model.cut=1,lr=0.1,seed=0") == "model.cut=1,lr=0.1,seed=0"
    assert sanitize("a b/c[1]") == "a_b_c_1"
    assert "/" not in sanitize("x/y") and len(sanitize("k=" + "v" * 400)) <= 150


def _small_plan(scenario_file, variants=None) -> Plan:
    return plan_compare(scenario_file, ["splitfed_v1", "splitfed_v2"], "2", variants=variants)


def test_run_batch_in_process_lands_runs_and_resumes(tmp_path, scenario_file):
    """Runs land in runs/<id>/ with run.json; runs.csv and batch.json are written; a re-run reuses them."""
    out = tmp_path / "out"
    result = run_batch(_small_plan(scenario_file), out, workers=1, threads=1, progress=False)
    assert [o["status"] for o in result.outcomes] == ["completed"] * 4
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert names == ["splitfed_v1-seed3", "splitfed_v1-seed4", "splitfed_v2-seed3", "splitfed_v2-seed4"]
    meta = json.loads((out / "runs" / "splitfed_v2-seed4" / "run.json").read_text())
    assert (meta["status"], meta["seed"], meta["threads"]) == ("completed", 4, 1)
    table = pd.read_csv(out / "runs.csv")
    assert table["status"].tolist() == ["completed"] * 4 and table["final_accuracy"].notna().all()
    batch = json.loads((out / "batch.json").read_text())
    assert batch["kind"] == "compare" and len(batch["runs"]) == 4 and batch["execution"]["in_process"]
    stamp = os.path.getmtime(out / "runs" / "splitfed_v1-seed3" / "metrics.csv")
    again = run_batch(_small_plan(scenario_file), out, workers=1, threads=1, progress=False)
    assert [o["status"] for o in again.outcomes] == ["reused"] * 4
    assert os.path.getmtime(out / "runs" / "splitfed_v1-seed3" / "metrics.csv") == stamp


def test_changed_inputs_are_refused_unless_overwrite(tmp_path, scenario_file):
    """A finished run made from other inputs is not silently reused nor silently replaced."""
    out = tmp_path / "out"
    plan = plan_compare(scenario_file, ["splitfed_v1"], "3,")
    run_batch(plan, out, workers=1, threads=1, progress=False)
    changed = plan_compare(scenario_file, ["splitfed_v1"], "3,", ["algorithm.lr_client=0.2"])
    with pytest.raises(UserError, match="different inputs"):
        run_batch(changed, out, workers=1, threads=1, progress=False)
    result = run_batch(changed, out, workers=1, threads=1, progress=False, overwrite=True)
    assert result.outcomes[0]["status"] == "completed"
    scen = yaml.safe_load((out / "runs" / "splitfed_v1-seed3" / "scenario.yaml").read_text())
    assert scen["algorithm"]["lr_client"] == 0.2


def test_failing_run_is_recorded_and_the_batch_finishes(tmp_path, scenario_file, monkeypatch):
    """A variant whose dataset is missing fails at run time: .failed/ with a traceback, others
    complete; an unfinished .partial leftover (an interrupted batch) is run again."""
    out = tmp_path / "out"
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv("SFLSIM_DATA", str(empty))
    plan = plan_compare(scenario_file, ["splitfed_v2"], "3,",
                        variants={"splitfed_v2": {"ok": {}, "bad": {"data.dataset": "cifar10",
                                                                    "data.root": str(empty)}}})
    (out / "runs" / "splitfed_v2-ok-seed3.partial").mkdir(parents=True)  # left by an interrupt
    result = run_batch(plan, out, workers=1, threads=1, progress=False)
    status = {o["run_id"]: o for o in result.outcomes}
    assert status["splitfed_v2-ok-seed3"]["status"] == "completed"
    bad = status["splitfed_v2-bad-seed3"]
    assert bad["status"] == "failed" and "cifar10" in bad["error"] and "not found" in bad["error"]
    failed_dir = out / "runs" / "splitfed_v2-bad-seed3.failed"
    assert "Traceback" in (failed_dir / "traceback.txt").read_text()
    assert json.loads((failed_dir / "run.json").read_text())["status"] == "failed"
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["splitfed_v2-bad-seed3.failed", "splitfed_v2-ok-seed3"]
    table = pd.read_csv(out / "runs.csv").set_index("run_id")
    assert table.loc["splitfed_v2-bad-seed3", "status"] == "failed"


def test_compare_on_a_local_dask_cluster(tmp_path, scenario_file):
    """Two algorithms x two seeds on a LocalCluster of two worker processes, same results as in-process.

    Workers are forked here so they inherit the imported torch (the CLI spawns them, which
    takes ~10 s per worker to import torch; see the slow test below)."""
    import dask
    import distributed  # noqa: F401  (load its config first: leaving the block restores the config)

    with dask.config.set({"distributed.worker.multiprocessing-method": "fork"}):
        a = run_batch(_small_plan(scenario_file), tmp_path / "dask", workers=2, threads=1, progress=True)
    assert [o["status"] for o in a.outcomes] == ["completed"] * 4
    batch = json.loads((tmp_path / "dask" / "batch.json").read_text())
    assert batch["execution"]["workers"] == 2 and not batch["execution"]["in_process"]
    assert not any(p.name.endswith((".partial", ".failed")) for p in (tmp_path / "dask" / "runs").iterdir())
    pids = {json.loads((tmp_path / "dask" / "runs" / o["run_id"] / "run.json").read_text())["pid"] for o in a.outcomes}
    assert os.getpid() not in pids
    assert len(pids) <= 2  # warm workers: each process runs run after run
    b = run_batch(_small_plan(scenario_file), tmp_path / "local", workers=1, threads=1, progress=False)
    for x, y in zip(a.outcomes, b.outcomes):  # same seed, same thread count: same numbers anywhere
        assert (x["final_accuracy"], x["sim_time_s"]) == (y["final_accuracy"], y["sim_time_s"])


@pytest.mark.slow
def test_compare_on_spawned_dask_workers(tmp_path, scenario_file):
    """The CLI's setting: spawned worker processes that import sflsim themselves."""
    a = run_batch(_small_plan(scenario_file), tmp_path / "dask", workers=2, threads=1, progress=False)
    assert [o["status"] for o in a.outcomes] == ["completed"] * 4
    pids = {json.loads((tmp_path / "dask" / "runs" / o["run_id"] / "run.json").read_text())["pid"] for o in a.outcomes}
    assert len(pids) <= 2  # two worker processes, each warmed once (preload), ran the four runs


def test_cli_compare_report_and_errors(tmp_path, scenario_file, capsys, monkeypatch):
    """sflsim compare (exit 1 when a run failed), sflsim report, and user errors as exit 2."""
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv("SFLSIM_DATA", str(empty))
    cmp = tmp_path / "cmp.yaml"
    cmp.write_text(yaml.safe_dump({"base": scenario_file.name, "seeds": 1, "variants": {"splitfed_v1": {
        "ok": {}, "bad": {"data.dataset": "cifar10", "data.root": str(empty)}}}}))
    out = tmp_path / "out"
    rc = main(["compare", str(cmp), "--out", str(out), "--workers", "1", "--threads", "1", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 1 and "1 of 2 runs failed" in captured.err and "splitfed_v1-bad-seed3" in captured.err
    assert main(["report", str(out), "--targets", "0.05"]) == 0
    assert (out / "report" / "report.md").is_file() and (out / "report" / "report.html").is_file()
    assert main(["report", str(out), "--targets", "80"]) == 2
    assert main(["compare", str(scenario_file), "--algorithms", "nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "fractions" in err and "unknown algorithm 'nope'" in err
    assert main(["compare", str(cmp), "--out", str(out), "--dry-run"]) == 0
    assert "splitfed_v1-ok-seed3: skip (complete)" in capsys.readouterr().out


def test_a_batch_never_writes_into_a_single_runs_folder(tmp_path, scenario_file):
    """compare/sweep --out DIR where DIR holds a run of `sflsim run` is refused: no mix of a run and a batch."""
    from simulator.runner import run_scenario
    from simulator.scenario import load_scenario

    out = tmp_path / "out"
    run_scenario(load_scenario(scenario_file), out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(UserError, match="holds a single run"):
        run_batch(plan_compare(scenario_file, ["splitfed_v1"], "3,"), out, workers=1, threads=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before
