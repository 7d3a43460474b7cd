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
import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from models.registry import MODELS
from simulator.algorithms import ALGORITHMS
from simulator.config import (
    LIMITS,
    MAX_EVALUATIONS,
    MAX_ROUNDS,
    MAX_SEED,
    MAX_SEQ_LEN,
    MAX_THREADS,
    MIN_BANDWIDTH_MBPS,
    MIN_EVAL_EVERY_S,
    MIN_FLOPS_PER_S,
    BatchSize,
    ClientCount,
    Fraction,
    KeyedValueError as _KeyedValueError,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    Strict,
    Value,
    bounded_float,
    bounded_int,
    largest_draw,
)
from simulator.data import DATASETS
from simulator.errors import ScenarioError, UserError

#: Measured by ``benchmarks/zo_cost.py`` (docs/benchmarks.md, docs/time-model.md): drawing one
#: N(0,1) float32 with torch's CPU generator costs as much host time as this many FLOPs of the
#: model's own first-order step (AlexNet server part, 1 thread).
ZO_RNG_FLOPS_PER_ELEMENT = 350.0
#: Measured the same way: one elementwise op over float32 parameters (``p += z``, ``z *= c``),
#: per element. Memory-bound work, which FlopCounterMode would count as 1 FLOP.
ZO_ELEMENTWISE_FLOPS_PER_ELEMENT = 32.0

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
        None, description="Folder with the dataset files (when set, the only place looked); null: $SFLSIM_DATA, "
                          "then Debian's path."
    )
    num_clients: ClientCount = Field(10, description="Number of clients K.")
    partition: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: PosFloat = Field(0.5, description="Dirichlet concentration (partition: dirichlet).")
    shards_per_client: PosInt = Field(2, description="Label shards per client (partition: shards).")
    train_limit: Optional[PosInt] = Field(None, description="Use at most this many train samples.")
    test_limit: Optional[PosInt] = Field(None, description="Use at most this many test samples.")
    validation: Union[PosInt, bounded_float(gt=0, lt=1), None] = Field(  # type: ignore[valid-type]
        None, description="Hold this many training samples (or this fraction of them) out before partitioning, "
                          "class-stratified and keyed by the seed, and evaluate on them instead of the test set "
                          "(which the run then does not use); null: no validation split.")
    max_len: bounded_int(2, MAX_SEQ_LEN) = Field(48, description=  # type: ignore[valid-type]
       "Text datasets: tokens per sequence (truncated / right-padded).")

    @field_validator("validation", mode="before")
    @classmethod
    def _validation_size(cls, v):
        """One line for any value that is neither a count of samples nor a fraction in (0, 1)."""
        if v is None:
            return v
        count = isinstance(v, int) and not isinstance(v, bool) and v >= 1
        whole = isinstance(v, float) and v.is_integer() and v >= 1
        fraction = isinstance(v, float) and 0 < v < 1
        if not (count or whole or fraction):
            raise ValueError(f"expected a number of training samples (an integer, at least the number of classes) "
                             f"or a fraction of them in (0, 1), got {v!r}")
        return v


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


def _rate_at_least(dist, minimum: float, unit: str):
    """A speed or bandwidth that can never reach ``minimum`` is an error now, not at run time
    (draws of an unbounded distribution are checked when they are made: ``preflight``)."""
    top = largest_draw(dist)
    if top < minimum:
        what = "is" if dist.dist == "constant" else "can draw at most"
        raise ValueError(f"{what} {top:g} {unit}; must be at least {minimum:g} {unit}")
    return dist


class ClientTimeConfig(Strict):
    """How fast client devices compute."""

    flops_per_s: Value = Field(1e9, description="Device speed: number or distribution, drawn once per client.")
    tiers: list[Tier] = Field(default_factory=list, description="Device tiers; speed is multiplied by speed_factor.")
    delay_s: Value = Field(0.0, description="Random delay added to each client compute operation.")

    @field_validator("flops_per_s")
    @classmethod
    def _can_compute(cls, v):
        return _rate_at_least(v, MIN_FLOPS_PER_S, "FLOP/s")


class ServerTimeConfig(Strict):
    """The Split Server (and Fed Server) compute."""

    flops_per_s: bounded_float(ge=MIN_FLOPS_PER_S) = 1e11  # type: ignore[valid-type]
    capacity: Optional[PosInt] = Field(1, description="Concurrent server jobs; null = unlimited.")


