"""The timeline verifier: each check catches a hand-made violation (and only that), every
registered algorithm's real run verifies clean, and a violation fails the run loudly."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import yaml

from simulator import rundir, verify
from simulator.algorithms import ALGORITHMS
from simulator.cli import main
from simulator.errors import UserError
from simulator.runner import run_scenario
from simulator.scenario import validate
from simulator.trace import EVENT_COLUMNS
from tests.conftest import TINY


# --------------------------------------------------------------------------------------------
# Hand-made run folders
# --------------------------------------------------------------------------------------------
def span(client, party, kind, seq, start, end, wait=0.0, nbytes=0, round=0):
    return {"client": client, "party": party, "kind": kind, "round": round, "seq": seq, "start_s": start,
            "end_s": end, "wait_s": wait, "flops": 1.0, "nbytes": nbytes, "rng_elements": 0}


def clean_spans() -> list[dict]:
    """Two clients through one capacity-1 server; touching boundaries everywhere (allowed)."""
    return [
        span(0, "downlink", "model_down", 0, 0.0, 1.0, nbytes=10),
        span(1, "downlink", "model_down", 0, 0.0, 1.5, nbytes=10),
        span(0, "client", "client_forward", 0, 1.0, 2.0),
        span(0, "uplink", "activation", 1, 2.0, 2.5, nbytes=7),
        span(0, "uplink", "activation_plus", 2, 2.5, 3.0, nbytes=7),   # queued right behind it
        span(0, "client", "client_forward_plus", 1, 2.0, 2.5),        # compute beside the upload
        span(0, "server", "server_step", 0, 2.5, 3.5),
        span(1, "client", "client_forward", 0, 1.5, 3.0),
        span(1, "uplink", "activation", 1, 3.0, 3.5, nbytes=7),
        span(1, "server", "server_step", 0, 3.5, 4.0, wait=0.0),      # starts as client 0's job ends
        span(1, "server", "server_step", 1, 4.0, 4.0),                # zero length, slot free
        span(0, "downlink", "gradient", 1, 3.5, 4.0, nbytes=5),
        span(1, "downlink", "gradient", 1, 4.0, 4.5, nbytes=5),
        span(None, "fed", "aggregate_client", 0, 4.5, 5.0),
        span(None, "server", "aggregate_server", 1, 4.5, 5.0),        # beside the fed server: fine
    ]


def write_run(folder, spans, *, capacity=1, summary=None, metrics=None):
    """A run folder whose summary and metrics agree with ``spans`` unless overridden."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [",".join(EVENT_COLUMNS)]
    for s in spans:
        lines.append(",".join("" if s[c] is None else repr(s[c]) if isinstance(s[c], float) else str(s[c])
                              for c in EVENT_COLUMNS))
    (folder / rundir.EVENTS).write_text("\n".join(lines) + "\n")
    srv = [(s["start_s"], s["end_s"]) for s in spans if s["party"] == "server"]
    busy = verify.union_length(*(np.array(xs, float) for xs in zip(*srv))) if srv else 0.0
    metrics = metrics if metrics is not None else [(0.0, 0, 0), (5.0, 1, 41)]
    (folder / rundir.METRICS).write_text(
        "sim_time_s,round,test_accuracy,test_loss,bytes_up,bytes_down\n"
        + "".join(f"{t!r},{r},0.5,1.0,{b},{b}\n" for t, r, b in metrics))
    base = {"status": "completed", "events": len(spans), "evaluations": len(metrics), "sim_time_s": 5.0,
            "bytes_up": sum(s["nbytes"] for s in spans if s["party"] == "uplink"),
            "bytes_down": sum(s["nbytes"] for s in spans if s["party"] == "downlink"), "server_busy_s": busy}
    base.update(summary or {})
    (folder / rundir.SUMMARY).write_text(json.dumps(base))
    (folder / rundir.SCENARIO).write_text(yaml.safe_dump({"time": {"server": {"capacity": capacity}}}))
    return folder


def checks_of(folder) -> set[str]:
    return {v.check for v in verify.verify_run(folder)}


def with_changed(index: int, **changes) -> list[dict]:
    spans = clean_spans()
    spans[index] = {**spans[index], **changes}
    return spans


def test_a_clean_timeline_has_no_violation(tmp_path):
    """Touching spans, uploads queued back to back, a zero-length job in a free slot, fed beside server."""
    assert verify.verify_run(write_run(tmp_path / "r", clean_spans())) == []


@pytest.mark.parametrize("changes, why", [
    ({"end_s": 0.5}, "end before start"),
    ({"end_s": float("nan")}, "NaN end"),
    ({"start_s": float("-inf")}, "infinite start"),
    ({"wait_s": -0.1}, "negative wait"),
    ({"party": "cloud"}, "unknown party"),
])
def test_spans_catches_bad_spans(tmp_path, changes, why):
    assert "spans" in checks_of(write_run(tmp_path / "r", with_changed(2, **changes))), why


