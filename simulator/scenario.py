"""The scenario: one YAML file -> one validated, frozen ``Scenario`` object.

Configuration flows one way: YAML text -> ``--set`` overrides on the raw mapping -> pydantic
validation -> frozen objects handed to builders. Any bad input raises ``ScenarioError`` whose
message starts with the dotted key (``algorithm.tua: unknown key ...``); nothing here prints or
exits. The algorithm section is a tagged union built from the ``ALGORITHMS`` registry, so a
new algorithm adds its config class there and nowhere else.
"""
from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from models.registry import MODELS
from simulator.algorithms import ALGORITHMS
from simulator.config import (
    Fraction,
    KeyedValueError as _KeyedValueError,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    Strict,
    Value,
)
from simulator.data import DATASETS
from simulator.errors import ScenarioError

#: Measured by ``benchmarks/zo_cost.py`` (docs/benchmarks.md): one N(0,1) float32 drawn with
#: torch's CPU generator in 64K chunks and added to a parameter costs as much host time as this
#: many FLOPs of the model's own forward/backward (AlexNet server part, 1 thread).
ZO_RNG_FLOPS_PER_ELEMENT = 600.0

# The allowed names come from the registries (add a dataset or model there, not here). Text
# datasets go with text models, image datasets with image models.
DATASET_NAMES = tuple(DATASETS)
MODEL_NAMES = tuple(MODELS)
TEXT_DATASET_NAMES = tuple(name for name, spec in DATASETS.items() if spec.kind == "text")
TEXT_MODEL_NAMES = tuple(name for name, spec in MODELS.items() if spec.kind == "text")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
class DataConfig(Strict):
    """Which dataset, where it lives, and how it is split across clients."""

    dataset: Literal[DATASET_NAMES] = "fashion_mnist"  # type: ignore[valid-type]
    root: Optional[str] = Field(
        None, description="Folder with the dataset files; else $SFLSIM_DATA, else Debian's path."
    )
    num_clients: PosInt = Field(10, description="Number of clients K.")
    partition: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: PosFloat = Field(0.5, description="Dirichlet concentration (partition: dirichlet).")
    shards_per_client: PosInt = Field(2, description="Label shards per client (partition: shards).")
    train_limit: Optional[PosInt] = Field(None, description="Use at most this many train samples.")
    test_limit: Optional[PosInt] = Field(None, description="Use at most this many test samples.")
    max_len: int = Field(48, ge=2, description="Text datasets: tokens per sequence (truncated / right-padded).")


class ModelConfig(Strict):
    """The split network and where it is cut."""

    name: Literal[MODEL_NAMES] = "alexnet"  # type: ignore[valid-type]
    cut: PosInt = Field(2, description="Cut layer: the client holds blocks up to L<cut> (text models: "
                                       "the embeddings and transformer blocks 1..cut).")
    config: Optional[dict[str, Any]] = Field(
        None, description="Text models only. opt: OPT sizes (hidden_size, num_hidden_layers, ffn_dim, "
                          "num_attention_heads, ...) and/or preset (opt-125m, opt-350m, opt-1.3b), random "
                          "weights; minilm or opt with local_path: dropout, attn_implementation.")
    local_path: Optional[str] = Field(
        None, description="opt only: a local directory with a transformers checkpoint (real weights, tokenizer).")


class Tier(Strict):
    """A named device tier: a share of the clients (or a list of them) runs at speed_factor."""

    name: str
    share: Optional[Fraction] = None
    clients: Optional[list[NonNegInt]] = None
    speed_factor: PosFloat

    @model_validator(mode="after")
    def _one_of(self) -> "Tier":
        if (self.share is None) == (self.clients is None):
            raise ValueError("give exactly one of share or clients")
        return self


class ClientTimeConfig(Strict):
    """How fast client devices compute."""

    flops_per_s: Value = Field(1e9, description="Device speed: number or distribution, drawn once per client.")
    tiers: list[Tier] = Field(default_factory=list, description="Device tiers; speed is multiplied by speed_factor.")
    delay_s: Value = Field(0.0, description="Random delay added to each client compute operation.")


class ServerTimeConfig(Strict):
    """The Split Server (and Fed Server) compute."""

    flops_per_s: PosFloat = 1e11
    capacity: Optional[PosInt] = Field(1, description="Concurrent server jobs; null = unlimited.")


class LinkConfig(Strict):
    """One direction of a client's network link."""

    bandwidth_mbps: Value = Field(100.0, description="Bandwidth in Mbit/s: number or distribution, per client.")
    latency_s: Value = Field(0.01, description="One-way latency in seconds: number or distribution, per client.")


