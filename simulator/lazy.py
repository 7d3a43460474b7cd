"""Modules imported on first use, so that validating a scenario never imports torch.

``torch = lazy_module("torch")`` binds a stand-in that imports the real module the first time
one of its attributes is read (``torch.from_numpy``, ``torch.Tensor``) and hands every lookup
on to it. Modules that the scenario schema imports but whose tensor code only runs during a
run (the dataset catalogue in ``simulator.data``) use it: ``sflsim validate``, ``schema`` and
``list`` then start in a fraction of a second, and code in those modules keeps writing
``torch.x`` as usual. Annotations need ``from __future__ import annotations`` (they stay text).
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class LazyModule(types.ModuleType):
    """A module that imports ``name`` on the first attribute read and delegates to it."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__"):  # copy/pickle/inspect probes: not a use
            raise AttributeError(attr)
        return getattr(importlib.import_module(self.__name__), attr)

    def __repr__(self) -> str:
        state = "imported" if self.__name__ in sys.modules else "not imported yet"
        return f"<lazy module {self.__name__!r} ({state})>"


def lazy_module(name: str) -> Any:
    """The module ``name`` if it is imported already, else a ``LazyModule`` standing in for it."""
    return sys.modules.get(name) or LazyModule(name)
