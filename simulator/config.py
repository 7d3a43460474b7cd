"""Building blocks of the scenario schema: strict frozen models and random distributions.

Everything a user writes in YAML is validated by these pydantic models: unknown keys are
errors, values are typed and range-checked, and a validated object is frozen. This module only
describes values; it draws nothing (drawing happens in ``simulator.latency`` with keyed
generators).
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

NonNegFloat = Annotated[float, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]


class KeyedValueError(ValueError):
    """A validation error that knows the user's dotted key (``scenario._to_scenario_error`` reads it)."""

    def __init__(self, key: str, msg: str):
        self.key = key
        super().__init__(f"@@{key}@@{msg}")


class Strict(BaseModel):
    """Base of every scenario section: unknown keys are errors and objects are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


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
    sigma: NonNegFloat

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


def _number_to_constant(v):
    """A plain number (or a numeric string such as YAML's '1e9') means a constant."""
    if isinstance(v, bool):
        raise ValueError("expected a number or a distribution such as {dist: exponential, mean: 0.5}")
    if isinstance(v, (int, float)):
        return {"dist": "constant", "value": v}
    if isinstance(v, str):
        try:
            return {"dist": "constant", "value": float(v)}
        except ValueError:
            pass
    if isinstance(v, dict) or isinstance(v, BaseModel):
        return v
    raise ValueError(f"expected a number or a distribution such as {{dist: exponential, mean: 0.5}}, got {v!r}")


#: A number (a constant) or a distribution mapping with a ``dist`` key.
Value = Annotated[Distribution, BeforeValidator(_number_to_constant)]

DISTRIBUTIONS = ("constant", "uniform", "normal", "lognormal", "exponential", "shifted_exponential")


def as_distribution(v: "float | Distribution") -> "Distribution":
    """A number becomes Constant(value); a distribution is returned as it is."""
    if isinstance(v, (int, float)):
        return Constant(value=float(v))
    return v
