"""Property: a mutated shipped scenario is refused with one UserError, or it runs.

Hypothesis takes a scenario from ``scenarios/*.yaml``, deletes keys and writes random values of
random types (booleans, strings, registry names, huge, negative, infinite and NaN numbers, lists,
mappings) at random dotted paths, writes it as YAML and asserts:

1. ``load_scenario`` + ``preflight`` accept it or raise the project's ``UserError`` (a one-line
   message that starts with a key), never another exception;
2. an accepted one, given a tiny budget (1 round, a few hundred samples, no evaluations
   between the first and the last, 1 thread) and accepted again, runs that round without any
   exception (a divergence is a result, not an exception). Scenarios that would be slow here
   (text models, large work per round) are not run.

The default run is derandomised (the same examples on every machine) and takes well under a
minute; ``-m slow`` runs many more examples.
"""
from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from models.registry import MODELS  # noqa: E402
from simulator.algorithms import ALGORITHMS  # noqa: E402
from simulator.data import DATASETS  # noqa: E402
from simulator.errors import UserError  # noqa: E402
from simulator.preflight import preflight  # noqa: E402
from simulator.scenario import load_scenario, scenario_mapping  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {p.name: scenario_mapping(p) for p in sorted((ROOT / "scenarios").glob("*.yaml"))}

WORDS = sorted({*ALGORITHMS, *DATASETS, *MODELS, "adaptive", "iid", "dirichlet", "shards", "fo", "zo", "gaussian",
                "sphere", "constant", "uniform", "normal", "lognormal", "exponential", "slowdown", "unreachable",
                "bandwidth", "gas_wireless", "cpu", "cuda", "auto", "diagonal", "full", "1e-3", "12", ".inf", "yes"})
NUMBERS = [0, 1, -1, 2, 7, 0.5, 1e-300, 1e300, 10**6, 10**12, 2**63, -(10**40), math.inf, -math.inf, math.nan]
KEYS = ["dist", "mean", "value", "low", "high", "kind", "name", "clients", "factor", "start_s", "end_s", "share",
        "speed_factor", "rounds", "x"]

scalars = st.one_of(
    st.booleans(), st.none(), st.sampled_from(WORDS), st.text(max_size=8), st.sampled_from(NUMBERS),
    st.integers(-10, 100), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.sampled_from(KEYS), scalars, max_size=3),
    st.lists(st.dictionaries(st.sampled_from(KEYS), scalars, max_size=4), min_size=1, max_size=2),
)


def _like(old: Any):
    """Values of the same type as ``old`` (a plausible edit), including extreme ones."""
    if isinstance(old, bool):
        return st.booleans()
    if isinstance(old, int):
        return st.one_of(st.integers(0, 64), st.sampled_from([0, 1, 2, 10**5, 10**9, 2**63]), st.integers())
    if isinstance(old, float):
        return st.one_of(st.floats(0, 10), st.floats(1e-9, 1e12), st.sampled_from(NUMBERS))
    if isinstance(old, str):
        return st.sampled_from(WORDS)
    return values


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every dotted path of a mapping (dict keys and list indices), parents first."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def mutated(draw) -> tuple[str, dict, list]:
    name = draw(st.sampled_from(sorted(SHIPPED)))
    raw = copy.deepcopy(SHIPPED[name])
    done = []
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(raw)
        path = draw(st.sampled_from(paths)) if paths else ()
        parent = raw
        for part in path[:-1]:
            parent = parent[part]
        op = draw(st.sampled_from(["like", "like", "like", "set", "set", "delete", "add"]))
        if not path:
            break
        leaf = path[-1]
        if op == "delete":
            del parent[leaf]
        elif op == "set":
            parent[leaf] = draw(values)
        elif op == "like":
            parent[leaf] = draw(_like(parent[leaf]))
        else:  # a new key under a mapping (or a known key in an unusual place)
            target = parent[leaf]
            if not isinstance(target, dict):
                continue
            target[draw(st.sampled_from(KEYS + ["rounds", "tau", "batch_size", "root", "trace_csv"]))] = draw(values)
        done.append((op, ".".join(map(str, path))))
    return name, raw, done


def _tiny(raw: dict) -> dict:
    """The same scenario with a tiny budget (keys that are not mappings are left to fail)."""
    out = copy.deepcopy(raw)
    out["stop"] = {"rounds": 1}
    out["threads"] = 1
    out["eval"] = {"every_rounds": None, "every_sim_s": None, "batch_size": 100}
    data = out.setdefault("data", {})
    if isinstance(data, dict):
        limit = data.get("train_limit")
        data["train_limit"] = min(limit, 300) if isinstance(limit, int) and not isinstance(limit, bool) else 300
        data["test_limit"] = 100
    return out


def _slow(s) -> str:
    """Why one round of ``s`` would take too long here ('' if it would not)."""
    a, d = s.algorithm, s.data
    if MODELS[s.model.name].kind == "text":
        return "text model"
    steps = a.local_steps or 1_000
    per_client = steps * (a.tau_max if getattr(a, "tau", 1) == "adaptive" else getattr(a, "tau", 1))
    per_client *= a.zo.perturbations
    if a.name == "gas":
        if s.model.name == "alexnet" and a.generate and a.covariance == "full":
            return "gas with full covariances of alexnet activations"
        clients = (a.model_buffer or a.active_clients)
    else:
        clients = max(1, round(getattr(a, "participation", 1.0) * d.num_clients))
    heavy = 10 if s.model.name == "alexnet" else 1
    if a.batch_size > 128 or d.num_clients > 64 or clients * per_client * heavy > 150:
        return "too much work per round"
    return ""


def _to_yaml_file(raw: dict, folder: Path) -> Path:
    p = folder / "mutated.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def _check(example: tuple[str, dict, list], folder: Path) -> str:
    name, raw, done = example
    try:
        s = load_scenario(_to_yaml_file(raw, folder))
        preflight(s)
    except UserError as e:
        text = str(e)
        assert text and "\n" not in text and "Traceback" not in text, (name, done, text)
        return "refused"
    try:
        tiny = load_scenario(_to_yaml_file(_tiny(raw), folder))
        preflight(tiny)
    except UserError:
        return "refused with a tiny budget"
    if _slow(tiny):
        return "accepted, not run: " + _slow(tiny)
    from simulator.runner import run_scenario

    result = run_scenario(tiny)  # any exception fails the test; a divergence is a result
    assert result.summary["status"] in ("completed", "diverged"), (name, done, result.summary["status"])
    return "ran"


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])


@settings(max_examples=200, **COMMON)
@given(example=mutated())
def test_mutated_scenarios_are_refused_in_one_line_or_run(example, folder):
    _check(example, folder)


@pytest.mark.slow
@settings(max_examples=2000, **COMMON)
@given(example=mutated())
def test_mutated_scenarios_many(example, folder):
    _check(example, folder)
