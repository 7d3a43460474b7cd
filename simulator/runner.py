"""Run one scenario: build data, model, time model and algorithm, run the event loop, write outputs.

``run_scenario`` is the API for notebooks and the CLI alike. It owns evaluation (free in
simulated time: during training on a fixed, stratified, keyed subset of the test set, at the
end on the full test set; with ``data.validation``, of the validation split instead, and the
test set is not used; ``eval_subset``, ``_Controller``), the stop rules and the output
files; the algorithm owns its control flow.
Outputs in ``out_dir``: scenario.yaml (resolved), metrics.csv, events.csv, summary.json,
accuracy_vs_time.png, and any per-round tables the algorithm records. A KeyboardInterrupt
stops the loop; what was recorded is flushed and the summary says ``"status": "interrupted"``.
A ``Diverged`` raised by the algorithm (a NaN/inf loss or parameter) is a result, not an error:
the run returns normally with ``"status": "diverged"``, ``"stop_reason": "diverged"`` and
``"diverged": {what, round, local_step, party, client}``; every output is kept, and the NaN
model is not evaluated again.

The folder is written beside ``out_dir`` and lands whole when the run ends (``simulator.rundir``:
an existing run is refused without ``overwrite``, and never replaced by a run that did not
finish); then the timeline is checked (``simulator.verify``), and a violation fails the run.
"""
from __future__ import annotations

import contextlib
import logging
import math
import platform
import sys
import time as _time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

