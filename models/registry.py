"""Every model a scenario can name: ``MODELS``, the one list of model names.

The scenario's ``model.name`` values, its image/text pairing check, its cut check, pre-flight
and ``sflsim list`` all read it. Each entry has ``name``, ``kind`` (``"image"`` or ``"text"``:
which datasets it takes), ``summary`` (one line), ``cut_range()`` (for ``sflsim list``) and
``check(cut, config, local_path)``, which raises ``ScenarioError`` naming the key when a
scenario's model section cannot work, before anything is built. Importing this module does not
import torch: the entries live in ``models.specs``; their builders in ``models.zoo``
(``BUILDERS``, built by ``build_model``) and ``models.text`` (``build_text_model``).

To add a model: write its builder and add one entry to ``models.specs.IMAGE_MODELS`` and
``models.zoo.BUILDERS`` (or, for a new text architecture, a branch of ``build_hf_model`` and
one entry to ``TEXT_MODEL_SPECS``).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol

from models.specs import IMAGE_MODELS, TEXT_MODEL_SPECS


class ModelSpec(Protocol):
    """What every ``MODELS`` entry has."""

    kind: str  # "image" (models.zoo.build_model) or "text" (models.text.build_text_model)
    name: str
    summary: str  # one line for `sflsim list` and docs/scenarios.md

    def check(self, cut: int, config: Optional[Mapping[str, Any]], local_path: Optional[str]) -> None: ...

    def cut_range(self) -> str: ...


#: Every model, image models first, in the order `sflsim list` and the schema show them.
MODELS: dict[str, ModelSpec] = {**IMAGE_MODELS, **TEXT_MODEL_SPECS}
