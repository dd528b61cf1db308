"""CCDC: class-confidence and confusion guided dynamic contrastive loss (Chen et al., Pattern Recognition 2024).

One code path for 2D and 3D. Everything the loss samples is drawn inside the current mini-batch (no memory bank)
from a caller-supplied ``torch.Generator``, so a fixed generator state gives the same loss twice.

Reading of the paper (see ``docs/methods.md`` §3 of the shared notes for the ambiguities):

* Statistics per class A present in the batch, from all GT pixels of A and the detached softmax ``p``:
  confidence ``D_A = mean_{i in A} p_i(A)`` (Eq. 1) and confusion ``D_A^c = mean_{i in A} p_i(c)``, c != A (Eq. 4).
* Core (positive key, Eq. 2): mean of the L2-normalised, *detached* pixel embeddings of A with ``p_i(A) > t_h``
  (t_h = 0.97), re-normalised. When no pixel of A passes t_h (common early in training) the core falls back to
  the mean over all pixels of A (``core_fallback="mean"``, ReCo's prototype) or over the ``core_topk`` most
  confident pixels of A (``"topk"``).
* Easy/hard split (Eq. 3): ``T_A = 1 - D_A``; a pixel of A is **easy if p_i(A) >= T_A and hard if p_i(A) < T_A**.
  A weak class (low D_A) gets a high threshold, so only its confident pixels count as easy; a strong class gets a
  low threshold, so only its really wrong pixels count as hard.
* Query ratio (§3.3.2): easy : hard = (1 - D_A) : D_A, i.e. ``n_easy = round(num_queries * (1 - D_A))``. An
  empty pool hands its quota to the other one. Queries are drawn with replacement and keep their gradient.
* Region-level queries (§3.5, Table 7 default "4 pixels, stride 1"): the mean of the normalised embeddings over
  the 2x2 (3D: 2x2x2) neighbourhood ``{x, x + s}^d`` with replicate padding at the far border, re-normalised.
  Only queries are region-level (the paper enhances the queries); cores and negatives are pixel-level.
* Negatives: ``num_negatives`` per query. The class of each slot is drawn from the other present classes with
  probability ∝ D_A^c (``"dynamic"``, Eq. 4 / Fig. 4), ∝ class pixel count (``"random"``: a uniformly random
  negative pixel) or uniformly over the classes (``"uniform"``); the pixel is then uniform within the class.
* Loss (Eqs. 5-7, exp(-s) with s read as the distance 1 - cos, which is standard InfoNCE): for each query
  ``-log( e^{q.z+/tau} / (e^{q.z+/tau} + sum_k e^{q.z_k/tau}) )``, mean over the queries of a class, then mean
  over the present classes (background included). Fewer than two present classes gives a zero loss that still
  carries a graph (keeps DDP graphs identical across ranks).

Keys, statistics and thresholds are detached; only the queries carry gradient. Normalisation and logits are
computed in fp32 whatever the autocast state.

The embedding is either a dense (B, E, *S) tensor or a ``ProjectedEmbedding``: the projection head with its
input (what the models return as ``output.projection``). The second gives the same loss and the same gradients
for a fraction of the cost: the head runs densely once without gradient, and its last 1x1 conv is never applied
to the map (norms, cores and key dot products are taken through it as a matrix, in the head's hidden width);
with gradient it runs only at the 2^d neighbours of each sampled query.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import CCDCConfig

__all__ = [
    "CCDCLoss",
    "ClassStatistics",
    "PixelSample",
    "ProjectedEmbedding",
    "ccdc_loss",
    "class_cores",
    "class_statistics",
    "easy_hard_threshold",
    "negative_class_weights",
    "query_split",
    "region_embeddings",
    "sample_pixels",
]

QueryMode = Literal["adaptive", "easy", "hard", "easy_to_hard"]
NegativeSampling = Literal["dynamic", "random", "uniform"]
CoreFallback = Literal["mean", "topk"]

_QUERY_MODES = ("adaptive", "easy", "hard", "easy_to_hard")
_NEGATIVE_SAMPLINGS = ("dynamic", "random", "uniform")
_CORE_FALLBACKS = ("mean", "topk")
# Floor on confusion-degree weights so a row of exact zeros still defines a distribution.
_CONFUSION_EPS = 1e-8
_NORM_EPS = 1e-12
# Above this many map elements (16 MiB in fp32, far beyond the cache) CPU gathers of negatives read memory in
# sorted order.
_SORTED_GATHER_MIN_ELEMENTS = 1 << 22
# Pixels per chunk when norms are computed through the projection head's last layer.
_NORM_CHUNK = 8192


@dataclass(frozen=True)
class ClassStatistics:
    """Per-class statistics of one mini-batch (all detached, on the probabilities' device).

    counts: (K,) int64, number of GT pixels of each class.
    confusion: (K, K) float32, ``confusion[A, c]`` = mean of p(c) over the GT pixels of A (zero rows for
        absent classes). Its diagonal is the confidence degree D_A, the off-diagonal the confusion degree D_A^c.
    """

    counts: Tensor
    confusion: Tensor

    @property
    def confidence(self) -> Tensor:
        """(K,) D_A, the mean predicted probability of A over the GT pixels of A (0 for absent classes)."""
        return torch.diagonal(self.confusion)

    @property
    def present(self) -> Tensor:
        """(K,) bool, classes with at least one GT pixel."""
        return self.counts > 0


def _check_inputs(embedding: Embedding, probs: Tensor, labels: Tensor) -> None:
    if not isinstance(embedding, Tensor) and not all(
        hasattr(embedding, name) for name in ("shape", "readout", "at")
    ):
        raise TypeError(
            f"embedding must be a tensor (B, E, *S) or a ProjectedEmbedding (shape, readout, at), "
            f"got {type(embedding).__name__}"
        )
    if len(embedding.shape) not in (4, 5):
        raise ValueError(
            f"embedding must be (B, E, H, W) or (B, E, D, H, W), got shape {tuple(embedding.shape)}"
        )
    batch, spatial = embedding.shape[0], tuple(embedding.shape[2:])
    if probs.dim() != len(embedding.shape) or probs.shape[0] != batch or tuple(probs.shape[2:]) != spatial:
        raise ValueError(
            f"probs must be (B, K, *S) matching embedding (B, E, *S): probs {tuple(probs.shape)}, "
            f"embedding {tuple(embedding.shape)}"
        )
    if tuple(labels.shape) != (batch, *spatial):
        raise ValueError(
            f"labels must be (B, *S) matching embedding (B, E, *S): labels {tuple(labels.shape)}, "
            f"embedding {tuple(embedding.shape)}"
        )
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64, got {labels.dtype} (shape {tuple(labels.shape)})")
    if probs.shape[1] < 1:
        raise ValueError(f"probs needs at least one class channel, got shape {tuple(probs.shape)}")


def class_statistics(probs: Tensor, labels: Tensor, *, ignore_index: int | None = None) -> ClassStatistics:
    """Confidence and confusion degrees (paper B Eqs. 1 and 4) of one mini-batch.

    probs (B, K, *S) softmax probabilities, labels (B, *S) int64 in [0, K) (or ``ignore_index``) -> statistics
    pooled over every pixel of the batch. Computed without gradient, in fp32.
    """
    if probs.dim() < 3 or tuple(labels.shape) != (probs.shape[0], *probs.shape[2:]):
        raise ValueError(
            f"labels must be (B, *S) for probs (B, K, *S): labels {tuple(labels.shape)}, probs {tuple(probs.shape)}"
        )
    num_classes = probs.shape[1]
    batch = probs.shape[0]
    with torch.no_grad():
        flat_labels = labels.reshape(batch, -1)  # (B, N_b)
        _check_label_range(flat_labels, num_classes, ignore_index)
        if ignore_index is not None:
            flat_labels = torch.where(flat_labels == ignore_index, num_classes, flat_labels)
        flat_probs = probs.detach().float().reshape(batch, num_classes, -1)  # (B, K, N_b)
        # sums[b, c, A] = sum of p(c) over the pixels of image b labelled A; column K collects ignored pixels.
        sums = torch.zeros(batch, num_classes, num_classes + 1, dtype=torch.float32, device=probs.device)
        sums.scatter_add_(2, flat_labels.unsqueeze(1).expand(-1, num_classes, -1), flat_probs)
        counts = torch.bincount(flat_labels.reshape(-1), minlength=num_classes + 1)[:num_classes]
        confusion = sums.sum(0)[:, :num_classes].t() / counts.clamp_min(1).unsqueeze(1).float()  # (A, c)
    return ClassStatistics(counts=counts, confusion=confusion)


def _check_label_range(labels: Tensor, num_classes: int, ignore_index: int | None) -> None:
    if labels.numel() == 0:
        return
    checked = labels if ignore_index is None else torch.where(labels == ignore_index, 0, labels)
    low, high = int(checked.min()), int(checked.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for {num_classes} classes (or equal ignore_index="
            f"{ignore_index}), got values in [{low}, {high}]"
        )


def easy_hard_threshold(
    confidence: Tensor, *, adaptive: bool = True, fixed_threshold: float = 0.97
) -> Tensor:
    """Per-class easy/hard threshold (Eq. 3): (K,) D_A -> (K,) T_A = 1 - D_A, or ``fixed_threshold`` everywhere.

    A pixel i of class A is easy when p_i(A) >= T_A and hard when p_i(A) < T_A.
    """
    if adaptive:
        return 1.0 - confidence
    return torch.full_like(confidence, float(fixed_threshold))


def query_split(
    confidence: Tensor,
    num_queries: int,
    *,
    easy_available: Tensor,
    hard_available: Tensor,
    query_mode: QueryMode = "adaptive",
    adaptive_ratio: bool = True,
    fixed_easy_fraction: float = 0.5,
    progress: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Number of easy and hard queries per class: (K,) each, summing to ``num_queries``.

    confidence (K,) D_A; easy_available / hard_available (K,) bool, whether each pool is non-empty.
    ``query_mode``: "adaptive" (the paper's dynamic sampling; easy fraction 1 - D_A, or ``fixed_easy_fraction``
    when ``adaptive_ratio`` is off), "easy" / "hard" (Table 5 single-pool baselines), "easy_to_hard" (Table 5
    schedule: easy fraction 1 - ``progress``, progress in [0, 1] being the fraction of training done).
    An empty pool hands its quota to the other.
    """
    if query_mode == "adaptive":
        easy_fraction = (
            (1.0 - confidence) if adaptive_ratio else torch.full_like(confidence, fixed_easy_fraction)
        )
    elif query_mode == "easy":
        easy_fraction = torch.ones_like(confidence)
    elif query_mode == "hard":
        easy_fraction = torch.zeros_like(confidence)
    elif query_mode == "easy_to_hard":
        if progress is None or not 0.0 <= progress <= 1.0:
            raise ValueError(f"query_mode='easy_to_hard' needs progress in [0, 1], got {progress!r}")
        easy_fraction = torch.full_like(confidence, 1.0 - progress)
    else:
        raise ValueError(f"query_mode must be one of {_QUERY_MODES}, got {query_mode!r}")
    n_easy = torch.round(easy_fraction.clamp(0.0, 1.0) * num_queries).long()
    n_easy = torch.where(easy_available, n_easy, torch.zeros_like(n_easy))
    n_easy = torch.where(hard_available, n_easy, torch.full_like(n_easy, num_queries))
    n_easy = torch.where(easy_available | hard_available, n_easy, torch.zeros_like(n_easy))
    n_hard = torch.where(easy_available | hard_available, num_queries - n_easy, torch.zeros_like(n_easy))
    return n_easy, n_hard


def negative_class_weights(stats: ClassStatistics, negative_sampling: NegativeSampling = "dynamic") -> Tensor:
    """Unnormalised probabilities of drawing each negative class: (K, K), row A for queries of class A.

    Zero on the diagonal and for absent classes. "dynamic": D_A^c (floored at a tiny epsilon so that a row of
    zero confusion falls back to uniform); "random": the pixel count of c (a uniformly random negative pixel);
    "uniform": 1 for every present negative class.
    """
    present = stats.present
    num_classes = present.shape[0]
    allowed = present.unsqueeze(0) & ~torch.eye(num_classes, dtype=torch.bool, device=present.device)
    if negative_sampling == "dynamic":
        weights = stats.confusion.clamp_min(_CONFUSION_EPS)
    elif negative_sampling == "random":
        weights = stats.counts.float().unsqueeze(0).expand(num_classes, -1)
    elif negative_sampling == "uniform":
        weights = torch.ones(num_classes, num_classes, device=present.device)
    else:
        raise ValueError(f"negative_sampling must be one of {_NEGATIVE_SAMPLINGS}, got {negative_sampling!r}")
    return torch.where(allowed, weights, torch.zeros_like(weights))


class ProjectedEmbedding(Protocol):
    """An embedding map (B, E, *S) that CCDC reads through its projection head instead of as a dense tensor
    (``training.models.output.ProjectionInput`` is one).

    shape: (B, E, *S).
    readout(): detached ``(hidden (B, H, *S), weight (E, H), bias (E,))``; the embedding at every pixel is
        ``weight @ hidden + bias`` (the head ends with a 1x1 conv).
    at(flat_index): (...) int64 indices into the flattened (B, *S) grid -> (..., E) embeddings there, with
        gradient; equal to the dense map at those pixels.

    Only the queries carry gradient, so the loss needs the head's gradient at the sampled query pixels alone
    (``at``), and builds keys and cores from ``readout`` without ever forming the (B, E, *S) map.
    """

    @property
    def shape(self) -> torch.Size: ...

    def readout(self) -> tuple[Tensor, Tensor, Tensor]: ...

    def at(self, flat_index: Tensor) -> Tensor: ...


Embedding = Tensor | ProjectedEmbedding


@dataclass(frozen=True)
class _KeyMap:
    """The detached embedding map keys and cores come from, as ``weight @ hidden + bias`` at every pixel.

    hidden (B, H, N) flattened pixels; weight (E, H) and bias (E,), or both None when hidden is the embedding
    itself (a dense tensor input). With a projection head H is its hidden width (16 for an E = 64 head on a
    16-channel decoder), so every pass over the map touches H channels instead of E.
    """

    hidden: Tensor
    weight: Tensor | None = None
    bias: Tensor | None = None

    @classmethod
    def of(cls, embedding: Embedding) -> _KeyMap:
        if isinstance(embedding, Tensor):
            detached = embedding.detach()
            return cls(detached.reshape(*detached.shape[:2], -1))
        hidden, weight, bias = embedding.readout()
        return cls(
            hidden.detach().reshape(*hidden.shape[:2], -1), weight.detach().float(), bias.detach().float()
        )

    def inverse_norm(self) -> Tensor:
        """1 / ||e_i|| of every pixel: (B, N) fp32.

        A dense map: a loop over its E channels that accumulates in place (reducing the strided channel axis in
        one call, or squaring the whole map first, is several times slower on CPU for (B, E, 96^3) maps).
        Through a head: ||W r + b||^2 = r . (W^T W r + 2 W^T b) + ||b||^2, H^2 instead of H E per pixel, in
        chunks of pixels so that the (B, H, chunk) intermediate stays in cache.
        """
        z = self.hidden
        batch, _, pixels = z.shape
        if self.weight is None:
            squared = torch.zeros(batch, pixels, dtype=torch.float32, device=z.device)
            for channel in range(z.shape[1]):
                plane = z[:, channel].float()
                squared.addcmul_(plane, plane)
        else:
            gram = self.weight.t() @ self.weight  # (H, H)
            linear = 2.0 * (self.weight.t() @ self.bias)  # (H,)
            squared = torch.empty(batch, pixels, dtype=torch.float32, device=z.device)
            for start in range(0, pixels, _NORM_CHUNK):
                chunk = z[:, :, start : start + _NORM_CHUNK].float()  # (B, H, n)
                partner = torch.baddbmm(
                    linear.view(1, -1, 1).expand(batch, -1, 1), gram.expand(batch, -1, -1), chunk
                )  # (B, H, n)
                squared[:, start : start + _NORM_CHUNK] = partner.mul_(chunk).sum(1)
            squared += self.bias.square().sum()
        return squared.clamp_min(_NORM_EPS**2).rsqrt()

    def embed(self, sums: Tensor, totals: Tensor) -> Tensor:
        """Weighted sums of embeddings from weighted sums of hidden vectors: sums (..., H), totals (...) the
        summed pixel weights -> (..., E) fp32."""
        if self.weight is None:
            return sums.float()
        return sums.float() @ self.weight.t() + totals.float().unsqueeze(-1) * self.bias

    def query_keys(self, queries: Tensor) -> tuple[Tensor, Tensor | None]:
        """(R, E) queries -> (R, H) and (R,) or None, with q . e_i = q_h . hidden_i + offset for every pixel i.

        The head's weights are detached here: keys carry no gradient, not even into the head.
        """
        if self.weight is None:
            return queries, None
        return queries @ self.weight, queries @ self.bias


def _matmul_dtype(embedding: Tensor) -> torch.dtype:
    # Pixel-wide reductions stay in the embedding's own dtype (no fp32 copy of a (B, E, *S) map); matmul
    # accumulates in fp32 on every backend, and only the tiny (K, E) result is used further.
    return (
        embedding.dtype
        if embedding.dtype in (torch.float16, torch.bfloat16, torch.float32)
        else torch.float32
    )


def class_cores(
    embedding: Embedding,
    p_true: Tensor,
    labels: Tensor,
    counts: Tensor,
    *,
    strong_threshold: float = 0.97,
    core_fallback: CoreFallback = "mean",
    core_topk: int = 32,
) -> Tensor:
    """Class cores (Eq. 2), detached: (K, E) fp32, unit norm (zero rows for absent classes).

    embedding (B, E, *S) not normalised (a tensor or a ``ProjectedEmbedding``); p_true (B, *S) the probability
    of each pixel's own GT class; labels (B, *S) int64 in [0, K], K marking ignored pixels; counts (K,) GT pixel
    counts. Core of A = normalised mean of the normalised embeddings of the pixels of A with p_true >
    strong_threshold; when none passes, the mean over all pixels of A ("mean") or over its ``core_topk`` most
    confident ("topk").
    """
    if core_fallback not in _CORE_FALLBACKS:
        raise ValueError(f"core_fallback must be one of {_CORE_FALLBACKS}, got {core_fallback!r}")
    with torch.no_grad(), torch.autocast(labels.device.type, enabled=False):
        keys = _KeyMap.of(embedding)
        return _cores(
            keys, keys.inverse_norm(), p_true, labels, counts, strong_threshold, core_fallback, core_topk
        )


def _cores(
    keys: _KeyMap,
    inv_norm: Tensor,
    p_true: Tensor,
    labels: Tensor,
    counts: Tensor,
    strong_threshold: float,
    core_fallback: CoreFallback,
    core_topk: int,
) -> Tensor:
    """:func:`class_cores` on a key map with its (B, N) inverse norms: -> (K, E) fp32 unit rows."""
    num_classes = counts.shape[0]
    batch = keys.hidden.shape[0]
    flat_labels = labels.reshape(batch, -1)
    strong = p_true.reshape(batch, -1) > strong_threshold
    sums, totals = _class_sums(keys.hidden, flat_labels, torch.where(strong, inv_norm, 0.0), num_classes)
    cores = keys.embed(sums, totals)
    # Inverse norms are positive, so a class has strong pixels exactly when its summed weight is positive.
    missing = (totals == 0) & (counts > 0)
    if bool(missing.any()):
        if core_fallback == "mean":
            fallback = _class_sums(keys.hidden, flat_labels, inv_norm, num_classes)
        else:
            fallback = _topk_sums(keys.hidden, inv_norm, p_true, flat_labels, num_classes, core_topk)
        cores = torch.where(missing.unsqueeze(1), keys.embed(*fallback), cores)
    return F.normalize(cores, dim=1, eps=_NORM_EPS)


def _class_sums(
    z: Tensor, flat_labels: Tensor, pixel_weight: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """Per-class weighted sums of pixel vectors and of the weights: z (B, H, N), labels (B, N), weights (B, N)
    -> (K, H) fp32 and (K,) fp32."""
    batch, _, per_image = z.shape
    dtype = _matmul_dtype(z)
    # (B, K + 1, N) one-hot rows carrying the pixel weight; row K collects ignored pixels and is dropped.
    selector = torch.zeros(batch, num_classes + 1, per_image, dtype=dtype, device=z.device)
    selector.scatter_(1, flat_labels.unsqueeze(1), pixel_weight.unsqueeze(1).to(dtype))
    sums = torch.bmm(selector, z.to(dtype).transpose(1, 2)).float().sum(0)[:num_classes]
    totals = torch.zeros(num_classes + 1, dtype=torch.float32, device=z.device)
    totals.index_add_(0, flat_labels.reshape(-1), pixel_weight.reshape(-1).float())
    return sums, totals[:num_classes]


def _topk_sums(
    z: Tensor, inv_norm: Tensor, p_true: Tensor, flat_labels: Tensor, num_classes: int, k: int
) -> tuple[Tensor, Tensor]:
    """Per-class sums of the normalised vectors of the k most confident pixels of each class, and of their
    weights: (K, H) and (K,)."""
    per_image = z.shape[2]
    scores = torch.where(
        flat_labels.reshape(1, -1) == torch.arange(num_classes, device=z.device).view(-1, 1),
        p_true.reshape(1, -1).float(),
        torch.full((), -1.0, device=z.device),
    )  # (K, N): -1 marks pixels of other classes
    top_scores, top_index = scores.topk(min(k, scores.shape[1]), dim=1)  # (K, k)
    vectors = z[top_index // per_image, :, top_index % per_image].float()  # (K, k, H)
    weight = (top_scores >= 0).float() * inv_norm.reshape(-1)[top_index]
    return (vectors * weight.unsqueeze(-1)).sum(1), weight.sum(1)


def _gather(embedding: Tensor, flat_index: Tensor) -> Tensor:
    """Vectors at flat (B, *S) pixel indices: embedding (B, E, *S), flat_index (...) -> (..., E), same dtype."""
    batch, dim = embedding.shape[:2]
    flat = embedding.reshape(batch, dim, -1)
    per_image = flat.shape[2]
    return flat[flat_index // per_image, :, flat_index % per_image]


def _lookup(embedding: Embedding, flat_index: Tensor) -> Tensor:
    """Embeddings at flat (B, *S) pixel indices, with gradient: (...) -> (..., E)."""
    return _gather(embedding, flat_index) if isinstance(embedding, Tensor) else embedding.at(flat_index)


def _gather_detached(embedding: Tensor, flat_index: Tensor) -> Tensor:
    """Like :func:`_gather`, without gradient: (R,) -> (R, E).

    On CPU, for maps far larger than the cache, the indices are sorted first: unsorted reads across the E
    channel planes of a (B, E, 96^3) map miss the cache and take about twice as long. Small maps and GPUs
    gather directly (the sort would cost more than it saves).
    """
    with torch.no_grad():
        embedding = embedding.detach()
        if embedding.device.type != "cpu" or embedding.numel() < _SORTED_GATHER_MIN_ELEMENTS:
            return _gather(embedding, flat_index)
        sorted_index, permutation = torch.sort(flat_index)
        vectors = _gather(embedding, sorted_index)  # (R, E) in sorted order
        inverse = torch.empty_like(permutation)
        inverse[permutation] = torch.arange(permutation.numel(), device=permutation.device)
        return vectors.index_select(0, inverse)  # row gather: faster than scattering rows back


def region_embeddings(
    embedding: Embedding, flat_index: Tensor, *, stride: int = 1, region: bool = True, size: int = 4
) -> Tensor:
    """Normalised (region-level) embeddings at chosen pixels, fp32, with gradient: (Q,) -> (Q, E).

    embedding (B, E, *S), a tensor or a ``ProjectedEmbedding`` (evaluated at the needed pixels only); flat_index
    (Q,) int64 indices into the flattened (B, *S) grid. With ``region`` the vector is the mean of the normalised
    embeddings at ``x + o`` for o in {0, stride}^d (``size`` 4: 2x2 in 2D, 2x2x2 in 3D) or o in {0, stride * e}
    with e the last axis (``size`` 2: the pixel and its horizontal neighbour, Table 7's two-pixel row);
    coordinates past the last row/column are clamped (replicate padding); the mean is re-normalised.
    """
    if not region:
        return F.normalize(_lookup(embedding, flat_index).float(), dim=-1, eps=_NORM_EPS)
    if stride < 1:
        raise ValueError(f"region_stride must be >= 1, got {stride}")
    if size not in (2, 4):
        raise ValueError(f"region_size must be 2 or 4, got {size}")
    spatial = tuple(embedding.shape[2:])
    per_image = math.prod(spatial)
    b_index, s_index = flat_index // per_image, flat_index % per_image
    coords = torch.stack(torch.unravel_index(s_index, spatial), dim=-1)  # (Q, d)
    if size == 4:
        corners = torch.cartesian_prod(*[torch.tensor([0, stride], device=coords.device)] * len(spatial))
        corners = corners.view(-1, len(spatial))  # (2^d, d)
    else:
        corners = torch.zeros(2, len(spatial), dtype=torch.int64, device=coords.device)
        corners[1, -1] = stride  # (2, d): the pixel and its neighbour along the last axis
    extent = torch.tensor(spatial, device=coords.device)
    shifted = torch.minimum(coords.unsqueeze(1) + corners.unsqueeze(0), extent - 1)  # (Q, R, d), R = 2^d or 2
    place = torch.tensor([math.prod(spatial[i + 1 :]) for i in range(len(spatial))], device=coords.device)
    neighbours = b_index.unsqueeze(1) * per_image + (shifted * place).sum(-1)  # (Q, R) flat indices
    vectors = F.normalize(_lookup(embedding, neighbours).float(), dim=-1, eps=_NORM_EPS)  # (Q, R, E)
    return F.normalize(vectors.mean(1), dim=-1, eps=_NORM_EPS)


def _uniform_index(start: Tensor, count: Tensor, generator: torch.Generator | None) -> Tensor:
    """One uniform draw from each range [start, start + count) (count >= 1): (...) -> (...) int64."""
    u = torch.rand(start.shape, generator=generator, dtype=torch.float64, device=start.device)
    offset = torch.minimum((u * count).long(), count - 1)
    return start + offset


@dataclass(frozen=True)
class PixelSample:
    """Pixels drawn for one CCDC step, as flat indices into the (B, *S) grid.

    classes: (P,) the present classes, ascending; query_pixel: (P, Q) queries of each class; query_hard: (P, Q)
    bool, whether each query came from the hard pool; negative_pixel: (P, Q, N_neg) negatives of each query.
    """

    classes: Tensor
    query_pixel: Tensor
    query_hard: Tensor
    negative_pixel: Tensor


def sample_pixels(
    stats: ClassStatistics,
    p_true: Tensor,
    labels: Tensor,
    *,
    num_queries: int,
    num_negatives: int,
    threshold: Tensor,
    query_mode: QueryMode = "adaptive",
    adaptive_ratio: bool = True,
    fixed_easy_fraction: float = 0.5,
    progress: float | None = None,
    negative_sampling: NegativeSampling = "dynamic",
    generator: torch.Generator | None = None,
) -> PixelSample:
    """Draw the queries and negatives of every present class, with replacement, from ``generator``.

    p_true (B, *S) probability of each pixel's own GT class; labels (B, *S) int64 in [0, K], K marking ignored
    pixels; threshold (K,) easy/hard threshold T_A (easy: p >= T_A). Queries of A: ``query_split`` easy ones
    uniform over the easy pool of A, the rest uniform over its hard pool. Negatives: class c drawn with
    probability ∝ ``negative_class_weights``, then a pixel uniform over all pixels of c.
    """
    num_classes = stats.counts.shape[0]
    device = labels.device
    flat_labels = labels.reshape(-1)
    # Group of every pixel: 2A (easy pixel of A), 2A + 1 (hard pixel of A), 2K (ignored). Sorting pixels by group
    # once makes every pool, and every class (groups 2A and 2A + 1), a contiguous range of ``order``.
    padded_threshold = torch.cat([threshold.float(), threshold.new_zeros(1, dtype=torch.float32)])
    hard = p_true.reshape(-1) < padded_threshold[flat_labels]  # ignored pixels: p < 0 never holds
    group = 2 * flat_labels + hard.long()
    key_dtype = torch.uint8 if 2 * num_classes <= 255 else torch.int32
    order = torch.sort(group.to(key_dtype), stable=True).indices  # (N,) pixel indices, grouped
    group_count = torch.bincount(group, minlength=2 * num_classes + 1)[: 2 * num_classes]
    group_start = torch.cumsum(group_count, 0) - group_count  # (2K,)

    n_easy, _ = query_split(
        stats.confidence,
        num_queries,
        easy_available=group_count[0::2] > 0,
        hard_available=group_count[1::2] > 0,
        query_mode=query_mode,
        adaptive_ratio=adaptive_ratio,
        fixed_easy_fraction=fixed_easy_fraction,
        progress=progress,
    )
    sample_device = generator.device if generator is not None else device
    classes = stats.present.nonzero().flatten()  # (P,)
    num_present = classes.numel()

    # Slot j of class A is easy when j < n_easy[A].
    slot = torch.arange(num_queries, device=device).unsqueeze(0)  # (1, Q)
    query_hard = slot >= n_easy[classes].unsqueeze(1)  # (P, Q)
    query_group = 2 * classes.unsqueeze(1) + query_hard.long()
    query_pos = _uniform_index(
        group_start[query_group].to(sample_device), group_count[query_group].to(sample_device), generator
    ).to(device)

    weights = negative_class_weights(stats, negative_sampling)[classes]  # (P, K)
    negative_class = torch.multinomial(
        weights.to(sample_device), num_queries * num_negatives, replacement=True, generator=generator
    ).to(device)  # (P, Q * N_neg)
    class_start = group_start[0::2]
    negative_pos = _uniform_index(
        class_start[negative_class].to(sample_device),
        stats.counts[negative_class].to(sample_device),
        generator,
    ).to(device)
    return PixelSample(
        classes=classes,
        query_pixel=order[query_pos],
        query_hard=query_hard,
        negative_pixel=order[negative_pos].reshape(num_present, num_queries, num_negatives),
    )


def ccdc_loss(
    embedding: Embedding,
    probs: Tensor,
    labels: Tensor,
    *,
    temperature: float = 0.5,
    strong_threshold: float = 0.97,
    num_queries: int = 256,
    num_negatives: int = 256,
    region: bool = True,
    region_stride: int = 1,
    region_size: int = 4,
    adaptive_threshold: bool = True,
    fixed_threshold: float = 0.97,
    adaptive_ratio: bool = True,
    fixed_easy_fraction: float = 0.5,
    query_mode: QueryMode = "adaptive",
    progress: float | None = None,
    negative_sampling: NegativeSampling = "dynamic",
    core_fallback: CoreFallback = "mean",
    core_topk: int = 32,
    ignore_index: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """CCDC loss of one mini-batch (module docstring gives the exact reading of the paper).

    embedding (B, E, *S) projection-head output, not normalised (normalised here, in fp32): either the dense
    tensor, or a ``ProjectedEmbedding`` (the model output's ``projection``), which gives the same loss and the
    same gradients while evaluating the head with gradient at the sampled query pixels only; probs (B, K, *S)
    softmax probabilities at the same resolution (detached here); labels (B, *S) int64 in [0, K) or
    ``ignore_index`` -> scalar fp32 loss. *S is (H, W) or (D, H, W).

    Ablation switches (paper B Tables 4-7): ``adaptive_threshold=False`` uses ``fixed_threshold`` for the
    easy/hard split; ``adaptive_ratio=False`` uses ``fixed_easy_fraction`` of easy queries; ``query_mode``
    "easy" / "hard" / "easy_to_hard" (with ``progress``) are the Table 5 baselines; ``region=False`` is the
    pixel-level variant, ``region_stride=2`` the dilated region, ``region_size=2`` the two-pixel region (Table 7);
    ``negative_sampling`` "random" / "uniform" /
    "dynamic" are the Table 6 rows. All sampling uses ``generator`` (its device is where indices are drawn).
    """
    _check_inputs(embedding, probs, labels)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if num_queries < 1 or num_negatives < 1:
        raise ValueError(f"num_queries and num_negatives must be >= 1, got {num_queries} and {num_negatives}")
    if query_mode not in _QUERY_MODES:
        raise ValueError(f"query_mode must be one of {_QUERY_MODES}, got {query_mode!r}")
    if negative_sampling not in _NEGATIVE_SAMPLINGS:
        raise ValueError(f"negative_sampling must be one of {_NEGATIVE_SAMPLINGS}, got {negative_sampling!r}")
    if core_fallback not in _CORE_FALLBACKS:
        raise ValueError(f"core_fallback must be one of {_CORE_FALLBACKS}, got {core_fallback!r}")

    num_classes = probs.shape[1]
    device = probs.device
    stats = class_statistics(probs, labels, ignore_index=ignore_index)
    if int(stats.present.sum()) < 2:
        # Zero that is still connected to the graph: every parameter upstream gets a (zero) gradient.
        return _lookup(embedding, torch.zeros(1, dtype=torch.long, device=device)).float().sum() * 0.0

    with torch.no_grad():
        safe_labels = labels if ignore_index is None else torch.where(labels == ignore_index, 0, labels)
        p_true = probs.detach().gather(1, safe_labels.unsqueeze(1)).squeeze(1).float()  # (B, *S)
        # Ignored pixels get class K from here on: they match no class row below.
        class_labels = (
            labels if ignore_index is None else torch.where(labels == ignore_index, num_classes, labels)
        )
        keys = _KeyMap.of(embedding)  # (B, H, N) detached
        with torch.autocast(device.type, enabled=False):
            inv_norm = keys.inverse_norm()  # (B, N)
            cores = _cores(
                keys, inv_norm, p_true, class_labels, stats.counts, strong_threshold, core_fallback, core_topk
            )  # (K, E)
        sample = sample_pixels(
            stats,
            p_true,
            class_labels,
            num_queries=num_queries,
            num_negatives=num_negatives,
            threshold=easy_hard_threshold(
                stats.confidence, adaptive=adaptive_threshold, fixed_threshold=fixed_threshold
            ),
            query_mode=query_mode,
            adaptive_ratio=adaptive_ratio,
            fixed_easy_fraction=fixed_easy_fraction,
            progress=progress,
            negative_sampling=negative_sampling,
            generator=generator,
        )
        num_rows = sample.query_pixel.numel()  # P * Q
        negative_pixel = sample.negative_pixel.reshape(-1)
        negatives = _gather_detached(keys.hidden, negative_pixel)
        negatives = negatives.reshape(num_rows, num_negatives, -1).float()  # (P * Q, N_neg, H)
        negative_inv_norm = inv_norm.reshape(-1)[negative_pixel].reshape(num_rows, num_negatives)
        positives = cores[sample.classes].repeat_interleave(num_queries, dim=0)  # (P * Q, E)
        query_pixel = sample.query_pixel.reshape(-1)

    with torch.autocast(device.type, enabled=False):
        queries = region_embeddings(
            embedding, query_pixel, stride=region_stride, region=region, size=region_size
        )  # (P * Q, E)
        pos_logit = (queries * positives).sum(-1, keepdim=True)  # (P * Q, 1)
        # q . e_k = q_h . hidden_k (+ offset): dot products in the hidden width, normalised afterwards, so
        # no (P * Q, N_neg, E) tensor is ever formed.
        query_hidden, offset = keys.query_keys(queries)
        neg_logit = torch.bmm(negatives, query_hidden.unsqueeze(-1)).squeeze(-1)  # (P * Q, N_neg)
        if offset is not None:
            neg_logit = neg_logit + offset.unsqueeze(-1)
        logits = torch.cat([pos_logit, neg_logit * negative_inv_norm], dim=1) / temperature
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=device)
        # Every present class has exactly Q queries, so the mean over all queries equals the mean over classes
        # of the per-class means (Eq. 7).
        return F.cross_entropy(logits, target)


class CCDCLoss(nn.Module):
    """Weighted CCDC loss; holds the hyperparameters of :func:`ccdc_loss`, read from ``config``
    (training.config.CCDCConfig, whose defaults are the paper's; ``enabled`` is the trainer's, not read here).

    ``forward(embedding (B, E, *S), probs (B, K, *S), labels (B, *S), *, generator=None, progress=None)``
    -> ``weight * ccdc_loss(...)``. ``embedding`` is the model output's ``projection`` (a ``ProjectedEmbedding``,
    the cheap path) or a dense tensor. ``probs`` are softmax probabilities of the full-resolution logits at the
    embedding's resolution (pass ``logits.float().softmax(1)``).
    """

    def __init__(self, config: CCDCConfig | None = None, *, ignore_index: int | None = None) -> None:
        super().__init__()
        config = config or CCDCConfig()
        if config.query_mode not in _QUERY_MODES:
            raise ValueError(f"query_mode must be one of {_QUERY_MODES}, got {config.query_mode!r}")
        if config.negative_sampling not in _NEGATIVE_SAMPLINGS:
            raise ValueError(
                f"negative_sampling must be one of {_NEGATIVE_SAMPLINGS}, got {config.negative_sampling!r}"
            )
        if config.core_fallback not in _CORE_FALLBACKS:
            raise ValueError(f"core_fallback must be one of {_CORE_FALLBACKS}, got {config.core_fallback!r}")
        self.weight = float(config.weight)
        # Every field but the trainer's switch and the weight applied here is a keyword of ccdc_loss.
        self.options = {
            field.name: getattr(config, field.name)
            for field in dataclasses.fields(config)
            if field.name not in ("enabled", "weight")
        }
        self.options["ignore_index"] = ignore_index

    def forward(
        self,
        embedding: Embedding,
        probs: Tensor,
        labels: Tensor,
        *,
        generator: torch.Generator | None = None,
        progress: float | None = None,
    ) -> Tensor:
        return self.weight * ccdc_loss(
            embedding, probs, labels, progress=progress, generator=generator, **self.options
        )

    def extra_repr(self) -> str:
        return f"weight={self.weight}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())
