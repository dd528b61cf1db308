"""Sliding-window tiling: window positions, Gaussian importance weights, and a slab-wise accumulator.

Pure numpy. Everything here works on 3D grids ``(Z, Y, X)``; a 2D image is a depth-1 volume and a 2D model
over a 3D volume uses windows of depth 1, so one code path serves 2D, 3D and 2D-over-3D.

Windows are listed with the first axis slowest. Once the windows starting at a given ``z`` have all been
added, nothing later touches the rows below the next window's ``z``; the :class:`Accumulator` reduces those
rows to their final outputs and forgets them, so its working memory is one window deep along ``z``, not the
whole volume.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial

import numpy as np

Box = tuple[slice, ...]
# Voxels reduced at a time when a slab is final (bounds the argmax/entropy temporaries to a few MiB each).
_REDUCE_VOXELS = 1 << 20


def window_starts(size: int, patch: int, overlap: float) -> tuple[int, ...]:
    """Start indices of windows of length ``patch`` covering ``range(size)``, spread evenly (nnU-Net style).

    ``n = ceil((size - patch) / step) + 1`` windows with ``step = max(1, patch * (1 - overlap))``; starts are
    rounded from ``linspace(0, size - patch, n)``, so the real step never exceeds the target one and the
    last window ends exactly at ``size``. One start (0) when ``size <= patch``.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    if size < 1 or patch < 1:
        raise ValueError(f"size and patch must be positive, got size={size}, patch={patch}")
    if size <= patch:
        return (0,)
    step = max(1.0, patch * (1.0 - overlap))
    n = math.ceil((size - patch) / step) + 1
    return tuple(int(round(s)) for s in np.linspace(0, size - patch, n))


def window_boxes(shape: tuple[int, ...], window: tuple[int, ...], overlap: float) -> list[Box]:
    """Every window of shape ``window`` over a grid of ``shape`` (same length, each axis >= window),
    as slice tuples in C order (first axis slowest)."""
    if len(shape) != len(window):
        raise ValueError(f"grid shape {shape} and window {window} have different lengths")
    if any(s < w for s, w in zip(shape, window)):
        raise ValueError(f"grid shape {shape} is smaller than the window {window}; pad it first")
    per_axis = [window_starts(s, w, overlap) for s, w in zip(shape, window)]
    return [tuple(slice(s, s + w) for s, w in zip(starts, window)) for starts in itertools.product(*per_axis)]


def gaussian_importance(patch: tuple[int, ...]) -> np.ndarray:
    """Importance map of shape ``patch``: a Gaussian centred on the window, sigma = patch / 8 per axis,
    maximum 1, no zeros. float32, read-only, and the same object for the same patch (cached)."""
    return _gaussian(tuple(int(p) for p in patch))


@lru_cache(maxsize=16)
def _gaussian(patch: tuple[int, ...]) -> np.ndarray:
    if any(p < 1 for p in patch):
        raise ValueError(f"patch sizes must be positive, got {patch}")
    weights = np.ones((), dtype=np.float64)
    for n in patch:
        sigma = n / 8.0
        d = (np.arange(n, dtype=np.float64) - (n - 1) / 2.0) / sigma
        weights = np.multiply.outer(weights, np.exp(-0.5 * d * d))
    weights = (weights / weights.max()).astype(np.float32)
    # A product of three tails can underflow to 0 in float32 for large patches; a zero weight would leave a
    # voxel covered only by window corners undefined.
    nonzero = weights[weights > 0]
    weights[weights == 0] = nonzero.min()
    weights.setflags(write=False)
    return weights


