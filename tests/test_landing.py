"""Run folders are safe: written beside --out, landed whole when the run ends, never a mix of two
runs, an existing run refused without --overwrite and kept when a replacing run does not finish."""
from __future__ import annotations

import copy
import json
import os

import pytest
import yaml

from simulator import rundir
from simulator import runner as runner_mod
from simulator.cli import main
from simulator.errors import UserError
from simulator.runner import landed_in, run_scenario
from simulator.scenario import apply_overrides, validate


def _run(raw, out, overrides=(), **kw):
    return run_scenario(validate(apply_overrides(copy.deepcopy(raw), list(overrides))), out, **kw)


def _snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _siblings(folder) -> list[str]:
    """Everything next to ``folder`` but itself (partials, failed or interrupted runs)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(folder.name + "."))


@pytest.fixture
def tiny_file(tiny_raw, tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(tiny_raw))
    return p


def test_the_data_loss_sequence_leaves_the_run_untouched(tiny_file, tmp_path, capsys):
    """Run A into E; run into E with a missing trace file: exit 2, one line, E still A's outputs
    (with and without --overwrite), and nothing left beside E."""
    e = tmp_path / "E"
    assert main(["run", str(tiny_file), "--out", str(e), "--no-progress"]) == 0
    before = _snapshot(e)
    for extra in ([], ["--overwrite"]):
        capsys.readouterr()
        rc = main(["run", str(tiny_file), "--out", str(e), "--no-progress",
                   "--set", "time.trace_csv=/nonexistent.csv", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert "trace_csv" in err[0] or "already holds a run" in err[0]
        assert _snapshot(e) == before
        assert _siblings(e) == []


def test_bad_input_found_in_set_up_of_a_replacement_keeps_the_old_run(tiny_raw, tmp_path):
    """The same through the API (no pre-flight): the UserError is raised in set-up, the partial
    folder is discarded and E is untouched."""
    e = tmp_path / "E"
    _run(tiny_raw, e)
    before = _snapshot(e)
    with pytest.raises(UserError, match="trace_csv"):
        _run(tiny_raw, e, ["time.trace_csv=/nonexistent.csv"], overwrite=True)
    assert _snapshot(e) == before and _siblings(e) == []


def test_an_existing_run_is_refused_without_overwrite(tiny_raw, tmp_path):
    e = tmp_path / "E"
    _run(tiny_raw, e)
    before = _snapshot(e)
    with pytest.raises(UserError, match="already holds a run .status completed.; pass --overwrite"):
        _run(tiny_raw, e, ["seed=4"])
    assert _snapshot(e) == before and _siblings(e) == []
    (e / "notes.txt").write_text("mine")  # any files at all: refused too
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty"):
        _run(tiny_raw, stray)
    with pytest.raises(UserError, match="holds no run"):  # --overwrite replaces only a run folder
        _run(tiny_raw, stray, overwrite=True)
    assert (stray / "notes.txt").read_text() == "mine"


def test_an_empty_folder_is_fine(tiny_raw, tmp_path):
    e = tmp_path / "E"
    e.mkdir()
    res = _run(tiny_raw, e)
    assert res.out_dir == e and (e / rundir.SUMMARY).is_file() and _siblings(e) == []


def test_overwrite_replaces_the_folder_as_a_whole(tiny_raw, tmp_path):
    e = tmp_path / "E"
    _run(tiny_raw, e)
    (e / "old_table.csv").write_text("from the old run")
    res = _run(tiny_raw, e, ["seed=4"], overwrite=True)
    assert res.out_dir == e
    assert json.loads((e / rundir.SUMMARY).read_text())["seed"] == 4
    assert yaml.safe_load((e / rundir.SCENARIO).read_text())["seed"] == 4
    assert not (e / "old_table.csv").exists()  # nothing of the old run is mixed in
    assert _siblings(e) == []


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_out_that_is_a_file_or_under_a_file(tiny_raw, tmp_path, where):
    f = tmp_path / "f.txt"
    f.write_text("x")
    out = f if where == "file" else f / "run"
    with pytest.raises(UserError, match="is a file"):
        rundir.check_out_dir(out)
    with pytest.raises(UserError, match="is a file"):
        _run(tiny_raw, out)
    assert f.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions; the under-a-file test covers "
                                              "a folder that cannot be made")
def test_out_in_an_unwritable_folder(tiny_raw, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(UserError, match="cannot write"):
            rundir.check_out_dir(locked / "run")
    finally:
        locked.chmod(0o700)


def test_out_is_never_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in (".", str(tmp_path), ".."):
        with pytest.raises(UserError, match="working directory"):
            rundir.check_out_dir(out, overwrite=True)


def test_cli_out_errors_are_one_line_exit_2(tiny_file, tmp_path, capsys):
    f = tmp_path / "f.txt"
    f.write_text("x")
    for out in (f, f / "run"):
        assert main(["run", str(tiny_file), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sflsim: error: --out ")


def test_bad_input_in_set_up_leaves_nothing(tiny_raw, tmp_path):
    out = tmp_path / "new"
    with pytest.raises(UserError, match="trace_csv"):
        _run(tiny_raw, out, ["time.trace_csv=/nonexistent.csv"])
    assert not out.exists() and _siblings(out) == []


_ON_ROUND = runner_mod._Controller.on_round


def _fail_in_round(monkeypatch, exc):
    original = _ON_ROUND

    def on_round(self, r):
        original(self, r)
        if r == 1:
            raise exc

    monkeypatch.setattr(runner_mod._Controller, "on_round", on_round)


def test_a_failed_run_lands_with_its_traceback(tiny_raw, tmp_path, monkeypatch):
    _fail_in_round(monkeypatch, RuntimeError("boom"))
    out = tmp_path / "E"
    with pytest.raises(RuntimeError, match="boom") as info:
        _run(tiny_raw, out, ["stop.rounds=10"])
    assert landed_in(info.value) == out
    s = json.loads((out / rundir.SUMMARY).read_text())
    assert s["status"] == "failed" and "boom" in s["error"] and s["rounds"] == 2
    assert "RuntimeError: boom" in (out / rundir.TRACEBACK).read_text()
    assert len((out / rundir.EVENTS).read_text().splitlines()) > 10
    assert _siblings(out) == []


def test_a_failing_replacement_keeps_the_old_run(tiny_raw, tmp_path, monkeypatch, caplog):
    """--overwrite, then the new run fails: the old run stays, the failed one lands beside it, the log says so."""
    out = tmp_path / "E"
    _run(tiny_raw, out)
    before = _snapshot(out)
    _fail_in_round(monkeypatch, RuntimeError("boom"))
    with pytest.raises(RuntimeError) as info:
        _run(tiny_raw, out, ["stop.rounds=10"], overwrite=True)
    assert _snapshot(out) == before
    [beside] = _siblings(out)
    assert beside.startswith("E.failed-") and landed_in(info.value) == tmp_path / beside
    assert (tmp_path / beside / rundir.TRACEBACK).is_file()
    assert any(str(out) in r.getMessage() and "unchanged" in r.getMessage() for r in caplog.records)


def test_ctrl_c_during_set_up_still_lands_an_interrupted_summary(tiny_raw, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_mod, "build_context", interrupted)
    out = tmp_path / "E"
    with pytest.raises(KeyboardInterrupt) as info:
        _run(tiny_raw, out)
    assert landed_in(info.value) == out
    s = json.loads((out / rundir.SUMMARY).read_text())
    assert s["status"] == "interrupted" and s["interrupted_by"] == "SIGINT" and s["events"] == 0
    assert (out / rundir.SCENARIO).is_file() and (out / rundir.EVENTS).is_file()
    assert _siblings(out) == []


def test_ctrl_c_before_the_simulation_exists(tiny_raw, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_mod, "build_time_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_raw, tmp_path / "E")
    s = json.loads((tmp_path / "E" / rundir.SUMMARY).read_text())
    assert s["status"] == "interrupted" and s["sim_time_s"] == 0.0 and s["rounds"] == 0


def test_an_interrupted_replacement_keeps_the_old_run(tiny_raw, tmp_path, monkeypatch):
    out = tmp_path / "E"
    _run(tiny_raw, out)
    before = _snapshot(out)
    _fail_in_round(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt) as info:
        _run(tiny_raw, out, ["stop.rounds=10"], overwrite=True)
    assert _snapshot(out) == before
    [beside] = _siblings(out)
    assert beside.startswith("E.interrupted-") and landed_in(info.value) == tmp_path / beside
    assert json.loads((tmp_path / beside / rundir.SUMMARY).read_text())["status"] == "interrupted"


def test_cli_interrupt_exit_codes(tiny_file, tmp_path, monkeypatch, capsys):
    """Ctrl-C exits 130, SIGTERM (Terminated) 143; both land what was recorded and say where."""
    from simulator.errors import Terminated

    for exc, code in ((KeyboardInterrupt(), 130), (Terminated(), 143)):
        _fail_in_round(monkeypatch, exc)
        out = tmp_path / f"out{code}"
        assert main(["run", str(tiny_file), "--out", str(out), "--no-progress", "--set", "stop.rounds=10"]) == code
        assert f"what was recorded is in {out}/" in capsys.readouterr().err
        s = json.loads((out / rundir.SUMMARY).read_text())
        assert s["status"] == "interrupted"
        assert s["interrupted_by"] == ("SIGTERM" if code == 143 else "SIGINT")