class NetworkConfig(Strict):
    """Uplink (client -> server) and downlink (server -> client)."""

    uplink: LinkConfig = LinkConfig()
    downlink: LinkConfig = LinkConfig()
    preset: Optional[Literal["gas_wireless"]] = Field(
        None, description="gas_wireless: the GAS code's clock (Shannon-rate links, d ~ U(0.1, 1) km, "
                          "client FLOP/s ~ U(1e9, 1e10)); replaces uplink, downlink and client.flops_per_s.")

    @model_validator(mode="after")
    def _preset_owns_links(self) -> "NetworkConfig":
        if self.preset is not None and (self.uplink != LinkConfig() or self.downlink != LinkConfig()):
            raise ValueError(f"preset {self.preset} sets both links; remove uplink/downlink (or the preset)")
        return self


class _Episode(Strict):
    clients: list[NonNegInt] = Field(min_length=1)
    start_s: NonNegFloat = 0.0
    end_s: Optional[NonNegFloat] = None

    @model_validator(mode="after")
    def _window(self):
        if self.end_s is not None and self.end_s <= self.start_s:
            raise ValueError(f"end_s ({self.end_s}) must be > start_s ({self.start_s})")
        return self


class SlowdownEpisode(_Episode):
    """Compute of these clients takes ``factor`` times longer while the episode lasts."""

    kind: Literal["slowdown"]
    factor: PosFloat


class UnreachableEpisode(_Episode):
    """Messages to or from these clients wait until the episode ends."""

    kind: Literal["unreachable"]
    end_s: NonNegFloat  # required: an endless outage would never deliver a message


class BandwidthEpisode(_Episode):
    """Bandwidth of these clients becomes ``bandwidth_mbps`` while the episode lasts."""

    kind: Literal["bandwidth"]
    bandwidth_mbps: PosFloat
    direction: Literal["uplink", "downlink", "both"] = "both"


Episode = Annotated[
    Union[SlowdownEpisode, UnreachableEpisode, BandwidthEpisode], Field(discriminator="kind")
]


class TimeConfig(Strict):
    """The time model: what each priced operation costs (docs/time-model.md)."""

    client: ClientTimeConfig = ClientTimeConfig()
    server: ServerTimeConfig = ServerTimeConfig()
    network: NetworkConfig = NetworkConfig()
    episodes: list[Episode] = Field(default_factory=list)
    trace_csv: Optional[str] = Field(
        None, description="CSV with columns client,start_s,end_s and speed_factor and/or bandwidth_mbps."
    )
    zo_rng_flops_per_element: NonNegFloat = Field(
        ZO_RNG_FLOPS_PER_ELEMENT,
        description="FLOP-equivalents charged for each random number a ZO step regenerates and applies to a "
                    "parameter (client and server, at their FLOP/s). Default measured by benchmarks/zo_cost.py "
                    "on a 2-core x86 CPU (docs/benchmarks.md); 0 prices only the arithmetic.")


class EvalConfig(Strict):
    """When the global model is evaluated on the test set (free in simulated time)."""

    every_rounds: Optional[PosInt] = 1
    every_sim_s: Optional[PosFloat] = None
    batch_size: PosInt = 1000


class StopConfig(Strict):
    """Stop at whichever comes first."""

    rounds: Optional[PosInt] = None
    sim_time_s: Optional[PosFloat] = None
    target_accuracy: Optional[Fraction] = None

    @model_validator(mode="after")
    def _bounded(self) -> "StopConfig":
        if self.rounds is None and self.sim_time_s is None:
            raise ValueError("set stop.rounds or stop.sim_time_s (or both) so the run ends")
        return self


AlgorithmConfig = Annotated[
    Union[tuple(spec.config for spec in ALGORITHMS.values())],  # type: ignore[misc]
    Field(discriminator="name"),
]