# Text-model knowledge lives in models/ (models.text.check_fit, ServerWithMask; profile_text_cut).
# Profiles come through the disk cache (models.profile.cached): no torch._dynamo import when cached.
from models.profile import cached_profile_cut, cached_profile_text_cut
from simulator import rundir, verify
from simulator.algorithms import ALGORITHMS
from simulator.algorithms.common import RunContext
from simulator.engine import Simulation
from simulator.errors import Diverged, ScenarioError, Terminated, UserError
from simulator.latency import build_time_model
from simulator.scenario import Scenario, to_yaml
from simulator.timing import TimingOnly
from simulator.trace import Recorder
from simulator.verify import TimelineError

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run produced: the summary, and the recorder with every metric (and every span when
    the run had no output folder; with one, the spans were streamed to its events.csv)."""

    summary: dict
    recorder: Recorder
    out_dir: Optional[Path]
    algorithm: Any = field(repr=False, default=None)
    diverged: Optional[Diverged] = None  # why the run stopped when ``summary["status"] == "diverged"``

    @property
    def metrics(self):
        """Metrics as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.recorder.metrics)

    @property
    def events(self):
        """Events as a pandas DataFrame (read back from events.csv when they were streamed)."""
        import pandas as pd
        from simulator.trace import EVENT_COLUMNS

        if not self.recorder.keep_events:
            return pd.read_csv(self.out_dir / rundir.EVENTS)
        return pd.DataFrame(self.recorder.events, columns=list(EVENT_COLUMNS))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ScenarioError("device", "cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def build_context(scenario: Scenario, sim: Simulation, device: torch.device, pixels: bool = True) -> RunContext:
    """Data, partitions, split model and cut profile for a scenario (``pixels=False``: a
    timing-only run, which reads the labels and shapes only, skips normalising the images)."""
    from models.split import split
    from models.zoo import build_model
    from simulator.data import DATASETS, load_dataset

    d = scenario.data
    if DATASETS[d.dataset].kind == "text":
        return build_text_context(scenario, sim, device)
    with _validation_split():
        data = load_dataset(d.dataset, d.root, train_limit=d.train_limit, test_limit=d.test_limit,
                            seed=scenario.seed, pixels=pixels, validation=d.validation)
    parts_idx = _partition(scenario, data.y_train.numpy())
    c, h, w = data.input_shape
    model = build_model(scenario.model.name, c, data.num_classes, (h, w), seed=scenario.seed)
    try:
        parts = split(model, scenario.model.cut)
    except ValueError as e:
        raise ScenarioError("model.cut", str(e)) from None
    batch = getattr(scenario.algorithm, "batch_size", 32)
    built = {"name": scenario.model.name, "in_channels": c, "num_classes": data.num_classes, "input_hw": [h, w]}
    profile = cached_profile_cut(parts, data.input_shape, batch, model=built)
    return _context(scenario, sim, device, data, parts, parts_idx, profile)


def build_text_context(scenario: Scenario, sim: Simulation, device: torch.device) -> RunContext:
    """Tokenised text data, partitions, a split transformer and its measured cut profile.

    The tokenizer is the model's own (local files only); the model is built with the number
    of classes of the data, then checked against it (``models.text.check_fit``).
    """
    from models.text import build_text_model, check_fit, tokenizer_for
    from simulator.data import load_text_dataset

    d, m = scenario.data, scenario.model
    tokenizer = tokenizer_for(m.name, m.local_path)
    with _validation_split():
        data = load_text_dataset(d.dataset, d.root, tokenizer=tokenizer, max_len=d.max_len,
                                 train_limit=d.train_limit, test_limit=d.test_limit, seed=scenario.seed,
                                 validation=d.validation)
    parts_idx = _partition(scenario, data.y_train.numpy())
    try:
        parts = build_text_model(m.name, cut=m.cut, num_classes=data.num_classes, seed=scenario.seed,
                                 config=m.config, local_path=m.local_path)
    except ValueError as e:
        raise ScenarioError("model.cut" if "invalid cut" in str(e) else "model.config", str(e)) from None
    check_fit(parts, data, d.max_len)
    batch = getattr(scenario.algorithm, "batch_size", 32)
    built = {"name": m.name, "config": m.config, "local_path": m.local_path, "num_classes": data.num_classes}
    profile = cached_profile_text_cut(parts, d.max_len, batch, model=built)
    return _context(scenario, sim, device, data, parts, parts_idx, profile)


@contextlib.contextmanager
def _validation_split():
    """A ``data.validation`` the loaded labels cannot honour is bad input naming the key."""
    from simulator.data.partitions import ValidationSplitError

    try:
        yield
    except ValidationSplitError as e:
        raise ScenarioError("data.validation", str(e)) from None


def _partition(scenario: Scenario, labels) -> list:
    """Client index arrays for the scenario's partition (bad partition arguments name the key)."""
    from simulator.data import partition

    d = scenario.data
    try:
        return partition(labels, d.num_clients, d.partition, seed=scenario.seed,
                         alpha=d.alpha, shards_per_client=d.shards_per_client)
    except ValueError as e:
        raise ScenarioError("data.partition", str(e)) from None


def _context(scenario, sim, device, data, parts, parts_idx, profile) -> RunContext:
    """Move the model (and the data, off the CPU) to the device and assemble the RunContext."""
    parts.client.to(device)
    parts.server.to(device)
    if device.type != "cpu":
        data = _to_device(data, device)
    return RunContext(scenario, scenario.algorithm, data, parts, profile, parts_idx, sim, device, scenario.seed)


def _to_device(data, device):
    import dataclasses

    return dataclasses.replace(
        data,
        x_train=data.x_train.to(device), y_train=data.y_train.to(device),
        x_test=data.x_test.to(device), y_test=data.y_test.to(device),
    )


def eval_subset(scenario: Scenario, labels) -> Optional["np.ndarray"]:
    """Sorted indices of the run's training-time evaluation subset of its evaluation set (the
    test set, or the validation split with ``data.validation``); None: the full set.

    Drawn once per run from ``rng.generator(seed, "eval", "subset")`` with the evaluation labels
    only: proportional to the classes (largest remainder), every class represented, the same for
    every algorithm given the same seed and data, another subset for another seed. ``eval.subset``
    larger than the evaluation set, or smaller than its number of classes, is a ``ScenarioError``.
    """
    import numpy as np

    from simulator.data import stratified_subset
    from simulator.rng import generator

    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    asked, n = scenario.eval.subset, int(y.size)
    which = "test" if scenario.data.validation is None else "validation"
    if isinstance(asked, int) and asked > n:
        raise ScenarioError("eval.subset", f"{asked:,} is more than the {n:,} samples of the {which} set; give at "
                                           f"most {n:,}, auto, or null (the full {which} set every time)")
    size = scenario.eval.subset_size(n)
    if size is None:
        return None
    try:
        return stratified_subset(y, size, generator(scenario.seed, "eval", "subset"), every_class=True)
    except ValueError as e:
        raise ScenarioError("eval.subset", f"{size:,} samples: {e}; give more, or null (the full {which} set)") from None


class _Controller:
    """Evaluation and stop rules, driven by round notifications and a clock process.

    Evaluations during training use the run's fixed subset of the evaluation set (``eval_subset``;
    the full set when ``eval.subset`` is null or covers it) and decide ``stop.target_accuracy``;
    ``finish`` adds the evaluation on the full set at the end. The evaluation set is the test set,
    or the validation split with ``data.validation`` (``ctx.data.eval_data``). All are free in
    simulated time; their host seconds are summed in ``eval_host_s``.
    """

    def __init__(self, scenario: Scenario, sim: Simulation, algo, ctx: RunContext, progress: bool,
                 checkpointer=None, resume=None, out: Optional[Path] = None):
        self.s, self.sim, self.algo, self.ctx = scenario, sim, algo, ctx
        self.checkpointer, self.resume, self.out = checkpointer, resume, out
        self.last_eval_key = None
        self.last_acc = float("nan")
        self.eval_host_s = 0.0
        x, y = ctx.data.x_test, ctx.data.y_test
        self.eval_data = getattr(ctx.data, "eval_data", "test")  # what x_test holds: test or validation
        self.test_samples = len(y)
        idx = eval_subset(scenario, y)
        self.full = ("full", x, y)
        if idx is None:
            self.during = self.full
        else:
            t = torch.as_tensor(idx, dtype=torch.long, device=y.device)
            self.during = ("subset", x[t], y[t])
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=scenario.stop.rounds, unit="round", file=sys.stderr, dynamic_ncols=True,
                            desc=scenario.name, leave=True)

    @property
    def subset_samples(self) -> Optional[int]:
        """Samples of the training-time subset; None when training evaluates the full set."""
        return len(self.during[2]) if self.during is not self.full else None

    def _measure(self, which: tuple) -> dict:
        """Evaluate the global model on ``which`` (eval_set, x, y) and record the row."""
        name, x, y = which
        t0 = _time.perf_counter()
        acc, loss = self.algo.evaluate(x, y, self.s.eval.batch_size)
        self.eval_host_s += _time.perf_counter() - t0
        return self.sim.recorder.metric(self.sim.now, self.sim.rounds_done, acc, loss,
                                        eval_set=name, eval_samples=len(y))

    def evaluate(self) -> dict:
        """A training-time evaluation (the subset): the curve, and the target check."""
        row = self._measure(self.during)
        acc = row["test_accuracy"]
        self.last_eval_key = (self.sim.rounds_done, self.sim.now)
        self.last_acc = acc
        if self.bar is not None:
            self.bar.set_postfix(sim_s=f"{self.sim.now:.1f}", acc=f"{acc:.4f}", refresh=False)
        target = self.s.stop.target_accuracy
        if target is not None and acc >= target:
            self.sim.stop("target_accuracy")
        return row

    def finish(self) -> None:
        """At the run's end: a training-time evaluation (unless one was made at this round and
        time), then, when training used a subset, the full test set (same sim_time_s)."""
        if self.last_eval_key != (self.sim.rounds_done, self.sim.now):
            self.evaluate()
        if self.during is not self.full:
            self._measure(self.full)

    def on_round(self, r: int) -> None:
        done = r + 1
        self.sim.recorder.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(sim_s=f"{self.sim.now:.1f}", acc=f"{self.last_acc:.4f}", refresh=True)
        every = self.s.eval.every_rounds
        if every is not None and done % every == 0:
            self.evaluate()
        if self.s.stop.rounds is not None and done >= self.s.stop.rounds:
            self.sim.stop("rounds")
        if self.resume is not None and done == self.resume.round:
            # The replay has reached the checkpoint: check it wrote what the run had, then train on.
            self.resume.check_replayed(self.out, self.sim)
            self.resume.load(self.algo)
            self.algo.set_timing(None)
            self.resume = None
        if self.checkpointer is not None and self.resume is None:
            self.checkpointer.at_round_end(done)

    def clock(self):
        """Evaluate every ``eval.every_sim_s`` simulated seconds."""
        period = self.s.eval.every_sim_s
        while True:
            yield self.sim.env.timeout(period)
            self.evaluate()

    def deadline(self):
        yield self.sim.env.timeout(self.s.stop.sim_time_s)
        self.sim.stop("sim_time_s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_scenario(scenario: Scenario, out_dir: str | Path | None = None, *, progress: bool = False,
                 overwrite: bool = False, in_place: bool = False,
                 timing: Optional[TimingOnly] = None, checkpoint_every: Optional[int] = None,
                 resume=None) -> RunResult:
    """Run a validated scenario; write outputs to ``out_dir`` (if given) and return the result.

    The run is written into ``DIR.partial-<pid>`` beside ``out_dir`` and moved into place when it
    ends (``simulator.rundir``): completed, diverged, interrupted or failed (then with
    ``traceback.txt``). An ``out_dir`` with files in it is refused (a ``UserError``, before
    anything runs) unless ``overwrite``; then the old folder is replaced as a whole at the end,
    and only by a run that completed or diverged (one that failed or was interrupted lands beside
    it as ``DIR.failed-<time>`` / ``DIR.interrupted-<time>``). Bad input found during set-up (a
    ``UserError``) leaves nothing behind. Every run's timeline is verified (``simulator.verify``)
    after its outputs are written; a violation fails the run with a ``TimelineError``.
    ``in_place``: write straight into ``out_dir``, which the caller lands (a batch's
    ``runs/<id>.partial/``). ``simulator.preflight.preflight`` runs first, for every caller (CLI,
    notebook, batch). Where the run landed is ``RunResult.out_dir``; an exception raised
    after set-up carries it as ``landed_in(exc)``.

    ``timing``: run the timeline with no tensor work (also what ``scenario.timing_only``
    asks for); ``simulator.retime`` passes one that replays a finished run's values.

    ``checkpoint_every``: write ``checkpoint.pt`` every that many rounds (GAS: global
    iterations), at the end, and on the way out of an interrupted run (``simulator.checkpoint``).
    ``resume``: a ``simulator.checkpoint.Resume`` (``resume_run`` makes it).
    """
    from simulator.preflight import preflight

    if timing is None and scenario.timing_only:
        timing = TimingOnly()
    if checkpoint_every is not None:
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise UserError(f"--checkpoint-every must be a whole number of rounds >= 1, got {checkpoint_every!r}")
        if timing is not None:
            raise UserError("--checkpoint-every: a timing-only or re-timed run has no tensor state to checkpoint")

    preflight(scenario)  # files, data roots, sizes, draws: refused before any output is touched
    final = Path(out_dir) if out_dir is not None else None
    if final is None or in_place:
        if final is not None:
            final.mkdir(parents=True, exist_ok=True)
        result = _execute(scenario, final, final, progress, timing, checkpoint_every, resume)
        _verify(result, scenario)
        return result
    partial = rundir.open_run(final, overwrite)
    try:
        result = _execute(scenario, partial, final, progress, timing, checkpoint_every, resume)
        _verify(result, scenario, final)
    except UserError as e:
        if not getattr(e, "sflsim_recorded", False):  # bad input found in set-up: nothing ran, nothing kept
            rundir.discard_run(partial)
            raise
        _land_failed(partial, final, e)
        raise
    except KeyboardInterrupt as e:
        try:
            _verify_folder(partial, final, require_files=False)  # Ctrl-C may come before a file is written
        except TimelineError as bug:
            _land_failed(partial, final, bug)
            raise bug from e
        e.sflsim_out_dir = rundir.land_run(partial, final, "interrupted")
        if e.sflsim_out_dir != final:
            log.warning("%s is unchanged; the interrupted run is in %s/", final, e.sflsim_out_dir)
        raise
    except BaseException as e:
        _land_failed(partial, final, e)
        raise
    result.out_dir = rundir.land_run(partial, final, result.summary.get("status", "completed"))
    result.recorder.out_dir = result.out_dir
    return result


