"""UAFR: uncertainty-aware feature re-weighting (paper A, Eqs. 13-15).

A small head F maps the feature Q to M logits; U = normalised entropy of softmax(F(Q)) over the M channels,
in [0, 1]; the block returns Q * (1 + (1 - U)) = Q * (2 - U), a per-voxel gain in [1, 2] broadcast over
channels. F is trained only through this gating (no supervision, U not detached).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from training.models.blocks import activation, check_spatial_dims, conv
from training.models.blocks import norm as make_norm
from training.models.receptive_field import Geometry, propagate_geometry

__all__ = ["UAFR", "normalized_entropy", "normalized_entropy_from_logits"]


def normalized_entropy(probs: Tensor, dim: int = 1, eps: float = 1e-12) -> Tensor:
    """-sum_m p log p / log M along ``dim``, kept as a size-1 axis: (B, M, *S) -> (B, 1, *S) in [0, 1].

    ``probs`` must be a distribution along ``dim``. The log is taken of ``clamp(p, min=eps)`` so p = 0 adds
    exactly 0 (no xlogy/special.entr: both export badly with the TorchScript ONNX exporter). M = 1 gives
    zeros (the 0/0 of the formula), still attached to the graph.
    """
    m = probs.shape[dim]
    if m == 1:
        return probs * 0.0
    entropy = -(probs * probs.clamp(min=eps).log()).sum(dim=dim, keepdim=True)
    # Rounding can push the ratio a few ulps outside [0, 1].
    return (entropy / math.log(m)).clamp(0.0, 1.0)


def normalized_entropy_from_logits(logits: Tensor, dim: int = 1) -> Tensor:
    """Normalised entropy of softmax(logits) along ``dim``: (B, M, *S) -> (B, 1, *S) float32 in [0, 1].

    Exact (log_softmax, no eps) and computed in float32 so it stays accurate under bf16/fp16 autocast.
    """
    return _entropy_of_logits(logits, int(logits.shape[dim]), dim)


def _entropy_of_logits(logits: Tensor, m: int, dim: int = 1) -> Tensor:
    # ``m`` is passed as a Python int so a traced export sees a constant, not a shape-derived tensor.
    if m == 1:
        return logits.float() * 0.0
    log_p = torch.log_softmax(logits.float(), dim=dim)
    entropy = -(log_p.exp() * log_p).sum(dim=dim, keepdim=True)
    return (entropy / math.log(m)).clamp(0.0, 1.0)


class UAFR(nn.Module):
    """Uncertainty-aware feature re-weighting block.

    F = conv k (C -> hidden, no bias) -> norm -> ReLU -> conv 1 (hidden -> m, bias).
    ``forward(q)``: q (B, C, *S) -> (q * (2 - u) with shape (B, C, *S), u with shape (B, 1, *S)).
    m = 2 is the paper's default (its ablation, Table IX b); m = 1 makes u = 0, a plain x2 gain.
    ``use_f=False`` is Table IX a's variant without F: A = softmax(Q) over Q's own C channels, so U is their
    normalised entropy (m, hidden, kernel_size and norm are then unused) and the block has no parameters.
    """

    gives_uncertainty = True

    def __init__(
        self,
        channels: int,
        spatial_dims: int,
        m: int = 2,
        hidden: int = 16,
        kernel_size: int = 3,
        norm: str = "batch",
        use_f: bool = True,
    ):
        super().__init__()
        check_spatial_dims(spatial_dims)
        if m < 1 or hidden < 1 or channels < 1:
            raise ValueError(f"UAFR needs channels, m and hidden >= 1, got {channels=}, {m=}, {hidden=}")
        self.m = m if use_f else channels
        self.attention = (
            nn.Sequential(
                conv(spatial_dims, channels, hidden, kernel_size, bias=False),
                make_norm(norm, spatial_dims, hidden),
                activation("relu"),
                conv(spatial_dims, hidden, m, 1, bias=True),
            )
            if use_f
            else None
        )

    def forward(self, q: Tensor) -> tuple[Tensor, Tensor]:
        logits = q if self.attention is None else self.attention(q)
        u = _entropy_of_logits(logits, self.m).to(q.dtype)  # (B, 1, *S)
        return q * (2.0 - u), u

    def propagate_geometry(self, geometry: Geometry) -> Geometry:
        # The gate reads a k-neighbourhood of q, so the output's field is that of F (the identity path is inside).
        if self.attention is None:
            return geometry
        return geometry.merge(propagate_geometry(self.attention, geometry))
