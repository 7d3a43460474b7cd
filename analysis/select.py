"""Read the chosen grid point out of a finished sweep: the best step sizes per algorithm.

``select_points(DIR)`` reads a sweep folder (``sflsim sweep``; a compare folder works too) and
picks, for each algorithm (and variant), the grid point with the best mean ``metric`` over its
seeds. The rules, so a selection can be redone by hand from ``runs.csv`` and the summaries:

- **Candidates.** A grid point is the runs that share algorithm, variant and every grid key
  (the seeds differ). Its value is the mean of ``metric`` (a field of each run's summary.json:
  ``final_accuracy`` by default, the full evaluation set at the run's end) over its seeds.
- **Never a diverged or failed point.** A point is a candidate only when every run planned for
  it (batch.json) completed and has a finite value; one diverged, failed or unfinished seed
  excludes the whole point (``excluded`` says why). An algorithm none of whose points is a
  candidate gets no choice (``params`` None) and is listed in ``unselected``.
- **Ties** (equal means, to the last bit) go to the point planned first: the batch's run order,
  which is the grid file's order (the product of the values as listed). The shipped grids list
  step sizes from small to large, so a tie goes to the smaller steps.
- **Validation only.** The runs must have evaluated on a validation split (``data.validation``,
  ``"eval_data": "validation"`` in summary.json): selecting on test accuracy and reporting test
  accuracy of the selected point would tune on the test set. ``allow_test=True`` lifts this (for
  exploring; the result says ``eval_data: test``). Runs that evaluated on different data
  (test and validation, or two validation sizes) are never compared: a ``UserError``.

The result is a ``Selection``: a table of every point (``candidates``), the choice per algorithm
(``chosen``), and the ``--set`` items that give a later ``sflsim compare`` the chosen values
(``ALG:key=value``, ``ALG/VARIANT:key=value`` for a variant; the grid key ``algorithm.name`` is
the prefix, not an item). ``Selection.write(path)`` writes it as JSON. This module reads run
folders only; it never runs anything.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from analysis.traces import find_runs, run_labels
from simulator import rundir
from simulator.errors import UserError

#: Metrics a point can be selected on (summary.json fields) and which way is better.
METRICS: dict[str, str] = {
    "final_accuracy": "max",
    "best_accuracy": "max",
    "final_subset_accuracy": "max",
    "final_loss": "min",
}


@dataclass
class Selection:
    """The grid points of a batch, and the best of each algorithm's (see the module docstring)."""

    source: str
    metric: str
    goal: str  # "max" or "min"
    eval_data: str  # "validation" or "test": what every run evaluated on ("unknown": none completed)
    eval_samples: Optional[int]  # samples of that set (summary's eval_validation_samples / eval_test_samples)
    candidates: pd.DataFrame  # one row per point: algorithm, variant, grid keys, value, seeds, excluded, chosen
    chosen: list[dict] = field(default_factory=list)  # per algorithm/variant: params, value, seeds, set

    @property
    def unselected(self) -> list[str]:
        """Algorithms (``ALG`` or ``ALG/VARIANT``) with no candidate point."""
        return [c["label"] for c in self.chosen if c["params"] is None]

    def set_items(self) -> list[str]:
        """The ``--set`` items of every choice, in order (``ALG:key=value``)."""
        return [item for c in self.chosen for item in c["set"]]

    def to_dict(self) -> dict:
        """What ``write`` writes: the rules' inputs, the choices, the ``--set`` items, every point."""
        points = []
        for r in self.candidates.to_dict("records"):
            points.append({k: _plain(v) for k, v in r.items()})
        return {
            "source": self.source, "metric": self.metric, "goal": self.goal, "eval_data": self.eval_data,
            "eval_samples": self.eval_samples, "chosen": self.chosen, "unselected": self.unselected,
            "set": self.set_items(), "points": points,
        }

    def write(self, path: str | Path) -> Path:
        """Write ``to_dict()`` as JSON (atomically); returns the path."""
        path = Path(path)
        rundir.write_json_atomic(path, self.to_dict())
        return path

    def lines(self) -> list[str]:
        """One readable line per algorithm: what was chosen, its value and what was left out."""
        what = f"{self.eval_data} {self.metric.replace('_', ' ')}"
        out = []
        for c in self.chosen:
            n_out = c["points"] - c["candidates"]
            left = f"; {n_out} of {c['points']} points excluded (diverged, failed or unfinished)" if n_out else ""
            if c["params"] is None:
                out.append(f"{c['label']}: no point completed every seed ({c['points']} points){left}")
                continue
            keys = ", ".join(f"{k}={_text(v)}" for k, v in c["params"].items()) or "(no grid keys)"
            value = f"{100 * c['value']:.2f}%" if self.metric.endswith("accuracy") else f"{c['value']:.4g}"
            seeds = len(c["seeds"])
            out.append(f"{c['label']}: {keys} ({what} {value}, {seeds} seed{'s' if seeds != 1 else ''}{left})")
        return out


def _plain(v: Any) -> Any:
    """A frame cell as JSON: NaN and NA become None, numpy scalars Python numbers."""
    if v is None:
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    if hasattr(v, "item"):
        return v.item()
    return v


