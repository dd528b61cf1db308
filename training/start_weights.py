"""What a fine-tune keeps of the weights it started from: three guards against forgetting that need no data.

Fine-tuning on a few corrected cases from a new scanner moves every weight, and the network forgets part of
what it knew (``benchmarks/adaptation.py``: the clean held-out block loses Dice). Replay of the original
data (``training.replay``) is one guard; these are the others.

- :class:`WeightAnchor` (``init.anchor_weight``): L2-SP, the "starting point as reference" penalty of
  Li, Grandvalet and Davoine (ICML 2018), ``weight / 2 * sum over loaded weights of (w - w0) ** 2`` in the
  loss, acting on every weight in proportion to how far it has moved.
- :class:`WeightMix` (``init.weight_mix``): weight-space ensembling of the result with the start (WiSE-FT,
  Wortsman et al., CVPR 2022). Training runs as usual; the model the run validates and saves is
  ``w0 + share * (w - w0)``, a point on the straight line between the start and the fine-tuned weights.
  ``init.weight_mix_layers`` gives chosen layers their own share (the fine-tune preset keeps the whole trained
  change of the decoder and less of the encoder: docs/benchmarks.md).
- :func:`train_only` (``init.train_only``): only the named parameters train; the rest keep their loaded
  values. The usual choice for a new scanner is the first encoder stages, where a U-Net keeps what depends
  on the acquisition (Shirokikh et al., MICCAI 2020), leaving the layers that hold the anatomy as they were.

Only what was loaded takes part: output heads started afresh for new classes (``init.reinit_heads``) are
neither anchored nor mixed, and a prompt network's new input channels start, and are anchored, at zero
like every other loaded weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

__all__ = ["WeightAnchor", "WeightMix", "anchor_penalty", "layer_share", "mixed_state", "train_only"]


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


def _matches(name: str, prefix: str) -> bool:
    """Whether ``prefix`` is ``name`` or a prefix of it ending at a dot boundary."""
    return name == prefix or name.startswith(prefix + ".")


def _check_prefixes(setting: str, prefixes: Iterable[str], names: Iterable[str], what: str) -> None:
    """ValueError naming every entry of ``prefixes`` that matches none of ``names``, with the groups there are."""
    names = list(names)
    unmatched = [p for p in prefixes if not any(_matches(n, p) for n in names)]
    if unmatched:
        groups = sorted({".".join(n.split(".")[:2]) for n in names})
        raise ValueError(
            f"{setting}: {', '.join(unmatched)} match no {what} of the network; its groups are "
            + ", ".join(groups)
        )


def layer_share(name: str, share: float, layers: Mapping[str, float] | None = None) -> float:
    """The share of the trained change that tensor ``name`` keeps: that of the longest prefix of ``layers``
    naming it (at a dot boundary), else ``share``."""
    named = [prefix for prefix in (layers or {}) if _matches(name, prefix)]
    return float(layers[max(named, key=len)]) if named else float(share)  # type: ignore[index]


def mixed_state(
    start: Mapping[str, Tensor],
    trained: Mapping[str, Tensor],
    share: float,
    layers: Mapping[str, float] | None = None,
) -> dict[str, Tensor]:
    """``trained`` with every floating-point tensor that ``start`` also holds, in the same shape, moved to
    ``start + s * (trained - start)``, s from :func:`layer_share` (``share``, or the share ``layers`` gives
    the tensor's prefix); the rest as it is."""
    return {
        k: start[k] + layer_share(k, share, layers) * (v.detach() - start[k])
        if v.is_floating_point() and k in start and start[k].shape == v.shape
        else v
        for k, v in trained.items()
    }


class WeightMix:
    """The start's floating-point state (weights and normalisation statistics) and the share of the trained
    change that the run's result keeps (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        start: Mapping[str, Tensor],
        share: float,
        layers: Mapping[str, float] | None = None,
    ):
        """``layers``: prefix (at a dot boundary) -> the share its tensors keep instead of ``share``."""
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share must be in (0, 1], got {share!r}")
        own = model.state_dict()
        layers = dict(layers or {})
        _check_prefixes("init.weight_mix_layers", layers, own, "tensor")
        self.share = float(share)
        self.layers = layers
        self._start = {
            k: v.detach().to(device=own[k].device, dtype=own[k].dtype).clone()
            for k, v in start.items()
            if k in own and own[k].is_floating_point() and own[k].shape == v.shape
        }
        if not self._start:
            raise ValueError("no floating-point tensor of the network is among the loaded weights")

    def mixed_state(self, trained: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``trained`` (a state dict of the same network) mixed with the start (:func:`mixed_state`)."""
        return mixed_state(self._start, trained, self.share, self.layers)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[dict[str, Tensor]]:
        """Inside the block ``model`` holds the mixed weights; after it, its trained weights again. Yields
        a copy of the trained state (what a resumed run must continue from)."""
        trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            model.load_state_dict(self.mixed_state(trained))
        try:
            yield trained
        finally:
            with torch.no_grad():
                model.load_state_dict(trained)

    def describe(self) -> str:
        by_layer = "".join(f"; {prefix} {share:g}" for prefix, share in self.layers.items())
        return (
            f"init.weight_mix {self.share:g}: the model validated and saved is the start plus {self.share:g} of "
            f"the trained change ({len(self._start)} tensors; WiSE-FT{by_layer}), training continues from the "
            "trained weights"
        )


def train_only(model: nn.Module, names: Iterable[str]) -> str:
    """Freeze (``requires_grad = False``) every parameter of ``model`` but those named in ``names``: a full
    parameter name, or a prefix ending at a dot boundary (``encoder.0`` covers ``encoder.0.conv.weight``, not
    ``encoder.01``). Call it before the optimizer is built. Returns the log line; a ValueError names any entry
    that matches no parameter, with the top-level groups there are."""
    names = tuple(names)
    params = dict(model.named_parameters())
    _check_prefixes("init.train_only", names, params, "parameter")
    trained = 0
    for param_name, param in params.items():
        keep = any(_matches(param_name, n) for n in names)
        param.requires_grad_(keep)
        trained += param.numel() if keep else 0
    total = sum(p.numel() for p in params.values())
    return (
        f"init.train_only {', '.join(names)}: {trained:,} of {total:,} parameters train "
        f"({trained / total:.1%}); the others keep their loaded values"
    )
