"""Checkpoint and resume: a run's tensor state at a round end, and a timeline replayed to it.

A checkpoint (``checkpoint.pt`` in the run folder) is taken at the end of a round (GAS: a global
iteration), the one moment where the algorithm's state is data (``checkpoint_state``): every
model part, optimizer buffer, data cursor, in-flight tensor and statistic, plus torch's global
random state and how many rows each output file had. The engine's clock, its sequence counters,
the time model's draws and the recorder's position are NOT pickled (SimPy processes are
generators, which cannot be): ``resume`` rebuilds them by replaying the run's timeline with no
tensor work (the timing-only path, docs/timing-only.md) up to the checkpoint's round, the values
of evaluations and table rows taken from the run's own files (``ResumeReplay``). At that round it
checks that the replay wrote exactly the bytes the run had written (events.csv, metrics.csv and
every table, row for row), loads the tensor state, puts the training steps back and carries on.
The resumed run is the straight run, byte for byte, host-time fields aside (tests/test_checkpoint.py
checks every algorithm).

Files are written atomically (a temporary file renamed into place). A checkpoint holds tensors,
numbers, strings, lists and dicts only and is read with ``torch.load(weights_only=True)``: no
code runs when a checkpoint is read.

When: every ``checkpoint_every`` rounds, at the end of a run that stopped at a round end, and on
the way out of an interrupted run. For that last one a snapshot of a recent round end is kept in
memory: at every round end while snapshots have cost at most ``SNAPSHOT_SHARE`` of the run's
host time so far (a tiny model's rounds take milliseconds; then an interrupted run resumes from a
few rounds back, which gives the same result), and always at the rounds that are written.
Checkpointing is opt-in (``--checkpoint-every N``): a snapshot doubles the memory the state
takes (GAS's full covariances, a large text model), which a run that never resumes should not pay.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from simulator import rundir
from simulator.errors import UserError
from simulator.timing import TimingOnly

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
FORMAT = 1
#: At most this share of host time goes into the in-memory snapshots of round ends that are not
#: written (benchmarks/checkpoint_cost.py measures the cost).
SNAPSHOT_SHARE = 0.01


# --------------------------------------------------------------------------------------------
# Taking checkpoints
# --------------------------------------------------------------------------------------------
def _tables_written(recorder) -> dict:
    return recorder.table_counts()


def _engine(sim) -> dict:
    """The engine's clock and sequence counters (a resume checks its replay arrived at them)."""
    return {"now": float(sim.now), "rounds_done": int(sim.rounds_done),
            "seq": sorted(([k[0], k[1], int(n)] for k, n in sim._seq.items()), key=repr)}


class Checkpointer:
    """Snapshots at round ends; writes them every ``every`` rounds, at the end and on interrupt.

    ``snapshot`` serialises the state at once (``torch.save`` into memory: a deep copy that later
    training cannot change); ``write`` puts the latest snapshot on disk atomically.
    """

    def __init__(self, out: Optional[Path], every: int, algo, sim, recorder, ctl=None):
        self.out, self.every, self.algo, self.sim, self.recorder = out, int(every), algo, sim, recorder
        self.ctl = ctl
        self.latest: Optional[bytes] = None
        self.latest_round: Optional[int] = None
        self.written_round: Optional[int] = None
        self.started = time.perf_counter()
        self.snapshot_s = 0.0  # host seconds spent in snapshots

    def snapshot(self) -> None:
        """The state now (a round end) as bytes, kept as the latest snapshot."""
        rec = self.recorder
        state = {
            "format": FORMAT,
            "rounds_done": int(self.sim.rounds_done),
            "sim_time_s": float(self.sim.now),
            "every": self.every,
            "engine": _engine(self.sim),
            "rows": {"events": rec.event_count, "metrics": len(rec.metrics), "tables": _tables_written(rec)},
            "algorithm": self.algo.checkpoint_state(),
            "torch_rng": torch.get_rng_state(),
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        self.latest, self.latest_round = buf.getvalue(), int(self.sim.rounds_done)

    def at_round_end(self, done: int) -> None:
        """Called after the round's evaluation and stop rules: snapshot (within the host-time
        share, always on a round that is written or that ends the run); write every ``every``."""
        written = done % self.every == 0 or self.sim.stopping
        now = time.perf_counter()
        if written or self.snapshot_s <= SNAPSHOT_SHARE * (now - self.started):
            self.snapshot()
            self.snapshot_s += time.perf_counter() - now
        if done % self.every == 0:
            self.write()

    def write(self) -> Optional[int]:
        """Write the latest snapshot to ``checkpoint.pt`` (atomically); its round, or None."""
        if self.latest is None or self.out is None or self.written_round == self.latest_round:
            return self.written_round
        path = self.out / CHECKPOINT
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(self.latest)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.written_round = self.latest_round
        log.debug("checkpoint of round %d written to %s", self.latest_round, path)
        return self.written_round

    def summary_fields(self) -> dict:
        return {"checkpoint_every": self.every, "checkpoint_round": self.written_round}


def read_checkpoint(run_dir: Path, device: torch.device | str = "cpu") -> dict:
    """The checkpoint of ``run_dir`` (a ``UserError`` naming the file when it is missing or unreadable)."""
    path = Path(run_dir) / CHECKPOINT
    summary = rundir.read_json(Path(run_dir) / rundir.SUMMARY) or {}
    if not path.is_file() and summary.get("checkpoint_every") is not None:
        raise UserError(f"{run_dir} has no {CHECKPOINT}: it ended ({summary.get('status')}) before its first round "
                        f"did, so there is nothing to resume; run it again")
    if not path.is_file():
        raise UserError(f"{run_dir} has no {CHECKPOINT}: only a run made with --checkpoint-every N can be resumed "
                        f"(an interrupted one checkpoints on its way out)")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"{path} is not a readable sflsim checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not an sflsim checkpoint of format {FORMAT}")
    return state