class Scenario(Strict):
    """One experiment: data, model, algorithm, time model, evaluation and stop rules."""

    name: str = "scenario"
    description: str = ""
    seed: NonNegInt = 0
    threads: Optional[PosInt] = Field(None, description="torch threads; null = torch's default.")
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    algorithm: AlgorithmConfig  # type: ignore[valid-type]
    time: TimeConfig = TimeConfig()
    eval: EvalConfig = EvalConfig()
    stop: StopConfig

    @model_validator(mode="after")
    def _clients_exist(self) -> "Scenario":
        k = self.data.num_clients
        for i, ep in enumerate(self.time.episodes):
            bad = [c for c in ep.clients if c >= k]
            if bad:
                raise _KeyedValueError(
                    f"time.episodes.{i}.clients", f"client ids must be < data.num_clients={k}, got {bad}"
                )
        for i, tier in enumerate(self.time.client.tiers):
            bad = [c for c in (tier.clients or []) if c >= k]
            if bad:
                raise _KeyedValueError(
                    f"time.client.tiers.{i}.clients", f"client ids must be < data.num_clients={k}, got {bad}"
                )
        shares = sum(t.share or 0.0 for t in self.time.client.tiers)
        if shares > 1 + 1e-9:
            raise _KeyedValueError("time.client.tiers", f"shares add up to {shares:g}, more than 1")
        return self

    @model_validator(mode="after")
    def _model_goes_with_data(self) -> "Scenario":
        """Text models take text datasets and image models images; then the model's own check."""
        m, ds = self.model, self.data.dataset
        text_model, text_data = m.name in TEXT_MODEL_NAMES, ds in TEXT_DATASET_NAMES
        if text_model and not text_data:
            raise _KeyedValueError("model.name", f"{m.name} is a text model but data.dataset is {ds!r}, an "
                                                 f"image dataset; use one of {', '.join(TEXT_DATASET_NAMES)}")
        if text_data and not text_model:
            raise _KeyedValueError("model.name", f"data.dataset {ds!r} is text, so the model must be one of "
                                                 f"{', '.join(TEXT_MODEL_NAMES)}, got {m.name!r}")
        try:
            MODELS[m.name].check(m.cut, m.config, m.local_path)
        except ScenarioError as e:
            raise _KeyedValueError(e.key, e.detail) from None
        return self


