"""Scenario schema: strict keys, dotted-key errors, overrides, round trip, JSON Schema."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from simulator.errors import ScenarioError
from simulator.scenario import (
    apply_overrides,
    json_schema,
    load_scenario,
    parse_override,
    to_yaml,
    validate,
)

SCENARIOS = sorted((Path(__file__).parent.parent / "scenarios").glob("*.yaml"))


def _error(raw) -> ScenarioError:
    with pytest.raises(ScenarioError) as ei:
        validate(raw)
    return ei.value


def test_minimal_scenario_gets_defaults(tiny_raw):
    """A scenario with a few keys is filled with documented defaults."""
    s = validate({"algorithm": {"name": "splitfed_v1"}, "stop": {"rounds": 1}})
    assert s.data.dataset == "fashion_mnist" and s.data.num_clients == 10
    assert s.model.name == "alexnet" and s.model.cut == 2
    assert s.time.server.capacity == 1
    assert s.algorithm.batch_size == 32


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("algorithm.tua=3", "algorithm.tua", "unknown key"),
        ("data.datset=mnist", "data.datset", "did you mean 'dataset'"),
        ("algorithm.lr_client=-1", "algorithm.lr_client", "greater than 0"),
        ("data.num_clients=abc", "data.num_clients", "integer"),
        ("algorithm.name=nope", "algorithm.name", "splitfed_v1"),
        ("data.dataset=imagenet", "data.dataset", "fashion_mnist"),
        ("stop.target_accuracy=1.5", "stop.target_accuracy", "at most 1, got 1.5"),
        ("algorithm.participation=1.2", "algorithm.participation", "at most 1"),
        ("time.server.flops_per_s=-5", "time.server.flops_per_s", "at least 1"),
        ("time.client.delay_s.mean=-2", "time.client.delay_s.mean", "greater than 0"),
        ("time.client.flops_per_s.dist=weird", "time.client.flops_per_s.dist", "exponential"),
        ("time.client.delay_s=abc", "time.client.delay_s", "distribution"),
        ("stop.sim_time_s=-1", "stop.sim_time_s", "greater than 0"),
    ],
)
def test_bad_values_name_the_dotted_key(tiny_raw, override, key, words):
    """Each bad value gives a ScenarioError whose message starts with the dotted key."""
    with pytest.raises(ScenarioError) as ei:
        validate(apply_overrides(tiny_raw, [override]))
    msg = str(ei.value)
    assert ei.value.key == key, msg
    assert msg.startswith(key + ":"), msg
    assert words in msg, msg
    assert "\n" not in msg


def test_episode_client_out_of_range(tiny_raw):
    """Episode client ids beyond num_clients are rejected with the episode's dotted key."""
    tiny_raw["time"]["episodes"] = [{"kind": "slowdown", "clients": [9], "factor": 2}]
    err = _error(tiny_raw)
    assert err.key == "time.episodes.0.clients"


def test_episode_window_must_be_positive(tiny_raw):
    """end_s must come after start_s."""
    tiny_raw["time"]["episodes"] = [{"kind": "unreachable", "clients": [0], "start_s": 5, "end_s": 2}]
    assert _error(tiny_raw).key == "time.episodes.0"


def test_stop_needs_a_bound(tiny_raw):
    """A run without rounds or sim_time_s would never end: rejected."""
    tiny_raw["stop"] = {"target_accuracy": 0.9}
    assert _error(tiny_raw).key == "stop"


def test_local_steps_xor_epochs(tiny_raw):
    """Exactly one of local_steps and local_epochs."""
    tiny_raw["algorithm"]["local_epochs"] = 1
    assert _error(tiny_raw).key == "algorithm.local_steps"


def test_tier_shares_cannot_exceed_one(tiny_raw):
    """Tier shares are fractions of the clients: their sum is at most 1."""
    tiny_raw["time"]["client"]["tiers"] = [
        {"name": "a", "share": 0.7, "speed_factor": 1}, {"name": "b", "share": 0.5, "speed_factor": 0.1}
    ]
    assert _error(tiny_raw).key == "time.client.tiers"


def test_number_means_constant(tiny_raw):
    """A plain number (YAML's '1e9' string too) is a constant distribution."""
    s = validate(apply_overrides(tiny_raw, ["time.client.flops_per_s=1e9"]))
    assert s.time.client.flops_per_s.dist == "constant"
    assert s.time.client.flops_per_s.value == 1e9


def test_parse_override_reads_yaml_values():
    """--set values are YAML: numbers, null, lists."""
    assert parse_override("a.b=0.5") == ("a.b", 0.5)
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=text") == ("a", "text")


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1", "a.=1"])
def test_malformed_override(bad):
    """A malformed --set is a ScenarioError on '--set'."""
    with pytest.raises(ScenarioError) as ei:
        parse_override(bad)
    assert ei.value.key == "--set"