def landed_in(exc: BaseException) -> Optional[Path]:
    """The folder a run that raised ``exc`` landed in (None: nothing was kept, or no folder)."""
    return getattr(exc, "sflsim_out_dir", None)


def _land_failed(partial: Path, final: Path, exc: BaseException) -> None:
    """A run that raised lands with its traceback; the exception learns where, the log says it."""
    import traceback

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    error = f"{type(exc).__name__}: {' '.join(str(exc).split())}".rstrip(": ")
    dest = rundir.land_run(partial, final, "failed", text, error)
    exc.sflsim_out_dir = dest
    if dest != final:
        log.error("the run failed; %s is unchanged, the failed run and its traceback are in %s/", final, dest)
    else:
        log.error("the run failed; what it recorded and its traceback are in %s/", dest)


def _verify(result: RunResult, scenario: Scenario, shown: Optional[Path] = None) -> None:
    """Check the finished run's timeline; a violation marks its summary failed and raises."""
    if result.out_dir is not None:
        _verify_folder(result.out_dir, shown or result.out_dir)
        return
    violations = verify.verify_recorded(result.recorder, result.summary, scenario.time.server.capacity)
    if violations:
        result.summary["status"] = "failed"
        raise TimelineError(violations)


def _verify_folder(folder: Path, shown: Path, require_files: bool = True) -> None:
    """``verify.verify_run`` on ``folder`` (the run that lands in ``shown``); raise on a violation."""
    t0 = _time.perf_counter()
    violations = verify.verify_run(folder, require_files=require_files)
    log.debug("verified the timeline of %s in %.3f s", shown, _time.perf_counter() - t0)
    if violations:
        raise TimelineError(violations, f"the run for {shown}")


