"""Building blocks of the scenario schema: strict frozen models and random distributions.

Everything a user writes in YAML is validated by these pydantic models: unknown keys are
errors, values are typed and range-checked, and a validated object is frozen. Numbers are
strict (``Float``, ``Int`` and friends): finite, never a bool or a quoted string, and bounded
(``MAX_NUMBER`` and the ``MAX_*`` limits on work, documented in docs/scenarios.md, "Limits").
This module only describes values; it draws nothing (drawing happens in ``simulator.latency``
with keyed generators).
"""
from __future__ import annotations

import math
from typing import Annotated, Literal, Union

import annotated_types as at
import numpy as np
from pydantic import AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic import Strict as _StrictMode

# --------------------------------------------------------------------------------------------
# Numbers: finite, strictly typed, bounded. One set of types for every key of the schema.
# --------------------------------------------------------------------------------------------
#: Largest magnitude of any number in a scenario. Keeps every price finite: a duration is at
#: most FLOPs / (1 FLOP/s) times a slowdown factor plus delays, all far below float's 1.8e308.
MAX_NUMBER = 1e18
#: Largest value of any count (client ids, limits, buffers) that has no tighter limit below.
MAX_COUNT = 1_000_000_000
#: Limits on the work a scenario asks for (docs/scenarios.md, "Limits").
MAX_CLIENTS = 100_000  # data.num_clients
MAX_BATCH_SIZE = 100_000  # algorithm.batch_size, eval.batch_size (also at most the training samples)
MAX_LOCAL_STEPS = 100_000  # algorithm.local_steps (iterations per client and round)
MAX_LOCAL_EPOCHS = 1_000  # algorithm.local_epochs
MAX_ROUNDS = 1_000_000  # stop.rounds (GAS: global iterations)
MAX_TAU = 1_000  # algorithm.tau, algorithm.tau_max (server steps per local iteration)
MAX_PERTURBATIONS = 1_000  # algorithm.zo.perturbations
MAX_BUFFER = 100_000  # GAS activation_buffer, model_buffer
MAX_THREADS = 1_024  # threads
MAX_SEQ_LEN = 2_048  # data.max_len (OPT's position table)
MAX_SEED = 2**63 - 1  # seed
MAX_SIGMA = 10.0  # lognormal sigma (exp(10 * N(0, 1)) already spans 40 orders of magnitude)
MIN_FLOPS_PER_S = 1.0  # every device speed, after tiers and trace factors
MIN_BANDWIDTH_MBPS = 1e-6  # every bandwidth: 1 bit/s
MIN_EVAL_EVERY_S = 1e-3  # eval.every_sim_s
MAX_EVALUATIONS = 1_000_000  # stop.sim_time_s / eval.every_sim_s

#: The upper limits above, for error messages that point at the documentation.
LIMITS = frozenset({MAX_NUMBER, MAX_COUNT, MAX_CLIENTS, MAX_BATCH_SIZE, MAX_LOCAL_STEPS, MAX_LOCAL_EPOCHS,
                    MAX_ROUNDS, MAX_TAU, MAX_PERTURBATIONS, MAX_BUFFER, MAX_THREADS, MAX_SEQ_LEN, MAX_SEED,
                    MAX_SIGMA})


def _integral_float_to_int(v):
    """An integer key also takes a float with no fractional part (YAML's ``1e3``, ``100.0``)."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


_IntegralFloat = BeforeValidator(_integral_float_to_int)

_FLOAT = (_StrictMode(), AllowInfNan(False))


def bounded_float(*, ge=None, gt=None, le=MAX_NUMBER, lt=None):
    """A finite number (an int is fine; a bool or a string is not) within the given bounds."""
    bounds = [at.Ge(ge) if ge is not None else at.Gt(gt) if gt is not None else at.Ge(-MAX_NUMBER),
              at.Lt(lt) if lt is not None else at.Le(le)]
    return Annotated[(float, *_FLOAT, *bounds)]


def bounded_int(low: int, high: int = MAX_COUNT):
    """An integer in [low, high] (an integral float such as 1e3 is fine; a bool or a string is not)."""
    return Annotated[int, _StrictMode(), at.Ge(low), at.Le(high), _IntegralFloat]


#: A finite number, at most MAX_NUMBER in magnitude.
Float = bounded_float()
NonNegFloat = bounded_float(ge=0)
PosFloat = bounded_float(gt=0)
Fraction = bounded_float(gt=0, le=1)
#: An integer, at most MAX_COUNT in magnitude.
Int = bounded_int(-MAX_COUNT)
PosInt = bounded_int(1)
NonNegInt = bounded_int(0)
#: Counts of work, each with its limit.
BatchSize = bounded_int(1, MAX_BATCH_SIZE)
LocalSteps = bounded_int(1, MAX_LOCAL_STEPS)
LocalEpochs = bounded_int(1, MAX_LOCAL_EPOCHS)
TauSteps = bounded_int(1, MAX_TAU)
BufferSize = bounded_int(1, MAX_BUFFER)
ClientCount = bounded_int(1, MAX_CLIENTS)


#: true or false only (not 1, "yes" as a string, ...). YAML's yes/no/on/off are booleans already.
Bool = Annotated[bool, _StrictMode()]


class KeyedValueError(ValueError):
    """A validation error that knows the user's dotted key (``scenario._to_scenario_error`` reads it)."""

    def __init__(self, key: str, msg: str):
        self.key = key
        self.detail = msg
        super().__init__(f"{key}: {msg}")


