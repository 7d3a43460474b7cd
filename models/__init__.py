"""Split networks (named blocks), cutting them, and measuring the cost of a cut.

``MODELS`` (models/registry.py) lists every model a scenario can name. The names below are
loaded on first use, so ``import models.registry`` (what the scenario schema needs) does not
import torch.
"""
from __future__ import annotations

import importlib

from models.split import SplitModel, split  # torch-free; bound here so `split` is the function

__all__ = ["MODELS", "CutProfile", "ModelSpec", "SplitModel", "build_model", "profile_cut",
           "profile_text_cut", "split"]

_WHERE = {"MODELS": "models.registry", "ModelSpec": "models.registry", "CutProfile": "models.profile",
          "profile_cut": "models.profile", "profile_text_cut": "models.profile",
          "build_model": "models.zoo"}


def __getattr__(name: str):  # lazy: importing the package stays cheap and torch-free
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
