"""Many runs at once: compare algorithms over seeds, sweep a grid of keys, on dask.distributed.

Planning is pure and happens in the caller's process: a scenario plus algorithms, variants and
seeds (``plan_compare``), or a grid file (``plan_sweep``), becomes a list of ``RunSpec`` s, each a
validated scenario with a readable, stable run id. ``run_batch`` then runs every spec through
``simulator.runner.run_scenario`` on a Dask cluster (or in this process) and lands each run
atomically: it is written into ``DIR/runs/<id>.partial/`` and renamed to ``DIR/runs/<id>/`` only
when complete (``DIR/runs/<id>.failed/`` with ``traceback.txt`` when it raised). A run that
diverged (NaN/inf, ``status: diverged`` in its summary) is a result, not a failure: it lands in
``DIR/runs/<id>/`` like a completed run, is reused by a re-run, and its outcome is ``diverged``.
``DIR/batch.json`` says what was asked for, ``DIR/runs.csv`` the status of every run.

This module never changes how one run behaves (that is the runner's) and never interprets
results (that is ``analysis/``). Its command-line layer (``compare``, ``sweep``, ``report``)
lives in ``simulator/cli.py``; nothing here prints.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import datetime as _dt
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import socket
import sys
import time as _time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from simulator.errors import ScenarioError, UserError

log = logging.getLogger(__name__)

RUNS = "runs"
PARTIAL = ".partial"
FAILED = ".failed"
RUN_META = "run.json"
BATCH_META = "batch.json"
RUNS_CSV = "runs.csv"

# Keys of a compare file (a scenario YAML with these extra top-level keys, or ``base:`` + them).
from simulator.scenario import COMPARE_KEYS  # noqa: E402  (top-level keys of a comparison file)
# Keys of a grid file.
GRID_KEYS = ("name", "description", "base", "grid", "seeds", "set")


# --------------------------------------------------------------------------------------------
# Run specs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One run of a batch: a resolved scenario mapping and the labels analysis groups by."""

    run_id: str
    scenario: dict  # the validated scenario, dumped as JSON-able data (loadable by validate)
    algorithm: str
    variant: str = ""
    seed: int = 0
    params: dict = field(default_factory=dict)  # grid point (dotted key -> value), seed excluded
    dropped_keys: tuple[str, ...] = ()  # algorithm keys the target algorithm does not declare
    fingerprint: str = ""  # identifies the inputs (threads excluded); set by make_spec

    def labels(self) -> dict:
        """What identifies this run in run.json, batch.json and runs.csv."""
        return {
            "run_id": self.run_id, "algorithm": self.algorithm, "variant": self.variant,
            "seed": self.seed, "params": self.params, "dropped_keys": list(self.dropped_keys),
            "fingerprint": self.fingerprint,
        }

    def with_threads(self, threads: Optional[int]) -> "RunSpec":
        """The same run with the scenario's torch ``threads`` set (None: keep the scenario's)."""
        if threads is None:
            return self
        scen = dict(self.scenario)
        scen["threads"] = int(threads)
        return RunSpec(self.run_id, scen, self.algorithm, self.variant, self.seed, self.params,
                       self.dropped_keys, self.fingerprint)


def fingerprint(scenario: dict) -> str:
    """A digest of a resolved scenario, ignoring ``threads`` (a resource setting, not an input)."""
    data = {k: v for k, v in scenario.items() if k != "threads"}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_spec(run_id: str, raw: dict, *, variant: str = "", params: dict | None = None,
              dropped: Sequence[str] = ()) -> RunSpec:
    """Validate ``raw`` into a spec; a bad key fails here, before anything runs."""
    from simulator.scenario import validate

    try:
        scenario = validate(raw)
    except ScenarioError as e:
        raise ScenarioError(e.key, f"{e.detail} (in run {run_id})") from None
    dumped = scenario.model_dump(mode="json", by_alias=True)
    return RunSpec(run_id, dumped, scenario.algorithm.name, variant, scenario.seed, dict(params or {}),
                   tuple(dropped), fingerprint(dumped))


# --------------------------------------------------------------------------------------------
# Planning helpers
# --------------------------------------------------------------------------------------------
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]")


def sanitize(text: str) -> str:
    """A file-name-safe version of ``text`` (keeps letters, digits and ``. _ , = + -``)."""
    out = _UNSAFE.sub("_", text).strip("._") or "_"
    if len(out) > 150:  # keep names short enough for any file system, still unique
        out = out[:140] + "~" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return out