def _execute(scenario: Scenario, out: Optional[Path], shown: Optional[Path], progress: bool,
             timing: Optional[TimingOnly] = None, checkpoint_every: Optional[int] = None,
             resume=None) -> RunResult:
    """Run the scenario writing into ``out`` (``shown``: the folder named in log lines); with
    ``timing``, no tensor work (the algorithms' no-op steps); with ``resume``, the timeline
    replayed with no tensor work up to the checkpoint's round, then training from its state."""
    host_start = _time.perf_counter()
    status = "completed"
    sim = ctx = algo = ctl = recorder = checkpointer = None
    diverged: Optional[Diverged] = None
    interrupted_by = None
    started = False  # the event loop has the algorithm: what goes wrong now is not bad set-up input
    try:
        if out is not None:
            (out / rundir.SCENARIO).write_text(to_yaml(scenario))
            for stale in (rundir.SUMMARY, rundir.FIGURE):
                (out / stale).unlink(missing_ok=True)
        recorder = Recorder(out)
        if scenario.threads:
            torch.set_num_threads(scenario.threads)
        device = resolve_device(scenario.device)
        spec = ALGORITHMS[scenario.algorithm.name]
        time_model = build_time_model(scenario.time, scenario.data.num_clients, scenario.seed)
        sim = Simulation(time_model, recorder, scenario.time.server.capacity)
        ctx = build_context(scenario, sim, device) if timing is None else build_context(scenario, sim, device,
                                                                                          pixels=False)
        ctx.timing = timing
        algo = spec.build(ctx)
        if resume is not None:
            algo.set_timing(resume.replay)  # no tensor work until the checkpoint's round
        if checkpoint_every is not None and out is not None:
            from simulator.checkpoint import Checkpointer

            checkpointer = Checkpointer(out, checkpoint_every, algo, sim, recorder)
        ctl = _Controller(scenario, sim, algo, ctx, progress, checkpointer, resume, out)
        sim.on_round(ctl.on_round)
        ctl.evaluate()  # the initial model, at time 0
        env = sim.env
        started = True
        env.process(algo.process())
        if scenario.eval.every_sim_s:
            env.process(ctl.clock())
        if scenario.stop.sim_time_s is not None:
            env.process(ctl.deadline())
        if not sim.stopping:
            sim.run()
        if ctl.resume is not None:
            raise RuntimeError(f"resuming {resume.source}: the run stopped after {sim.rounds_done} rounds, before "
                               f"the checkpoint's round {resume.round}")
        ctl.finish()
    except Exception as e:
        diverged = _diverged_in(e)
        if diverged is None:
            status = "failed"
            if isinstance(e, UserError) and started:
                e.sflsim_recorded = True  # raised after the run started: keep what it recorded
            raise
        # A result: keep everything, no final evaluation of a NaN model.
        status = "diverged"
        log.warning("%s; stopped at simulated time %.3f s%s", diverged, sim.now,
                    f", outputs kept in {shown}/" if shown is not None else "", extra={"sflsim_diverged": True})
    except KeyboardInterrupt as e:
        status = "interrupted"
        interrupted_by = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        log.warning("interrupted (%s) at simulated time %.3f s; keeping what was recorded", interrupted_by,
                    sim.now if sim is not None else 0.0)
        raise
    except BaseException:
        status = "failed"
        raise
    finally:
        if ctl is not None:
            ctl.close()
        if checkpointer is not None and status != "diverged":
            _write_checkpoint(checkpointer)
        if recorder is None:  # interrupted before the recorder existed
            recorder = Recorder(out)
        recorder.close()
        summary = _summary(scenario, sim, recorder, ctx, algo, ctl, status, _time.perf_counter() - host_start)
        if timing is not None:
            summary.update(timing.summary_fields())
        if diverged is not None:
            summary["stop_reason"] = "diverged"
            summary["diverged"] = _jsonable(diverged.info())
        if interrupted_by is not None:
            summary["interrupted_by"] = interrupted_by
        if checkpointer is not None:
            summary.update(checkpointer.summary_fields())
        if resume is not None:
            summary["resumed_from"] = {"run": str(resume.source), "round": resume.round}
        if out is not None:
            rundir.write_json_atomic(out / rundir.SUMMARY, summary)
            if recorder.metrics and (timing is None or timing.has_values):  # timing-only: no accuracy to plot
                _plot(out, recorder, scenario)
    return RunResult(summary, recorder, out, algo, diverged)


