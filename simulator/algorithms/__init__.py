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
                                 "SplitFed V1: a server copy per client, averaged each round (first-order by default)"),
    "splitfed_v2": AlgorithmSpec("splitfed_v2", splitfed.SplitFedV2Config, splitfed.build_v2,
                                 "SplitFed V2: one shared server model, updated in arrival order (first-order by default)"),
    "mu_splitfed": AlgorithmSpec("mu_splitfed", mu_splitfed.MUSplitFedConfig, mu_splitfed.build,
                                 "MU-SplitFed: tau server steps per local iteration that fill idle time (ZO by default)"),
    "splitfed_zo": AlgorithmSpec("splitfed_zo", mu_splitfed.SplitFedZOConfig, mu_splitfed.build,
                                 "the MU-SplitFed paper's vanilla SplitFed: MU-SplitFed with tau 1 (ZO by default)"),
    "gas": AlgorithmSpec("gas", gas.GASConfig, gas.build,
                         "GAS: asynchronous SFL with activation/model buffers and generated activations"),
}