# --------------------------------------------------------------------------------------------
# Resuming: the timeline replayed to the checkpoint, values from the run's own files
# --------------------------------------------------------------------------------------------
def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _cell_float(cell: str) -> float:
    return float(cell) if cell != "" else math.nan


class ResumeReplay(TimingOnly):
    """The values a replay to the checkpoint needs, read from the interrupted run's files.

    Evaluations come back in order (the n-th evaluation is the n-th row of metrics.csv, after the
    same number of rounds); a table row takes, for every cell the no-op steps left NaN, the value
    of the same row of the run's table. Anything beyond the checkpoint, or a mismatch, is a bug
    (the timelines differ) and raises.
    """

    has_values = True

    def __init__(self, source: Path, checkpoint: dict):
        self.source = Path(source)
        rows = checkpoint["rows"]
        self.metrics = _read_rows(self.source / rundir.METRICS)[: rows["metrics"]]
        self.next_eval = 0
        self.tables = {name: _read_rows(self.source / f"{name}.csv")[:n] for name, n in rows["tables"].items()}
        self.next_row = {name: 0 for name in self.tables}
        gas = checkpoint["algorithm"].get("factor_attempts")
        self.attempts = {int(k): int(v) for k, v in gas.items()} if gas else {}

    def evaluate(self, rounds_done: int) -> tuple[float, float]:
        i = self.next_eval
        if i >= len(self.metrics):
            raise RuntimeError(f"resuming {self.source}: evaluation {i + 1} comes before the checkpoint, but the run "
                               f"had made only {len(self.metrics)} by then")
        row = self.metrics[i]
        if int(row["round"]) != rounds_done:
            raise RuntimeError(f"resuming {self.source}: evaluation {i + 1} comes after {rounds_done} rounds, in the "
                               f"run after {row['round']}")
        self.next_eval += 1
        return _cell_float(row["test_accuracy"]), _cell_float(row["test_loss"])

    def row(self, table: str, row: dict) -> dict:
        rows = self.tables.get(table, [])
        i = self.next_row.get(table, 0)
        if i >= len(rows):
            raise RuntimeError(f"resuming {self.source}: row {i + 1} of {table}.csv comes before the checkpoint, "
                               f"but the run had written only {len(rows)}")
        self.next_row[table] = i + 1
        old = rows[i]
        out = dict(row)
        for k, v in row.items():
            if isinstance(v, float) and v != v:  # a value the no-op steps could not compute
                out[k] = _cell_float(old[k])
        return out

    def factor_attempts(self, step: int) -> Optional[int]:
        """GAS: how many Cholesky attempts the run's server update ``step`` needed (None: unknown)."""
        return self.attempts.get(int(step))

    def summary_fields(self) -> dict:
        return {}