class LinkConfig(Strict):
    """One direction of a client's network link."""

    bandwidth_mbps: Value = Field(100.0, description="Bandwidth in Mbit/s: number or distribution, per client.")
    latency_s: Value = Field(0.01, description="One-way latency in seconds: number or distribution, per client.")

    @field_validator("bandwidth_mbps")
    @classmethod
    def _can_send(cls, v):
        return _rate_at_least(v, MIN_BANDWIDTH_MBPS, "Mbit/s")


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
    bandwidth_mbps: bounded_float(ge=MIN_BANDWIDTH_MBPS)  # type: ignore[valid-type]
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
        description="FLOP-equivalents charged for each random number a ZO step draws (client and server, at "
                    "their FLOP/s). Default measured by benchmarks/zo_cost.py on a 2-core x86 CPU "
                    "(docs/benchmarks.md); 0 prices only the arithmetic.")
    zo_elementwise_flops_per_element: NonNegFloat = Field(
        ZO_ELEMENTWISE_FLOPS_PER_ELEMENT,
        description="FLOP-equivalents counted per element of each elementwise op a ZO step runs over the "
                    "parameters (scale a direction, add it, the sphere's norm). Default measured by "
                    "benchmarks/zo_cost.py (docs/benchmarks.md).")


#: ``eval.subset: auto`` evaluates on this many test samples during training (the whole test set
#: when it has no more). The standard error of an accuracy p measured on n samples is
#: sqrt(p(1-p)/n): at n = 1000 it is at most 1.6 points (p = 0.5) and 1.1 points at p = 0.85, below
#: the round-to-round movement of the curves, while an evaluation of 1000 samples costs a tenth
#: of one on Fashion-MNIST's 10,000 (docs/scenarios.md, "Evaluation").
DEFAULT_EVAL_SUBSET = 1000


class EvalConfig(Strict):
    """When and on what the global model is evaluated (free in simulated time).

    During training every evaluation uses one fixed, class-stratified subset of the test set,
    drawn once per run from ``rng.generator(seed, "eval", "subset")`` (so every algorithm run
    with the same seed and data sees the same samples); at the end of the run the model is
    evaluated once more on the full test set. ``stop.target_accuracy`` is checked against the
    training-time evaluations (the subset: the only accuracy a run has while it trains).
    """

    every_rounds: Optional[PosInt] = 1
    every_sim_s: Optional[bounded_float(ge=MIN_EVAL_EVERY_S)] = None  # type: ignore[valid-type]
    batch_size: BatchSize = 1000
    subset: Union[PosInt, Literal["auto"], None] = Field(
        "auto", description=f"Test samples evaluated during training (a fixed, class-stratified subset; the full "
                            f"test set is evaluated at the end). auto: {DEFAULT_EVAL_SUBSET}, or the whole test set "
                            "when it has no more; null: the full test set every time.")

    def subset_size(self, test_samples: int) -> Optional[int]:
        """Samples of the training-time subset for a test set of ``test_samples``; None: the full set.

        A subset that covers the test set is the full set (None). A number larger than the test
        set is not decided here: pre-flight and the runner refuse it, naming ``eval.subset``.
        """
        n = DEFAULT_EVAL_SUBSET if self.subset == "auto" else self.subset
        return None if n is None or n >= test_samples else int(n)


class StopConfig(Strict):
    """Stop at whichever comes first."""

    rounds: Optional[bounded_int(1, MAX_ROUNDS)] = None  # type: ignore[valid-type]
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
    seed: bounded_int(0, MAX_SEED) = 0  # type: ignore[valid-type]
    threads: Optional[bounded_int(1, MAX_THREADS)] = Field(None,  # type: ignore[valid-type]
                                                          description="torch threads; null = torch's default.")
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    algorithm: AlgorithmConfig  # type: ignore[valid-type]
    time: TimeConfig = TimeConfig()
    eval: EvalConfig = EvalConfig()
    stop: StopConfig
    timing_only: bool = Field(False, description="Run the event timeline with no tensor work: events.csv as "
                                                 "training would write it, no accuracy (docs/timing-only.md).")

    @model_validator(mode="after")
    def _timing_only_has_no_accuracy(self) -> "Scenario":
        if self.timing_only and self.stop.target_accuracy is not None:
            raise _KeyedValueError("stop.target_accuracy", "a timing-only run measures no accuracy, so it cannot "
                                                           "stop at a target accuracy; set it to null, or stop.rounds")
        return self

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
        active = getattr(self.algorithm, "active_clients", None)
        if active is not None and active > k:
            raise _KeyedValueError("algorithm.active_clients", f"{active} active clients but data.num_clients is {k}")
        return self

    @model_validator(mode="after")
    def _validation_replaces_test(self) -> "Scenario":
        if self.data.validation is not None and self.data.test_limit is not None:
            raise _KeyedValueError("data.test_limit", "has no effect with data.validation set (the run evaluates on "
                                                      "the validation split and never reads the test set); set "
                                                      "data.test_limit: null")
        return self

    @model_validator(mode="after")
    def _bounded_evaluations(self) -> "Scenario":
        every, until = self.eval.every_sim_s, self.stop.sim_time_s
        if every is not None and until is not None and until / every > MAX_EVALUATIONS:
            raise _KeyedValueError("eval.every_sim_s", f"{every:g} s is {until / every:.3g} evaluations in "
                                                       f"stop.sim_time_s={until:g}; at most {MAX_EVALUATIONS:,}")
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
class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a number in exponent notation is a float whether or
    not it has a dot or a sign after the ``e`` (``1e-3``, ``2E9``, ``1.0e3``), as in YAML 1.2.
    Plain PyYAML (YAML 1.1) reads ``1e-3`` as the string '1e-3'; the schema takes no strings
    for numbers, so without this such a number would be refused."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _no_duplicate_keys(loader: YamlLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A key written twice in one mapping is an error (PyYAML would keep the last silently)."""
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.setdefault(key, key_node.start_mark.line)
        except TypeError:  # an unhashable key: the constructor below says so
            continue
        if first != key_node.start_mark.line:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (lines {first + 1} and {key_node.start_mark.line + 1})",
                key_node.start_mark)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


