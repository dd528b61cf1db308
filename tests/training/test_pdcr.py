"""PDCR kernels and module: hand-computed values, geometry pins, gradient direction, 2D/3D module runs."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from training.config import PDCRConfig  # noqa: E402
from training.losses.pdcr import (  # noqa: E402
    PDCRLoss,
    affinity,
    dragsaw_loss,
    foreground_ratios,
    nearest_cells,
    rf_window,
    sample_grid_positions,
    tap_centers,
)

pytestmark = pytest.mark.torch

try:
    from training.models import TapInfo
except ImportError:  # models package not written yet: same fields, same frozen dataclass

    @dataclass(frozen=True)
    class TapInfo:
        channels: int
        stride: tuple[int, ...]
        receptive_field: tuple[int, ...]


LABELS_2D = torch.tensor(
    [
        [0, 0, 1, 1, 0, 0],
        [0, 1, 1, 1, 0, 2],
        [0, 0, 1, 0, 0, 2],
        [2, 0, 0, 0, 0, 2],
        [2, 2, 0, 0, 0, 0],
    ]
)


def _brute_ratios(labels, centers, sizes, num_classes):
    """Loop reference: fractions over the inside voxels of each window."""
    out = torch.zeros(centers.shape[0], centers.shape[1], num_classes)
    for b, i in itertools.product(range(centers.shape[0]), range(centers.shape[1])):
        box = tuple(
            slice(max(int(c) - s // 2, 0), min(int(c) + s // 2 + 1, extent))
            for c, s, extent in zip(centers[b, i], sizes, labels.shape[1:])
        )
        window = labels[b][box].reshape(-1)
        out[b, i] = torch.bincount(window, minlength=num_classes).float() / window.numel()
    return out


def _cos(v):
    v = F.normalize(v, dim=-1)
    return v @ v.transpose(1, 2)


# -------------------------------------------------------------------------------------------------- phi


def test_foreground_ratios_2d_hand_values_with_borders():
    centers = torch.tensor([[[0, 0], [2, 2], [4, 5], [1, 4]]])
    phi = foreground_ratios(LABELS_2D[None], centers, 3, 3)
    expected = torch.tensor(
        [
            [3 / 4, 1 / 4, 0],  # corner: rows 0-1, cols 0-1 only (4 inside voxels)
            [5 / 9, 4 / 9, 0],  # interior 3x3
            [3 / 4, 0, 1 / 4],  # opposite corner: rows 3-4, cols 4-5
            [5 / 9, 2 / 9, 2 / 9],  # right border: rows 0-2, cols 3-5
        ]
    )
    torch.testing.assert_close(phi[0], expected)
    torch.testing.assert_close(phi.sum(-1), torch.ones(1, 4))


def test_foreground_ratios_per_axis_size_and_window_larger_than_image():
    centers = torch.tensor([[[0, 0], [2, 2], [4, 5], [1, 4]]])
    phi = foreground_ratios(LABELS_2D[None], centers, (1, 3), 3)  # one row, three columns
    expected = torch.tensor([[1, 0, 0], [2 / 3, 1 / 3, 0], [1, 0, 0], [1 / 3, 1 / 3, 1 / 3]])
    torch.testing.assert_close(phi[0], expected)
    whole = foreground_ratios(LABELS_2D[None], centers, 11, 3)
    torch.testing.assert_close(whole[0], torch.tensor([[18 / 30, 6 / 30, 6 / 30]]).expand(4, 3))


def test_foreground_ratios_3d_hand_values():
    labels = torch.zeros(1, 3, 3, 4, dtype=torch.int64)
    labels[0, 0, 0, 0] = 1
    labels[0, 1, 1, 1] = 1
    labels[0, 2, 2, 3] = 2
    centers = torch.tensor([[[0, 0, 0], [2, 2, 3], [1, 1, 1]]])
    phi = foreground_ratios(labels, centers, 3, 3)
    # corner windows hold 2x2x2 = 8 inside voxels; the centre window holds all 27 of [0,2]^3
    expected = torch.tensor([[6 / 8, 2 / 8, 0], [7 / 8, 0, 1 / 8], [25 / 27, 2 / 27, 0]])
    torch.testing.assert_close(phi[0], expected)
    phi = foreground_ratios(labels, centers[:, 2:], (1, 3, 5), 3)  # depth 1, rows 0-2, cols 0-3 -> 12 voxels
    torch.testing.assert_close(phi[0, 0], torch.tensor([11 / 12, 1 / 12, 0]))


def test_foreground_ratios_match_loop_reference_3d():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (2, 5, 7, 6), generator=g)
    centers = torch.stack([torch.randint(0, s, (2, 9), generator=g) for s in (5, 7, 6)], -1)
    for sizes in [(3, 3, 3), (5, 1, 7), (9, 9, 9)]:
        torch.testing.assert_close(
            foreground_ratios(labels, centers, sizes, 4), _brute_ratios(labels, centers, sizes, 4)
        )


@pytest.mark.parametrize(
    ("labels", "centers", "size", "num_classes", "match"),
    [
        (LABELS_2D[None], torch.tensor([[[0, 0]]]), 4, 3, "odd"),
        (LABELS_2D[None], torch.tensor([[[0, 0]]]), (3, 3, 3), 3, "odd"),
        (LABELS_2D[None], torch.tensor([[[5, 0]]]), 3, 3, "inside"),
        (LABELS_2D[None], torch.tensor([[[0, -1]]]), 3, 3, "inside"),
        (LABELS_2D[None], torch.tensor([[[0, 0]]]), 3, 2, r"\[0, 2\]"),
        (-LABELS_2D[None], torch.tensor([[[0, 0]]]), 3, 3, "values"),
        (LABELS_2D[None], torch.tensor([[0, 0]]), 3, 3, r"\(1, 2\)"),
        (LABELS_2D[None].float(), torch.tensor([[[0, 0]]]), 3, 3, "integer"),
    ],
)
def test_foreground_ratios_validation(labels, centers, size, num_classes, match):
    with pytest.raises(ValueError, match=match):
        foreground_ratios(labels, centers, size, num_classes)


# -------------------------------------------------------------------------------------------------- w, loss


def test_affinity_hand_values():
    phi_a = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
    phi_b = torch.tensor([[[0.0, 1.0], [0.75, 0.25]]])
    w = affinity(phi_a, phi_b)
    torch.testing.assert_close(w, torch.tensor([[[0.0, 0.75], [0.5, 0.75]]]))
    three = affinity(torch.tensor([[[0.5, 0.5, 0.0]]]), torch.tensor([[[0.0, 0.5, 0.5]]]))
    torch.testing.assert_close(three, torch.tensor([[[2 / 3]]]))  # background counts in the mean over M=3
    with pytest.raises(ValueError, match=r"\(1, 2, 2\).*\(1, 2, 3\)"):
        affinity(phi_a, torch.zeros(1, 2, 3))


def test_dragsaw_loss_hand_values():
    sim = torch.tensor([[[1.0, 0.5], [0.5, 1.0]]])
    w = torch.tensor([[[1.0, 0.25], [0.25, 1.0]]])
    # paper form (Eq. 9), tau = 0.5: s / tau = [[2, 1], [1, 2]]
    # row 0: logsumexp_n s_0n (1 - w_0n) / tau = log(e^0 + e^0.75) = 1.1368710061
    # l_00 = -2 + 1.1368710061, l_01 = -0.25 + 1.1368710061; rows symmetric -> mean 0.0118710061
    torch.testing.assert_close(dragsaw_loss(sim, w, 0.5), torch.tensor(0.0118710061))
    # authors' form: S' = (sim - 1) / 0.5 = [[0, -1], [-1, 0]]
    # row i: logsumexp_n S'_in (1 - w_in) = log(e^0 + e^(-0.75)) = 0.3868710061
    # l_00 = 0.3868710061, l_01 = 0.25 + 0.3868710061; rows symmetric -> mean 0.5118710061
    torch.testing.assert_close(dragsaw_loss(sim, w, 0.5, form="authors"), torch.tensor(0.5118710061))
    # asymmetric w pins that the softmax runs over the second index n of row i:
    # row 0 as above; row 1: log(e^(-0.25) + e^0) = 0.5759394199, l_10 = 0.75 + that, l_11 = that
    # mean = (2 * 0.3868710061 + 0.25 + 2 * 0.5759394199 + 0.75) / 4 = 0.7314052130
    w_asym = torch.tensor([[[1.0, 0.25], [0.75, 1.0]]])
    torch.testing.assert_close(dragsaw_loss(sim, w_asym, 0.5, form="authors"), torch.tensor(0.7314052130))
    # the released 2D code's swapped weights would give 0.9509 on the first example
    assert not math.isclose(float(dragsaw_loss(sim, w, 0.5, form="authors")), 0.9509, abs_tol=1e-3)
    # sum over (b, i, j) = 4 x the mean here
    torch.testing.assert_close(dragsaw_loss(sim, w, 0.5, reduction="sum"), torch.tensor(4 * 0.0118710061))
    with pytest.raises(ValueError, match=r"\(1, 2, 2\).*\(1, 2, 3\)"):
        dragsaw_loss(sim, torch.zeros(1, 2, 3), 0.5)
    with pytest.raises(ValueError, match="tau"):
        dragsaw_loss(sim, w, 0.0)


@pytest.mark.parametrize(("w12", "direction"), [(1.0, 1), (0.9, 1), (0.1, -1), (0.0, -1)])
def test_dragsaw_gradient_pulls_similar_and_pushes_dissimilar(w12, direction):
    v = torch.tensor([[[1.0, 0.2, 0.0, 0.3], [0.6, 0.9, 0.1, 0.0]]], requires_grad=True)
    w = torch.tensor([[[1.0, w12], [w12, 1.0]]])
    before = float(_cos(v.detach())[0, 0, 1])
    dragsaw_loss(_cos(v), w, 0.5).backward()
    with torch.no_grad():
        v -= 0.05 * v.grad
    after = float(_cos(v.detach())[0, 0, 1])
    assert direction * (after - before) > 1e-4, (before, after)


def test_dragsaw_gradient_through_affinity_from_phi():
    # identical composition -> w = 1 -> pulled; disjoint one-class windows -> w = 0 -> pushed
    for phi, direction in [([[0.3, 0.7], [0.3, 0.7]], 1), ([[1.0, 0.0], [0.0, 1.0]], -1)]:
        phi = torch.tensor([phi])
        v = torch.tensor([[[1.0, 0.0, 0.5], [0.2, 1.0, 0.5]]], requires_grad=True)
        before = float(_cos(v.detach())[0, 0, 1])
        dragsaw_loss(_cos(v), affinity(phi, phi), 0.5).backward()
        with torch.no_grad():
            v -= 0.05 * v.grad
        assert direction * (float(_cos(v.detach())[0, 0, 1]) - before) > 1e-4


# -------------------------------------------------------------------------------------------------- sampling


def test_sample_grid_is_a_true_grid_and_seeded():
    shape = (40, 60)
    pos = sample_grid_positions(shape, 24, torch.Generator().manual_seed(0))
    rows, cols = pos[:, 0].unique(), pos[:, 1].unique()
    assert pos.dtype == torch.int64 and pos.shape[1] == 2
    assert len(rows) >= 3 and len(cols) >= 3
    assert len(pos) == len(rows) * len(cols)  # the Cartesian product of its rows and columns
    assert set(map(tuple, pos.tolist())) == set(itertools.product(rows.tolist(), cols.tolist()))
    assert 20 <= len(pos) <= 28 and len(cols) > len(rows)  # about n, counts follow the axis lengths
    assert int(pos.min()) >= 0 and (pos < torch.tensor(shape)).all()
    assert rows.max() - rows.min() >= 20 and cols.max() - cols.min() >= 30  # spread over the map
    again = sample_grid_positions(shape, 24, torch.Generator().manual_seed(0))
    other = sample_grid_positions(shape, 24, torch.Generator().manual_seed(1))
    assert torch.equal(pos, again)
    assert not torch.equal(pos, other)
    assert torch.equal(sample_grid_positions(shape, 24), sample_grid_positions(shape, 24, None))


def test_sample_grid_does_not_collapse_and_handles_3d_and_small_maps():
    # the released cross-layer code put all 32 samples of a 32x32 map in column 0
    pos = sample_grid_positions((32, 32), 32, torch.Generator().manual_seed(0))
    assert len(pos[:, 1].unique()) >= 4 and len(pos[:, 0].unique()) >= 4
    cube = sample_grid_positions((6, 6, 6), 8, torch.Generator().manual_seed(0))
    assert cube.shape == (8, 3) and all(len(cube[:, a].unique()) == 2 for a in range(3))
    flat = sample_grid_positions((1, 64, 64), 64, None)  # 2D stored as depth-1 3D
    assert flat.shape == (64, 3) and (flat[:, 0] == 0).all() and len(flat[:, 2].unique()) == 8
    tiny = sample_grid_positions((3, 4), 100, None)
    assert tiny.shape == (12, 2) and len(set(map(tuple, tiny.tolist()))) == 12
    inner = sample_grid_positions((20, 20), 16, None, margin=5)
    assert int(inner.min()) >= 5 and int(inner.max()) <= 14
    with pytest.raises(ValueError, match="n must be"):
        sample_grid_positions((4, 4), 0)


def test_tap_centres_follow_stride_and_axis_order():
    # non-square image, anisotropic stride: a transposed lookup cannot land on the same voxel
    image_shape, stride = (24, 40), (2, 4)
    labels = torch.zeros(1, *image_shape, dtype=torch.int64)
    labels[0, 12, 29] = 1  # = centre of tap cell (6, 7): 6*2 + 0, 7*4 + 1
    tap_shape = (12, 10)
    idx = sample_grid_positions(tap_shape, 10**6)  # every cell
    centers = tap_centers(idx, stride, image_shape)
    torch.testing.assert_close(centers, idx * torch.tensor([2, 4]) + torch.tensor([0, 1]))
    phi = foreground_ratios(labels, centers[None], 1, 2)
    hits = idx[phi[0, :, 1] == 1].tolist()
    assert hits == [[6, 7]]
    assert tap_centers(torch.tensor([[11, 9]]), (2, 5), (23, 48)).tolist() == [[22, 47]]  # clamped, 9*5+2=47
    assert tap_centers(torch.tensor([[3, 3]]), (3, 3), (9, 12)).tolist() == [[8, 10]]  # 3*3+1 clamped to 8


def test_tap_centres_with_explicit_offset_and_nearest_cells():
    # same-padded strided convs centre cell i on voxel i * s: offset 0; a negative offset clamps at 0
    idx = torch.tensor([[0, 0], [3, 5]])
    assert tap_centers(idx, (4, 2), (16, 12), offset=(0, 0)).tolist() == [[0, 0], [12, 10]]
    assert tap_centers(idx, (4, 2), (16, 12), offset=(-1, 1)).tolist() == [[0, 1], [11, 11]]
    # nearest_cells inverts tap_centers on the tap's own centres, per axis, for both conventions
    grid = sample_grid_positions((4, 6), 10**6)
    for offset in (None, (0, 0)):
        centres = tap_centers(grid, (4, 2), (16, 12), offset)
        assert torch.equal(nearest_cells(centres, (4, 2), (4, 6), offset), grid)
    # default offsets: the cell whose voxels contain the point; offset 0: nearest centre, ties to the lower
    points = torch.tensor([[0, 0], [3, 1], [15, 11], [7, 5]])
    assert nearest_cells(points, (4, 2), (4, 6)).tolist() == [[0, 0], [0, 0], [3, 5], [1, 2]]
    assert nearest_cells(points, (4, 2), (4, 6), (0, 0)).tolist() == [[0, 0], [1, 0], [3, 5], [2, 2]]


def test_cross_pair_samples_both_taps_at_the_same_image_positions():
    # the gradient of a cross-only PDCR reaches exactly the sampled cells of each tap; with same-padding
    # offsets (0) a stride-(4, 4) and a stride-(2, 1) tap have coinciding centres, so the two footprints
    # must map to the same set of image voxels (anisotropic strides pin the axis order)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (2, 16, 24), generator=g)
    info = {
        "fine": TapInfo(channels=3, stride=(2, 1), receptive_field=(5, 3)),
        "coarse": TapInfo(channels=5, stride=(4, 4), receptive_field=(11, 11)),
    }
    taps = {
        "fine": torch.randn(2, 3, 8, 24, generator=g, requires_grad=True),
        "coarse": torch.randn(2, 5, 4, 6, generator=g, requires_grad=True),
    }
    pdcr = PDCRLoss(
        info,
        PDCRConfig(layers={}, cross_pairs=[("fine", "coarse")], cross_samples=6),
        num_classes=2,
        center_offsets={"fine": (0, 0), "coarse": (0, 0)},
        spatial_dims=2,
    )
    pdcr(taps, labels, generator=torch.Generator().manual_seed(2)).loss.backward()
    footprint = {}
    for name, tap in taps.items():
        cells = (tap.grad.abs().sum((0, 1)) > 0).nonzero()
        footprint[name] = set(map(tuple, tap_centers(cells, info[name].stride, (16, 24), (0, 0)).tolist()))
    assert len(footprint["coarse"]) == 6
    assert footprint["fine"] == footprint["coarse"]


def test_rf_window_is_odd_and_fits_the_image():
    assert rf_window((23, 4, 3), (64, 64, 64)) == (23, 5, 3)
    assert rf_window((47, 47, 47), (20, 9, 1)) == (19, 9, 1)


# -------------------------------------------------------------------------------------------------- module


def _setup(spatial_dims, *, num_classes=3, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = (12, 16) if spatial_dims == 2 else (8, 12, 16)
    labels = torch.randint(0, num_classes, (batch, *image), generator=g)
    info, taps = {}, {}
    for name, s, c in [("s1", 1, 4), ("s2", 2, 6), ("s4", 4, 8)]:
        stride = (s,) * spatial_dims
        info[name] = TapInfo(channels=c, stride=stride, receptive_field=(1 + 4 * s,) * spatial_dims)
        shape = tuple(math.ceil(n / s) for n in image)
        taps[name] = torch.randn(batch, c, *shape, generator=g, requires_grad=True)
    return info, taps, labels


def _module(info, spatial_dims, **kwargs):
    options = {
        "num_classes": 3,
        "layers": {"s1": 16, "s2": 12, "s4": 4},
        "cross_pairs": (("s1", "s2"), ("s4", "s2")),
        "cross_samples": 6,
        "spatial_dims": spatial_dims,
    }
    options.update(kwargs)
    module_args = {
        k: options.pop(k) for k in ("num_classes", "spatial_dims", "center_offsets") if k in options
    }
    return PDCRLoss(info, PDCRConfig(**options), **module_args)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("mode", ["h", "rf"])
def test_pdcr_module_runs_and_backpropagates(spatial_dims, mode):
    info, taps, labels = _setup(spatial_dims)
    pdcr = _module(info, spatial_dims, mode=mode)
    terms = pdcr(taps, labels, generator=torch.Generator().manual_seed(0))
    assert terms.loss.ndim == 0 and torch.isfinite(terms.loss) and terms.loss.dtype == torch.float32
    assert set(terms.per_layer) == {"s1", "s2", "s4", "s1<->s2", "s4<->s2"}
    assert all(not v.requires_grad and torch.isfinite(v) for v in terms.per_layer.values())
    torch.testing.assert_close(terms.loss.detach(), 0.01 * sum(terms.per_layer.values()))
    terms.loss.backward()
    for name, tap in taps.items():
        assert tap.grad is not None and tap.grad.abs().sum() > 0, name
    projection_params = list(pdcr.projections.parameters())
    assert len(projection_params) == 3 * 3  # linear weight, norm weight and bias for s1, s2, s4
    assert set(map(id, projection_params)) <= set(map(id, pdcr.parameters()))
    for p in projection_params:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_pdcr_module_deterministic_and_weight_scales():
    info, taps, labels = _setup(2)

    def run(seed, **kwargs):
        torch.manual_seed(0)  # same projection init in every call; sampling uses only the passed generator
        pdcr = _module(info, 2, **kwargs)
        return pdcr(taps, labels, generator=torch.Generator().manual_seed(seed)).loss

    base = run(0)
    torch.testing.assert_close(run(0), base)
    assert not torch.allclose(run(5), base)
    torch.testing.assert_close(run(0, weight=0.1), 10 * base)
    with_pe = run(0, position_encoding=True)
    assert torch.isfinite(with_pe) and not torch.allclose(with_pe, base)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_pdcr_module_bf16_autocast_on_cpu(spatial_dims):
    info, taps, labels = _setup(spatial_dims)
    pdcr = _module(info, spatial_dims, position_encoding=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = {k: v.to(torch.bfloat16) for k, v in taps.items()}
        terms = pdcr(low, labels, generator=torch.Generator().manual_seed(0))
    assert terms.loss.dtype == torch.float32 and torch.isfinite(terms.loss)
    terms.loss.backward()
    assert all(torch.isfinite(t.grad).all() for t in taps.values())


@pytest.mark.parametrize("mode", ["h", "rf"])
def test_pdcr_module_one_class_labels(mode):
    info, taps, labels = _setup(3)
    labels = torch.zeros_like(labels)  # all background: every w is 1
    terms = _module(info, 3, mode=mode)(taps, labels, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(terms.loss)
    terms.loss.backward()
    assert all(torch.isfinite(t.grad).all() for t in taps.values())
    single = PDCRLoss(info, PDCRConfig(layers={"s2": 8}), num_classes=1, spatial_dims=3)
    assert torch.isfinite(single(taps, labels).loss)


def test_pdcr_module_pairs_features_with_the_labels_under_them():
    # features = one-hot of the label at each cell's image centre; with 1-voxel windows (RF 1) the aligned
    # pairing is the loss's optimum and any misplacement (e.g. transposed or wrong-stride lookup) costs more
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(1, 24, 40, generator=g) > 0.6).long()
    stride = (2, 4)
    idx = sample_grid_positions((12, 10), 10**6)
    centre_labels = labels[0][tuple(tap_centers(idx, stride, (24, 40), (0, 0)).T)]  # TapInfo.offset default
    aligned = F.one_hot(centre_labels, 2).T.float().reshape(1, 2, 12, 10)
    shifted = torch.roll(aligned, shifts=(1, 1), dims=(2, 3))
    info = {"t": TapInfo(channels=2, stride=stride, receptive_field=(1, 1))}
    pdcr = PDCRLoss(info, PDCRConfig(layers={"t": 40}, mode="rf"), num_classes=2, spatial_dims=2)
    loss_aligned = pdcr({"t": aligned}, labels, generator=torch.Generator().manual_seed(1)).per_layer["t"]
    loss_shifted = pdcr({"t": shifted}, labels, generator=torch.Generator().manual_seed(1)).per_layer["t"]
    assert loss_aligned < loss_shifted - 0.05


def test_pdcr_module_validation():
    info, taps, labels = _setup(2)
    with pytest.raises(ValueError, match="not in tap_info"):
        PDCRLoss(info, PDCRConfig(layers={"nope": 8}), num_classes=3, spatial_dims=2)
    with pytest.raises(ValueError, match="mode"):
        PDCRLoss(info, PDCRConfig(layers={"s2": 8}, mode="x"), num_classes=3, spatial_dims=2)
    with pytest.raises(ValueError, match="odd"):
        PDCRLoss(info, PDCRConfig(layers={"s2": 8}, patch_sizes=(4,)), num_classes=3, spatial_dims=2)
    with pytest.raises(ValueError, match="3 entries"):
        PDCRLoss(info, PDCRConfig(layers={"s2": 8}), num_classes=3, spatial_dims=3)
    pdcr = PDCRLoss(info, PDCRConfig(layers={"s2": 8}), num_classes=3, spatial_dims=2)
    with pytest.raises(ValueError, match="missing"):
        pdcr({"s1": taps["s1"]}, labels)
    with pytest.raises(ValueError, match="outside the image"):  # axes transposed for a 12x16 image
        pdcr({"s2": taps["s2"].transpose(2, 3)}, labels)
    with pytest.raises(ValueError, match="label values"):
        pdcr(taps, labels + 3)
    with pytest.raises(ValueError, match="center_offsets"):
        PDCRLoss(
            info, PDCRConfig(layers={"s2": 8}), num_classes=3, center_offsets={"s2": (0,)}, spatial_dims=2
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_pdcr_module_fp16_autocast_on_cuda(spatial_dims):
    info, taps, labels = _setup(spatial_dims)
    taps = {k: v.detach().cuda().requires_grad_() for k, v in taps.items()}
    pdcr = _module(info, spatial_dims, position_encoding=True).cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.autocast("cuda", dtype=torch.float16):
        terms = pdcr({k: v.half() for k, v in taps.items()}, labels.cuda(), generator=generator)
    assert terms.loss.dtype == torch.float32 and torch.isfinite(terms.loss)
    terms.loss.backward()
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in taps.values())
