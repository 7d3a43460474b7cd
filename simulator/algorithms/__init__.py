"""Algorithm registry: one file per algorithm, one line here per algorithm name.

An entry pairs a config class (a pydantic model with ``name: Literal[...]``, which becomes a
branch of the scenario's ``algorithm`` section) with a builder ``build(ctx) -> algorithm``.
An algorithm object has ``process()`` (a SimPy generator that owns its own control flow and
calls ``ctx.sim.end_round`` when it completes a round or global iteration) and
``evaluate(x, y, batch_size) -> (accuracy, loss)`` for its current global model.

Importing this registry must not import torch: the config classes live in the torch-free
``simulator.algorithms.configs`` (the scenario schema is built from them, so ``sflsim validate``
and ``sflsim schema`` stay fast), and an entry names its builder by module and function
(``builder``), imported on the first ``build(ctx)``. A new algorithm: its config class in
``configs.py``, its implementation in its own file, one line here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from simulator.algorithms import configs


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    config: type
    builder: tuple[str, str]  # (module, function): imported when the algorithm is built
    summary: str

    def build(self, ctx: Any) -> Any:
        """The algorithm object for a run context (imports its module, and torch, on first use)."""
        module, function = self.builder
        return getattr(importlib.import_module(module), function)(ctx)


_SPLITFED, _MU, _GAS = "simulator.algorithms.splitfed", "simulator.algorithms.mu_splitfed", "simulator.algorithms.gas"

ALGORITHMS: dict[str, AlgorithmSpec] = {
    "splitfed_v1": AlgorithmSpec("splitfed_v1", configs.SplitFedV1Config, (_SPLITFED, "build_v1"),
                                 "SplitFed V1: a server copy per client, averaged each round (first-order by default)"),
    "splitfed_v2": AlgorithmSpec("splitfed_v2", configs.SplitFedV2Config, (_SPLITFED, "build_v2"),
                                 "SplitFed V2: one shared server model, updated in arrival order (first-order by default)"),
    "mu_splitfed": AlgorithmSpec("mu_splitfed", configs.MUSplitFedConfig, (_MU, "build"),
                                 "MU-SplitFed: tau server steps per local iteration that fill idle time (ZO by default)"),
    "splitfed_zo": AlgorithmSpec("splitfed_zo", configs.SplitFedZOConfig, (_MU, "build"),
                                 "the MU-SplitFed paper's vanilla SplitFed: MU-SplitFed with tau 1 (ZO by default)"),
    "gas": AlgorithmSpec("gas", configs.GASConfig, (_GAS, "build"),
                         "GAS: asynchronous SFL with activation/model buffers and generated activations"),
}