class Strict(BaseModel):
    """Base of every scenario section: unknown keys are errors and objects are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, defer_build=True)


# --------------------------------------------------------------------------------------------
# Distributions. Each has ``sample(rng)`` returning one non-negative float and ``mean()``.
# --------------------------------------------------------------------------------------------
class Constant(Strict):
    """Always the same value."""

    dist: Literal["constant"] = "constant"
    value: NonNegFloat

    def sample(self, rng: np.random.Generator) -> float:
        return float(self.value)

    def mean(self) -> float:
        return float(self.value)


class Uniform(Strict):
    """Uniform on [low, high]."""

    dist: Literal["uniform"]
    low: NonNegFloat
    high: NonNegFloat

    @model_validator(mode="after")
    def _order(self) -> "Uniform":
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        return self

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.low, self.high))

    def mean(self) -> float:
        return 0.5 * (self.low + self.high)


class Normal(Strict):
    """Normal(mean, std) truncated to values > 0 (redrawn, at most 1000 times)."""

    dist: Literal["normal"]
    mean_: PosFloat = Field(alias="mean")
    std: NonNegFloat

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def sample(self, rng: np.random.Generator) -> float:
        for _ in range(1000):
            v = float(rng.normal(self.mean_, self.std))
            if v > 0:
                return v
        raise ValueError(
            f"normal(mean={self.mean_}, std={self.std}) gave no positive value in 1000 draws"
        )

    def mean(self) -> float:  # of the untruncated normal; documented as such
        return float(self.mean_)


class LogNormal(Strict):
    """exp(Normal(log(median), sigma)): parameterised by its median and log-space sigma."""

    dist: Literal["lognormal"]
    median: PosFloat
    sigma: bounded_float(ge=0, le=MAX_SIGMA)  # type: ignore[valid-type]

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.lognormal(np.log(self.median), self.sigma))

    def mean(self) -> float:
        return float(self.median * np.exp(self.sigma**2 / 2))


class Exponential(Strict):
    """Exponential with the given mean (rate 1/mean)."""

    dist: Literal["exponential"]
    mean_: PosFloat = Field(alias="mean")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.exponential(self.mean_))

    def mean(self) -> float:
        return float(self.mean_)


class ShiftedExponential(Strict):
    """shift + Exponential(mean): a minimum value plus an exponential tail."""

    dist: Literal["shifted_exponential"]
    shift: NonNegFloat
    mean_: PosFloat = Field(alias="mean")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def sample(self, rng: np.random.Generator) -> float:
        return float(self.shift + rng.exponential(self.mean_))

    def mean(self) -> float:
        return float(self.shift + self.mean_)


Distribution = Annotated[
    Union[Constant, Uniform, Normal, LogNormal, Exponential, ShiftedExponential],
    Field(discriminator="dist"),
]


_DIST_HINT = "expected a number or a distribution such as {dist: exponential, mean: 0.5}"


def _number_to_constant(v):
    """A plain number means a constant; a mapping is a distribution. Nothing else is read."""
    if isinstance(v, bool):
        raise ValueError(f"{_DIST_HINT}, got {str(v).lower()} (a boolean)")
    if isinstance(v, (int, float)):
        return {"dist": "constant", "value": v}
    if isinstance(v, (dict, BaseModel)):
        return v
    if isinstance(v, str):
        try:
            float(v)
        except ValueError:
            raise ValueError(f"{_DIST_HINT}, got the string {v!r}") from None
        raise ValueError(f"{_DIST_HINT}, got the string {v!r} (numbers are written without quotes)")
    raise ValueError(f"{_DIST_HINT}, got {v!r}")


#: A number (a constant) or a distribution mapping with a ``dist`` key.
Value = Annotated[Distribution, BeforeValidator(_number_to_constant)]

DISTRIBUTIONS = ("constant", "uniform", "normal", "lognormal", "exponential", "shifted_exponential")


def largest_draw(d: "Distribution") -> float:
    """The largest value ``d`` can draw (inf when unbounded): a rate whose largest draw is
    below its minimum can never be valid, whatever the seed."""
    if d.dist == "constant":
        return float(d.value)
    if d.dist == "uniform":
        return float(d.high)
    return math.inf


def as_distribution(v: "float | Distribution") -> "Distribution":
    """A number becomes Constant(value); a distribution is returned as it is."""
    if isinstance(v, (int, float)):
        return Constant(value=float(v))
    return v
