"""sflsim retime: a finished run re-priced under another time model equals a full run of it."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from simulator.cli import main
from simulator.errors import UserError
from simulator.retime import non_time_changes, retime_run, retimed_scenario
from simulator.runner import run_scenario
from simulator.scenario import apply_overrides, validate

from simulator.rundir import HOST_TIME_FIELDS as HOST_FIELDS

BASE_TIME = {
    "client": {
        "flops_per_s": {"dist": "uniform", "low": 1.0e6, "high": 4.0e6},
        "delay_s": {"dist": "exponential", "mean": 0.05},
        "tiers": [{"name": "slow", "clients": [1], "speed_factor": 0.5}],
    },
    "server": {"flops_per_s": 5.0e6, "capacity": 1},  # slow enough that server slots are contended
    "episodes": [{"kind": "slowdown", "clients": [0], "start_s": 0.5, "end_s": 3.0, "factor": 4.0}],
}

ALGORITHMS = {
    "splitfed_v1": {"name": "splitfed_v1", "participation": 0.8, "momentum": 0.5},
    "splitfed_zo": {"name": "splitfed_zo", "participation": 0.6},
    "mu_splitfed": {"name": "mu_splitfed", "tau": 3, "participation": 0.6, "zo": {"perturbations": 2}},
}

# Straggler changes: tiers, delays, episodes, bandwidth, server capacity (several at once in the last).
CHANGES = {
    "tiers": ["time.client.tiers.0.speed_factor=0.1", "time.client.tiers.0.clients=[1,3]"],
    "delays": ["time.client.delay_s={dist: exponential, mean: 0.8}"],
    "episodes": ["time.episodes.0.factor=20", "time.episodes.0.end_s=9.0"],
    "bandwidth": ["time.network.uplink.bandwidth_mbps={dist: uniform, low: 0.5, high: 2.0}",
                  "time.network.downlink.latency_s=0.2"],
    "capacity": ["time.server.capacity=3"],
    "all": ["time.server.capacity=null", "time.client.tiers=[]", "time.episodes=[{kind: unreachable, clients: [2], "
            "start_s: 0.0, end_s: 5.0}]", "time.server.flops_per_s=2e7"],
}


def _raw(tiny_raw, algo: dict) -> dict:
    raw = copy.deepcopy(tiny_raw)
    raw["data"]["num_clients"] = 5
    raw["algorithm"] = {"batch_size": 16, "local_steps": 2, **algo}
    raw["time"] = copy.deepcopy(BASE_TIME)
    raw["stop"] = {"rounds": 3}
    return raw


RUN_META_HOST = ("started_at", "finished_at", "pid", "host", "host_s", "retimed_from")


def _same_folder(full: Path, retimed: Path, source: Path) -> None:
    """Every file byte for byte; summary.json (and a batch's run.json) equal but for host fields and retimed_from."""
    names = sorted(p.name for p in full.iterdir())
    assert names == sorted(p.name for p in retimed.iterdir())
    for name in names:
        if name == "run.json":
            a, b = json.loads((full / name).read_text()), json.loads((retimed / name).read_text())
            assert {k: v for k, v in a.items() if k not in RUN_META_HOST} == \
                   {k: v for k, v in b.items() if k not in RUN_META_HOST}
        elif name == "summary.json":
            a, b = json.loads((full / name).read_text()), json.loads((retimed / name).read_text())
            assert b.pop("retimed_from") == str(source)
            for k in HOST_FIELDS:
                a.pop(k, None), b.pop(k, None)
            assert a == b
        else:
            assert (full / name).read_bytes() == (retimed / name).read_bytes(), name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One training run per algorithm (module-wide: the re-timings all start from these)."""
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("trained")
    out = {}
    for which, algo in ALGORITHMS.items():
        raw = _raw(TINY, algo)
        run_scenario(validate(raw), root / which)
        out[which] = (raw, root / which)
    return out


@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("which", sorted(ALGORITHMS))
def test_retime_equals_full_run(trained, which, change, tmp_path):
    """retime under a straggler change writes the folder a full training run of the change writes."""
    raw, source = trained[which]
    modified = validate(apply_overrides(copy.deepcopy(raw), CHANGES[change]))
    full = run_scenario(modified, tmp_path / "full")
    original = json.loads((source / "summary.json").read_text())
    assert full.summary["sim_time_s"] != original["sim_time_s"]  # the change does move the clock
    retime_run(modified, source, tmp_path / "retimed")
    _same_folder(tmp_path / "full", tmp_path / "retimed", source)


def test_cli_retime(trained, tmp_path, capsys):
    """sflsim retime RUN_DIR --set time.K=V --out DIR writes the re-timed folder and says so."""
    raw, source = trained["splitfed_v1"]
    code = main(["retime", str(source), "--set", "time.server.capacity=2", "--out", str(tmp_path / "r"),
                 "--no-progress"])
    assert code == 0
    assert "re-timed from" in capsys.readouterr().out
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["retimed_from"] == str(source) and s["final_accuracy"] is not None
    assert "capacity: 2" in (tmp_path / "r" / "scenario.yaml").read_text()


def _refused(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err, err


def test_refuses_non_time_key(trained, tmp_path, capsys):
    """A key outside time.* is refused (it needs training), naming the key."""
    _, source = trained["splitfed_v1"]
    _refused(["retime", str(source), "--set", "algorithm.lr_client=0.2", "--out", str(tmp_path / "r")], capsys,
             "algorithm.lr_client")
    _refused(["retime", str(source), "--set", "seed=4", "--out", str(tmp_path / "r")], capsys, "seed")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("algo, match", [
    ({"name": "splitfed_v2"}, "splitfed_v2"),
    ({"name": "gas", "active_clients": 2, "local_steps": 2, "covariance": "diagonal"}, "gas is asynchronous"),
])
def test_refuses_schedule_dependent_algorithms(tiny_raw, tmp_path, capsys, algo, match):
    """splitfed_v2 and gas are refused: their values depend on time."""
    raw = _raw(tiny_raw, algo)
    raw["stop"] = {"rounds": 1}
    run_scenario(validate(raw), tmp_path / "src")
    _refused(["retime", str(tmp_path / "src"), "--set", "time.server.capacity=2", "--out", str(tmp_path / "r")],
             capsys, match)


@pytest.mark.parametrize("key, value, match", [
    ("eval", {"every_rounds": None, "every_sim_s": 1.0}, "eval.every_sim_s"),
    ("stop", {"rounds": 2, "sim_time_s": 50.0}, "stop.sim_time_s"),
])
def test_refuses_time_driven_evaluation_and_stop(tiny_raw, tmp_path, capsys, key, value, match):
    """Evaluation by simulated time and a stop.sim_time_s are refused (they depend on the clock)."""
    raw = _raw(tiny_raw, ALGORITHMS["splitfed_v1"])
    raw[key] = value
    run_scenario(validate(raw), tmp_path / "src")
    _refused(["retime", str(tmp_path / "src"), "--set", "time.server.capacity=2", "--out", str(tmp_path / "r")],
             capsys, match)


def test_refuses_unfinished_and_timing_only_runs(trained, tmp_path, capsys):
    """A run that did not complete, a timing-only run and a folder without a run are refused."""
    raw, source = trained["splitfed_v1"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in source.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    s = json.loads((bad / "summary.json").read_text())
    s["status"] = "interrupted"
    (bad / "summary.json").write_text(json.dumps(s))
    _refused(["retime", str(bad), "--set", "time.server.capacity=2", "--out", str(tmp_path / "r")], capsys,
             "did not complete")
    run_scenario(validate({**raw, "timing_only": True}), tmp_path / "t")
    _refused(["retime", str(tmp_path / "t"), "--set", "time.server.capacity=2", "--out", str(tmp_path / "r")],
             capsys, "timing-only")
    _refused(["retime", str(tmp_path / "nothing"), "--set", "time.server.capacity=2", "--out", str(tmp_path / "r")],
             capsys, "not a run folder")


def test_retimed_scenario_and_changes(trained):
    """Only time.* overrides are taken; non_time_changes names what else differs (labels aside)."""
    raw, source = trained["mu_splitfed"]
    s = retimed_scenario(source, ["time.server.capacity=4"])
    assert s.time.server.capacity == 4
    with pytest.raises(UserError, match="data.num_clients"):
        retimed_scenario(source, ["data.num_clients=3"])
    a = validate(raw).model_dump(mode="json")
    b = validate({**raw, "name": "other", "threads": 2, "time": {**raw["time"], "server": {"capacity": 5}}})
    assert non_time_changes(a, b.model_dump(mode="json")) == []
    c = validate({**raw, "seed": 9}).model_dump(mode="json")
    assert non_time_changes(a, c) == ["seed"]


def test_sweep_retimes_time_only_points(tiny_raw, tmp_path, capsys):
    """A sweep over time.* keys trains once per other point and re-times the rest, with the same outputs."""
    import yaml

    from simulator.experiments import plan_sweep, run_batch

    base = _raw(tiny_raw, ALGORITHMS["splitfed_zo"])
    base["stop"] = {"rounds": 2}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml",
        "grid": {"algorithm.name": ["splitfed_zo", "splitfed_v2"], "time.episodes.0.factor": [1.0, 8.0, 30.0]}}))
    plan = plan_sweep(tmp_path / "grid.yaml")
    sources = plan.retime_sources()
    assert len(sources) == 2  # splitfed_zo: 1 trains, 2 re-timed; splitfed_v2 cannot be re-timed
    assert all(k.startswith("algorithm.name=splitfed_zo") for k in sources)
    fast = run_batch(plan, tmp_path / "fast", workers=1, progress=False)
    slow = run_batch(plan, tmp_path / "slow", workers=1, progress=False, retime=False)
    assert fast.count("completed") == slow.count("completed") == 6
    for spec in plan.specs:
        a, b = tmp_path / "slow" / "runs" / spec.run_id, tmp_path / "fast" / "runs" / spec.run_id
        if spec.run_id in sources:
            _same_folder(a, b, tmp_path / "fast" / "runs" / sources[spec.run_id])
            assert json.loads((b / "run.json").read_text())["retimed_from"] == sources[spec.run_id]
        else:
            assert "retimed_from" not in json.loads((b / "summary.json").read_text())
    import csv

    rows = {r["run_id"]: r for r in csv.DictReader((tmp_path / "fast" / "runs.csv").open())}
    assert {rid for rid, r in rows.items() if r["retimed_from"]} == set(sources)
    slow_rows = {r["run_id"]: r for r in csv.DictReader((tmp_path / "slow" / "runs.csv").open())}
    for rid, r in rows.items():  # runs.csv: the same but for retimed_from, host_s and the path
        for k in ("status", "final_accuracy", "sim_time_s", "rounds"):
            assert r[k] == slow_rows[rid][k], (rid, k)


def test_cli_sweep_says_it_retimes(tiny_raw, tmp_path, capsys):
    """sweep --dry-run says which runs are re-timed and from which; --no-retime trains every run."""
    import yaml

    base = _raw(tiny_raw, ALGORITHMS["mu_splitfed"])
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({"base": "base.yaml",
                                                        "grid": {"time.server.capacity": [1, 2, 4]}}))
    assert main(["sweep", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "2 of 3 runs differ from another run only in time.* keys" in err
    assert out.count("re-time from time.server.capacity=1,seed=3") == 2
    assert main(["sweep", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "o"), "--dry-run", "--no-retime"]) == 0
    out, err = capsys.readouterr()
    assert "re-time" not in out + err and out.count(": run") == 3


ADAPTIVE = {"name": "mu_splitfed", "tau": "adaptive", "tau_max": 3, "participation": 0.6, "zo": {"perturbations": 2}}


@pytest.fixture(scope="module")
def adaptive_run(tmp_path_factory):
    """A trained adaptive-tau run whose step counts vary (2 and 3) with the time model."""
    import csv

    from tests.conftest import TINY

    raw = _raw(TINY, ADAPTIVE)
    source = tmp_path_factory.mktemp("adaptive") / "src"
    run_scenario(validate(raw), source)
    taus = {int(r["tau_used"]) for r in csv.DictReader((source / "client_rounds.csv").open())}
    assert len(taus) > 1, taus  # the schedule really depends on time in this scenario
    return raw, source


def test_adaptive_retime_equals_full_run_when_steps_keep(adaptive_run, tmp_path):
    """Adaptive tau is re-timed when the new time model keeps every step count: the folder a full run writes."""
    raw, source = adaptive_run
    modified = validate(apply_overrides(copy.deepcopy(raw), ["time.network.downlink.latency_s=0.0001"]))
    full = run_scenario(modified, tmp_path / "full")
    assert full.summary["sim_time_s"] != json.loads((source / "summary.json").read_text())["sim_time_s"]
    retime_run(modified, source, tmp_path / "retimed")
    _same_folder(tmp_path / "full", tmp_path / "retimed", source)


def test_adaptive_retime_refused_when_steps_change(adaptive_run, tmp_path, capsys):
    """A time model that changes a step count is refused with one line naming where; nothing is written."""
    raw, source = adaptive_run
    _refused(["retime", str(source), "--set", "time.server.capacity=3", "--out", str(tmp_path / "r")], capsys,
             "adaptive tau takes 3 server steps at round 0")
    assert not (tmp_path / "r").exists()
    assert not [p for p in tmp_path.iterdir()]  # no partial folder either
    from simulator.retime import ScheduleChanged

    with pytest.raises(ScheduleChanged, match="needs training"):
        retime_run(validate(apply_overrides(copy.deepcopy(raw), ["time.server.capacity=3"])), source, None)


def test_sweep_trains_adaptive_points_whose_steps_change(tiny_raw, tmp_path):
    """A sweep re-times the adaptive points whose step counts keep and trains the others: same outputs."""
    import csv

    import yaml

    from simulator.experiments import plan_sweep, run_batch

    base = _raw(tiny_raw, ADAPTIVE)
    base["stop"] = {"rounds": 2}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml", "grid": {"time.network.downlink.latency_s": [0.01, 0.0001],
                                      "time.server.capacity": [1, 3]}}))
    plan = plan_sweep(tmp_path / "grid.yaml")
    assert len(plan.retime_sources()) == 3
    fast = run_batch(plan, tmp_path / "fast", workers=1, progress=False)
    slow = run_batch(plan, tmp_path / "slow", workers=1, progress=False, retime=False)
    assert fast.count("completed") == slow.count("completed") == 4
    rows = {r["run_id"]: r for r in csv.DictReader((tmp_path / "fast" / "runs.csv").open())}
    retimed = {rid for rid, r in rows.items() if r["retimed_from"]}
    assert retimed and len(retimed) < 3  # some kept their step counts, some were trained instead
    for spec in plan.specs:
        a, b = tmp_path / "slow" / "runs" / spec.run_id, tmp_path / "fast" / "runs" / spec.run_id
        if spec.run_id in retimed:
            _same_folder(a, b, tmp_path / "fast" / "runs" / rows[spec.run_id]["retimed_from"])
        else:
            assert "retimed_from" not in json.loads((b / "run.json").read_text())
            for name in ("events.csv", "metrics.csv", "client_rounds.csv"):
                assert (a / name).read_bytes() == (b / name).read_bytes(), (spec.run_id, name)
