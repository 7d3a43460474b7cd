"""Algorithm registry: one file per algorithm, one line here per algorithm name.

An entry pairs a config class (a pydantic model with ``name: Literal[...]``, which becomes a
branch of the scenario's ``algorithm`` section) with a builder ``build(ctx) -> algorithm``.
An algorithm object has ``process()`` (a SimPy generator that owns its own control flow and
calls ``ctx.sim.end_round`` when it completes a round or global iteration) and
``evaluate(x, y, batch_size) -> (accuracy, loss)`` for its current global model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from simulator.algorithms import splitfed
from simulator.algorithms import mu_splitfed
from simulator.algorithms import gas


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    config: type
    build: Callable[[Any], Any]
    summary: str


ALGORITHMS: dict[str, AlgorithmSpec] = {
    "splitfed_v1": AlgorithmSpec("splitfed_v1", splitfed.SplitFedV1Config, splitfed.build_v1,
                                 "SplitFed V1, first-order: a server copy per client, averaged each round"),
    "splitfed_v2": AlgorithmSpec("splitfed_v2", splitfed.SplitFedV2Config, splitfed.build_v2,
                                 "SplitFed V2, first-order: one shared server model, arrival order"),
    "mu_splitfed": AlgorithmSpec("mu_splitfed", mu_splitfed.MUSplitFedConfig, mu_splitfed.build,
                                 "MU-SplitFed: ZO clients, tau server steps per client filling idle time"),
    "splitfed_zo": AlgorithmSpec("splitfed_zo", mu_splitfed.SplitFedZOConfig, mu_splitfed.build,
                                 "SplitFed, zeroth-order (the MU-SplitFed paper's vanilla): MU-SplitFed with tau 1"),
    "gas": AlgorithmSpec("gas", gas.GASConfig, gas.build,
                         "GAS: asynchronous SFL with activation/model buffers and generated activations"),
}
