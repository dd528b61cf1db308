"""L2-SP, the pull of a fine-tuned network back toward the weights it started from (``init.anchor_weight``).

Fine-tuning on a few corrected cases from a new scanner moves every weight, and the network forgets part of
what it knew (``benchmarks/adaptation.py``: the clean held-out block loses Dice). Replay of the original
data (``training.replay``) is one guard; this is the other, the "starting point as reference" penalty of
Li, Grandvalet and Davoine (ICML 2018): ``weight / 2 * sum over loaded weights of (w - w0) ** 2``. It needs
no data, and it acts on every weight in proportion to how far it has moved.

Only the weights that were loaded are anchored: output heads started afresh for new classes
(``init.reinit_heads``) move freely, and a prompt network's new input channels are anchored at the zeros
they started from, like every other loaded weight.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["WeightAnchor", "anchor_penalty"]


def anchor_penalty(weights: Iterable[Tensor], anchors: Iterable[Tensor], weight: float) -> Tensor:
    """``weight / 2 * sum((w - w0) ** 2)`` over matching pairs, as a float32 scalar with gradient for
    ``weights``. Each pair must have equal shapes (ValueError naming both otherwise)."""
    total: Tensor | None = None
    for w, w0 in zip(weights, anchors, strict=True):
        if w.shape != w0.shape:
            raise ValueError(f"weight {tuple(w.shape)} and its anchor {tuple(w0.shape)} differ in shape")
        term = (w.float() - w0.float()).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no weights to anchor")
    return total * (0.5 * float(weight))


class WeightAnchor:
    """The loaded weights' starting values and the strength of the pull toward them.

    ``penalty()`` is the L2-SP term for the network's current weights (see the module docstring)."""

    def __init__(self, model: nn.Module, start: Mapping[str, Tensor], weight: float):
        """``start``: the loaded state by name (``training.init_weights.initial_state``); buffers in it
        (not trained) are not anchored."""
        params = dict(model.named_parameters())
        chosen = [n for n in start if n in params and params[n].requires_grad]
        if not chosen:
            raise ValueError("no trained parameter of the network is among the loaded weights")
        self.names = tuple(chosen)
        self.weight = float(weight)
        self._params = [params[n] for n in chosen]
        self._anchors = [
            start[n].detach().to(device=params[n].device, dtype=torch.float32).clone() for n in chosen
        ]

    def penalty(self) -> Tensor:
        return anchor_penalty(self._params, self._anchors, self.weight)

    def distance(self) -> float:
        """The root of the summed squared distance from the start, over the anchored weights (for the log)."""
        with torch.no_grad():
            total = sum(
                float((p.float() - a.float()).pow(2).sum()) for p, a in zip(self._params, self._anchors)
            )
        return total**0.5

    def describe(self) -> str:
        count = sum(a.numel() for a in self._anchors)
        return (
            f"init.anchor_weight {self.weight:g}: L2-SP pulls {len(self.names)} loaded weight tensors "
            f"({count} values) toward their starting values"
        )