def _write_checkpoint(checkpointer) -> None:
    """The latest round-end snapshot to disk as the run ends (an error here must not hide the
    run's own outcome: it is logged)."""
    try:
        checkpointer.write()
    except Exception as e:  # e.g. a full disk
        log.error("could not write the checkpoint: %s: %s", type(e).__name__, e)


def resume_run(run_dir: str | Path, overrides: list[str] = (), *, progress: bool = False,
               checkpoint_every: Optional[int] = None) -> RunResult:
    """Continue the run in ``run_dir`` from its ``checkpoint.pt`` (``overrides``: ``stop.*=VALUE``
    changes, e.g. a larger ``stop.rounds``). The resumed run replaces ``run_dir`` when it completes
    (an interrupted or failed one lands beside it); it is the straight run, byte for byte,
    host-time fields and ``resumed_from`` aside (``simulator.checkpoint``)."""
    from simulator.checkpoint import prepare_resume, resumed_scenario

    scenario = resumed_scenario(run_dir, list(overrides))
    plan = prepare_resume(run_dir, scenario)
    every = checkpoint_every if checkpoint_every is not None else int(plan.checkpoint["every"])
    return run_scenario(scenario, run_dir, progress=progress, overwrite=True, checkpoint_every=every, resume=plan)


def _diverged_in(e: BaseException) -> Optional[Diverged]:
    """The original ``Diverged`` that ``e`` is or was caused by, else None.

    SimPy hands a failed process's exception on (to the process waiting for it, and out of
    ``env.run``) as a copy, ``type(e)(*e.args)``, whose ``__cause__`` is the exception before;
    the deepest ``Diverged`` of that chain is the one the algorithm raised, with its info.
    """
    found, seen = None, set()
    while e is not None and id(e) not in seen:
        if isinstance(e, Diverged):
            found = e
        seen.add(id(e))
        e = e.__cause__
    return found


