"""Split networks (named blocks), cutting them, and measuring the cost of a cut."""
from models.profile import CutProfile, profile_cut
from models.split import SplitModel, split
from models.zoo import MODELS, build_model

__all__ = ["MODELS", "CutProfile", "SplitModel", "build_model", "profile_cut", "split"]
