"""Whether PDCR acts: the ratio of its gradient norm to the segmentation loss's, on the parameters both reach.

PDCR's strength depends on its reduction (the mean over b, i, j or the sum, a factor B * N^2 apart) and on its
weight, so a config can leave it far too weak to matter (docs/methods.md, "PDCR strength"). The trainer measures

    ratio = || d(weight * PDCR) / d theta || / || d(segmentation loss) / d theta ||,   theta = shared parameters,

on the first batch of every epoch (printed, and stored in metrics.jsonl as ``train.pdcr_grad_ratio``). The shared
parameters are the network's parameters that receive a gradient from both terms (the encoder and decoder stages up
to the deepest tap PDCR reads; not the segmentation heads, not PDCR's cross-layer projections).

The measurement is a separate forward pass of the bare network on that batch, with ``torch.autograd.grad``, so
it leaves the training step alone: random states (global and PDCR's generator) and normalisation buffers are
restored afterwards, and a run gives the same weights with or without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["pdcr_gradient_ratio"]


def pdcr_gradient_ratio(
    model: nn.Module,
    seg_loss: Callable[[list[Tensor], Tensor], Any],
    pdcr: nn.Module,
    image: Tensor,
    label: Tensor,
    *,
    generator: torch.Generator | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> float:
    """||grad of pdcr(...).loss|| / ||grad of seg_loss(...).loss|| over the parameters both reach.

    image (B, C, *S) float, label (B, *S) int64. ``generator`` is PDCR's (its state is restored); ``autocast``
    the run's autocast context factory. Returns nan when no parameter receives both gradients.
    """
    buffers = [b for m in (model, pdcr) for b in m.buffers()]
    saved = [b.detach().clone() for b in buffers]
    generator_state = generator.get_state() if generator is not None else None
    devices = [image.device] if image.device.type == "cuda" else []
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        with torch.random.fork_rng(devices=devices), (autocast or contextlib.nullcontext)():
            out = model(image)
            seg = seg_loss([out.logits, *out.deep_supervision], label).loss
            reg = pdcr(out.taps, label, generator=generator).loss
        grads_seg = torch.autograd.grad(seg, params, retain_graph=True, allow_unused=True)
        grads_reg = torch.autograd.grad(reg, params, allow_unused=True)
    finally:
        with torch.no_grad():
            for b, v in zip(buffers, saved):
                b.copy_(v)
        if generator is not None:
            generator.set_state(generator_state)
    shared = [(a, b) for a, b in zip(grads_seg, grads_reg) if a is not None and b is not None]
    if not shared:
        return float("nan")
    norm_seg = torch.sqrt(sum(a.float().pow(2).sum() for a, _ in shared))
    norm_reg = torch.sqrt(sum(b.float().pow(2).sum() for _, b in shared))
    return float(norm_reg / norm_seg) if float(norm_seg) > 0 else float("inf")