def _not_divergence(record: logging.LogRecord) -> bool:
    return not getattr(record, "sflsim_diverged", False)


@contextlib.contextmanager
def divergence_warning_muted():
    """Leave out ``run_scenario``'s warning line on divergence, for callers that report it themselves."""
    log.addFilter(_not_divergence)
    try:
        yield
    finally:
        log.removeFilter(_not_divergence)


def _plot(out: Path, recorder: Recorder, scenario: Scenario) -> None:
    import pandas as pd

    from analysis.plots import new_figure, plot_accuracy_vs_time

    fig, ax = new_figure()
    plot_accuracy_vs_time(ax, pd.DataFrame(recorder.metrics), label=scenario.algorithm.name)
    if scenario.data.validation is not None:
        ax.set_ylabel("validation accuracy (%)")
    ax.set_title(scenario.name)
    if scenario.stop.target_accuracy:
        ax.axhline(100 * scenario.stop.target_accuracy, color="0.5", ls=":", lw=1, label="target")
    ax.legend(loc="lower right")
    fig.savefig(out / rundir.FIGURE, dpi=120, bbox_inches="tight")


def _versions() -> dict:
    import numpy
    import pandas
    import pydantic
    import simpy

    try:
        from importlib.metadata import version

        sfl = version("sflsim")
    except Exception:  # not installed (running from a checkout)
        sfl = "unknown"
    return {
        "python": platform.python_version(), "sflsim": sfl, "torch": torch.__version__,
        "simpy": getattr(simpy, "__version__", "unknown"), "numpy": numpy.__version__,
        "pandas": pandas.__version__, "pydantic": pydantic.__version__,
    }


