"""sflsim: a discrete-event wall-clock simulator for split federated learning with stragglers.

Notebook API::

    from simulator import load_scenario, run_scenario
    s = load_scenario("scenarios/quickstart.yaml", ["stop.rounds=3"])
    result = run_scenario(s, "runs/qs")
    result.metrics  # pandas DataFrame
"""
from __future__ import annotations

__all__ = ["load_scenario", "run_scenario"]


def __getattr__(name):  # lazy: importing the package stays cheap
    if name == "load_scenario":
        from simulator.scenario import load_scenario

        return load_scenario
    if name == "run_scenario":
        from simulator.runner import run_scenario

        return run_scenario
    raise AttributeError(name)
