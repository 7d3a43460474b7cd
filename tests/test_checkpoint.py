"""Checkpoint and resume: a resumed run is the straight run, byte for byte, for every algorithm."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from simulator import checkpoint as ckpt_mod
from simulator.cli import main
from simulator.errors import UserError
from simulator.rundir import HOST_TIME_FIELDS
from simulator.runner import landed_in, resume_run, run_scenario
from simulator.scenario import validate
from simulator.trace import Recorder

# Every algorithm, and the variants whose state differs (ZO/FO clients and servers, adaptive
# tau with evaluation by simulated time, V2's shared server momentum, GAS with full and diagonal statistics, shared momentum).
ALGORITHMS = {
    "splitfed_v1": {"name": "splitfed_v1", "momentum": 0.5},
    "splitfed_v2": {"name": "splitfed_v2", "momentum": 0.5},
    "splitfed_zo": {"name": "splitfed_zo", "lr_client": 0.001, "lr_server": 0.05},
    "mu_splitfed": {"name": "mu_splitfed", "tau": 3, "lr_client": 0.001, "lr_server": 0.05,
                    "zo": {"perturbations": 2}},
    "mu_adaptive": {"name": "mu_splitfed", "tau": "adaptive", "tau_max": 4, "server_optimizer": "fo",
                    "lr_client": 0.001, "lr_server": 0.05},
    "mu_fo_client": {"name": "mu_splitfed", "tau": 2, "client_optimizer": "fo", "lr_client": 0.02,
                     "lr_server": 0.02},
    "gas": {"name": "gas", "active_clients": 3, "local_steps": 3, "momentum": 0.5},
    "gas_zo_diagonal": {"name": "gas", "active_clients": 2, "local_steps": 2, "client_optimizer": "zo",
                        "lr_client": 0.01, "covariance": "diagonal", "client_momentum": "shared"},
}


def _raw(tiny_raw, algo: dict, rounds: int, every_sim_s: bool = False) -> dict:
    raw = copy.deepcopy(tiny_raw)
    raw["data"]["num_clients"] = 5
    raw["algorithm"] = {"batch_size": 16, "local_steps": 2, "lr_client": 0.1, "lr_server": 0.1, **algo}
    raw["stop"] = {"rounds": rounds}
    if every_sim_s:
        raw["eval"] = {"every_sim_s": 0.7}
    return raw


def same_run(straight: Path, resumed: Path) -> None:
    """Every file byte for byte; summary.json equal but for host-time fields and resumed_from."""
    names = sorted(p.name for p in straight.iterdir())
    assert names == sorted(p.name for p in resumed.iterdir())
    for name in names:
        a, b = straight / name, resumed / name
        if name == "summary.json":
            x, y = json.loads(a.read_text()), json.loads(b.read_text())
            assert "resumed_from" in y
            for s in (x, y):
                s.pop("resumed_from", None)
                for k in HOST_TIME_FIELDS:
                    s.pop(k, None)
            assert x == y
        elif name == ckpt_mod.CHECKPOINT:
            ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
            assert ca["rounds_done"] == cb["rounds_done"] and ca["rows"] == cb["rows"]
        else:
            assert a.read_bytes() == b.read_bytes(), name


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Each algorithm run straight for 5 rounds with checkpoints every 2 (the reference)."""
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("straight")
    out = {}
    for which, algo in ALGORITHMS.items():
        raw = _raw(TINY, algo, 5, every_sim_s=which == "mu_adaptive")
        run_scenario(validate(raw), root / which, checkpoint_every=2)
        out[which] = (raw, root / which)
    return out


@pytest.mark.parametrize("which", sorted(ALGORITHMS))
def test_stopped_run_resumed_with_more_rounds_is_the_straight_run(straight, which, tmp_path):
    """Stopped after 3 rounds (checkpoint at the end), resumed to 5: the 5-round run, byte for byte."""
    raw, reference = straight[which]
    short = copy.deepcopy(raw)
    short["stop"] = {"rounds": 3}
    run_scenario(validate(short), tmp_path / "run", checkpoint_every=2)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["checkpoint_round"] == 3
    result = resume_run(tmp_path / "run", ["stop.rounds=5"])
    assert result.summary["resumed_from"]["round"] == 3
    same_run(reference, tmp_path / "run")


def _interrupt_at_span(monkeypatch, n: int) -> None:
    """Ctrl-C as the n-th span is recorded (mid-round, with work in flight)."""
    original = Recorder.add_span
    count = {"spans": 0}

    def add_span(self, span):
        count["spans"] += 1
        if count["spans"] == n:
            raise KeyboardInterrupt
        original(self, span)

    monkeypatch.setattr(Recorder, "add_span", add_span)


