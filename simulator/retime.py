"""Re-time a finished run under another time model, without training again.

For ``splitfed_v1``, ``splitfed_zo`` and ``mu_splitfed`` with a fixed ``tau`` the tensor work
does not depend on the clock: every client trains its own copies from keyed minibatches, and
the round's average is taken in client order. A change of ``time.*`` keys then changes only
when each operation happens, never what it computes. ``retime_run`` runs the modified
scenario's timeline with no tensor work (the timing-only path, ``simulator.algorithms``'
no-op steps) and takes the values from the finished run, evaluation by evaluation and row by
row (``Replay``): the run folder it writes is the one a full training run of the modified
scenario writes, byte for byte, except ``summary.json``'s host-time fields (``rundir.HOST_TIME_FIELDS``:
``host_runtime_s``, ``eval_host_s``) and its ``retimed_from`` (docs/retime.md).

``mu_splitfed`` with ``tau: adaptive`` takes as many server steps as fit before an arrival: its
tensor work depends on the clock only through the number of steps per local iteration. It is
re-timed when the new time model gives every local iteration the same number of steps as the
finished run (``tau_used`` in ``client_rounds.csv``): a first timeline pass with no output
checks that (``schedule_dependent``), and a different count is refused with one line naming
the first local iteration that differs (``ScheduleChanged``; sweeps and comparisons then
train the run).

Refused, with one line saying why (a ``UserError``, exit 2): another algorithm (``splitfed_v2``
updates one server model in arrival order, ``gas`` is asynchronous: their values depend on
time), adaptive ``tau`` whose step counts change, a change outside ``time.*``, evaluation by
simulated time (``eval.every_sim_s``), a ``stop.sim_time_s`` (the round count would change),
a timing-only run, or a run that did not complete. This module never trains.
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Optional

from simulator import rundir
from simulator.timing import TimingOnly
from simulator.errors import UserError

log = logging.getLogger(__name__)

#: Keys that may differ between a finished run and its re-timed copy besides ``time.*``:
#: labels that change nothing a run computes (``threads`` is the caller's to keep equal).
LABEL_KEYS = ("name", "description", "threads")


def why_not_retimable(scenario) -> Optional[str]:
    """Why runs of ``scenario`` cannot be re-timed (None: they can). ``scenario``: a Scenario."""
    algo = scenario.algorithm
    name = algo.name
    if name == "splitfed_v2":
        return "splitfed_v2 updates its one server model in the order activations arrive, which the time model changes"
    if name == "gas":
        return "gas is asynchronous: which model a client starts from and what each server update sees depend on time"
    if name not in ("splitfed_v1", "splitfed_zo", "mu_splitfed"):
        return f"{name} is not known to have time-independent tensor work"
    if scenario.eval.every_sim_s is not None:
        return "eval.every_sim_s evaluates at simulated times, which the time model changes"
    if scenario.stop.sim_time_s is not None:
        return "stop.sim_time_s stops at a simulated time: the number of rounds would change"
    if scenario.timing_only:
        return "it is a timing-only run: it has no values to replay"
    return None


def schedule_dependent(scenario) -> bool:
    """Whether re-timing ``scenario``'s runs needs its schedule checked first: ``mu_splitfed``
    with ``tau: adaptive``, whose number of server steps per local iteration depends on time."""
    return scenario.algorithm.name == "mu_splitfed" and scenario.algorithm.tau == "adaptive"


class ScheduleChanged(UserError):
    """The new time model changes a schedule-dependent run's tensor work: it needs training."""


def differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two scenario mappings (lists compared whole)."""
    out = []
    for k in sorted(set(a) | set(b), key=str):
        key = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differing_keys(va, vb, key + ".")
        elif va != vb or (k in a) != (k in b):
            out.append(key)
    return out


def non_time_changes(a: dict, b: dict) -> list[str]:
    """The differing keys of two scenario mappings outside ``time.*`` and the labels."""
    return [k for k in differing_keys(a, b) if not k.startswith("time.") and k != "time" and k not in LABEL_KEYS]


class Replay(TimingOnly):
    """A finished run's values, handed back in the order a re-timed run asks for them.

    Evaluations come in sequence (the n-th evaluation of the re-timed run is the n-th row of
    the finished run's metrics.csv, and must be after the same number of rounds); rows of
    client_rounds.csv take their ``server_loss`` from the row of the same round, client and
    local iteration. A mismatch is a bug (the schedules differ), never papered over.
    """

    has_values = True

    def __init__(self, source: Path, check_tau: bool = False):
        self.source = Path(source)
        self.evaluations = _read_metrics(self.source / rundir.METRICS)
        self.next_eval = 0
        self.losses: dict = {}
        #: ``check_tau``: each row's ``tau_used`` must equal the finished run's (adaptive tau).
        self.taus: Optional[dict] = {} if check_tau else None
        table = self.source / "client_rounds.csv"
        if table.exists():
            with table.open(newline="") as f:
                for r in csv.DictReader(f):
                    key = (int(r["round"]), int(r["client"]), int(r["local_step"]))
                    self.losses[key] = _float(r["server_loss"])
                    if self.taus is not None:
                        self.taus[key] = int(r["tau_used"])

    def evaluate(self, rounds_done: int) -> tuple[float, float]:
        i = self.next_eval
        if i >= len(self.evaluations):
            raise RuntimeError(f"re-timing {self.source}: evaluation {i + 1} after {rounds_done} rounds, but the "
                               f"finished run evaluated only {len(self.evaluations)} times")
        rnd, acc, loss = self.evaluations[i]
        if rnd != rounds_done:
            raise RuntimeError(f"re-timing {self.source}: evaluation {i + 1} comes after {rounds_done} rounds, "
                               f"in the finished run after {rnd}")
        self.next_eval += 1
        return acc, loss

    def row(self, table: str, row: dict) -> dict:
        if table != "client_rounds":
            raise RuntimeError(f"re-timing {self.source}: no values to replay for table {table}")
        key = (row["round"], row["client"], row["local_step"])
        if key not in self.losses:
            raise RuntimeError(f"re-timing {self.source}: the finished run has no client_rounds row for round, "
                               f"client, local step {key}")
        if self.taus is not None and row["tau_used"] != self.taus[key]:
            raise ScheduleChanged(
                f"cannot re-time {self.source}: with the new time model adaptive tau takes {row['tau_used']} server "
                f"steps at round {key[0]}, client {key[1]}, local step {key[2]}, where the run took {self.taus[key]}: "
                f"the tensor work changes and needs training")
        return {**row, "server_loss": self.losses[key]}

    def summary_fields(self) -> dict:
        return {"retimed_from": str(self.source)}

    def rewind(self) -> None:
        """Replay the same values again from the first evaluation (a second pass of the same run)."""
        self.next_eval = 0

    def check_used_up(self) -> None:
        """Every evaluation of the finished run was replayed (else the round counts differ)."""
        if self.next_eval != len(self.evaluations):
            raise RuntimeError(f"re-timing {self.source}: replayed {self.next_eval} of its "
                               f"{len(self.evaluations)} evaluations")


def _float(cell: str) -> float:
    return float(cell) if cell != "" else math.nan


def _read_metrics(path: Path) -> list[tuple[int, float, float]]:
    with path.open(newline="") as f:
        return [(int(r["round"]), _float(r["test_accuracy"]), _float(r["test_loss"])) for r in csv.DictReader(f)]


def check_source(source: Path, scenario) -> None:
    """Refuse (``UserError``, one line) a source run or a target scenario that cannot be re-timed."""
    from simulator.scenario import load_scenario

    source = Path(source)
    summary = rundir.read_json(source / rundir.SUMMARY)
    if summary is None or not (source / rundir.SCENARIO).is_file():
        raise UserError(f"{source} is not a finished run folder (no {rundir.SUMMARY} or {rundir.SCENARIO})")
    if summary.get("status") != "completed":
        raise UserError(f"{source} did not complete (status {summary.get('status')!r}): only a completed run can be "
                        f"re-timed")
    if summary.get("retimed_from") is not None:
        source_of = summary["retimed_from"]
        log.debug("%s was itself re-timed from %s", source, source_of)
    original = load_scenario(source / rundir.SCENARIO)
    for s in (original, scenario):
        why = why_not_retimable(s)
        if why is not None:
            raise UserError(f"cannot re-time {source}: {why}")
    changed = non_time_changes(original.model_dump(mode="json"), scenario.model_dump(mode="json"))
    if changed:
        raise UserError(f"cannot re-time {source}: {changed[0]} differs and only time.* keys may change "
                        f"(a change outside time.* needs training)")


def retime_run(scenario, source: str | Path, out_dir: str | Path | None = None, *, overwrite: bool = False,
               in_place: bool = False, progress: bool = False):
    """Run ``scenario`` (a Scenario that differs from the run in ``source`` only in ``time.*``)
    with no tensor work, its values replayed from ``source``; returns the runner's RunResult."""
    from simulator.runner import run_scenario

    source = Path(source)
    check_source(source, scenario)
    check_tau = schedule_dependent(scenario)
    replay = Replay(source, check_tau=check_tau)
    if check_tau:  # a first pass, writing nothing: raises ScheduleChanged before any output
        run_scenario(scenario, None, timing=replay)
        replay.check_used_up()
        replay.rewind()  # the same values, replayed again by the pass that writes
    result = run_scenario(scenario, out_dir, progress=progress, overwrite=overwrite, in_place=in_place,
                          timing=replay)
    replay.check_used_up()
    return result


def retimed_scenario(run_dir: str | Path, overrides: list[str]):
    """The scenario of ``run_dir`` with ``--set time.KEY=VALUE`` overrides (any other key refused)."""
    from simulator.scenario import run_folder_scenario

    return run_folder_scenario(run_dir, overrides, ("time.",), "retime", "a change of {key} needs training")