def _eval_fields(recorder: Recorder, ctl: Optional[_Controller]) -> dict:
    """summary.json's accuracy and evaluation fields.

    eval_data: what every evaluation used, ``test`` or ``validation`` (``data.validation``: then
    every accuracy below is a validation accuracy, eval_validation_samples its size and
    eval_test_samples None).
    final_accuracy / final_loss: the last evaluation on the full set (the one at the end;
    None when the run ended without it: diverged or interrupted while training on a subset).
    final_subset_accuracy: the last training-time evaluation on the subset (None: no subset).
    best_accuracy: the best training-time evaluation (the rows time to target is read from).
    """
    rows = recorder.metrics
    during = "subset" if any(m["eval_set"] == "subset" for m in rows) else "full"
    full = [m for m in rows if m["eval_set"] == "full"]
    subset = [m for m in rows if m["eval_set"] == "subset"]
    last = full[-1] if full else {}
    return {
        "final_accuracy": last.get("test_accuracy"),
        "final_loss": last.get("test_loss"),
        "final_subset_accuracy": subset[-1]["test_accuracy"] if subset else None,
        "best_accuracy": max((m["test_accuracy"] for m in rows if m["eval_set"] == during), default=None),
        "eval_subset_samples": ctl.subset_samples if ctl is not None else None,
        "eval_test_samples": ctl.test_samples if ctl is not None and ctl.eval_data == "test" else None,
        "eval_validation_samples": ctl.test_samples if ctl is not None and ctl.eval_data == "validation" else None,
        "eval_host_s": ctl.eval_host_s if ctl is not None else 0.0,
    }


def _summary(scenario, sim, recorder, ctx, algo, ctl, status, host_s) -> dict:
    evals = _eval_fields(recorder, ctl)
    total = sim.now if sim is not None else 0.0  # no sim: interrupted early in set-up
    busy = recorder.busy_time("server")
    prof = ctx.profile if ctx is not None else None
    summary = {
        "scenario": scenario.name,
        "algorithm": scenario.algorithm.name,
        "seed": scenario.seed,
        "status": status,
        "stop_reason": sim.stop_reason if sim is not None else None,
        "final_accuracy": evals["final_accuracy"],
        "final_loss": evals["final_loss"],
        "final_subset_accuracy": evals["final_subset_accuracy"],
        "best_accuracy": evals["best_accuracy"],
        "sim_time_s": total,
        "rounds": sim.rounds_done if sim is not None else 0,
        "bytes_up": recorder.bytes_up,
        "bytes_down": recorder.bytes_down,
        "server_busy_s": busy,
        "server_busy_fraction": (busy / total) if total > 0 else None,
        "events": recorder.event_count,
        "evaluations": len(recorder.metrics),
        "eval_data": "test" if scenario.data.validation is None else "validation",
        "eval_subset_samples": evals["eval_subset_samples"],
        "eval_test_samples": evals["eval_test_samples"],
        "eval_validation_samples": evals["eval_validation_samples"],
        "host_runtime_s": host_s,
        "eval_host_s": evals["eval_host_s"],  # host seconds evaluating, part of host_runtime_s
        "threads": torch.get_num_threads(),
        "device": str(ctx.device) if ctx is not None else None,
        "clients": [
            {"client": c, "flops_per_s": sim.time_model.client_speeds[c], "tier": sim.time_model.tiers[c],
             "uplink_mbps": sim.time_model.uplink_bps[c] / 1e6, "downlink_mbps": sim.time_model.downlink_bps[c] / 1e6,
             "samples": int(len(ctx.partitions[c])) if ctx is not None else None}
            for c in range(len(sim.time_model.client_speeds) if sim is not None else 0)
        ],
        "profile": _profile_dict(prof),
        "versions": _versions(),
    }
    if algo is not None and hasattr(algo, "summary_extra"):
        summary.update(algo.summary_extra())
    return _jsonable(summary)


def _profile_dict(prof) -> Optional[dict]:
    if prof is None:
        return None
    import dataclasses

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(prof).items()}


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
