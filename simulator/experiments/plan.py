"""Planning a batch: the runs of ``sflsim compare`` and ``sflsim sweep``, before anything runs.

Planning is pure and happens in the caller's process: a scenario plus algorithms, variants and
seeds (``plan_compare``), or a grid file (``plan_sweep``), becomes a ``Plan``: a list of
``RunSpec`` s, each a validated scenario with a readable, stable run id, and what was asked for
(written to batch.json). Here live the ``base:`` merge, variants, ``ALG:`` / ``ALG/VARIANT:``
``--set`` prefixes, grid files and seed parsing; running the plan is ``execute.run_batch``'s.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from simulator.errors import ScenarioError, UserError
from simulator.rundir import fingerprint, format_value
from simulator.scenario import COMPARE_KEYS  # top-level keys of a comparison file

log = logging.getLogger(__name__)

# Keys of a grid file (a compare file's extra top-level keys are simulator.scenario.COMPARE_KEYS).
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


def make_spec(run_id: str, raw: dict, *, variant: str = "", params: dict | None = None,
              dropped: Sequence[str] = ()) -> RunSpec:
    """Validate ``raw`` into a spec; a bad key fails here, before anything runs."""
    from simulator.scenario import dump_scenario, validate

    try:
        scenario = validate(raw)
    except ScenarioError as e:
        raise ScenarioError(e.key, f"{e.detail} (in run {run_id})") from None
    # timing_only and data.validation only when set (as scenario.yaml has them): fingerprints of
    # earlier batches stay valid
    dumped = dump_scenario(scenario)
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

    def retime_sources(self) -> dict[str, str]:
        """Runs that can be re-timed instead of trained: run id -> the run id they are re-timed from.

        Specs that differ only in ``time.*`` keys (and labels: ``simulator.retime.LABEL_KEYS``)
        form a group; the group's first spec in plan order trains and the others are re-timed
        from it, where the algorithm allows (``simulator.retime.why_not_retimable``).
        """
        from simulator.retime import LABEL_KEYS, why_not_retimable
        from simulator.scenario import validate

        groups: dict[str, list[RunSpec]] = {}
        for spec in self.specs:
            rest = {k: v for k, v in spec.scenario.items() if k != "time" and k not in LABEL_KEYS}
            groups.setdefault(fingerprint(rest), []).append(spec)
        out: dict[str, str] = {}
        for members in groups.values():
            if len(members) < 2 or why_not_retimable(validate(members[0].scenario)) is not None:
                continue
            for spec in members[1:]:
                out[spec.run_id] = members[0].run_id
        return out


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