def window_shape(patch: tuple[int, ...], divisor: tuple[int, ...]) -> tuple[int, ...]:
    """The patch rounded up to a multiple of the divisor on every axis (what a window fed to the model is)."""
    return tuple(-(-p // d) * d for p, d in zip(patch, divisor))


def padding(shape: tuple[int, ...], window: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Symmetric (before, after) padding per axis so that every axis is at least the window; zero where the
    image is already large enough."""
    pads = []
    for s, w in zip(shape, window):
        extra = max(0, w - s)
        pads.append((extra // 2, extra - extra // 2))
    return tuple(pads)


def label_dtype(num_classes: int) -> np.dtype:
    """uint8 for up to 255 classes, uint16 above."""
    if num_classes > 65535:
        raise ValueError(f"at most 65535 classes are supported, got {num_classes}")
    return np.dtype(np.uint8 if num_classes <= 255 else np.uint16)


def argmax_entropy(
    planes: Iterable[np.ndarray],
    num_classes: int,
    labels: np.ndarray,
    entropy: np.ndarray,
    foreground: np.ndarray | None = None,
    top_error: np.ndarray | None = None,
) -> None:
    """Reduce class probability planes, given one class at a time in index order, to labels and entropy.

    ``planes``: ``num_classes`` float32 arrays of shape ``S`` (probabilities summing to 1 over classes).
    Writes ``labels`` (S) with the argmax (ties go to the lower index) and ``entropy`` (S) with the
    normalised predictive entropy ``-sum p log p / log K`` clipped to [0, 1]. ``foreground`` (S) bool: where
    it holds, the argmax runs over the classes 1.. only (background is ruled out); the entropy is still that
    of all K probabilities. ``top_error`` (S) float32, when given, receives the model's own probability that
    the label is wrong, ``1 - p(label)`` clipped to [0, 1]: ``1 - max_k p_k``; where ``foreground`` holds,
    background is ruled out, so the label's probability is the one renormalised over the classes that remain,
    ``1 - max_{k >= 1} p_k / (1 - p_0)`` (there the network's belief in background says nothing about which
    tissue it is). Consuming classes one by one keeps the temporary memory at two float32 planes and one
    bool plane whatever the number of classes (one float32 plane more, the background's, when both
    ``foreground`` and ``top_error`` are given).
    """
    if foreground is not None and foreground.shape != labels.shape:
        raise ValueError(f"foreground mask shape {foreground.shape} != labels shape {labels.shape}")
    if top_error is not None and top_error.shape != labels.shape:
        raise ValueError(f"top_error shape {top_error.shape} != labels shape {labels.shape}")
    # The only temporaries: the running maximum, one p log p plane and one bool plane, reused for every class.
    best = term = better = background = None
    count = 0
    entropy[...] = 0
    for index, p in enumerate(planes):
        p = np.asarray(p, dtype=np.float32)
        if best is None:
            best = p.copy()
            term = np.empty_like(best)
            better = np.empty(best.shape, dtype=bool)
            if foreground is not None:
                best[foreground] = -1.0  # below any probability: class 1 wins first, then the argmax of 1..
                if top_error is not None:
                    background = p.copy()
            labels[...] = 0
        else:
            np.greater(p, best, out=better)
            labels[better] = index
            np.maximum(best, p, out=best)
        # p log p -> 0 as p -> 0; the clamp keeps log finite and changes the sum by < 1e-30 per class.
        np.maximum(p, np.float32(1e-30), out=term)
        np.log(term, out=term)
        term *= p
        entropy -= term
        count += 1
    if count != num_classes:
        raise ValueError(f"expected {num_classes} class planes, got {count}")
    entropy *= 1.0 / math.log(num_classes)
    np.clip(entropy, 0.0, 1.0, out=entropy)
    if top_error is not None:
        # best is the probability of the chosen label (the -1 placeholder is gone: K >= 2 planes came).
        if background is not None:
            # p(label | not background) inside the mask; where the network gave the foreground classes next
            # to nothing the floor keeps the ratio finite (and the clip below keeps it a probability).
            np.subtract(np.float32(1.0), background, out=background)
            np.maximum(background, np.float32(1e-6), out=background)
            np.divide(best, background, out=background)
            np.copyto(best, background, where=foreground)
        np.subtract(np.float32(1.0), best, out=top_error)
        np.clip(top_error, 0.0, 1.0, out=top_error)


@dataclass(frozen=True, eq=False)
class StitchResult:
    """Outputs of an :class:`Accumulator` over the crop region ``S = (Z, Y, X)``.

    ``labels`` (S) uint8/uint16, ``entropy`` (S) float32 and ``top_class_error`` (S) float32 (1 - the
    probability of the chosen label, see :func:`argmax_entropy`) when the accumulator reduced, else None;
    ``maps`` (U, *S) float32 UAFR maps (U may be 0); ``probabilities`` (K, *S) float32 when kept, else None.
    """

    labels: np.ndarray | None
    entropy: np.ndarray | None
    maps: np.ndarray
    probabilities: np.ndarray | None
    top_class_error: np.ndarray | None = None


class Accumulator:
    """Gaussian-weighted stitching of window outputs, reduced slab by slab along the first axis.

    ``shape``: the padded grid ``(Z, Y, X)`` the windows live on; ``window``: the window shape; ``crop``:
    the part of the grid that is the real image (default: all of it). Windows must be added in non-decreasing
    order of their first-axis start (the order of :func:`window_boxes`). Sums are float32 and only one window
    depth along ``z`` is held: when a window starts at a larger ``z``, the rows before it are final and are
    reduced into the outputs (``probs = sums / weights``, then argmax, entropy, top-class error and the UAFR
    maps).

    With ``reduce=False`` no labels, entropy or top-class error are computed (use it when the probabilities
    are resampled before the argmax); ``keep_probabilities`` keeps the stitched probabilities, which
    ``reduce=False`` implies. ``foreground`` (bool, the crop region's shape): voxels whose label is never
    background (see :func:`argmax_entropy`). ``threads`` > 1 splits each window's sums over that many threads
    (worth it where the model runs elsewhere, on a GPU; ``finish`` or ``close`` ends them).
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        window: tuple[int, int, int],
        num_classes: int,
        num_maps: int,
        *,
        crop: Box | None = None,
        keep_probabilities: bool = False,
        reduce: bool = True,
        foreground: np.ndarray | None = None,
        threads: int = 1,
    ):
        if len(shape) != 3 or len(window) != 3:
            raise ValueError(f"Accumulator works on 3D grids, got shape {shape} and window {window}")
        if any(w > s for s, w in zip(shape, window)):
            raise ValueError(f"window {window} is larger than the grid {shape}")
        if num_classes < 2:
            raise ValueError(f"need at least 2 classes, got {num_classes}")
        self.shape = tuple(int(s) for s in shape)
        self.window = tuple(int(w) for w in window)
        self.num_classes = num_classes
        self.num_maps = num_maps
        crop = crop if crop is not None else tuple(slice(0, s) for s in self.shape)
        self._crop = tuple(slice(*c.indices(s)[:2]) for c, s in zip(crop, self.shape))
        out_shape = tuple(c.stop - c.start for c in self._crop)
        if any(n < 1 for n in out_shape):
            raise ValueError(f"crop {crop} is empty for grid {shape}")
        self.out_shape = out_shape
        if foreground is not None and foreground.shape != out_shape:
            raise ValueError(f"foreground mask shape {foreground.shape} != output shape {out_shape}")
        self._foreground = foreground
        self._reduce = reduce
        self._threads = max(1, int(threads))
        self._pool = (
            ThreadPoolExecutor(self._threads - 1, thread_name_prefix="medcl-stitch")
            if self._threads > 1
            else None
        )
        # One window deep along z: rows [z0, z0 + window[0]) of the padded grid.
        depth = self.window[0]
        self._sums = np.zeros((num_classes + num_maps, depth, *self.shape[1:]), dtype=np.float32)
        self._weights = np.zeros((depth, *self.shape[1:]), dtype=np.float32)
        self._z0 = 0
        self.labels = np.zeros(out_shape, dtype=label_dtype(num_classes)) if reduce else None
        self.entropy = np.zeros(out_shape, dtype=np.float32) if reduce else None
        self.top_class_error = np.zeros(out_shape, dtype=np.float32) if reduce else None
        self.maps = np.zeros((num_maps, *out_shape), dtype=np.float32)
        keep = keep_probabilities or not reduce
        self.probabilities = np.zeros((num_classes, *out_shape), dtype=np.float32) if keep else None
        self._finished = False

    def add(
        self, box: Box, probabilities: np.ndarray, maps: np.ndarray | None = None, *, weighted: bool = False
    ) -> None:
        """Add one window's outputs: ``probabilities`` (K, *window), ``maps`` (U, *window) or None when U == 0.

        The arrays may be modified in place (they are multiplied by the importance map). ``weighted``: the
        caller has already multiplied them by ``gaussian_importance(window)`` (in another thread, say)."""
        if self._finished:
            raise RuntimeError("Accumulator.add after finish()")
        starts = tuple(b.start for b in box)
        if tuple(b.stop - b.start for b in box) != self.window:
            raise ValueError(f"window box {box} does not have the window shape {self.window}")
        if starts[0] < self._z0:
            raise ValueError(f"windows must come in non-decreasing z order: start {starts[0]} < {self._z0}")
        if probabilities.shape != (self.num_classes, *self.window):
            raise ValueError(
                f"probabilities shape {probabilities.shape} != {(self.num_classes, *self.window)}"
            )
        if (maps is None) != (self.num_maps == 0) or (
            maps is not None and maps.shape != (self.num_maps, *self.window)
        ):
            got = None if maps is None else maps.shape
            raise ValueError(f"maps shape {got} does not match {self.num_maps} maps of window {self.window}")
        if starts[0] > self._z0:
            self.finalize(starts[0])
        weight = gaussian_importance(self.window)
        rows = slice(starts[0] - self._z0, starts[0] - self._z0 + self.window[0])
        region = (rows, box[1], box[2])
        channels = list(enumerate([*probabilities, *(() if maps is None else maps)]))

        def add_channels(part: list[tuple[int, np.ndarray]]) -> None:
            # Channel by channel: one channel of a window stays in a core's cache between the weighting and
            # the sum.
            for channel, window in part:
                if not weighted:
                    np.multiply(window, weight, out=window)
                target = self._sums[(channel, *region)]
                np.add(target, window, out=target)

        def first_share() -> None:
            add_channels(channels[::shares])
            target = self._weights[region]
            np.add(target, weight, out=target)

        # The sums are memory-bound: with threads, each takes a share of the channels (numpy releases the
        # GIL), this one the first share and the weights.
        shares = self._threads
        self._share([first_share, *(partial(add_channels, channels[i::shares]) for i in range(1, shares))])

    def weigh(self, *arrays: np.ndarray | None) -> None:
        """Multiply window outputs (..., *window) by the importance map in place, as ``add`` does; a caller
        that does it elsewhere (in the thread that runs the model, say) passes them with ``weighted=True``."""
        weight = gaussian_importance(self.window)
        for array in arrays:
            if array is not None:
                np.multiply(array, weight, out=array)

    def _share(self, calls: list[Callable[[], None]]) -> None:
        """Run ``calls`` (independent, each writing its own memory): the first on this thread, the others on
        the accumulator's threads when it has them; return when all are done."""
        if self._pool is None:
            for call in calls:
                call()
            return
        futures = [self._pool.submit(call) for call in calls[1:]]
        for call in calls[:1]:
            call()
        for future in futures:
            future.result()

    def finalize(self, upto: int) -> None:
        """Reduce the grid rows ``[z0, upto)`` into the outputs and drop them from the working buffer."""
        depth = self.window[0]
        upto = min(int(upto), self.shape[0])
        if upto <= self._z0:
            return
        n = min(upto - self._z0, depth)
        crop_z = self._crop[0]
        lo, hi = max(self._z0, crop_z.start), min(self._z0 + n, crop_z.stop)
        # A few rows at a time, so the reduction's temporaries stay near _REDUCE_VOXELS whatever the image.
        step = max(1, _REDUCE_VOXELS // math.prod(self.out_shape[1:]))
        chunks = [
            (slice(a - self._z0, b - self._z0), slice(a - crop_z.start, b - crop_z.start))
            for a, b in ((a, min(a + step, hi)) for a in range(lo, hi, step))
        ]
        # The chunks write disjoint rows of the outputs: the threads, if any, share them.
        self._share([partial(self._reduce_rows, *chunk) for chunk in chunks])
        # Shift the buffer down by n rows (numpy copies overlapping slices correctly) and clear the top.
        if n < depth:
            self._sums[:, : depth - n] = self._sums[:, n:]
            self._weights[: depth - n] = self._weights[n:]
        self._sums[:, depth - n :] = 0
        self._weights[depth - n :] = 0
        self._z0 += n
        if upto > self._z0:  # rows never reached by any window; cannot happen with window_boxes
            raise ValueError(f"rows {self._z0}..{upto} were not covered by any window")

    def _reduce_rows(self, buffer_rows: slice, out_rows: slice) -> None:
        region = (buffer_rows, self._crop[1], self._crop[2])
        weights = self._weights[region]  # (dz, Y, X)
        if weights.min() <= 0:
            raise ValueError("some voxels were not covered by any window; windows must cover the grid")
        inverse = np.reciprocal(weights)
        k = self.num_classes

        def planes() -> Iterator[np.ndarray]:
            for c in range(k):
                p = self._sums[(c, *region)] * inverse
                if self.probabilities is not None:
                    self.probabilities[c, out_rows] = p
                yield p

        if self._reduce:
            mask = None if self._foreground is None else self._foreground[out_rows]
            argmax_entropy(
                planes(),
                k,
                self.labels[out_rows],
                self.entropy[out_rows],
                mask,
                self.top_class_error[out_rows],
            )
        else:
            for _ in planes():
                pass
        for u in range(self.num_maps):
            np.multiply(self._sums[(k + u, *region)], inverse, out=self.maps[u, out_rows])

    def close(self) -> None:
        """Free the working buffer and the threads (``finish`` does it too; call it when a prediction stops
        before the last window)."""
        self._sums = self._weights = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def finish(self) -> StitchResult:
        """Reduce the remaining rows and return the outputs over the crop region."""
        if not self._finished:
            self.finalize(self.shape[0])
            self._finished = True
            self.close()
        return StitchResult(self.labels, self.entropy, self.maps, self.probabilities, self.top_class_error)