YamlLoader.construct_mapping = _no_duplicate_keys  # type: ignore[method-assign, assignment]


def read_yaml(text: str) -> Any:
    """YAML text to Python values, with ``YamlLoader`` (scenario files and ``--set`` values)."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``--set dotted.key=value``; the value is read as YAML (so 0.5, null, [1, 2])."""
    if "=" not in text:
        raise ScenarioError("--set", f"expected dotted.key=value, got {text!r}")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ScenarioError("--set", f"expected dotted.key=value, got {text!r}")
    try:
        value = read_yaml(raw) if raw.strip() else ""
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
        raw = read_yaml(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ScenarioError("", f"{p}: not valid YAML: {_first_line(e)}") from None
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise ScenarioError("", f"{p} line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x})") from None
    except OSError as e:
        raise ScenarioError("", f"{p}: cannot read ({e.strerror})") from None
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


def dump_scenario(scenario: Scenario) -> dict:
    """The resolved scenario as JSON-able data (scenario.yaml, a batch run's fingerprint).

    Keys added after runs were first written are left out at their default (``timing_only:
    false``, ``data.validation: null``), so the scenario.yaml and fingerprint of a run that does
    not use them are what they were before the keys existed.
    """
    exclude: dict = {}
    if not scenario.timing_only:
        exclude["timing_only"] = True
    if scenario.data.validation is None:
        exclude["data"] = {"validation": True}
    return scenario.model_dump(mode="json", by_alias=True, exclude=exclude or None)


def to_yaml(scenario: Scenario) -> str:
    """The resolved scenario (defaults filled in) as YAML, loadable again with load_scenario."""
    return yaml.safe_dump(dump_scenario(scenario), sort_keys=False)


def json_schema() -> dict:
    """JSON Schema of the scenario, for editor autocompletion of YAML files."""
    schema = Scenario.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "sflsim scenario"
    return schema


def _first_line(e: Exception) -> str:
    return " ".join(str(e).split())


_TAGS = ("name", "kind", "dist")  # the keys that pick a member of a tagged union


def _dotted(loc: tuple, raw: Any) -> str:
    """The dotted key the user wrote for a pydantic error location.

    Pydantic's location also names what the user did not write: the member of a tagged union
    (``mu_splitfed``, ``constant``), a union branch (``constrained-int``,
    ``literal['adaptive']``), the fields of a distribution behind a plain number. The key ends
    where the user's text ends: at a scalar, at a key they did not write, or past a list.
    """
    parts: list[str] = []
    node = raw
    for item in loc:
        if isinstance(node, dict):
            if item in node:
                parts.append(str(item))
                node = node[item]
                continue
            if isinstance(item, str) and any(node.get(t) == item for t in _TAGS):
                continue  # a tagged-union member name
            if isinstance(item, str) and ("[" in item or "-" in item):
                continue  # a union branch label
            parts.append(str(item))  # a key they did not write (missing); nothing below is theirs
            break
        if isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node):
            parts.append(str(item))
            node = node[item]
            continue
        break  # a scalar: the rest of the location is internal
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