def test_spans_catches_a_span_after_the_end_of_the_run(tmp_path):
    folder = write_run(tmp_path / "r", clean_spans(), summary={"sim_time_s": 4.9})
    assert checks_of(folder) == {"spans"}


def test_client_compute_overlap_is_exact(tmp_path):
    """A compute span starting 1e-12 s before the client's previous one ends is caught; touching is not."""
    spans = clean_spans() + [span(0, "client", "client_backward", 2, 2.5 - 1e-12, 2.6)]
    v = verify.verify_run(write_run(tmp_path / "r", spans))
    assert [x.check for x in v] == ["client_compute"]
    assert "client 0" in str(v[0]) and "client_backward" in str(v[0]) and "client_forward_plus" in str(v[0])
    spans[-1] = {**spans[-1], "start_s": 2.5}
    assert verify.verify_run(write_run(tmp_path / "ok", spans)) == []


def test_links_catches_two_messages_at_once_on_one_link(tmp_path):
    """Two uploads of one client overlapping: a violation; an upload beside a download, or two
    clients' uploads at once, are not."""
    bad = with_changed(4, start_s=2.4)  # activation_plus starts before activation (ends 2.5) is sent
    v = verify.verify_run(write_run(tmp_path / "bad", bad))
    assert [x.check for x in v] == ["links"] and "client 0 uplink" in v[0].message
    other = clean_spans() + [span(0, "uplink", "model_up", 3, 4.6, 4.9, nbytes=1),
                             span(0, "downlink", "loss_diff", 2, 4.6, 4.8, nbytes=1),  # the other direction
                             span(1, "uplink", "model_up", 2, 4.6, 4.9, nbytes=1)]  # another client's link
    assert checks_of(write_run(tmp_path / "ok", other)) == set()


def test_server_capacity(tmp_path):
    """Two server jobs at once break capacity 1, not capacity 2 or null; the fed server never counts."""
    spans = with_changed(9, start_s=3.4)  # client 1's job starts while client 0's runs (to 3.5)
    assert checks_of(write_run(tmp_path / "c1", spans, capacity=1)) == {"server_capacity"}
    assert checks_of(write_run(tmp_path / "c2", spans, capacity=2)) == set()
    assert checks_of(write_run(tmp_path / "none", spans, capacity=None)) == set()
    zero = clean_spans() + [span(None, "server", "x", 0, 3.0, 3.0)]  # inside client 0's job
    assert checks_of(write_run(tmp_path / "zero", zero, capacity=1)) == {"server_capacity"}
    fed = with_changed(13, start_s=3.0, end_s=3.4)  # the Fed Server beside client 0's server job
    assert checks_of(write_run(tmp_path / "fed", fed, capacity=1)) == set()


def test_seq_must_rise_with_time(tmp_path):
    """seq k starting before seq k-1 of the same (client, party), or a seq twice; ties are fine."""
    dup = with_changed(12, seq=0)  # client 1's downlink: seq 0 at 0.0 (model_down) and at 4.0
    assert checks_of(write_run(tmp_path / "dup", dup)) == {"seq"}
    swapped = clean_spans()
    swapped[0], swapped[11] = {**swapped[0], "seq": 1}, {**swapped[11], "seq": 0}
    v = verify.verify_run(write_run(tmp_path / "back", swapped))
    assert [x.check for x in v] == ["seq"] and "client 0 downlink" in v[0].message
    tie = clean_spans() + [span(0, "client", "t", 2, 2.5, 2.5), span(0, "client", "u", 3, 2.5, 2.6)]
    assert checks_of(write_run(tmp_path / "tie", tie)) == set()


@pytest.mark.parametrize("key, value", [("events", 14), ("bytes_up", 22), ("bytes_down", 29),
                                        ("evaluations", 3)])
def test_totals_must_equal_the_event_log(tmp_path, key, value):
    assert checks_of(write_run(tmp_path / "r", clean_spans(), summary={key: value})) == {"totals"}


def test_server_busy_to_1e9_relative(tmp_path):
    busy = 2.0  # [2.5, 4.0) and [4.5, 5.0)
    near = write_run(tmp_path / "a", clean_spans(), summary={"server_busy_s": busy * (1 + 1e-12)})
    off = write_run(tmp_path / "b", clean_spans(), summary={"server_busy_s": busy * (1 + 1e-7)})
    assert checks_of(near) == set() and checks_of(off) == {"totals"}