def format_value(value: Any) -> str:
    """A compact text form of a grid value for run ids (``0.1``, ``true``, ``null``, ``[1,2]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def parse_seeds(text: Any, base_seed: int = 0) -> list[int]:
    """Seeds from ``--seeds``: ``N`` (an int: N seeds from the scenario's seed on) or a list.

    ``"3"`` with base seed 0 gives [0, 1, 2]; ``"0,4,7"`` or a YAML list gives exactly those;
    ``"7,"`` gives [7].
    """
    if isinstance(text, bool):
        raise UserError(f"seeds: expected a count or a list of seeds, got {text!r}")
    if isinstance(text, int):
        n = text
        if n < 1:
            raise UserError(f"seeds: the number of seeds must be >= 1, got {n}")
        return list(range(base_seed, base_seed + n))
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        s = str(text).strip()
        if "," not in s:
            try:
                return parse_seeds(int(s), base_seed)
            except ValueError:
                raise UserError(f"seeds: expected a count (3) or a list (0,4,7), got {text!r}") from None
        items = [p for p in s.split(",") if p.strip()]
    seeds: list[int] = []
    for p in items:
        try:
            v = int(p)
        except (TypeError, ValueError):
            raise UserError(f"seeds: {p!r} is not an integer seed") from None
        if v < 0:
            raise UserError(f"seeds: seeds must be >= 0, got {v}")
        if v in seeds:
            raise UserError(f"seeds: seed {v} is listed twice")
        seeds.append(v)
    if not seeds:
        raise UserError("seeds: no seeds given")
    return seeds


def algorithm_keys(name: str) -> set[str]:
    """The keys an algorithm's config class declares (field names and aliases)."""
    from simulator.algorithms import ALGORITHMS

    spec = ALGORITHMS[name]
    keys = set()
    for fname, f in spec.config.model_fields.items():
        keys.add(fname)
        if f.alias:
            keys.add(f.alias)
    return keys


def check_algorithm(name: str, where: str = "algorithms") -> None:
    """Raise a UserError unless ``name`` is a registered algorithm."""
    from simulator.algorithms import ALGORITHMS

    if name not in ALGORITHMS:
        import difflib

        hint = difflib.get_close_matches(name, list(ALGORITHMS), n=1)
        more = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise UserError(f"{where}: unknown algorithm {name!r}{more}; known: {', '.join(ALGORITHMS)}")


def switch_algorithm(raw: dict, name: str) -> tuple[dict, list[str]]:
    """``raw`` with ``algorithm.name`` set to ``name``.

    Keys of the algorithm section that the target config class does not declare are not
    carried over (the schema forbids unknown keys) and are returned as dotted keys
    (``algorithm.tau``; a nested mapping such as ``zo: {lam: ..}`` as ``algorithm.zo.lam``), so
    the caller can say so; keys both share (batch_size, learning rates, ``zo``, ...) carry over.
    A key is declared when its top-level field is. Nothing is dropped when the name is unchanged,
    so a typo in the scenario still fails validation. Planning calls this only after checking
    that no key given for every run (``--set``, a sweep's ``set:`` or grid) is among the dropped
    (``check_shared_keys``): what is dropped here comes from the base scenario.
    """
    check_algorithm(name)
    out = copy.deepcopy(raw)
    section = out.get("algorithm")
    section = dict(section) if isinstance(section, dict) else {}
    if section.get("name") == name:
        return out, []
    allowed = algorithm_keys(name)
    kept = {k: v for k, v in section.items() if k in allowed and k != "name"}
    dropped = sorted(d for k, v in section.items() if k not in allowed and k != "name"
                     for d in _dotted_leaves(f"algorithm.{k}", v))
    out["algorithm"] = {"name": name, **kept}
    return out, dropped


def _dotted_leaves(prefix: str, value: Any) -> list[str]:
    """``algorithm.zo`` with ``{lam: .., perturbations: ..}`` -> ``algorithm.zo.lam``, ``algorithm.zo.perturbations``."""
    if isinstance(value, dict) and value:
        return [d for k, v in value.items() for d in _dotted_leaves(f"{prefix}.{k}", v)]
    return [prefix]


def _algorithm_fields(items: Iterable[Any]) -> list[tuple[str, str]]:
    """(dotted key, top-level algorithm field) of every override item that sets an algorithm key
    (``name`` excepted). Items are ``key=value`` strings or (key, value) pairs."""
    from simulator.scenario import parse_override

    out: list[tuple[str, str]] = []
    for item in items:
        key, value = parse_override(item) if isinstance(item, str) else (str(item[0]), item[1])
        parts = key.split(".")
        if parts[0] != "algorithm":
            continue
        if len(parts) == 1:  # the whole section: algorithm={...}
            if isinstance(value, dict):
                out += [(f"algorithm.{k}", str(k)) for k in value if k != "name"]
        elif parts[1] != "name":
            out.append((key, parts[1]))
    return out


def check_shared_keys(items: Iterable[Any], algorithm: str, algorithms: Iterable[str], *,
                      grid: bool = False) -> None:
    """Raise a ScenarioError naming the dotted key when an item meant for every run of a batch
    (plain ``--set``, a sweep's ``set:`` entry or grid key) sets an algorithm key that
    ``algorithm`` does not declare: it is never dropped silently. ``algorithms`` (the batch's)
    give the hint which prefix would set it for one algorithm only."""
    declared = algorithm_keys(algorithm)
    for dotted, key in _algorithm_fields(items):
        if key in declared:
            continue
        owners = [a for a in dict.fromkeys(algorithms) if a != algorithm and key in algorithm_keys(a)]
        if owners:
            hint = f" (use the prefix {owners[0]}:{dotted}=... to set it for one algorithm)"
            if grid:
                hint = (f" (a grid key applies to every algorithm.name of the grid; set it for one algorithm "
                        f"with --set {owners[0]}:{dotted}=...)")
        else:
            import difflib

            close = difflib.get_close_matches(key, sorted(declared), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
        raise ScenarioError(dotted, f"{algorithm} has no key {key}{hint}")


def split_overrides(items: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Split ``--set`` items into plain ones and ``PREFIX:key=value`` ones (prefix, item).

    A prefix is an algorithm name or ``algorithm/variant``; it is recognised only before the
    first ``=`` so values may contain colons.
    """
    plain: list[str] = []
    prefixed: list[tuple[str, str]] = []
    for item in items:
        key = item.split("=", 1)[0]
        if ":" in key:
            prefix, _, rest = item.partition(":")
            prefix = prefix.strip()
            if not prefix:
                raise ScenarioError("--set", f"empty algorithm prefix in {item!r}")
            prefixed.append((prefix, rest))
        else:
            plain.append(item)
    return plain, prefixed


def _dotted_items(mapping: Any, where: str) -> list[tuple[str, Any]]:
    if mapping is None:
        return []
    if not isinstance(mapping, dict):
        raise UserError(f"{where}: expected a mapping of dotted.key: value, got {type(mapping).__name__}")
    return [(str(k), v) for k, v in mapping.items()]


def _check_prefixes(prefixed: list[tuple[str, str]], labels: set[str]) -> None:
    for prefix, item in prefixed:
        if prefix not in labels:
            raise ScenarioError("--set", f"prefix {prefix!r} in '{prefix}:{item}' matches no run of this "
                                         f"batch; expected one of: {', '.join(sorted(labels))}")


def _resolve(raw: dict, algorithm: Optional[str], steps: list[list[Any]]) -> tuple[dict, list[str]]:
    """Switch the algorithm (if given), then apply override lists in order."""
    from simulator.scenario import apply_overrides

    dropped: list[str] = []
    if algorithm is not None:
        raw, dropped = switch_algorithm(raw, algorithm)
    for items in steps:
        if items:
            raw = apply_overrides(raw, items)
    return raw, dropped


# --------------------------------------------------------------------------------------------
# Planning: compare and sweep
# --------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What a batch will run, and how it was asked for (written to batch.json)."""

    kind: str  # "compare" or "sweep"
    specs: list[RunSpec]
    info: dict


def plan_compare(path: str | Path, algorithms: Sequence[str] | None = None, seeds: Any = None,
                 overrides: Sequence[str] = (), variants: dict | None = None) -> Plan:
    """Every (algorithm[, variant], seed) on one scenario: the runs of ``sflsim compare``.

    ``path`` is a scenario YAML that may carry compare keys at its top level (removed before
    validation): ``algorithms: [..]``, ``seeds: N | [..]``, ``variants: {algorithm: {label:
    {dotted.key: value}}}``, and ``base: other.yaml`` (a scenario, relative to this file, that
    the rest of this file is merged onto). Arguments win over the file. An algorithm with
    variants gives one row per variant (label in ``variant``), the others one row. Order of
    overrides: plain ``--set``, switch to the algorithm, the variant's keys, ``ALG:key=value`` / ``ALG/VARIANT:key=value`` ``--set`` items, the seed.
    Same seed => same straggler realisation: the time model draws from keyed generators.
    A plain ``--set algorithm.X`` that one of the algorithms does not declare is a ScenarioError
    (give it an ``ALG:`` prefix); keys of the base scenario's algorithm section that a target
    lacks are not carried over and are recorded in the spec's ``dropped_keys``.
    """
    from simulator.scenario import load_raw, merge_mappings, scenario_mapping

    p = Path(path)
    raw = load_raw(p)
    file_keys = {k: raw.pop(k) for k in COMPARE_KEYS if k in raw}
    if "base" in file_keys:
        base_path = (p.parent / str(file_keys["base"])).resolve()
        raw = merge_mappings(scenario_mapping(base_path), raw)
    base_alg = (raw.get("algorithm") or {}).get("name") if isinstance(raw.get("algorithm"), dict) else None

    var_spec = variants if variants is not None else file_keys.get("variants")
    var_map = _parse_variants(var_spec)

    if algorithms:
        algs = [a.strip() for a in algorithms if a and a.strip()]
    elif "algorithms" in file_keys:
        algs = file_keys["algorithms"]
        if isinstance(algs, str):
            algs = [a.strip() for a in algs.split(",") if a.strip()]
        if not isinstance(algs, list) or not algs:
            raise UserError(f"{p}: algorithms: expected a non-empty list of algorithm names")
    elif var_map:
        algs = list(var_map)
    elif base_alg:
        algs = [base_alg]
    else:
        raise UserError(f"{p}: no algorithm: give --algorithms or an algorithm.name in the scenario")
    if len(set(algs)) != len(algs):
        raise UserError(f"algorithms: listed twice: {', '.join(sorted({a for a in algs if algs.count(a) > 1}))}")
    for a in algs:
        check_algorithm(str(a))
    for a in var_map:
        if a not in algs:
            log.warning("variants for %s are ignored: it is not among the algorithms (%s)", a, ", ".join(algs))

    plain, prefixed = split_overrides(overrides)
    seed_arg = seeds if seeds is not None else file_keys.get("seeds")
    base_seed = _base_seed(_resolve(raw, None, [plain])[0])
    seed_list = parse_seeds(seed_arg, base_seed) if seed_arg is not None else [base_seed]

    rows = [(a, label, items) for a in algs for label, items in (var_map.get(a) or {"": []}).items()]
    _check_prefixes(prefixed, {a for a, _, _ in rows} | {f"{a}/{v}" for a, v, _ in rows if v})

    for alg in algs:  # a key for every run that one algorithm lacks is an error, not a silent drop
        check_shared_keys(plain, alg, algs)

    specs: list[RunSpec] = []
    for alg, label, items in rows:
        mine = [it for pre, it in prefixed if pre in (alg, f"{alg}/{label}")]
        for seed in seed_list:
            run_id = sanitize(f"{alg}-{label}-seed{seed}" if label else f"{alg}-seed{seed}")
            r, dropped = _resolve(raw, None, [plain])
            r, dropped = _resolve(r, alg, [items, mine])
            r["seed"] = seed
            specs.append(make_spec(run_id, r, variant=label, dropped=dropped))
    _check_unique(specs)
    info = {
        "kind": "compare", "source": str(p.resolve()),
        "base": str((p.parent / str(file_keys["base"])).resolve()) if "base" in file_keys else None,
        "algorithms": list(algs), "seeds": seed_list,
        "variants": {a: {lab: dict(it) for lab, it in v.items()} for a, v in var_map.items()},
        "set": list(overrides),
    }
    return Plan("compare", specs, info)


def _parse_variants(spec: Any) -> dict[str, dict[str, list[tuple[str, Any]]]]:
    """``{algorithm: {label: {dotted.key: value}}}`` -> same with lists of (key, value)."""
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise UserError("variants: expected a mapping {algorithm: {label: {dotted.key: value}}}")
    out: dict[str, dict[str, list[tuple[str, Any]]]] = {}
    for alg, labels in spec.items():
        check_algorithm(str(alg), where=f"variants.{alg}")
        if not isinstance(labels, dict) or not labels:
            raise UserError(f"variants.{alg}: expected a mapping {{label: {{dotted.key: value}}}}")
        out[str(alg)] = {}
        for label, items in labels.items():
            lab = str(label)
            if not lab or sanitize(lab) != lab:
                raise UserError(f"variants.{alg}.{lab}: a label may use letters, digits and . _ , = + - only")
            pairs = _dotted_items(items or {}, f"variants.{alg}.{lab}")
            for key, _ in pairs:
                if key == "algorithm.name":
                    raise UserError(f"variants.{alg}.{lab}: algorithm.name is fixed by the variant's algorithm")
            out[str(alg)][lab] = pairs
    return out


def plan_sweep(path: str | Path, overrides: Sequence[str] = (), seeds: Any = None) -> Plan:
    """The cartesian product of a grid file: the runs of ``sflsim sweep``.

    A grid file has ``base: scenario.yaml`` (relative to the grid file), ``grid: {dotted.key:
    [values...]}`` and optionally ``seeds: N | [..]`` (or ``seed`` as a grid key), ``set:
    {dotted.key: value}`` (fixed overrides for every run), ``name`` and ``description``. A grid
    key ``algorithm.name`` switches algorithm before the point's other keys are set: a key of
    ``set:``, a plain ``--set`` or the grid that the target does not declare is a ScenarioError;
    base-scenario keys it lacks are not carried over and are recorded in ``dropped_keys``. Run
    ids read ``key1=v1,key2=v2,seed=k``.
    """
    from simulator.scenario import load_raw, scenario_mapping

    p = Path(path)
    doc = load_raw(p)
    unknown = [k for k in doc if k not in GRID_KEYS]
    if unknown:
        raise UserError(f"{p}: unknown grid-file key(s) {', '.join(map(str, unknown))}; "
                        f"expected: {', '.join(GRID_KEYS)}")
    if not doc.get("base"):
        raise UserError(f"{p}: base: required (the scenario file the grid varies, relative to this file)")
    base_path = (p.parent / str(doc["base"])).resolve()
    base = scenario_mapping(base_path)  # a comparison file's own algorithms/variants are set aside
    grid = doc.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise UserError(f"{p}: grid: expected a mapping {{dotted.key: [values...]}} with at least one key")
    axes: list[tuple[str, list]] = []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{p}: grid.{key}: expected a non-empty list of values")
        if any(values.count(v) > 1 for v in values):
            raise UserError(f"{p}: grid.{key}: a value is listed twice")
        axes.append((str(key), values))
    if "algorithm.name" in dict(axes):
        for a in dict(axes)["algorithm.name"]:
            check_algorithm(str(a), where=f"{p}: grid.algorithm.name")

    fixed = _dotted_items(doc.get("set"), f"{p}: set")
    plain, prefixed = split_overrides(overrides)
    base_seed = _base_seed(_resolve(base, None, [fixed, plain])[0])
    seed_axis = dict(axes).pop("seed", None)
    if seed_axis is not None and (seeds is not None or "seeds" in doc):
        raise UserError(f"{p}: give seeds either as a grid key 'seed' or with seeds:/--seeds, not both")
    if seed_axis is not None:
        seed_list = parse_seeds(seed_axis, base_seed)
    elif seeds is not None:
        seed_list = parse_seeds(seeds, base_seed)
    elif "seeds" in doc:
        seed_list = parse_seeds(doc["seeds"], base_seed)
    else:
        seed_list = [base_seed]
    axes = [(k, v) for k, v in axes if k != "seed"]

    algs_in_grid = {str(a) for a in dict(axes).get("algorithm.name", [])}
    base_alg = (base.get("algorithm") or {}).get("name") if isinstance(base.get("algorithm"), dict) else None
    fixed_alg = dict(fixed).get("algorithm.name")
    _check_prefixes(prefixed, algs_in_grid | {str(a) for a in (base_alg, fixed_alg) if a})
    grid_algs = list(dict.fromkeys(str(a) for a in dict(axes).get("algorithm.name", [])))
    grid_keys = [(k, v[0]) for k, v in axes if k != "algorithm.name"]
    for a in grid_algs:  # keys for every run that a grid algorithm lacks: an error, never dropped
        check_shared_keys([*fixed, *plain], a, grid_algs)
        check_shared_keys(grid_keys, a, grid_algs, grid=True)

    specs: list[RunSpec] = []
    keys = [k for k, _ in axes]
    for combo in itertools.product(*[v for _, v in axes]):
        point = dict(zip(keys, combo))
        alg = point.get("algorithm.name")
        rest = [(k, v) for k, v in point.items() if k != "algorithm.name"]
        for seed in seed_list:
            run_id = sanitize(",".join(f"{k}={format_value(v)}" for k, v in point.items()) + f",seed={seed}")
            r, _ = _resolve(base, None, [fixed, plain])
            r, dropped = _resolve(r, str(alg) if alg is not None else None, [rest])
            cur = (r.get("algorithm") or {}).get("name") if isinstance(r.get("algorithm"), dict) else None
            mine = [it for pre, it in prefixed if pre == cur]
            r, _ = _resolve(r, None, [mine])
            r["seed"] = seed
            specs.append(make_spec(run_id, r, params=point, dropped=dropped))
    _check_unique(specs)
    info = {
        "kind": "sweep", "source": str(p.resolve()), "base": str(base_path), "name": doc.get("name"),
        "description": doc.get("description"), "grid": {k: v for k, v in axes}, "seeds": seed_list,
        "set": [f"{k}={format_value(v)}" for k, v in fixed] + list(overrides),
    }
    return Plan("sweep", specs, info)


def _base_seed(raw: dict) -> int:
    seed = raw.get("seed", 0)
    if seed is None:
        return 0
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ScenarioError("seed", f"should be an integer >= 0, got {seed!r}")
    return seed


def _check_unique(specs: list[RunSpec]) -> None:
    seen: dict[str, int] = {}
    for s in specs:
        seen[s.run_id] = seen.get(s.run_id, 0) + 1
    dup = [k for k, n in seen.items() if n > 1]
    if dup:
        raise UserError(f"two runs would share the id {dup[0]!r} (values that differ only in characters "
                        "not allowed in file names?)")


# --------------------------------------------------------------------------------------------
# One run, on a worker (or in this process)
# --------------------------------------------------------------------------------------------
def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path) -> Optional[dict]:
    """A JSON file as a dict, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


FINISHED = ("completed", "diverged")  # a run's end states that a re-run reuses


def run_state(runs_dir: Path, spec: RunSpec) -> str:
    """``complete`` (same inputs, finished: completed or diverged), ``changed`` (finished from
    other inputs), or ``missing``."""
    final = Path(runs_dir) / spec.run_id
    if not final.is_dir():
        return "missing"
    meta = read_json(final / RUN_META) or {}
    summary = read_json(final / "summary.json") or {}
    finished = (meta.get("status") in FINISHED and summary.get("status") == meta.get("status")
                and (final / "metrics.csv").is_file())
    if not finished:
        return "missing"
    return "complete" if meta.get("fingerprint") == spec.fingerprint else "changed"


def execute_run(spec: RunSpec, runs_dir: str) -> dict:
    """Run one spec into ``runs_dir/<id>.partial`` and rename it when it ends; never raises
    for a failing run (the error and traceback are recorded), only for an interrupt."""
    from simulator.runner import divergence_warning_muted, run_scenario
    from simulator.scenario import validate

    runs = Path(runs_dir)
    final, partial, failed = runs / spec.run_id, runs / (spec.run_id + PARTIAL), runs / (spec.run_id + FAILED)
    if run_state(runs, spec) == "complete":
        return _reused(spec, final)
    for stale in (partial, failed):
        shutil.rmtree(stale, ignore_errors=True)
    partial.mkdir(parents=True)
    meta = {**spec.labels(), "status": "running", "threads": spec.scenario.get("threads"),
            "host": socket.gethostname(), "pid": os.getpid(), "started_at": _now()}
    _write_json_atomic(partial / RUN_META, meta)
    t0 = _time.perf_counter()
    try:
        with divergence_warning_muted():  # an outcome "diverged"; the batch's progress says it
            result = run_scenario(validate(spec.scenario), partial, progress=False)
    except Exception as e:  # a failing run is recorded; the batch goes on
        meta.update(status="failed", error=_one_line(e), host_s=_time.perf_counter() - t0, finished_at=_now())
        (partial / "traceback.txt").write_text(traceback.format_exc())
        _mark_summary_failed(partial, meta["error"])
        _write_json_atomic(partial / RUN_META, meta)
        os.replace(partial, failed)
        return _outcome(spec, "failed", failed, error=meta["error"], host_s=meta["host_s"])
    status = "diverged" if result.summary.get("status") == "diverged" else "completed"
    error = _diverged_text(result.summary) if status == "diverged" else ""
    meta.update(status=status, host_s=_time.perf_counter() - t0, finished_at=_now(),
                final_accuracy=result.summary.get("final_accuracy"), sim_time_s=result.summary.get("sim_time_s"),
                rounds=result.summary.get("rounds"))
    if status == "diverged":
        meta.update(error=error, diverged=result.summary.get("diverged"))
    _write_json_atomic(partial / RUN_META, meta)
    if final.exists():  # a finished run from other inputs (--overwrite), or an unfinished leftover
        shutil.rmtree(final)
    os.replace(partial, final)
    return _outcome(spec, status, final, error=error, host_s=meta["host_s"], summary=result.summary)


def _diverged_text(summary: dict) -> str:
    """The one-line Diverged message of a diverged run's summary."""
    from simulator.errors import Diverged

    info = summary.get("diverged") or {}
    try:
        return str(Diverged(**info))
    except TypeError:  # written by another version
        return "diverged: " + ", ".join(f"{k}={v}" for k, v in info.items() if v is not None)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _mark_summary_failed(run_dir: Path, error: str) -> None:
    """The runner writes its summary in a ``finally``: say there that the run failed."""
    path = run_dir / "summary.json"
    summary = read_json(path)
    if summary is not None:
        summary["status"] = "failed"
        summary["error"] = error
        _write_json_atomic(path, summary)


def _reused(spec: RunSpec, path: Path) -> dict:
    """The outcome of a finished run found on disk: ``reused``, or ``diverged`` (a result too)."""
    summary = read_json(path / "summary.json") or {}
    if summary.get("status") == "diverged":
        host_s = (read_json(path / RUN_META) or {}).get("host_s")
        return _outcome(spec, "diverged", path, error=_diverged_text(summary), host_s=host_s, summary=summary)
    return _outcome(spec, "reused", path, summary=summary)


def _outcome(spec: RunSpec, status: str, path: Path, *, error: str = "", host_s: Optional[float] = None,
             summary: Optional[dict] = None) -> dict:
    if summary is None and status in ("completed", "reused", "diverged"):
        summary = read_json(path / "summary.json") or {}
    if host_s is None and status == "reused":
        host_s = (read_json(path / RUN_META) or {}).get("host_s")
    summary = summary or {}
    return {
        "run_id": spec.run_id, "status": status, "error": error, "host_s": host_s, "path": str(path),
        "final_accuracy": summary.get("final_accuracy"), "sim_time_s": summary.get("sim_time_s"),
        "rounds": summary.get("rounds"),
    }


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
              command: Optional[list[str]] = None) -> BatchResult:
    """Run every spec of ``plan`` not already complete in ``out_dir``; return the outcomes.

    ``workers``: a LocalCluster of that many worker processes (default: one per core, at most
    one per run); 1 runs in this process, without Dask. ``scheduler``: the address of an
    existing Dask scheduler instead (its workers must see ``out_dir`` and import sflsim).
    ``threads``: torch threads per run; default cores // workers on a local cluster, the
    scenario's own setting on an external one. ``overwrite``: re-run finished runs whose inputs
    changed (default: refuse). Completed runs are skipped; a failing run does not stop others.
    Workers are always processes: runs in threads of one process share torch's global state
    (RNG, thread count, autograd hooks) and break each other.
    """
    out = Path(out_dir)
    runs_dir = out / RUNS
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    if workers is not None and scheduler:
        raise UserError("give --workers (a local cluster) or --scheduler (an existing one), not both")
    specs = plan.specs
    states = {s.run_id: run_state(runs_dir, s) for s in specs}
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
        shutil.rmtree(runs_dir / (s.run_id + PARTIAL), ignore_errors=True)
    execution = {"workers": n_workers, "scheduler": scheduler, "threads_per_run": per_run, "cores": cores,
                 "in_process": in_process}
    _write_json_atomic(out / BATCH_META, {
        **plan.info, "created_at": _now(), "command": command, "execution": execution,
        "runs": [{**s.labels(), "scenario": s.scenario} for s in specs],
    })
    outcomes: dict[str, dict] = {}
    for s in specs:
        if states[s.run_id] == "complete":
            outcomes[s.run_id] = _reused(s, runs_dir / s.run_id)
    _write_runs_csv(out, specs, outcomes)

    bar = _Progress(len(specs), len(outcomes), progress, plan.kind)
    redirect = contextlib.nullcontext()
    if progress:  # log lines (a failed run) go above the bar instead of through it
        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect = logging_redirect_tqdm()
    try:
        with redirect:
            _execute(todo, runs_dir, out, specs, outcomes, bar, execution, n_workers, scheduler)
    except KeyboardInterrupt:
        for s in specs:
            outcomes.setdefault(s.run_id, _outcome(s, "not_run", runs_dir / s.run_id, error="interrupted"))
        _write_runs_csv(out, specs, outcomes)
        raise
    finally:
        bar.close()
    for s in specs:
        outcomes.setdefault(s.run_id, _outcome(s, "not_run", runs_dir / s.run_id))
    _write_runs_csv(out, specs, outcomes)
    return BatchResult(out, [outcomes[s.run_id] for s in specs])


def _execute(todo, runs_dir, out, specs, outcomes, bar, execution, n_workers, scheduler) -> None:
    if not todo:
        return
    if execution["in_process"]:
        for s in todo:
            bar.running(1)
            outcomes[s.run_id] = execute_run(s, str(runs_dir))
            bar.done(outcomes[s.run_id])
            _write_runs_csv(out, specs, outcomes)
    else:
        _run_on_dask(todo, runs_dir, out, specs, outcomes, bar, n_workers, scheduler)


def _run_on_dask(todo, runs_dir, out, specs, outcomes, bar, n_workers, scheduler) -> None:
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
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                   dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR)
            client = Client(cluster)
        with client:
            futures = {client.submit(execute_run, s, str(runs_dir), pure=False,
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
                bar.running(sum((runs_dir / (futures[f].run_id + PARTIAL)).is_dir() for f in pending))
    finally:
        if cluster is not None:
            cluster.close()
        dask_log.setLevel(old_level)


def _collect(fut, spec: RunSpec, runs_dir: Path) -> dict:
    """A future's outcome; a worker that died (or a task that could not run) is a failed run."""
    try:
        return fut.result()
    except Exception as e:
        partial, failed = runs_dir / (spec.run_id + PARTIAL), runs_dir / (spec.run_id + FAILED)
        if partial.is_dir():
            shutil.rmtree(failed, ignore_errors=True)
            os.replace(partial, failed)
        failed.mkdir(parents=True, exist_ok=True)
        (failed / "traceback.txt").write_text("".join(traceback.format_exception(e)))
        meta = read_json(failed / RUN_META) or spec.labels()
        meta.update(status="failed", error=_one_line(e), finished_at=_now())
        _write_json_atomic(failed / RUN_META, meta)
        return _outcome(spec, "failed", failed, error=meta["error"])


RUNS_CSV_COLUMNS = ("run_id", "status", "algorithm", "variant", "seed", "final_accuracy", "sim_time_s", "rounds",
                    "host_s", "error", "path")


def _write_runs_csv(out: Path, specs: list[RunSpec], outcomes: dict[str, dict]) -> None:
    """``runs.csv``: one line per planned run (pending ones say ``pending``), grid keys as columns."""
    param_keys: list[str] = []
    for s in specs:
        for k in s.params:
            if k not in param_keys:
                param_keys.append(k)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(RUNS_CSV_COLUMNS[:5]) + param_keys + list(RUNS_CSV_COLUMNS[5:]))
    for s in specs:
        o = outcomes.get(s.run_id) or {"status": "pending", "path": str(out / RUNS / s.run_id)}
        row = [s.run_id, o["status"], s.algorithm, s.variant, s.seed]
        row += [format_value(s.params[k]) if k in s.params else "" for k in param_keys]
        row += ["" if o.get(c) is None else o.get(c) for c in RUNS_CSV_COLUMNS[5:]]
        w.writerow(row)
    tmp = out / (RUNS_CSV + ".tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, out / RUNS_CSV)


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