def _number(v: Any) -> str:
    """A bound as the user would write it: 1000000 stays, 1e18 is 1e+18."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e7:
        v = int(v)
    if isinstance(v, int) and abs(v) < 10**12:
        return str(v)
    return f"{float(v):g}"


def _as_written(v: Any) -> str:
    """A scalar as YAML shows it, and what YAML made of it when that is surprising."""
    if isinstance(v, bool):
        return f"{str(v).lower()} (a boolean: YAML reads true/false, yes/no and on/off as booleans)"
    if v is None:
        return "null"
    if isinstance(v, str):
        return f"the string {v!r}" + (" (numbers are written without quotes)" if _looks_numeric(v) else "")
    if isinstance(v, float) and not math.isfinite(v):
        return {"inf": ".inf", "-inf": "-.inf"}.get(str(v), ".nan")
    if isinstance(v, (int, float)):
        return _number(v) if abs(v) >= 10**12 else repr(v)
    return repr(v)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _phrase(err: dict) -> str:
    """What one pydantic error says is wrong, in the user's words (no types or class names)."""
    typ, ctx = err["type"], err.get("ctx", {})
    limits = {"greater_than_equal": ("at least", "ge"), "greater_than": ("greater than", "gt"),
              "less_than_equal": ("at most", "le"), "less_than": ("less than", "lt")}
    if typ in limits:
        words, k = limits[typ]
        text = f"should be {words} {_number(ctx.get(k))}"
        if typ == "less_than_equal" and ctx.get(k) in LIMITS:
            text += " (a limit of sflsim: docs/scenarios.md#limits)"
        return text
    fixed = {
        "int_type": "should be an integer", "int_from_float": "should be an integer",
        "int_parsing": "should be an integer", "float_type": "should be a number",
        "float_parsing": "should be a number", "finite_number": "should be a finite number",
        "bool_type": "should be true or false", "bool_parsing": "should be true or false",
        "string_type": "should be text", "dict_type": "should be a mapping (key: value)",
        "model_type": "should be a mapping (key: value)", "model_attributes_type": "should be a mapping (key: value)",
        "list_type": "should be a list", "missing": "required key is missing",
    }
    if typ in fixed:
        return fixed[typ]
    if typ == "too_short":
        n = ctx.get("min_length", 1)
        return f"should have at least {n} item{'s' if n != 1 else ''}"
    msg = err["msg"].removeprefix("Value error, ")
    if msg.startswith("Input should be"):
        msg = "should be" + msg[len("Input should be"):]
    return msg


def _keyed(err: dict) -> Optional[_KeyedValueError]:
    """The KeyedValueError behind a pydantic error (a rule that names its own key), if any."""
    exc = err.get("ctx", {}).get("error")
    return exc if isinstance(exc, _KeyedValueError) else None


def _to_scenario_error(e: ValidationError, raw: dict) -> ScenarioError:
    errors = e.errors(include_url=False)
    err = errors[0]
    keyed = _keyed(err)
    key = keyed.key if keyed is not None else _dotted(tuple(err["loc"]), raw)
    typ = err["type"]
    # The branches of one union (tau: an integer or 'adaptive') fail together: one message.
    same = [x for x in errors if _keyed(x) is None and _dotted(tuple(x["loc"]), raw) == key]
    others = {x_key for x in errors
              if (x_key := (_keyed(x).key if _keyed(x) is not None else _dotted(tuple(x["loc"]), raw))) != key}
    more = f" (and {len(others)} more problem{'s' if len(others) > 1 else ''})" if others else ""
    if keyed is not None:  # a cross-field error that carries its own key
        return ScenarioError(keyed.key, keyed.detail + more)
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
    if typ in ("union_tag_invalid", "union_tag_not_found"):
        ctx = err.get("ctx", {})
        tag = ctx.get("discriminator", "").strip("'")
        expected = ctx.get("expected_tags", "")
        key = f"{key}.{tag}" if tag and not key.endswith(tag) else key
        got = ctx.get("tag")
        return ScenarioError(key, f"expected one of {expected}" + (f", got {got!r}" if got else "") + more)
    phrases: list[str] = []
    for x in same or [err]:
        p = _phrase(x)
        if phrases and p.startswith("should be "):
            p = p[len("should be "):]
        if p not in phrases:
            phrases.append(p)
    msg = ", or ".join(phrases)
    got = err.get("input")
    if typ not in ("value_error", "missing") and not isinstance(got, (dict, list, BaseModel)):
        msg += f", got {_as_written(got)}"
    return ScenarioError(key, msg + more)


def run_folder_scenario(run_dir: str | Path, overrides: list[str], allowed: tuple[str, ...], command: str,
                        why: str) -> "Scenario":
    """The scenario of a run folder (its scenario.yaml) with ``--set`` overrides whose keys are
    ``allowed`` (exact keys, or prefixes ending in "."); any other key is a ``UserError`` saying
    ``command`` changes only those and ``why``. Used by ``retime`` and ``resume``."""
    from simulator import rundir

    path = Path(run_dir) / rundir.SCENARIO
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no {rundir.SCENARIO})")
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in allowed):
            raise UserError(f"--set {key}: {command} changes only {', '.join(k + '*' if k.endswith('.') else k for k in allowed)} "
                            f"({why.format(key=key)})")
    return load_scenario(path, overrides)

