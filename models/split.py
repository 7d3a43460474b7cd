"""Cut a named-block ``nn.Sequential`` into a client part and a server part.

``split`` never copies parameters: the two parts are new containers that hold the original
block modules, so training either part trains the original model. Callers that need separate
copies (per-client server copies, the Fed Server's average) make them explicitly.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by ``split`` itself: ``import models`` stays torch-free
    from torch import nn


@dataclass
class SplitModel:
    """The two halves of a model cut at user-facing cut number ``cut``."""

    client: nn.Sequential
    """Leading blocks, run by the client; its output is the cut-layer activation h."""
    server: nn.Sequential
    """Remaining blocks, run by the Split Server; its output is the logits."""
    cut: int
    """The user-facing cut number (a key of the model's ``cuts``)."""


def split(model: nn.Sequential, cut: int) -> SplitModel:
    """Cut ``model`` after the blocks that ``model.cuts[cut]`` gives to the client.

    Both parts hold the original block modules under their original names (no copy), so
    ``split.server(split.client(x))`` equals ``model(x)`` exactly. Raises ValueError for a cut
    the model does not define, naming the valid ones.
    """
    from torch import nn

    cuts = getattr(model, "cuts", None)
    if not isinstance(model, nn.Sequential) or not isinstance(cuts, dict):
        raise TypeError(
            "split needs an nn.Sequential of named blocks with a `cuts` dict "
            "(build it with models.zoo.build_model)"
        )
    valid = ", ".join(str(c) for c in sorted(cuts))
    if isinstance(cut, bool) or cut not in cuts:
        raise ValueError(f"invalid cut {cut!r} for this model; valid cuts: {valid}")
    n_client = cuts[cut]
    blocks = list(model.named_children())
    if not 0 < n_client < len(blocks):
        raise ValueError(
            f"cut {cut} gives {n_client} of {len(blocks)} blocks to the client; "
            "both parts must keep at least one block"
        )
    client = nn.Sequential(OrderedDict(blocks[:n_client]))
    server = nn.Sequential(OrderedDict(blocks[n_client:]))
    return SplitModel(client=client, server=server, cut=cut)