def _text(v: Any) -> str:
    """A grid value as a ``--set`` value YAML reads back to the same value (floats exactly)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"), sort_keys=True)
    return str(v)


def _planned(src: Path) -> list[dict]:
    """Every run the batch planned (batch.json), or every run folder found, with its labels."""
    batch = rundir.read_json(src / rundir.BATCH_META)
    if batch and batch.get("runs"):
        return [{"run_id": r["run_id"], "algorithm": r.get("algorithm", ""), "variant": r.get("variant", "") or "",
                 "seed": r.get("seed"), "params": dict(r.get("params") or {}),
                 "run_dir": src / rundir.RUNS / r["run_id"]} for r in batch["runs"]]
    out = []
    for d in find_runs(src, complete_only=False):
        lab = run_labels(d)
        out.append({"run_id": lab["run_id"], "algorithm": lab["algorithm"], "variant": lab["variant"],
                    "seed": lab["seed"], "params": lab["params"], "run_dir": Path(d)})
    return out


def _summary(run_dir: Path) -> Optional[dict]:
    """A finished run's summary (None: no finished folder; a .partial or .failed one is not)."""
    return rundir.read_json(run_dir / rundir.SUMMARY) if (run_dir / rundir.METRICS).is_file() else None


def _evaluated_on(summary: dict) -> tuple[str, Optional[int]]:
    """(eval_data, samples) of a run; a summary from before the field evaluated on the test set."""
    data = summary.get("eval_data") or "test"
    samples = summary.get("eval_validation_samples") if data == "validation" else summary.get("eval_test_samples")
    return data, samples


def select_points(batch_dir: str | Path, metric: str = "final_accuracy", *, allow_test: bool = False) -> Selection:
    """The best grid point of each algorithm (and variant) of the batch in ``batch_dir``.

    ``metric``: one of ``METRICS`` (higher is better for accuracies, lower for ``final_loss``).
    Raises ``UserError`` for a folder with no runs, an unknown metric, runs that evaluated on the
    test set (unless ``allow_test``) or on different data.
    """
    if metric not in METRICS:
        raise UserError(f"--metric: {metric!r} is not one of {', '.join(METRICS)}")
    goal = METRICS[metric]
    src = Path(batch_dir)
    planned = _planned(src)
    if not planned:
        raise UserError(f"{src}: no runs to select from")
    statuses = {r["run_id"]: r["status"] for r in rundir.read_runs_csv(src / rundir.RUNS_CSV)}

    seen: set[tuple[str, Optional[int]]] = set()
    points: dict[tuple, dict] = {}
    keys: list[str] = []
    for run in planned:
        for k in run["params"]:
            if k not in keys:
                keys.append(k)
        params = {k: v for k, v in run["params"].items() if k != "algorithm.name"}
        point_key = (run["algorithm"], run["variant"], json.dumps(params, sort_keys=True))
        p = points.setdefault(point_key, {"algorithm": run["algorithm"], "variant": run["variant"], "params": params,
                                          "values": [], "seeds": [], "excluded": []})
        s = _summary(run["run_dir"])
        status = (s or {}).get("status") or statuses.get(run["run_id"]) or "not finished"
        if s is None or status != "completed":
            p["excluded"].append(f"{'not finished' if status in ('pending', 'not_run') else status} "
                                 f"(seed {run['seed']})")
            continue
        seen.add(_evaluated_on(s))
        value = s.get(metric)
        if value is None or not math.isfinite(float(value)):
            p["excluded"].append(f"no {metric} (seed {run['seed']})")
            continue
        p["values"].append(float(value))
        p["seeds"].append(run["seed"])
    data = {d for d, _ in seen}
    if len(seen) > 1:
        what = ", ".join(f"{d} ({n:,} samples)" if n else d for d, n in sorted(seen, key=str))
        raise UserError(f"{src}: the runs evaluated on different data ({what}); points are compared only on the "
                        "same evaluation set")
    eval_data, samples = next(iter(seen)) if seen else ("unknown", None)  # unknown: no run completed
    if data == {"test"} and not allow_test:
        raise UserError(f"{src}: the runs evaluated on the test set; choosing step sizes by test accuracy tunes on "
                        "the test set. Run the grid with data.validation set (the shipped step grids "
                        "scenarios/grids/steps_*.yaml do), or allow it explicitly (allow_test=True, --allow-test)")

    rows, chosen = [], []
    groups: dict[tuple[str, str], list[dict]] = {}
    for p in points.values():
        groups.setdefault((p["algorithm"], p["variant"]), []).append(p)
    for (alg, variant), pts in groups.items():
        best = None
        for p in pts:
            p["candidate"] = not p["excluded"] and bool(p["values"])
            p["value"] = sum(p["values"]) / len(p["values"]) if p["values"] else math.nan
            if p["candidate"] and (best is None or (p["value"] > best["value"] if goal == "max"
                                                    else p["value"] < best["value"])):
                best = p
        label = f"{alg}/{variant}" if variant else alg
        prefix = label
        chosen.append({
            "label": label, "algorithm": alg, "variant": variant,
            "params": dict(best["params"]) if best else None,
            "value": best["value"] if best else None,
            "seeds": list(best["seeds"]) if best else [],
            "set": [f"{prefix}:{k}={_text(v)}" for k, v in best["params"].items()] if best else [],
            "points": len(pts), "candidates": sum(p["candidate"] for p in pts),
        })
        for p in pts:
            rows.append({"algorithm": alg, "variant": variant,
                         **{k: p["params"].get(k) for k in keys if k != "algorithm.name"},
                         metric: p["value"], "seeds": len(p["values"]),
                         "excluded": "; ".join(p["excluded"]), "chosen": p is best})
    cols = ["algorithm", "variant", *[k for k in keys if k != "algorithm.name"], metric, "seeds", "excluded", "chosen"]
    return Selection(str(src), metric, goal, eval_data, samples, pd.DataFrame(rows, columns=cols), chosen)


__all__ = ["METRICS", "Selection", "select_points"]