@pytest.mark.parametrize("which", sorted(ALGORITHMS))
def test_interrupted_run_checkpoints_on_the_way_out_and_resumes(straight, which, tmp_path, monkeypatch):
    """Ctrl-C mid-round: the run lands interrupted with the last round end's checkpoint (one kept
    in memory: not a multiple of 2); resume replays to it and finishes as the straight run."""
    raw, reference = straight[which]
    events = len((reference / "events.csv").read_text().splitlines()) - 1
    monkeypatch.setattr(ckpt_mod, "SNAPSHOT_SHARE", 1.0)  # a snapshot at every round end (tiny rounds)
    with monkeypatch.context() as m:
        _interrupt_at_span(m, int(events * 0.7))
        with pytest.raises(KeyboardInterrupt) as info:
            run_scenario(validate(raw), tmp_path / "run", checkpoint_every=2)
    assert landed_in(info.value) == tmp_path / "run"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["checkpoint_round"] == summary["rounds"] >= 1
    resume_run(tmp_path / "run")
    same_run(reference, tmp_path / "run")


def test_gas_checkpoints_hold_work_in_flight(straight):
    """The GAS reference checkpoints catch slots mid-iteration (what the resume tests then restore)."""
    _, reference = straight["gas"]
    state = torch.load(reference / ckpt_mod.CHECKPOINT, weights_only=True)["algorithm"]
    assert any(s["phase"] != "idle" for s in state["slots"])


def test_cli_run_checkpoint_and_resume(tiny_raw, tmp_path, capsys):
    """sflsim run --checkpoint-every 1, then sflsim resume --set stop.rounds=3."""
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_raw(tiny_raw, ALGORITHMS["splitfed_v1"], 2)))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--checkpoint-every", "1", "--no-progress"]) == 0
    assert (out / ckpt_mod.CHECKPOINT).is_file()
    capsys.readouterr()
    assert main(["resume", str(out), "--set", "stop.rounds=3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "resumed" in printed and "after 3 rounds" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["checkpoint_round"] == 3 and summary["resumed_from"]["round"] == 2


def _refused(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err, err


def test_resume_refusals(straight, tmp_path, capsys):
    """No checkpoint, nothing left to do, a key outside stop.*, a bad --checkpoint-every: one line, exit 2."""
    _, reference = straight["splitfed_v1"]
    _refused(["resume", str(reference)], capsys, "stop.rounds is 5")
    _refused(["resume", str(reference), "--set", "algorithm.lr_client=0.2"], capsys, "algorithm.lr_client")
    _refused(["resume", str(tmp_path)], capsys, "not a run folder")
    plain = tmp_path / "plain"
    raw, _ = straight["splitfed_v1"]
    run_scenario(validate(raw), plain)
    _refused(["resume", str(plain), "--set", "stop.rounds=9"], capsys, "no checkpoint.pt")
    with pytest.raises(SystemExit) as e:
        main(["run", "x.yaml", "--checkpoint-every", "0"])
    assert e.value.code == 2
    with pytest.raises(UserError, match="timing-only"):
        run_scenario(validate({**raw, "timing_only": True}), tmp_path / "t", checkpoint_every=1)


def test_a_changed_timeline_is_caught(straight, tmp_path):
    """A run folder whose events.csv does not match the replay is refused loudly (never resumed wrong)."""
    import shutil

    _, reference = straight["mu_splitfed"]
    copy_ = tmp_path / "copy"
    shutil.copytree(reference, copy_)
    events = (copy_ / "events.csv").read_text().splitlines(keepends=True)
    events[5] = events[5].replace(",", ",9", 1)
    (copy_ / "events.csv").write_text("".join(events))
    with pytest.raises(RuntimeError, match="events.csv differs from the run's at line 6"):
        resume_run(copy_, ["stop.rounds=7"])
    assert (copy_ / "events.csv").read_text() == "".join(events)  # the folder is untouched


def test_a_corrupt_checkpoint_is_a_user_error(straight, tmp_path):
    import shutil

    _, reference = straight["splitfed_v1"]
    copy_ = tmp_path / "copy"
    shutil.copytree(reference, copy_)
    (copy_ / ckpt_mod.CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable sflsim checkpoint"):
        resume_run(copy_, ["stop.rounds=7"])


def test_run_stopped_by_simulated_time_resumes_with_a_later_deadline(tiny_raw, tmp_path):
    """stop.sim_time_s ends a run mid-round: resume replays to the last checkpoint (a round end
    before the deadline) and, with a later deadline, gives the straight run."""
    raw = _raw(tiny_raw, ALGORITHMS["splitfed_v1"], 0)
    raw["stop"] = {"sim_time_s": 12.0}
    raw["eval"] = {"every_sim_s": 1.0}
    run_scenario(validate(raw), tmp_path / "straight", checkpoint_every=3)
    raw["stop"] = {"sim_time_s": 5.0}
    run_scenario(validate(raw), tmp_path / "run", checkpoint_every=3)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "sim_time_s" and 1 <= summary["checkpoint_round"] <= summary["rounds"]
    resume_run(tmp_path / "run", ["stop.sim_time_s=12.0"])
    same_run(tmp_path / "straight", tmp_path / "run")