def test_override_into_list_and_missing_item(tiny_raw):
    """List items are addressed by index; a missing index is an error naming it."""
    tiny_raw["time"]["episodes"] = [{"kind": "slowdown", "clients": [0], "factor": 2}]
    s = validate(apply_overrides(tiny_raw, ["time.episodes.0.factor=8"]))
    assert s.time.episodes[0].factor == 8
    with pytest.raises(ScenarioError) as ei:
        apply_overrides(tiny_raw, ["time.episodes.4.factor=8"])
    assert ei.value.key == "time.episodes.4"


def test_override_through_a_scalar_is_an_error(tiny_raw):
    """Setting a.b when a is a number names the key."""
    with pytest.raises(ScenarioError) as ei:
        apply_overrides(tiny_raw, ["seed.x=1"])
    assert ei.value.key == "seed.x"


def test_round_trip_through_yaml(tiny_raw, tmp_path):
    """The resolved scenario written as YAML loads back to the same object."""
    s = validate(tiny_raw)
    p = tmp_path / "s.yaml"
    p.write_text(to_yaml(s))
    assert load_scenario(p) == s


def test_frozen(tiny_raw):
    """A validated scenario cannot be mutated."""
    s = validate(tiny_raw)
    with pytest.raises(Exception):
        s.seed = 5  # type: ignore[misc]


def test_load_errors(tmp_path):
    """Missing files and non-mapping YAML are ScenarioErrors, not tracebacks."""
    with pytest.raises(ScenarioError):
        load_scenario(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ScenarioError):
        load_scenario(p)
    p.write_text("a: [1,\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(p)


def test_seed_argument_overrides(tiny_raw, tmp_path):
    """load_scenario(seed=...) replaces the file's seed."""
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(tiny_raw))
    assert load_scenario(p, seed=11).seed == 11


def test_json_schema_describes_keys():
    """The JSON Schema is valid JSON and lists the public keys."""
    schema = json_schema()
    text = json.dumps(schema)
    for key in ("num_clients", "target_accuracy", "sim_time_s", "flops_per_s", "episodes"):
        assert key in text
    assert schema["title"] == "sflsim scenario"


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.name for p in SCENARIOS])
def test_shipped_scenarios_validate(path):
    """Every file in scenarios/ validates."""
    load_scenario(path)


def test_there_are_shipped_scenarios():
    """scenarios/ is not empty (so the parametrised test above runs)."""
    assert any(p.name == "quickstart.yaml" for p in SCENARIOS)


GRIDS = sorted((Path(__file__).parent.parent / "scenarios" / "grids").glob("*.yaml"))


@pytest.mark.parametrize("path", GRIDS, ids=[p.name for p in GRIDS])
def test_shipped_grids_plan(path):
    """Every sweep grid in scenarios/grids/ expands into valid scenarios."""
    from simulator.experiments import plan_sweep

    plan = plan_sweep(path)
    assert len(plan.specs) > 1


def test_image_model_cut_is_checked_at_validation(tiny_raw):
    """An impossible cut for an image model is a model.cut error before anything runs."""
    err = _error(apply_overrides(tiny_raw, ["model.cut=3"]))
    assert err.key == "model.cut" and "1, 2" in str(err)


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.name for p in SCENARIOS])
def test_resolved_shipped_scenarios_load_again(path, tmp_path):
    """The resolved scenario.yaml a run writes loads back to the same scenario (presets included)."""
    s = load_scenario(path)
    p = tmp_path / "scenario.yaml"
    p.write_text(to_yaml(s))
    assert load_scenario(p) == s


# --------------------------------------------------------------------------------------------
# Names come from the registries
# --------------------------------------------------------------------------------------------
DOCS = Path(__file__).parent.parent / "docs"


def names_tables() -> str:
    """The dataset and model tables of docs/scenarios.md, rendered from the registries."""
    from models import MODELS
    from simulator.data import DATASETS

    lines = ["| dataset | kind | what |", "|---|---|---|"]
    lines += [f"| `{n}` | {d.kind} | {d.summary} |" for n, d in DATASETS.items()]
    lines += ["", "| model | kind | cuts | what |", "|---|---|---|---|"]
    lines += [f"| `{n}` | {m.kind} | {m.cut_range()} | {m.summary} |" for n, m in MODELS.items()]
    return "\n".join(lines)


def test_schema_names_are_the_registries():
    """data.dataset and model.name accept exactly the registry names, in registry order."""
    from models import MODELS
    from simulator.data import DATASETS

    props = json_schema()["$defs"]
    assert props["DataConfig"]["properties"]["dataset"]["enum"] == list(DATASETS)
    assert props["ModelConfig"]["properties"]["name"]["enum"] == list(MODELS)


def test_docs_tables_list_every_dataset_and_model():
    """docs/scenarios.md holds the registries' tables verbatim; docs/text.md names every text entry."""
    from models import MODELS
    from simulator.data import DATASETS

    expected = names_tables()
    assert expected in (DOCS / "scenarios.md").read_text(), (
        "docs/scenarios.md is out of date with the registries; paste this table:\n" + expected
    )
    text_md = (DOCS / "text.md").read_text()
    for registry in (DATASETS, MODELS):
        for name, spec in registry.items():
            if spec.kind == "text":
                assert f"`{name}`" in text_md, f"docs/text.md does not name {name}"
