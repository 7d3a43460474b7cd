"""The algorithms' config classes: the ``algorithm`` section of a scenario, without torch.

Every class here is a pydantic model of the scenario schema (``simulator.scenario`` builds the
``algorithm`` tagged union from ``simulator.algorithms.ALGORITHMS``). They live apart from the
algorithm implementations so that loading, validating and describing a scenario (``sflsim
validate``, ``sflsim schema``, bad-input errors) never imports torch: this module must import
nothing heavier than pydantic and ``simulator.config``. Each algorithm module re-exports its own
config classes, so ``simulator.algorithms.mu_splitfed.MUSplitFedConfig`` still names them.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, model_validator

from simulator.config import (
    MAX_PERTURBATIONS,
    BatchSize,
    Bool,
    BufferSize,
    ClientCount,
    Fraction,
    KeyedValueError,
    LocalEpochs,
    LocalSteps,
    NonNegFloat,
    PosFloat,
    Strict,
    TauSteps,
    bounded_float,
    bounded_int,
)


# --------------------------------------------------------------------------------------------
# Shared by every algorithm (the vocabulary of simulator/algorithms/common.py)
# --------------------------------------------------------------------------------------------
class ZOConfig(Strict):
    """The zeroth-order estimator of every ZO party (client probes and server ZO steps)."""

    lam: PosFloat = Field(0.005, description="Smoothing radius lambda of the two-point estimate (paper: 0.005).")
    perturbations: bounded_int(1, MAX_PERTURBATIONS) = Field(1,  # type: ignore[valid-type]
        description="P: directions per estimate (a ZO client sends 2P perturbed activations).")
    direction: Literal["gaussian", "sphere"] = Field(
        "gaussian", description="u ~ N(0, I) (the authors' code, MeZO) or uniform on the sphere of radius sqrt(d) (the paper).")


#: Keys of earlier versions and what they are called now (a clear error instead of "unknown key").
RENAMED = {
    "eta_c": "lr_client", "eta_s": "lr_server", "eta_g": "lr_global",
    "lam": "zo.lam", "perturbations": "zo.perturbations", "direction": "zo.direction",
    "zo_lam": "zo.lam", "zo_perturbations": "zo.perturbations", "zo_direction": "zo.direction",
}


class TrainConfig(Strict):
    """The vocabulary every algorithm shares: one key, one meaning, in every algorithm.

    An algorithm that cannot honour a value refuses it at validation with the dotted key
    (``_refuse``), never by ignoring it. Momentum and weight decay apply to first-order steps;
    ZO steps are plain SGD (a momentum buffer would be the parameter copy ZO exists to avoid).
    """

    batch_size: BatchSize = Field(32, description="Minibatch size B.")
    local_steps: Optional[LocalSteps] = Field(5, description="Local iterations (minibatches) per client per round (null: use local_epochs).")
    local_epochs: Optional[LocalEpochs] = Field(None, description="Passes over the client's data per round, instead of local_steps.")
    client_optimizer: Literal["fo", "zo"] = Field(
        "fo", description="fo: backprop of dL/dh sent by the server; zo: two-point ZO from 2P perturbed activations.")
    server_optimizer: Literal["fo", "zo"] = Field(
        "fo", description="fo: backprop on the server part; zo: two-point ZO steps on the server part.")
    lr_client: PosFloat = Field(0.05, description="Client step size (the MU-SplitFed paper's eta_c).")
    lr_server: PosFloat = Field(0.05, description="Server step size (the MU-SplitFed paper's eta_s).")
    lr_global: PosFloat = Field(
        1.0, description="Global step of the aggregation x = x + lr_global * mean_m(x_m - x) (paper's eta_g; 1 = plain average).")
    momentum: bounded_float(ge=0, lt=1) = Field(0.0, description=  # type: ignore[valid-type]
       "SGD momentum of first-order steps (client and server).")
    weight_decay: NonNegFloat = Field(0.0, description="SGD weight decay of first-order steps (client and server).")
    aggregation: Literal["equal", "data_size"] = Field(
        "equal", description="Weights of the average of client (and server) parts: equal, or by client data size.")
    zo: ZOConfig = Field(default_factory=ZOConfig, description="The ZO estimator (used where an optimizer is zo).")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in RENAMED.items():
                if old in data:
                    raise KeyedValueError(f"algorithm.{old}", f"renamed to algorithm.{new} (one name for every algorithm)")
        return data

    @model_validator(mode="after")
    def _shared_rules(self):
        if (self.local_steps is None) == (self.local_epochs is None):
            raise KeyedValueError("algorithm.local_steps",
                                  "set exactly one of local_steps and local_epochs (the other to null)")
        if self.client_optimizer == "zo" and self.server_optimizer == "zo":
            for key in ("momentum", "weight_decay"):
                if getattr(self, key):
                    raise KeyedValueError(f"algorithm.{key}", f"applies to first-order steps, and both optimizers "
                                                              f"are zo (ZO steps keep no buffers); set {key}: 0")
        return self

    def steps_for(self, batches_per_epoch: int) -> int:
        """Local iterations of a client with ``batches_per_epoch`` minibatches per pass."""
        return self.local_steps if self.local_steps is not None else self.local_epochs * batches_per_epoch


def refuse(key: str, message: str) -> KeyedValueError:
    """The error of a shared key an algorithm cannot honour (raise it in a validator)."""
    return KeyedValueError(f"algorithm.{key}", message)


class RoundConfig(TrainConfig):
    """Round-based algorithms: a fraction of the clients takes part in each round."""

    participation: Fraction = Field(1.0, description="Fraction of clients taking part in each round.")


# --------------------------------------------------------------------------------------------
# SplitFed V1 and V2 (simulator/algorithms/splitfed.py)
# --------------------------------------------------------------------------------------------
class SplitFedConfig(RoundConfig):
    """SplitFed (shared by V1 and V2): first-order by default, ZO clients through client_optimizer."""

    @model_validator(mode="after")
    def _zo_server_needs_zo_client(self):
        if self.server_optimizer == "zo" and self.client_optimizer == "fo":
            raise refuse("server_optimizer", "a zo server computes no dL/dh for a first-order client; "
                                             "use client_optimizer: zo, or server_optimizer: fo")
        return self


class SplitFedV1Config(SplitFedConfig):
    """SplitFed V1: a server copy per client, averaged each round."""

    name: Literal["splitfed_v1"]


class SplitFedV2Config(SplitFedConfig):
    """SplitFed V2: one shared server model, updated in arrival order."""

    name: Literal["splitfed_v2"]


# --------------------------------------------------------------------------------------------
# MU-SplitFed and splitfed_zo (simulator/algorithms/mu_splitfed.py)
# Configuration (paper defaults: Table 6 of arXiv 2510.21155, one local iteration per round)
# --------------------------------------------------------------------------------------------
class ZOSplitConfig(RoundConfig):
    """Options shared by mu_splitfed and splitfed_zo (defaults: the paper's Table 6, as written)."""

    participation: Fraction = Field(0.5, description="Fraction of clients taking part in each round (paper: 5 of 10).")
    local_steps: Union[LocalSteps, None] = Field(
        1, description="Local iterations per client per round (paper's Algorithm 1 as written: 1); null: use local_epochs.")
    client_optimizer: Literal["fo", "zo"] = Field(
        "zo", description="zo: the paper's ZO client (2P perturbed activations); fo: backprop of dL/dh from the updated server copy.")
    server_optimizer: Literal["fo", "zo"] = Field(
        "zo", description="Server local steps: zeroth-order (the paper) or first-order SGD (backprop on the server part).")
    lr_client: PosFloat = Field(0.005, description="Client step size (paper: eta_c = 0.005).")
    lr_server: PosFloat = Field(0.01, description="Server step size of each of the tau local steps (paper: eta_s = 0.01).")
    lr_global: PosFloat = Field(0.3, description="Global step x = x + lr_global * mean_m(x_m - x), both sides (paper: eta_g = 0.3).")


class MUSplitFedConfig(ZOSplitConfig):
    """MU-SplitFed: tau unbalanced server steps per client and local iteration."""

    name: Literal["mu_splitfed"]
    tau: Union[TauSteps, Literal["adaptive"]] = Field(
        2, description="Server local steps per client and local iteration, or 'adaptive' (step until the perturbed activations arrive).")
    tau_max: TauSteps = Field(8, description="Most server steps per local iteration with tau: adaptive (ignored otherwise).")

    @model_validator(mode="after")
    def _adaptive_needs_zo_client(self):
        if self.tau == "adaptive" and self.client_optimizer == "fo":
            raise refuse("tau", "adaptive steps until the client's perturbed activations arrive, and a "
                                "first-order client sends none; use a fixed tau or client_optimizer: zo")
        return self


class SplitFedZOConfig(ZOSplitConfig):
    """The paper's vanilla SplitFed: MU-SplitFed with tau = 1."""

    name: Literal["splitfed_zo"]


# --------------------------------------------------------------------------------------------
# GAS (simulator/algorithms/gas.py)
# --------------------------------------------------------------------------------------------
class GASConfig(TrainConfig):
    """GAS (Yang & Liu, AAAI 2025). Defaults are the public code's settings for Fashion-MNIST.

    The shared vocabulary (``TrainConfig``) with GAS's meaning: ``local_steps`` is E, the local
    iterations before a client uploads (``local_epochs``: passes over its data instead);
    ``lr_global`` steps the model-buffer average; ``server_optimizer: zo`` is refused (the
    server update is one SGD step on real + generated activations); ``client_optimizer: zo``
    is MU-SplitFed's GAS variant.
    """

    name: Literal["gas"]
    local_steps: Optional[LocalSteps] = Field(20, description="E: local iterations before a client uploads and is replaced (null: use local_epochs).")
    lr_client: PosFloat = Field(0.01, description="Client learning rate.")
    lr_server: PosFloat = Field(0.01, description="Server learning rate.")
    momentum: bounded_float(ge=0, lt=1) = Field(0.9, description=  # type: ignore[valid-type]
       "SGD momentum of first-order steps (client and server).")
    weight_decay: NonNegFloat = Field(5e-4, description="SGD weight decay of first-order steps (client and server).")
    aggregation: Literal["data_size", "equal"] = Field(
        "data_size", description="Model-buffer average: data_size (paper) or equal (code).")
    zo: ZOConfig = Field(default_factory=lambda: ZOConfig(direction="sphere"),
                         description="The ZO estimator of client_optimizer: zo (default direction: sphere, the paper's).")
    active_clients: ClientCount = Field(10, description="Active clients C (at most data.num_clients).")
    activation_buffer: Optional[BufferSize] = Field(
        None, description="Q_s: minibatches per server update (null: active_clients, as the code).")
    model_buffer: Optional[BufferSize] = Field(
        None, description="Q_c: client models per global iteration (null: active_clients, as the code).")
    clip_norm: Optional[PosFloat] = Field(10.0, description="Clip client and server gradients to this norm (null: no clipping).")
    logit_adjustment: Bool = Field(True, description="Client loss CE(s + log p_k(y), y) with p_k the client's label frequencies.")
    generate: Bool = Field(True, description="Generate activations (false: the plain asynchronous SFL baseline).")
    covariance: Literal["full", "diagonal"] = Field(
        "full", description="Per-class covariance: full (the code for AlexNet) or diagonal (large activations).")
    stats_dtype: Literal["float32", "float64"] = Field("float32", description="dtype of the statistics and factors.")
    # ---- quirks of the public code (default = the paper's reading) -------------------------
    client_momentum: Literal["per_client", "shared"] = Field(
        "per_client", description="Client momentum: per_client (fresh per activation) or shared (code: one buffer for all).")
    weight_growth: Literal["paper", "code"] = Field(
        "paper", description="Activation weights: paper s(n) = n (server update index) or the code's counters.")
    merge_ridge: NonNegFloat = Field(0.0, description="Ridge added to the covariance at every merge (code: 1e-5).")
    truncate_to_batch: Bool = Field(
        False, description="When generating, cut classes with more than B real activations to B (code: true).")

    @model_validator(mode="after")
    def _server_is_first_order(self):
        if self.server_optimizer == "zo":
            raise refuse("server_optimizer", "gas's server update is one first-order SGD step on real + generated "
                                             "activations; ZO server steps are not implemented for gas")
        return self
