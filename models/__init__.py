"""Split networks (named blocks), cutting them, and measuring the cost of a cut.

``MODELS`` (models/registry.py) lists every model a scenario can name.
"""
from models.profile import CutProfile, profile_cut, profile_text_cut
from models.registry import MODELS, ModelSpec
from models.split import SplitModel, split
from models.zoo import build_model

__all__ = ["MODELS", "CutProfile", "ModelSpec", "SplitModel", "build_model", "profile_cut",
           "profile_text_cut", "split"]