@dataclass
class Resume:
    """A run resumed from ``source``'s checkpoint: the replay, then the swap at its round."""

    source: Path
    checkpoint: dict
    replay: ResumeReplay

    @property
    def round(self) -> int:
        return int(self.checkpoint["rounds_done"])

    def check_replayed(self, out: Optional[Path], sim) -> None:
        """The replay is where the run was at the checkpoint: the engine's clock and sequence
        counters, the row counts, and every file written so far, byte for byte."""
        recorder = sim.recorder
        if _engine(sim) != self.checkpoint["engine"]:
            raise RuntimeError(f"resuming {self.source}: at round {self.round} the replay's clock and sequence "
                               f"counters differ from the checkpoint's: the timeline differs (was sflsim changed "
                               f"since the run?)")
        rows = self.checkpoint["rows"]
        have = {"events": recorder.event_count, "metrics": len(recorder.metrics), "tables": _tables_written(recorder)}
        if have != rows:
            raise RuntimeError(f"resuming {self.source}: at round {self.round} the replay has {have} rows, the "
                               f"checkpoint {rows}: the timeline differs (was sflsim changed since the run?)")
        if out is None:
            return
        recorder.flush()
        files = [rundir.EVENTS, rundir.METRICS] + [f"{name}.csv" for name in rows["tables"]]
        for name in files:
            new = (out / name).read_bytes()
            with (self.source / name).open("rb") as f:
                old = f.read(len(new))
            if new != old:
                line = next((i for i, (a, b) in enumerate(zip(new.split(b"\n"), old.split(b"\n"))) if a != b), None)
                raise RuntimeError(f"resuming {self.source}: the replayed {name} differs from the run's at line "
                                   f"{(line or 0) + 1}: the timeline differs (was sflsim changed since the run?)")

    def load(self, algo) -> None:
        """Put the checkpoint's tensor state into ``algo`` and torch's random state back."""
        algo.load_checkpoint_state(self.checkpoint["algorithm"])
        torch.set_rng_state(self.checkpoint["torch_rng"].cpu())


#: Keys that ``resume --set`` may change: when to stop, and labels. Anything else changes what
#: the run computes or when, and the replay to the checkpoint would not be the run.
RESUME_KEYS = ("stop.", "name", "description", "threads")


def resumed_scenario(run_dir: str | Path, overrides: list[str]):
    """The scenario of ``run_dir`` with ``--set stop.KEY=VALUE`` overrides (any other key refused)."""
    from simulator.scenario import run_folder_scenario

    return run_folder_scenario(run_dir, overrides, RESUME_KEYS, "resume", "a change of {key} would make the run "
                                                                          "another run")


def prepare_resume(run_dir: str | Path, scenario) -> Resume:
    """Check that ``run_dir`` can be resumed as ``scenario``; read its checkpoint."""
    run_dir = Path(run_dir)
    summary = rundir.read_json(run_dir / rundir.SUMMARY) or {}
    status = summary.get("status")
    if status == "diverged":
        raise UserError(f"{run_dir} diverged: its checkpoint holds the model before the NaN, and resuming would "
                        f"diverge again; change the scenario and run it anew")
    if summary.get("timing_only") or scenario.timing_only:
        raise UserError(f"{run_dir} is a timing-only run: it has no tensor state to resume")
    if summary.get("retimed_from"):
        raise UserError(f"{run_dir} was re-timed (sflsim retime), not trained: it has no tensor state to resume")
    ckpt = read_checkpoint(run_dir, "cpu")
    done = int(ckpt["rounds_done"])
    stop = scenario.stop
    if stop.rounds is not None and stop.rounds <= done:
        raise UserError(f"{run_dir} has a checkpoint at round {done} and stop.rounds is {stop.rounds}: nothing to "
                        f"resume; give a larger one, e.g. --set stop.rounds={done + max(1, done)}")
    if stop.sim_time_s is not None and stop.sim_time_s <= ckpt["sim_time_s"]:
        raise UserError(f"{run_dir} has a checkpoint at simulated time {ckpt['sim_time_s']:.3f} s and stop.sim_time_s "
                        f"is {stop.sim_time_s}: nothing to resume; give a larger one")
    return Resume(run_dir, ckpt, ResumeReplay(run_dir, ckpt))
