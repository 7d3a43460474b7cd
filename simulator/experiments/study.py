"""A study: step sizes tuned on a validation split, then experiments with them, then reports.

``sflsim study STUDY.yaml --out DIR`` runs a whole study in one command, in stages:

1. **tuning**: each entry of ``tuning:`` is a step-size grid (``sflsim sweep``) that evaluates on
   a validation split (``data.validation``; a grid evaluated on test is refused); the point with
   the best final validation accuracy is selected (``analysis.select``: completed runs only,
   never a diverged or failed one; the mean over seeds when the grid has several; ties go to the
   earlier point of the grid). The selections are written to ``DIR/selected.yaml``.
2. **experiments**: each entry of ``experiments:`` is a comparison (``compare:``) or a grid
   (``sweep:``) file; the selected values of the tunings it ``use:``s are passed as
   ``--set ALG[/VARIANT]:KEY=VALUE`` overrides to the algorithms the tuning ``apply_to:``s, so
   every method runs with the step sizes its own tuning chose, the same tuning budget for all.
   Runs that differ only in ``time.*`` keys are re-timed instead of trained (``sflsim retime``).
3. **reports**: ``sflsim report`` for every experiment (``DIR/<experiment>/report/``).

Every stage reuses what is finished (a batch re-run skips completed runs): an interrupted study
continues where it stopped when the same command is run again. ``--stage`` runs one stage
(``tuning`` needs nothing; ``experiments`` needs ``selected.yaml`` when an experiment uses a
tuning). A study file:

    name: paper_fmnist
    tuning:
      hybrid_mu: {grid: ../grids/steps_mu_hybrid.yaml, apply_to: [mu_splitfed],
                  keys: [algorithm.lr_client, algorithm.lr_server]}
    experiments:
      c1_hybrid: {compare: c1_hybrid.yaml, use: [hybrid_mu], targets: [0.7, 0.8]}

Paths are relative to the study file. ``keys`` are the grid keys carried over (default: every
grid key but ``algorithm.name``). A top-level ``set: {dotted.key: value}`` applies to every run
of the study, tunings included (``scenarios/paper/study_cifar10.yaml``: the same study on
CIFAR-10).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from simulator import rundir
from simulator.errors import UserError

log = logging.getLogger(__name__)

STUDY_KEYS = ("name", "description", "set", "tuning", "experiments")
TUNING_KEYS = ("grid", "apply_to", "keys", "seeds")
EXPERIMENT_KEYS = ("compare", "sweep", "use", "set", "seeds", "targets", "baseline")
STAGES = ("tuning", "experiments", "reports")
SELECTED = "selected.yaml"


@dataclass(frozen=True)
class Tuning:
    name: str
    grid: Path
    apply_to: tuple[str, ...]
    keys: Optional[tuple[str, ...]] = None
    seeds: Any = None


@dataclass(frozen=True)
class Experiment:
    name: str
    kind: str  # compare | sweep
    file: Path
    use: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    seeds: Any = None
    targets: Optional[tuple[float, ...]] = None
    baseline: Optional[str] = None


@dataclass
class Study:
    name: str
    path: Path
    tuning: dict[str, Tuning] = field(default_factory=dict)
    experiments: dict[str, Experiment] = field(default_factory=dict)
    description: str = ""
    overrides: tuple[str, ...] = ()  # set: for every run of the study (e.g. data.dataset: cifar10)


def _strs(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: expected a list of strings, got {value!r}")
    return tuple(value)


def _mapping(value: Any, where: str, allowed: Sequence[str]) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping, got {type(value).__name__}")
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise UserError(f"{where}.{unknown[0]}: unknown key; expected one of: {', '.join(allowed)}")
    return value


def load_study(path: str | Path) -> Study:
    """Read and check a study file (a ``UserError`` naming the key on bad input)."""
    from simulator.scenario import load_raw

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such study file")
    doc = _mapping(load_raw(p), str(p), STUDY_KEYS)
    study = Study(name=str(doc.get("name") or p.stem), path=p, description=str(doc.get("description") or ""),
                  overrides=_set_items(doc.get("set"), "set"))
    tuning = doc.get("tuning") or {}
    if not isinstance(tuning, dict):
        raise UserError(f"{p}: tuning: expected a mapping {{name: {{grid: ..., apply_to: [...]}}}}")
    for name, t in tuning.items():
        where = f"tuning.{name}"
        t = _mapping(t, where, TUNING_KEYS)
        if "grid" not in t or "apply_to" not in t:
            raise UserError(f"{where}: grid: and apply_to: are required")
        grid = (p.parent / str(t["grid"])).resolve()
        if not grid.is_file():
            raise UserError(f"{where}.grid: {grid} does not exist")
        study.tuning[str(name)] = Tuning(str(name), grid, _strs(t["apply_to"], f"{where}.apply_to"),
                                         _strs(t["keys"], f"{where}.keys") if "keys" in t else None, t.get("seeds"))
    experiments = doc.get("experiments") or {}
    if not isinstance(experiments, dict) or not experiments:
        raise UserError(f"{p}: experiments: expected a mapping with at least one experiment")
    for name, e in experiments.items():
        where = f"experiments.{name}"
        e = _mapping(e, where, EXPERIMENT_KEYS)
        kinds = [k for k in ("compare", "sweep") if k in e]
        if len(kinds) != 1:
            raise UserError(f"{where}: give exactly one of compare: or sweep:")
        file = (p.parent / str(e[kinds[0]])).resolve()
        if not file.is_file():
            raise UserError(f"{where}.{kinds[0]}: {file} does not exist")
        use = _strs(e.get("use", []), f"{where}.use")
        for u in use:
            if u not in study.tuning:
                raise UserError(f"{where}.use: {u!r} is not a tuning of this study ({', '.join(study.tuning) or 'none'})")
        overrides = _set_items(e.get("set"), f"{where}.set")
        targets = tuple(float(x) for x in e["targets"]) if "targets" in e else None
        study.experiments[str(name)] = Experiment(str(name), kinds[0], file, use, overrides, e.get("seeds"), targets,
                                                  e.get("baseline"))
    return study


def _set_items(mapping: Any, where: str) -> tuple[str, ...]:
    """``{dotted.key: value}`` as ``--set`` overrides."""
    if mapping is None:
        return ()
    if not isinstance(mapping, dict):
        raise UserError(f"{where}: expected a mapping {{dotted.key: value}}")
    return tuple(f"{k}={_yaml_value(v)}" for k, v in mapping.items())


def _yaml_value(v: Any) -> str:
    """A value as ``--set`` reads it (YAML flow style)."""
    import yaml

    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------
def select_point(batch_dir: str | Path, keys: Optional[Sequence[str]] = None) -> dict:
    """The chosen point of a finished tuning grid (``analysis.select.select_points``: the best
    mean final accuracy on the VALIDATION split over its seeds; a point with a diverged, failed
    or unfinished seed is never chosen; ties go to the point planned first).

    The grid must tune one algorithm (its choice is carried to the study's ``apply_to``). Returns
    ``{"params": {key: value}, "final_accuracy": value, "seeds": n, "eval_data": ...,
    "ruled_out": {point: why}}``; ``keys`` keeps only those grid keys.
    """
    from analysis.select import select_points

    sel = select_points(batch_dir)
    if len(sel.chosen) != 1:
        raise UserError(f"{batch_dir}: a tuning grid must tune one algorithm; it has "
                        f"{', '.join(c['label'] for c in sel.chosen)}")
    choice = sel.chosen[0]
    if choice["params"] is None:
        raise UserError(f"{batch_dir}: no grid point completed on every seed; nothing to select")
    params = {k: v for k, v in choice["params"].items() if k != "algorithm.name" and (keys is None or k in keys)}
    ruled_out = {}
    for row in sel.candidates.to_dict("records"):
        if row.get("excluded"):
            label = ", ".join(f"{k}={row[k]}" for k in choice["params"] if k in row)
            ruled_out[label] = row["excluded"]
    return {"params": params, "final_accuracy": choice["value"], "seeds": len(choice["seeds"]),
            "eval_data": sel.eval_data, "ruled_out": ruled_out}


def selection_overrides(study: Study, selected: dict, experiment: Experiment) -> list[str]:
    """``--set ALG:KEY=VALUE`` overrides carrying the selections an experiment uses."""
    out = []
    for name in experiment.use:
        if name not in selected:
            raise UserError(f"experiments.{experiment.name} uses tuning {name!r}, which has no selection yet: run the "
                            f"tuning stage first (sflsim study {study.path})")
        for target in study.tuning[name].apply_to:
            for k, v in selected[name]["params"].items():
                out.append(f"{target}:{k}={_yaml_value(v)}")
    return out


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
def read_selected(out: Path) -> dict:
    import yaml

    path = Path(out) / SELECTED
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _preflight(study: Study) -> None:
    """``simulator.preflight`` on one run of every tuning and experiment (data, files, sizes)."""
    from simulator.experiments import plan_compare, plan_sweep
    from simulator.preflight import preflight
    from simulator.scenario import validate

    plans = [plan_sweep(t.grid, overrides=list(study.overrides), seeds=t.seeds) for t in study.tuning.values()]
    for e in study.experiments.values():
        over = list(study.overrides) + list(e.overrides)
        plans.append(plan_compare(e.file, seeds=e.seeds, overrides=over) if e.kind == "compare"
                     else plan_sweep(e.file, overrides=over, seeds=e.seeds))
    seen = set()
    for plan in plans:
        for spec in plan.specs:
            key = (spec.scenario["data"]["dataset"], str(spec.scenario["data"].get("root")), spec.scenario["model"]["name"])
            if key not in seen:
                seen.add(key)
                preflight(validate(spec.scenario))


def run_study(study: Study, out: str | Path, *, stages: Sequence[str] = STAGES, workers: Optional[int] = None,
              threads: Optional[int] = None, progress: bool = True, say: Callable[[str], None] = print) -> dict:
    """Run the stages of ``study`` into ``out``; return ``{"selected": ..., "batches": {name: BatchResult}}``."""
    import yaml

    from simulator.experiments import plan_compare, plan_sweep, run_batch

    out = Path(out)
    _preflight(study)  # a missing dataset or file: refused before anything runs
    out.mkdir(parents=True, exist_ok=True)
    selected = read_selected(out)
    batches: dict = {}
    if "tuning" in stages:
        for t in study.tuning.values():
            say(f"study {study.name}: tuning {t.name} ({t.grid.name})")
            plan = plan_sweep(t.grid, overrides=list(study.overrides), seeds=t.seeds)
            res = run_batch(plan, out / "tuning" / t.name, workers=workers, threads=threads, progress=progress,
                            command=["sflsim", "study", str(study.path)])
            batches[f"tuning/{t.name}"] = res
            if res.failed:
                raise UserError(f"tuning {t.name}: {len(res.failed)} runs failed (see {out / 'tuning' / t.name}/"
                                f"{rundir.RUNS_CSV}); fix them before selecting")
            choice = select_point(out / "tuning" / t.name, t.keys)
            selected[t.name] = {"params": choice["params"], "final_accuracy": choice["final_accuracy"],
                                "seeds": choice["seeds"], "eval_data": choice["eval_data"],
                                "apply_to": list(t.apply_to),
                                "ruled_out": {k: v for k, v in choice["ruled_out"].items()}}
            say(f"  selected {choice['params']} (mean final {choice['eval_data']} accuracy "
                f"{choice['final_accuracy']:.4f} over {choice['seeds']} seed(s))")
            tmp = out / (SELECTED + ".tmp")
            tmp.write_text(yaml.safe_dump(selected, sort_keys=False))
            tmp.replace(out / SELECTED)
    if "experiments" in stages:
        for e in study.experiments.values():
            overrides = list(study.overrides) + list(e.overrides) + selection_overrides(study, selected, e)
            say(f"study {study.name}: {e.kind} {e.name} ({e.file.name})")
            plan = (plan_compare(e.file, seeds=e.seeds, overrides=overrides) if e.kind == "compare"
                    else plan_sweep(e.file, overrides=overrides, seeds=e.seeds))
            batches[e.name] = run_batch(plan, out / e.name, workers=workers, threads=threads, progress=progress,
                                        command=["sflsim", "study", str(study.path)])
    if "reports" in stages:
        from analysis.report import write_report

        for e in study.experiments.values():
            if (out / e.name / rundir.BATCH_META).is_file():
                page = write_report(out / e.name, targets=list(e.targets) if e.targets else None, baseline=e.baseline)
                say(f"  report: {page}")
    return {"selected": selected, "batches": batches}