# --------------------------------------------------------------------------------------------
# Loading, overrides, error messages
# --------------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``--set dotted.key=value``; the value is read as YAML (so 0.5, null, [1, 2])."""
    if "=" not in text:
        raise ScenarioError("--set", f"expected dotted.key=value, got {text!r}")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ScenarioError("--set", f"expected dotted.key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ScenarioError(key, f"--set value {raw!r} is not valid YAML ({_first_line(e)})") from None
    return key, value


def apply_overrides(raw: dict, overrides: list[str] | list[tuple[str, Any]]) -> dict:
    """Return a copy of ``raw`` with each dotted key set; list items are addressed by index."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        parts = key.split(".")
        node: Any = out
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ScenarioError(where, f"no list item {part} (the list has {len(node)} items)")
                idx = int(part)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                parent = ".".join(parts[:depth]) or "<root>"
                raise ScenarioError(where, f"cannot set: {parent} is {type(node).__name__}, not a mapping")
    return out


def load_raw(path: str | Path) -> dict:
    """Read a scenario file into a plain mapping (no validation)."""
    p = Path(path)
    if not p.is_file():
        raise ScenarioError("", f"scenario file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ScenarioError("", f"{p}: not valid YAML: {_first_line(e)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ScenarioError("", f"{p}: a scenario must be a YAML mapping, got {type(raw).__name__}")
    return raw


#: Top-level keys of a comparison file that belong to ``sflsim compare``, not to one run.
COMPARE_KEYS = ("base", "algorithms", "seeds", "variants")


def merge_mappings(base: dict, top: dict) -> dict:
    """``top`` deep-merged onto a copy of ``base`` (mappings merge, anything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_mappings(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def scenario_mapping(path: str | Path) -> dict:
    """The scenario mapping of a file: compare keys set aside, ``base:`` merged underneath."""
    p = Path(path)
    raw = load_raw(p)
    extra = {k: raw.pop(k) for k in COMPARE_KEYS if k in raw}
    if "base" in extra:
        raw = merge_mappings(scenario_mapping(p.parent / str(extra["base"])), raw)
    return raw


def validate(raw: dict) -> Scenario:
    """Validate a raw mapping into a frozen Scenario, or raise ScenarioError(dotted key, message)."""
    try:
        return Scenario.model_validate(raw)
    except ValidationError as e:
        raise _to_scenario_error(e, raw) from None


def load_scenario(
    path: str | Path, overrides: list[str] | None = None, *, seed: int | None = None
) -> Scenario:
    """Load a YAML scenario, apply ``--set`` overrides and an optional seed, and validate it.

    A comparison file (top-level ``algorithms``, ``seeds``, ``variants``: what ``sflsim
    compare`` runs) is also a scenario: those keys are set aside here and the file's own
    ``algorithm`` is what runs. ``base: other.yaml`` merges this file onto another scenario.
    """
    raw = apply_overrides(scenario_mapping(path), overrides or [])
    if seed is not None:
        raw["seed"] = seed
    return validate(raw)


def to_yaml(scenario: Scenario) -> str:
    """The resolved scenario (defaults filled in) as YAML, loadable again with load_scenario."""
    data = scenario.model_dump(mode="json", by_alias=True)
    return yaml.safe_dump(data, sort_keys=False)


def json_schema() -> dict:
    """JSON Schema of the scenario, for editor autocompletion of YAML files."""
    schema = Scenario.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "sflsim scenario"
    return schema


def _first_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _dotted(loc: tuple, raw: Any) -> str:
    """Turn a pydantic error location into the user's dotted key, dropping union tags."""
    parts: list[str] = []
    node = raw
    for item in loc:
        if isinstance(node, dict):
            if item in node:
                parts.append(str(item))
                node = node[item]
                continue
            # A tagged-union member name (e.g. 'splitfed_v1'), not a key the user wrote.
            if isinstance(item, str) and item in {str(v) for v in node.values() if isinstance(v, str)}:
                continue
            parts.append(str(item))
            node = None
        elif isinstance(node, list) and isinstance(item, int) and item < len(node):
            parts.append(str(item))
            node = node[item]
        else:
            if isinstance(item, str) and "[" in item:  # union branch labels like 'function-after[...]'
                continue
            parts.append(str(item))
            node = None
    return ".".join(parts)


def _allowed_keys(dotted: str, raw: Any) -> list[str]:
    """Field names allowed at the parent of ``dotted`` (best effort, for 'did you mean')."""
    model: Any = Scenario
    node = raw
    for part in dotted.split(".")[:-1]:
        if isinstance(node, list) and part.isdigit():
            node = node[int(part)] if int(part) < len(node) else None
            continue
        fields = getattr(model, "model_fields", None)
        if not fields:
            return []
        field = fields.get(part) or next((f for f in fields.values() if f.alias == part), None)
        if field is None:
            return []
        node = node.get(part) if isinstance(node, dict) else None
        target = node[0] if isinstance(node, list) and node else node
        model = _inner_model(field.annotation, target)
        if model is None:
            return []
    fields = getattr(model, "model_fields", {})
    return [f.alias or n for n, f in fields.items()]


def _inner_model(tp: Any, raw: Any = None) -> Any:
    """The BaseModel class inside Optional/list/Annotated/tagged unions (picked by raw's tag)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _inner_model(typing.get_args(tp)[0], raw)
    if origin in (list, tuple):
        return _inner_model(typing.get_args(tp)[0], raw)
    if origin is Union:
        inner = [m for m in (_inner_model(a, raw) for a in typing.get_args(tp)) if m is not None]
        if len(inner) > 1 and isinstance(raw, dict):
            for m in inner:  # a tagged union: the member whose Literal tag matches the input
                for tag in ("name", "kind", "dist"):
                    f = m.model_fields.get(tag)
                    if f is not None and raw.get(tag) in typing.get_args(f.annotation):
                        return m
        return inner[0] if len(inner) == 1 else None
    return tp if isinstance(tp, type) and hasattr(tp, "model_fields") else None


def _to_scenario_error(e: ValidationError, raw: dict) -> ScenarioError:
    errors = e.errors(include_url=False)
    err = errors[0]
    key = _dotted(tuple(err["loc"]), raw)
    typ = err["type"]
    msg = err["msg"]
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    if "@@" in msg:  # a cross-field error that carries its own key
        _, k, rest = msg.split("@@", 2)
        return ScenarioError(k, rest + more)
    if typ == "extra_forbidden":
        allowed = _allowed_keys(key, raw)
        leaf = key.rsplit(".", 1)[-1]
        hint = difflib.get_close_matches(leaf, allowed, n=1)
        text = "unknown key"
        if hint:
            text += f" (did you mean '{hint[0]}'?)"
        if allowed:
            text += f"; expected one of: {', '.join(allowed)}"
        return ScenarioError(key, text + more)
    if typ == "missing":
        return ScenarioError(key, "required key is missing" + more)
    if typ in ("union_tag_invalid", "union_tag_not_found"):
        ctx = err.get("ctx", {})
        tag = ctx.get("discriminator", "").strip("'")
        expected = ctx.get("expected_tags", "")
        key = f"{key}.{tag}" if tag and not key.endswith(tag) else key
        got = ctx.get("tag")
        return ScenarioError(key, f"expected one of {expected}" + (f", got {got!r}" if got else "") + more)
    if typ == "value_error":
        msg = msg.removeprefix("Value error, ")
    if typ == "literal_error":
        msg = msg.replace("Input should be", "expected")
    elif msg.startswith("Input should be"):
        msg = "should be" + msg[len("Input should be"):]
    got = err.get("input")
    if typ not in ("value_error",) and not isinstance(got, (dict, list)):
        msg += f", got {got!r}"
    return ScenarioError(key, msg + more)
