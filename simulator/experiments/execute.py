"""Running a plan: every run through ``simulator.runner.run_scenario``, on Dask or in this process.

``run_batch`` runs every spec of a ``Plan`` that is not already complete in the output folder:
on a local Dask cluster, on an existing scheduler, or in this process (``--workers 1``), with a
progress bar on stderr. Each run lands atomically (see ``simulator.rundir``): it is written into
``DIR/runs/<id>.partial/`` and renamed to ``DIR/runs/<id>/`` only when complete
(``DIR/runs/<id>.failed/`` with ``traceback.txt`` when it raised). A run that diverged (NaN/inf,
``status: diverged`` in its summary) is a result, not a failure: it lands in ``DIR/runs/<id>/``
like a completed run, is reused by a re-run, and its outcome is ``diverged``. ``DIR/batch.json``
says what was asked for, ``DIR/runs.csv`` the status of every run.

This module never changes how one run behaves (that is the runner's) and never interprets
results (that is ``analysis/``); nothing here prints.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sys
import time as _time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from simulator import rundir
from simulator.errors import UserError
from simulator.experiments.plan import Plan, RunSpec

log = logging.getLogger(__name__)

#: The module every local Dask worker imports when it starts (torch, the runner, the algorithms).
WORKER_PRELOAD = "simulator.experiments.worker"


# --------------------------------------------------------------------------------------------
# One run, on a worker (or in this process)
# --------------------------------------------------------------------------------------------
def execute_run(spec: RunSpec, runs_dir: str, source: Optional[str] = None) -> dict:
    """Run one spec into ``runs_dir/<id>.partial`` and rename it when it ends; never raises
    for a failing run (the error and traceback are recorded), only for an interrupt.

    ``source``: the id of a finished run of the batch that ``spec`` differs from only in
    ``time.*`` keys: the run is re-timed from it (``simulator.retime``) instead of trained. A
    source that did not complete (failed, diverged) is not re-timed from: the run trains; nor is
    one whose schedule the new time model changes (adaptive tau: ``retime.ScheduleChanged``)."""
    from simulator.retime import ScheduleChanged, retime_run
    from simulator.runner import divergence_warning_muted, run_scenario
    from simulator.scenario import validate

    runs = Path(runs_dir)
    if rundir.run_state(runs, spec.run_id, spec.fingerprint) == "complete":
        return rundir.reused_outcome(spec.run_id, runs / spec.run_id)
    if source is not None and (rundir.read_json(runs / source / rundir.SUMMARY) or {}).get("status") != "completed":
        log.info("run %s trains: %s, which it would be re-timed from, did not complete", spec.run_id, source)
        source = None
    meta = {**spec.labels(), "status": "running", "threads": spec.scenario.get("threads"),
            "host": socket.gethostname(), "pid": os.getpid(), "started_at": rundir.now()}
    if source is not None:
        meta["retimed_from"] = source
    partial = rundir.open_partial(runs, spec.run_id, meta)
    t0 = _time.perf_counter()
    try:
        with divergence_warning_muted():  # an outcome "diverged"; the batch's progress says it
            # in_place: this module lands runs/<id>.partial/ itself (rundir.land_finished / land_failed);
            # run_scenario still verifies the timeline, and a violation is a failed run.
            result = None
            if source is not None:
                try:
                    result = retime_run(validate(spec.scenario), runs / source, partial, in_place=True)
                except ScheduleChanged as e:  # raised before anything is written: train instead
                    log.info("run %s trains: %s", spec.run_id, e)
                    meta.pop("retimed_from")
                    rundir.write_json_atomic(partial / rundir.RUN_META, meta)
            if result is None:
                result = run_scenario(validate(spec.scenario), partial, progress=False, in_place=True)
    except Exception as e:  # a failing run is recorded; the batch goes on
        meta.update(status="failed", error=_one_line(e), host_s=_time.perf_counter() - t0, finished_at=rundir.now())
        failed = rundir.land_failed(runs, spec.run_id, meta, traceback.format_exc())
        return rundir.outcome(spec.run_id, "failed", failed, error=meta["error"], host_s=meta["host_s"])
    status = "diverged" if result.summary.get("status") == "diverged" else "completed"
    error = rundir.diverged_text(result.summary) if status == "diverged" else ""
    meta.update(status=status, host_s=_time.perf_counter() - t0, finished_at=rundir.now(),
                final_accuracy=result.summary.get("final_accuracy"), sim_time_s=result.summary.get("sim_time_s"),
                rounds=result.summary.get("rounds"))
    if status == "diverged":
        meta.update(error=error, diverged=result.summary.get("diverged"))
    final = rundir.land_finished(runs, spec.run_id, meta)
    return rundir.outcome(spec.run_id, status, final, error=error, host_s=meta["host_s"], summary=result.summary)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --------------------------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------------------------
@dataclass
class BatchResult:
    """Outcomes of a batch, in plan order."""

    out_dir: Path
    outcomes: list[dict]

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o["status"] == status)

    @property
    def failed(self) -> list[dict]:
        return [o for o in self.outcomes if o["status"] == "failed"]

    @property
    def diverged(self) -> list[dict]:
        """Runs that diverged (now or in an earlier command): results, not failures."""
        return [o for o in self.outcomes if o["status"] == "diverged"]


def machine_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def run_batch(plan: Plan, out_dir: str | Path, *, workers: Optional[int] = None, scheduler: Optional[str] = None,
              threads: Optional[int] = None, progress: bool = True, overwrite: bool = False,
              command: Optional[list[str]] = None, retime: bool = True) -> BatchResult:
    """Run every spec of ``plan`` not already complete in ``out_dir``; return the outcomes.

    ``workers``: a LocalCluster of that many worker processes (default: one per core, at most
    one per run); 1 runs in this process, without Dask. ``scheduler``: the address of an
    existing Dask scheduler instead (its workers must see ``out_dir`` and import sflsim).
    ``threads``: torch threads per run; default cores // workers on a local cluster, the
    scenario's own setting on an external one. ``overwrite``: re-run finished runs whose inputs
    changed (default: refuse). Completed runs are skipped; a failing run does not stop others.
    ``retime``: runs that differ from another run of the plan only in ``time.*`` keys
    (``Plan.retime_sources``) are re-timed from it once it has trained, instead of trained
    (``simulator.retime``; their summary.json, run.json and runs.csv say ``retimed_from``).
    Workers are always processes: runs in threads of one process share torch's global state
    (RNG, thread count, autograd hooks) and break each other.
    """
    out = Path(out_dir)
    runs_dir = out / rundir.RUNS
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    if workers is not None and scheduler:
        raise UserError("give --workers (a local cluster) or --scheduler (an existing one), not both")
    single = [f for f in rundir.RUN_FILES if (out / f).is_file()]
    if single and not (out / rundir.BATCH_META).is_file():
        raise UserError(f"{out} holds a single run ({single[0]}; sflsim run --out {out}): a batch would mix with it; "
                        f"give another --out")
    specs = plan.specs
    states = {s.run_id: rundir.run_state(runs_dir, s.run_id, s.fingerprint) for s in specs}
    changed = [rid for rid, st in states.items() if st == "changed"]
    if changed and not overwrite:
        raise UserError(
            f"{len(changed)} finished run(s) in {runs_dir} were made from different inputs "
            f"(e.g. {changed[0]}); use another --out, or --overwrite to re-run them")
    todo = [s for s in specs if states[s.run_id] != "complete"]
    cores = machine_cores()
    if scheduler:
        n_workers, in_process = None, False
        per_run = threads
    else:  # no more workers than runs to do; --workers 1 (or a single run by default) in-process
        n_workers = max(1, min(workers or cores, len(todo)))
        in_process = workers == 1 or (workers is None and n_workers == 1)
        per_run = threads or max(1, cores // n_workers)
    todo = [s.with_threads(per_run) for s in todo]

    runs_dir.mkdir(parents=True, exist_ok=True)
    for s in todo:  # unfinished leftovers of an interrupted batch: these runs start afresh
        shutil.rmtree(rundir.run_paths(runs_dir, s.run_id).partial, ignore_errors=True)
    sources = plan.retime_sources() if retime else {}
    execution = {"workers": n_workers, "scheduler": scheduler, "threads_per_run": per_run, "cores": cores,
                 "in_process": in_process, "retimed": sources}
    rundir.write_json_atomic(out / rundir.BATCH_META, {
        **plan.info, "created_at": rundir.now(), "command": command, "execution": execution,
        "runs": [{**s.labels(), "scenario": s.scenario} for s in specs],
    })
    outcomes: dict[str, dict] = {}
    for s in specs:
        if states[s.run_id] == "complete":
            outcomes[s.run_id] = rundir.reused_outcome(s.run_id, runs_dir / s.run_id)
    _write_runs_csv(out, specs, outcomes)

    bar = _Progress(len(specs), len(outcomes), progress, plan.kind)
    redirect = contextlib.nullcontext()
    if progress:  # log lines (a failed run) go above the bar instead of through it
        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect = logging_redirect_tqdm()
    try:
        with redirect:
            # First the runs that train, then those re-timed from them (their sources are finished by then).
            for phase in ([s for s in todo if s.run_id not in sources], [s for s in todo if s.run_id in sources]):
                _execute(phase, runs_dir, out, specs, outcomes, bar, execution, n_workers, scheduler, sources)
    except KeyboardInterrupt:
        for s in specs:
            outcomes.setdefault(s.run_id, rundir.outcome(s.run_id, "not_run", runs_dir / s.run_id, error="interrupted"))
        _write_runs_csv(out, specs, outcomes)
        raise
    finally:
        bar.close()
    for s in specs:
        outcomes.setdefault(s.run_id, rundir.outcome(s.run_id, "not_run", runs_dir / s.run_id))
    _write_runs_csv(out, specs, outcomes)
    return BatchResult(out, [outcomes[s.run_id] for s in specs])


def _write_runs_csv(out: Path, specs: list[RunSpec], outcomes: dict[str, dict]) -> None:
    rundir.write_runs_csv(out, [s.labels() for s in specs], outcomes)


def _execute(todo, runs_dir, out, specs, outcomes, bar, execution, n_workers, scheduler, sources) -> None:
    if not todo:
        return
    if execution["in_process"]:
        for s in todo:
            bar.running(1)
            outcomes[s.run_id] = execute_run(s, str(runs_dir), sources.get(s.run_id))
            bar.done(outcomes[s.run_id])
            _write_runs_csv(out, specs, outcomes)
    else:
        _run_on_dask(todo, runs_dir, out, specs, outcomes, bar, n_workers, scheduler, sources)


def _run_on_dask(todo, runs_dir, out, specs, outcomes, bar, n_workers, scheduler, sources) -> None:
    from distributed import Client, LocalCluster, wait

    cluster = None
    # Dask's own INFO/WARNING lines (cluster start, slow worker shutdown) would bury the
    # progress bar; failures reach us as exceptions on the futures. -v keeps them.
    dask_log = logging.getLogger("distributed")
    old_level = dask_log.level
    if not log.isEnabledFor(logging.DEBUG):
        dask_log.setLevel(logging.CRITICAL)
    try:
        if scheduler:
            try:
                client = Client(scheduler, timeout="20s")
            except (OSError, TimeoutError) as e:
                raise UserError(f"cannot reach the Dask scheduler at {scheduler}: {_one_line(e)}") from None
        else:
            # The scheduler always serves HTTP (metrics); a free local port avoids clashing with
            # another cluster on 8787.
            # Each worker imports torch and the simulator once, as it starts, then runs run after
            # run (simulator/experiments/worker.py): no run pays the imports.
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                   dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR,
                                   preload=[WORKER_PRELOAD])
            client = Client(cluster)
        with client:
            futures = {client.submit(execute_run, s, str(runs_dir), sources.get(s.run_id), pure=False,
                                     key=f"sflsim-{s.run_id}-{uuid.uuid4().hex[:8]}"): s for s in todo}
            pending = set(futures)
            while pending:
                try:
                    finished, pending = wait(pending, timeout=1.0, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    finished = set()
                for fut in finished:
                    spec = futures[fut]
                    outcomes[spec.run_id] = _collect(fut, spec, runs_dir)
                    bar.done(outcomes[spec.run_id])
                if finished:
                    _write_runs_csv(out, specs, outcomes)
                # Running = started and not finished: the run folders being written.
                bar.running(sum(rundir.run_paths(runs_dir, futures[f].run_id).partial.is_dir() for f in pending))
    finally:
        if cluster is not None:
            cluster.close()
        dask_log.setLevel(old_level)


def _collect(fut, spec: RunSpec, runs_dir: Path) -> dict:
    """A future's outcome; a worker that died (or a task that could not run) is a failed run."""
    try:
        return fut.result()
    except Exception as e:
        error = _one_line(e)
        failed = rundir.record_crash(runs_dir, spec.run_id, spec.labels(), error,
                                     "".join(traceback.format_exception(e)))
        return rundir.outcome(spec.run_id, "failed", failed, error=error)