@pytest.mark.parametrize("metrics", [[(0.0, 0, 0), (5.0, 1, 41), (4.0, 2, 41)],    # time goes back
                                     [(0.0, 1, 0), (5.0, 0, 41), (5.0, 2, 41)],    # round goes back
                                     [(0.0, 0, 9), (5.0, 1, 3)]])                  # bytes go back
def test_metrics_must_not_go_back(tmp_path, metrics):
    assert "metrics" in checks_of(write_run(tmp_path / "r", clean_spans(), metrics=metrics))


def test_missing_files_and_not_a_run(tmp_path):
    folder = write_run(tmp_path / "r", clean_spans())
    (folder / rundir.SCENARIO).unlink()
    assert checks_of(folder) == {"server_capacity"}
    with pytest.raises(UserError):
        verify.verify_run(tmp_path)


def test_many_violations_are_capped(tmp_path):
    spans = clean_spans() + [span(0, "client", "c", 10 + i, 1.5, 1.6) for i in range(40)]
    v = [x for x in verify.verify_run(write_run(tmp_path / "r", spans)) if x.check == "client_compute"]
    assert len(v) == 21 and v[-1].message.startswith("... and")


def test_cli_verify(tmp_path, capsys):
    """`sflsim verify`: 'ok: N events checked' and 0, one line per violation and 1, not a run 2."""
    assert main(["verify", str(write_run(tmp_path / "ok", clean_spans()))]) == 0
    assert capsys.readouterr().out.strip() == f"ok: {len(clean_spans())} events checked"
    assert main(["verify", str(write_run(tmp_path / "bad", with_changed(4, start_s=2.4)))]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "links: client 0 uplink" in out[0]
    assert main(["verify", str(tmp_path)]) == 2


# --------------------------------------------------------------------------------------------
# Real runs
# --------------------------------------------------------------------------------------------
def _raw(name: str, **algo) -> dict:
    raw = copy.deepcopy(TINY)
    raw["algorithm"] = {"name": name, "batch_size": 16, "local_steps": 2, **algo}
    if name == "gas":
        raw["algorithm"].setdefault("active_clients", 2)
        raw["algorithm"].setdefault("covariance", "diagonal")
    return raw


CASES = {name: _raw(name) for name in ALGORITHMS}
# MU-SplitFed adaptive on a contended server (one slot, every client) with a slow uplink, so
# its per-client uplink queue is in use; GAS first-order and ZO; SplitFed with ZO clients.
CASES["mu_splitfed_adaptive_contended"] = _raw("mu_splitfed", tau="adaptive", tau_max=4, participation=1.0)
CASES["mu_splitfed_adaptive_contended"]["time"].update(
    client={"flops_per_s": 1e9}, network={"uplink": {"bandwidth_mbps": 0.05, "latency_s": 0.01}})
CASES["gas_zo"] = _raw("gas", client_optimizer="zo", active_clients=3)
CASES["splitfed_v1_zo"] = _raw("splitfed_v1", client_optimizer="zo")
CASES["mu_splitfed_unlimited"] = _raw("mu_splitfed", tau=2)
CASES["mu_splitfed_unlimited"]["time"]["server"]["capacity"] = None


@pytest.mark.parametrize("case", sorted(CASES))
def test_real_runs_verify_clean(tmp_path, case):
    res = run_scenario(validate(CASES[case]), tmp_path / "run")
    assert res.summary["status"] == "completed"
    assert verify.verify_run(res.out_dir) == []
    assert res.summary["events"] > 20


def test_contended_case_uses_the_uplink_queue_and_the_server_slot(tmp_path):
    """The contended MU-SplitFed case is a real test: its uploads queue back to back and its
    server jobs wait for the one slot (so the link and capacity checks have work to do)."""
    res = run_scenario(validate(CASES["mu_splitfed_adaptive_contended"]))
    ev = res.events
    up = ev[(ev.party == "uplink") & (ev.client == 0)].sort_values("start_s")
    assert (up.start_s.to_numpy()[1:] == up.end_s.to_numpy()[:-1]).any()  # one waited for the other
    assert (ev[ev.party == "server"].wait_s > 0).any()


def _remove_uplink_queue(monkeypatch):
    """A bug on purpose: MU-SplitFed's uploads no longer wait for the client's uplink."""
    import simpy

    from simulator.algorithms import mu_splitfed as mu

    original = mu.SplitRounds.__init__

    def no_queue(self, *a, **k):
        original(self, *a, **k)
        self.uplinks = [simpy.Resource(self.ctx.sim.env, capacity=100) for _ in self.uplinks]

    monkeypatch.setattr(mu.SplitRounds, "__init__", no_queue)


def test_a_violation_fails_the_run_loudly(tmp_path, monkeypatch):
    """A bug that breaks an invariant (here: MU-SplitFed's uplink queue removed) fails the run with a
    TimelineError naming it; the run lands as failed with its traceback."""
    _remove_uplink_queue(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(verify.TimelineError, match="links: client 0 uplink"):
        run_scenario(validate(CASES["mu_splitfed_adaptive_contended"]), out)
    assert json.loads((out / rundir.SUMMARY).read_text())["status"] == "failed"
    assert "TimelineError" in (out / rundir.TRACEBACK).read_text()
    with pytest.raises(verify.TimelineError):  # in memory too
        run_scenario(validate(CASES["mu_splitfed_adaptive_contended"]))


def test_a_violation_fails_a_batch_run(tmp_path, monkeypatch):
    """In a batch the same bug is a failed run (runs/<id>.failed/ with the traceback); the batch goes on."""
    from simulator.experiments import plan_compare, run_batch

    _remove_uplink_queue(monkeypatch)
    raw = copy.deepcopy(CASES["mu_splitfed_adaptive_contended"])
    raw["stop"] = {"rounds": 1}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = run_batch(plan_compare(path, ["mu_splitfed"], "3,"), tmp_path / "out", workers=1, threads=1,
                       progress=False)
    [o] = result.outcomes
    assert o["status"] == "failed" and "TimelineError" in o["error"] and "links" in o["error"]
    failed = tmp_path / "out" / rundir.RUNS / "mu_splitfed-seed3.failed"
    assert json.loads((failed / rundir.SUMMARY).read_text())["status"] == "failed"
    assert (failed / rundir.TRACEBACK).is_file()


def test_verifier_is_fast(tmp_path):
    """Well under a second for a run's worth of events (a quickstart-sized run has ~11k)."""
    import time

    spans = []
    for c in range(10):
        t = 0.0
        for k in range(1000):
            spans.append(span(c, "client", "f", k, t, t + 0.5))
            t += 0.5
    folder = write_run(tmp_path / "r", spans, capacity=None, summary={"sim_time_s": 500.0})
    t0 = time.perf_counter()
    assert verify.verify_run(folder) == []
    assert time.perf_counter() - t0 < 2.0


# --------------------------------------------------------------------------------------------
# Evaluation marks of metrics.csv
# --------------------------------------------------------------------------------------------
def _subset_run(tmp_path):
    """A real tiny run that evaluates a 100-sample subset, then the full test set at its end."""
    raw = copy.deepcopy(TINY)
    raw["eval"] = {"every_rounds": 1, "subset": 100}
    run_scenario(validate(raw), tmp_path / "run")
    return tmp_path / "run"


def _edit_metrics(folder, edit):
    import pandas as pd

    m = pd.read_csv(folder / rundir.METRICS)
    m = edit(m)
    m.to_csv(folder / rundir.METRICS, index=False)


@pytest.mark.parametrize("edit, why", [
    (lambda m: m.assign(eval_set=["subset", "full", "subset", "full"]), "evaluate the full set"),
    (lambda m: m.assign(eval_set=["subset", "subset", "subset", "train"]), "eval_set is 'train'"),
    (lambda m: m.assign(eval_samples=[100, 100, 0, 359]), "eval_samples is 0"),
    (lambda m: m.assign(eval_samples=[100, 90, 100, 359]), "subset has 2 sample counts"),
    (lambda m: m.assign(eval_samples=[400, 400, 400, 359]), "not fewer than the full set"),
    (lambda m: m.assign(test_accuracy=[*m.test_accuracy[:3], 0.123]), "final_accuracy is"),
    (lambda m: m.assign(round=[0, 1, 1, 2]), "not at the sim_time_s and round"),
])
def test_metrics_checks_the_eval_marks(tmp_path, edit, why):
    """A subset run verifies clean; each broken mark is a metrics violation saying what."""
    folder = _subset_run(tmp_path)
    assert verify.verify_run(folder) == []
    _edit_metrics(folder, edit)
    found = verify.verify_run(folder)
    assert found and {v.check for v in found} == {"metrics"}, found
    assert any(why in v.message for v in found), found


def test_metrics_without_marks_are_an_older_run(tmp_path):
    """A metrics.csv written before eval_set existed verifies without the mark checks."""
    folder = _subset_run(tmp_path)
    summary = json.loads((folder / rundir.SUMMARY).read_text())
    _edit_metrics(folder, lambda m: m.drop(columns=["eval_set", "eval_samples"]))
    assert verify.verify_run(folder) == []
    _edit_metrics(folder, lambda m: m.assign(eval_set="full"))  # one mark without the other: broken
    assert {v.check for v in verify.verify_run(folder)} == {"metrics"}
    assert summary["final_accuracy"] is not None
