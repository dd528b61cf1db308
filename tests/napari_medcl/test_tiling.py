"""Tiling: window positions, Gaussian importance, padding and the slab-wise accumulator."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from napari_medcl import tiling
from napari_medcl.tiling import (
    Accumulator,
    argmax_entropy,
    gaussian_importance,
    label_dtype,
    padding,
    window_boxes,
    window_shape,
    window_starts,
)


@pytest.mark.parametrize(
    ("size", "patch", "overlap", "expected"),
    [
        (128, 64, 0.5, (0, 32, 64)),
        (150, 64, 0.5, (0, 29, 57, 86)),  # spread evenly, not clamped at the end
        (64, 64, 0.5, (0,)),
        (10, 64, 0.5, (0,)),  # smaller than the patch: one window (the image gets padded)
        (100, 50, 0.0, (0, 50)),
        (5, 1, 0.5, (0, 1, 2, 3, 4)),  # depth-1 windows step by one slice
    ],
)
def test_window_starts_examples(size, patch, overlap, expected):
    assert window_starts(size, patch, overlap) == expected


@pytest.mark.parametrize("size", [1, 7, 31, 64, 65, 97, 200])
@pytest.mark.parametrize("patch", [1, 8, 15, 64])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.8])
def test_window_starts_cover_every_index_with_bounded_steps(size, patch, overlap):
    starts = window_starts(size, patch, overlap)
    assert starts[0] == 0
    assert list(starts) == sorted(set(starts))
    if size <= patch:
        assert starts == (0,)
        return
    assert starts[-1] == size - patch
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + patch] = True
    assert covered.all()
    steps = np.diff(starts)
    assert steps.max() <= max(1.0, patch * (1 - overlap)) + 1  # rounding moves a start by at most one


def test_window_starts_rejects_bad_overlap():
    with pytest.raises(ValueError, match="overlap"):
        window_starts(10, 4, 1.0)
    with pytest.raises(ValueError, match="overlap"):
        window_starts(10, 4, -0.1)


@pytest.mark.parametrize(
    ("shape", "window"),
    [((13, 17, 11), (8, 8, 8)), ((1, 40, 33), (1, 16, 16)), ((9, 9, 9), (9, 9, 9)), ((5, 20, 7), (4, 6, 7))],
)
def test_window_boxes_cover_every_voxel_and_come_in_z_order(shape, window):
    boxes = window_boxes(shape, window, 0.5)
    count = np.zeros(shape, int)
    for box in boxes:
        assert tuple(b.stop - b.start for b in box) == window
        count[box] += 1
    assert count.min() >= 1
    z_starts = [b[0].start for b in boxes]
    assert z_starts == sorted(z_starts)


def test_window_boxes_refuses_grid_smaller_than_window():
    with pytest.raises(ValueError, match="pad it first"):
        window_boxes((4, 10, 10), (8, 8, 8), 0.5)


def test_gaussian_is_cached_read_only_positive_and_peaks_at_centre():
    g = gaussian_importance((9, 16, 5))
    assert gaussian_importance([9, 16, 5]) is g  # same object from the cache, whatever the sequence type
    assert g.dtype == np.float32 and g.shape == (9, 16, 5)
    assert not g.flags.writeable
    assert g.min() > 0
    assert g.max() == pytest.approx(1.0)
    assert g[4, 7, 2] == g.max() or g[4, 8, 2] == g.max()
    # separable with sigma = n / 8 on each axis
    n = 16
    d = (np.arange(n) - (n - 1) / 2) / (n / 8)
    profile = np.exp(-0.5 * d * d)
    np.testing.assert_allclose(g[4, :, 2] / g[4, :, 2].max(), profile / profile.max(), rtol=1e-5)


def test_gaussian_of_a_large_patch_has_no_zero():
    g = gaussian_importance((1, 512, 512))
    assert g.min() > 0
    assert g[0, 0, 0] == g.min()


def test_window_shape_and_padding():
    assert window_shape((7, 9, 8), (2, 4, 1)) == (8, 12, 8)
    assert padding((3, 20, 8), (8, 8, 8)) == ((2, 3), (0, 0), (0, 0))
    assert padding((1, 5), (1, 6)) == ((0, 0), (0, 1))


def test_label_dtype():
    assert label_dtype(2) == np.uint8
    assert label_dtype(255) == np.uint8
    assert label_dtype(256) == np.uint16


def _direct_stitch(shape, window, boxes, outputs):
    """Reference: full-volume float64 weighted average, the obvious (memory-hungry) way."""
    g = gaussian_importance(window).astype(np.float64)
    sums = np.zeros((outputs[0].shape[0], *shape))
    weights = np.zeros(shape)
    for box, out in zip(boxes, outputs):
        sums[(slice(None), *box)] += out * g
        weights[box] += g
    return sums / weights


@pytest.mark.parametrize(
    ("shape", "window", "crop"),
    [
        ((13, 11, 9), (5, 6, 4), None),
        ((12, 10, 10), (12, 4, 4), None),  # one slab
        ((6, 9, 7), (1, 4, 4), None),  # depth-1 windows: reduced slice by slice
        ((10, 12, 9), (6, 6, 6), (slice(2, 9), slice(1, 12), slice(0, 9))),  # padded grid, cropped output
    ],
)
@pytest.mark.parametrize("reduce_voxels", [1 << 20, 1], ids=["whole-slabs", "row-by-row"])
def test_accumulator_slab_reduction_equals_direct_computation(
    shape, window, crop, reduce_voxels, monkeypatch
):
    monkeypatch.setattr(tiling, "_REDUCE_VOXELS", reduce_voxels)
    rng = np.random.default_rng(0)
    k, u = 3, 2
    boxes = window_boxes(shape, window, 0.5)
    logits = [rng.normal(size=(k, *window)) for _ in boxes]
    probs = [np.exp(x) / np.exp(x).sum(0) for x in logits]
    maps = [rng.random((u, *window)) for _ in boxes]
    acc = Accumulator(shape, window, k, u, crop=crop, keep_probabilities=True)
    for box, p, m in zip(boxes, probs, maps):
        acc.add(box, p.astype(np.float32), m.astype(np.float32))
    result = acc.finish()

    crop = crop or tuple(slice(0, s) for s in shape)
    expected = _direct_stitch(shape, window, boxes, [np.concatenate([p, m]) for p, m in zip(probs, maps)])
    expected = expected[(slice(None), *crop)]
    p_ref, m_ref = expected[:k], expected[k:]
    np.testing.assert_allclose(result.probabilities, p_ref, atol=2e-6)
    np.testing.assert_allclose(result.maps, m_ref, atol=2e-6)
    margin = np.sort(p_ref, axis=0)[-1] - np.sort(p_ref, axis=0)[-2]
    clear = margin > 1e-4
    np.testing.assert_array_equal(result.labels[clear], p_ref.argmax(0)[clear])
    entropy = -(p_ref * np.log(p_ref)).sum(0) / math.log(k)
    np.testing.assert_allclose(result.entropy, entropy, atol=2e-6)
    np.testing.assert_allclose(result.top_class_error, 1 - p_ref.max(0), atol=2e-6)
    assert result.labels.dtype == np.uint8 and result.entropy.dtype == np.float32
    assert result.top_class_error.dtype == np.float32 and result.top_class_error.shape == result.labels.shape
    assert result.labels.shape == tuple(c.stop - c.start for c in crop)


def test_accumulator_working_buffer_is_one_window_deep():
    acc = Accumulator((200, 16, 16), (8, 16, 16), 4, 2)
    assert acc._sums.shape == (6, 8, 16, 16)
    assert acc._weights.shape == (8, 16, 16)


def test_accumulator_without_reduction_keeps_probabilities_only():
    shape, window = (6, 6, 6), (4, 4, 4)
    acc = Accumulator(shape, window, 2, 0, reduce=False)
    for box in window_boxes(shape, window, 0.5):
        acc.add(box, np.full((2, *window), 0.5, np.float32))
    result = acc.finish()
    assert result.labels is None and result.entropy is None and result.top_class_error is None
    assert result.maps.shape == (0, *shape)
    np.testing.assert_allclose(result.probabilities, 0.5, rtol=1e-6)


def test_accumulator_rejects_out_of_order_and_misshaped_windows():
    acc = Accumulator((8, 4, 4), (4, 4, 4), 2, 0)
    with pytest.raises(ValueError, match="probabilities shape"):
        acc.add((slice(0, 4), slice(0, 4), slice(0, 4)), np.zeros((3, 4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="maps"):
        acc.add(
            (slice(0, 4), slice(0, 4), slice(0, 4)),
            np.zeros((2, 4, 4, 4), np.float32),
            np.zeros((1, 4, 4, 4)),
        )
    acc.add((slice(0, 4), slice(0, 4), slice(0, 4)), np.zeros((2, 4, 4, 4), np.float32))
    acc.add((slice(4, 8), slice(0, 4), slice(0, 4)), np.zeros((2, 4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="z order"):
        acc.add((slice(0, 4), slice(0, 4), slice(0, 4)), np.zeros((2, 4, 4, 4), np.float32))


def test_accumulator_refuses_to_reduce_uncovered_voxels():
    acc = Accumulator((8, 4, 8), (4, 4, 4), 2, 0)
    acc.add(
        (slice(0, 4), slice(0, 4), slice(0, 4)), np.zeros((2, 4, 4, 4), np.float32)
    )  # x 4..8 never covered
    with pytest.raises(ValueError, match="not covered"):
        acc.add((slice(4, 8), slice(0, 4), slice(0, 4)), np.zeros((2, 4, 4, 4), np.float32))


def test_argmax_entropy_ties_and_uniform():
    planes = [np.array([0.5, 0.2, 1 / 3], np.float32), np.array([0.5, 0.8, 1 / 3], np.float32)]
    planes.append(1 - planes[0] - planes[1])
    labels = np.zeros(3, np.uint8)
    entropy = np.zeros(3, np.float32)
    argmax_entropy(iter(planes), 3, labels, entropy)
    assert labels[0] == 0  # tie between classes 0 and 1 -> lower index
    assert labels[1] == 1
    assert entropy[2] == pytest.approx(1.0, abs=1e-6)  # uniform over 3 classes
    assert entropy.min() >= 0 and entropy.max() <= 1
    with pytest.raises(ValueError, match="expected 4"):
        argmax_entropy(iter(planes), 4, labels, entropy)


def test_argmax_entropy_rules_background_out_where_foreground():
    p0 = np.array([0.9, 0.9, 1.0, 0.2], np.float32)
    p1 = np.array([0.02, 0.08, 0.0, 0.5], np.float32)
    p2 = np.array([0.08, 0.02, 0.0, 0.3], np.float32)
    foreground = np.array([True, True, True, False])
    labels, entropy = np.zeros(4, np.uint8), np.zeros(4, np.float32)
    plain_labels, plain_entropy = np.zeros(4, np.uint8), np.zeros(4, np.float32)
    argmax_entropy(iter([p0, p1, p2]), 3, labels, entropy, foreground)
    argmax_entropy(iter([p0, p1, p2]), 3, plain_labels, plain_entropy)
    np.testing.assert_array_equal(plain_labels, [0, 0, 0, 1])
    np.testing.assert_array_equal(labels, [2, 1, 1, 1])  # background certain: the first foreground class
    np.testing.assert_array_equal(entropy, plain_entropy)  # the network's uncertainty is left as it is
    with pytest.raises(ValueError, match="foreground mask shape"):
        argmax_entropy(iter([p0, p1, p2]), 3, labels, entropy, foreground[:3])


def test_argmax_entropy_top_error_is_one_minus_the_chosen_class_probability():
    p0 = np.array([0.7, 0.2, 1 / 3, 0.05, 1.0], np.float32)
    p1 = np.array([0.2, 0.5, 1 / 3, 0.05, 0.0], np.float32)
    p2 = np.array([0.1, 0.3, 1 / 3, 0.9, 0.0], np.float32)
    labels, entropy = np.zeros(5, np.uint8), np.zeros(5, np.float32)
    top_error = np.full(5, np.nan, np.float32)
    argmax_entropy(iter([p0, p1, p2]), 3, labels, entropy, top_error=top_error)
    np.testing.assert_array_equal(labels, [0, 1, 0, 2, 0])
    np.testing.assert_allclose(top_error, [0.3, 0.5, 2 / 3, 0.1, 0.0], atol=1e-6)
    assert top_error.dtype == np.float32
    # Without the output array nothing else changes.
    plain_labels, plain_entropy = np.zeros(5, np.uint8), np.zeros(5, np.float32)
    argmax_entropy(iter([p0, p1, p2]), 3, plain_labels, plain_entropy)
    np.testing.assert_array_equal(plain_labels, labels)
    np.testing.assert_array_equal(plain_entropy, entropy)
    with pytest.raises(ValueError, match="top_error shape"):
        argmax_entropy(iter([p0, p1, p2]), 3, labels, entropy, top_error=top_error[:4])


def test_argmax_entropy_top_error_follows_the_foreground_rule():
    # Background likely (0.9) or certain (1.0) but ruled out: the label is the likeliest foreground class,
    # and the chance it is wrong is 1 - its probability among the foreground classes, not 1 - 0.9.
    p0 = np.array([0.9, 0.9, 1.0, 0.2, 0.6], np.float32)
    p1 = np.array([0.02, 0.08, 0.0, 0.5, 0.1], np.float32)
    p2 = np.array([0.08, 0.02, 0.0, 0.3, 0.3], np.float32)
    foreground = np.array([True, True, True, True, False])
    labels, entropy = np.zeros(5, np.uint8), np.zeros(5, np.float32)
    top_error = np.full(5, np.nan, np.float32)
    argmax_entropy(iter([p0, p1, p2]), 3, labels, entropy, foreground, top_error)
    np.testing.assert_array_equal(labels, [2, 1, 1, 1, 0])
    # 0.08 of 0.1, 0.08 of 0.1, nothing left (clipped to 0: the floor makes 0/1e-6), 0.5 of 0.8, no rule
    np.testing.assert_allclose(top_error, [0.2, 0.2, 1.0, 1 - 0.5 / 0.8, 0.4], atol=1e-5)
    assert top_error.min() >= 0 and top_error.max() <= 1


@pytest.mark.parametrize("with_foreground", [False, True])
def test_argmax_entropy_temporaries_stay_at_two_planes(with_foreground):
    import tracemalloc

    n, k = 1 << 18, 6
    x = np.random.default_rng(2).random((k, n)).astype(np.float32)
    x /= x.sum(0)
    planes = list(x)  # made before measuring: only the reduction's own temporaries count
    labels, entropy, top_error = np.zeros(n, np.uint8), np.zeros(n, np.float32), np.zeros(n, np.float32)
    foreground = (np.arange(n) % 2).astype(bool) if with_foreground else None
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        argmax_entropy(iter(planes), k, labels, entropy, foreground, top_error)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The running maximum and one p log p plane (float32), one bool plane; no copy per class, no 1 - max copy;
    # with the foreground rule, the background plane as well.
    planes_allowed = 3.5 if with_foreground else 2.5
    assert peak < planes_allowed * 4 * n, f"peak {peak / (4 * n):.2f} float32 planes"
    np.testing.assert_allclose(top_error[::2], 1 - x[:, ::2].max(0), atol=1e-6)
    if with_foreground:
        conditional = x[1:, 1::2].max(0) / (1 - x[0, 1::2])
        np.testing.assert_allclose(top_error[1::2], 1 - conditional, atol=1e-5)


def test_accumulator_top_class_error_follows_the_foreground_mask():
    shape, window = (6, 4, 4), (2, 4, 4)
    foreground = np.zeros(shape, bool)
    foreground[2:5, 1:3] = True
    acc = Accumulator(shape, window, 3, 0, foreground=foreground)
    for box in window_boxes(shape, window, 0.5):
        probs = np.empty((3, *window), np.float32)
        probs[0], probs[1], probs[2] = 0.6, 0.15, 0.25
        acc.add(box, probs)
    result = acc.finish()
    np.testing.assert_allclose(result.top_class_error, np.where(foreground, 1 - 0.25 / 0.4, 0.4), atol=1e-6)


def test_accumulator_passes_the_foreground_mask_row_by_row():
    shape, window = (6, 4, 4), (2, 4, 4)
    foreground = np.zeros(shape, bool)
    foreground[2:5, 1:3] = True
    acc = Accumulator(shape, window, 2, 0, foreground=foreground)
    for box in window_boxes(shape, window, 0.5):
        probs = np.zeros((2, *window), np.float32)
        probs[0] = 0.7  # the network says background everywhere
        probs[1] = 0.3
        acc.add(box, probs)
    np.testing.assert_array_equal(acc.finish().labels, foreground.astype(np.uint8))
    with pytest.raises(ValueError, match="foreground mask shape"):
        Accumulator(shape, window, 2, 0, foreground=foreground[:3])


def _stitched(grid, window, threads, close_after=None):
    rng = np.random.default_rng(3)
    accumulator = Accumulator(grid, window, 3, 2, threads=threads)
    for count, box in enumerate(window_boxes(grid, window, 0.5)):
        if count == close_after:
            accumulator.close()
            return None
        probs = rng.random((3, *window), dtype=np.float32)
        probs /= probs.sum(axis=0)
        accumulator.add(box, probs, rng.random((2, *window), dtype=np.float32))
    return accumulator.finish()


def _stitch_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("medcl-stitch")]


@pytest.mark.parametrize("threads", [2, 3])
def test_accumulator_threads_give_the_same_outputs_and_end(threads, monkeypatch):
    monkeypatch.setattr(tiling, "_REDUCE_VOXELS", 2 * 14 * 13)  # two rows a chunk: the threads share them
    grid, window = (12, 14, 13), (4, 6, 5)
    one, many = _stitched(grid, window, 1), _stitched(grid, window, threads)
    for name in ("labels", "entropy", "maps", "top_class_error"):
        np.testing.assert_array_equal(getattr(many, name), getattr(one, name))
    assert one.maps.std() > 0 and len(np.unique(one.labels)) == 3  # outputs that can differ
    assert _stitch_threads() == []  # finish() ended them
    assert _stitched(grid, window, threads, close_after=3) is None
    assert _stitch_threads() == []  # and so does close() when a prediction stops early


def test_accumulator_takes_windows_the_caller_already_weighted():
    grid, window = (9, 10, 11), (3, 4, 5)
    rng = np.random.default_rng(5)
    windows = [(box, rng.random((2, *window), dtype=np.float32)) for box in window_boxes(grid, window, 0.5)]
    plain, weighted = Accumulator(grid, window, 2, 0), Accumulator(grid, window, 2, 0)
    for box, probs in windows:
        plain.add(box, probs.copy())
        weighted.add(box, probs * gaussian_importance(window), weighted=True)
    a, b = plain.finish(), weighted.finish()
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.entropy, b.entropy, rtol=0, atol=1e-6)
    assert len(np.unique(a.labels)) == 2