# --------------------------------------------------------------------------------------------
# The progress bar
# --------------------------------------------------------------------------------------------
class _Progress:
    """A tqdm bar for the batch: runs finished out of all, with done/failed/running counts."""

    def __init__(self, total: int, reused: int, enabled: bool, desc: str):
        self.counts = {"done": reused, "diverged": 0, "failed": 0, "running": 0}
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=reused, unit="run", desc=desc, file=sys.stderr,
                            dynamic_ncols=True, leave=True)
            self._post()

    def _postfix(self) -> dict:
        return {k: v for k, v in self.counts.items() if v or k != "diverged"}

    def _post(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix(self._postfix(), refresh=True)

    def running(self, n: int) -> None:
        if n != self.counts["running"]:
            self.counts["running"] = n
            self._post()

    def done(self, outcome: dict) -> None:
        key = outcome["status"] if outcome["status"] in ("failed", "diverged") else "done"
        self.counts[key] += 1
        self.counts["running"] = max(0, self.counts["running"] - 1)
        if outcome["status"] == "failed":
            log.warning("run %s failed: %s", outcome["run_id"], outcome["error"])
        elif outcome["status"] == "diverged":  # the error reads "diverged: ..."
            log.warning("run %s %s", outcome["run_id"], outcome["error"])
        if self.bar is not None:
            self.bar.set_postfix(self._postfix(), refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
