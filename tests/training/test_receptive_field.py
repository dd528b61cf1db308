"""Receptive fields computed from the architecture (Eqs. 5-7) against hand values and a brute-force probe.

The probe: set every conv weight to a small positive value, norms to identity (BatchNorm in eval mode with
zero mean / unit variance), feed a positive image in float64, and backpropagate one tap voxel to the input.
Input voxels with a nonzero gradient are exactly those the voxel depends on, so the per-axis extent of the
nonzero gradient must equal the computed box ``tap_geometry[name].box(index)``; the receptive field in
``tap_info`` is the largest extent over the grid phases (the rule documented in receptive_field.py).
"""

from __future__ import annotations

import itertools
import math

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from training.models import create_model  # noqa: E402
from training.models.deeplabv3plus import BasicBlock, Bottleneck, DeepLabV3Plus  # noqa: E402
from training.models.receptive_field import Geometry, propagate_geometry  # noqa: E402
from training.models.unet import UNet  # noqa: E402

pytestmark = pytest.mark.torch

_CONVS = (nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCHNORMS = (nn.BatchNorm2d, nn.BatchNorm3d)


def _make_positive(module: nn.Module, seed: int = 0) -> nn.Module:
    """Positive random conv weights scaled by fan-in, zero biases, identity BatchNorms; float64, eval mode."""
    gen = torch.Generator().manual_seed(seed)
    module.double().eval()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, _CONVS + _TRANSPOSED):
                fan_in = m.weight[0].numel() if isinstance(m, _CONVS) else m.weight.shape[0]
                m.weight.copy_(
                    (torch.rand(m.weight.shape, generator=gen, dtype=torch.float64) + 0.5) / fan_in
                )
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, _BATCHNORMS):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.weight.data.fill_(1.0)
                m.bias.data.zero_()
    return module


def _extent(grad: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """Per spatial axis, (first, last) index with a nonzero gradient. grad (1, C, *S)."""
    mask = grad.abs().sum(dim=(0, 1)) != 0
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = mask.any(dim=other) if other else mask
        idx = torch.nonzero(hits).flatten()
        out.append((int(idx.min()), int(idx.max())))
    return tuple(out)


def _probe(fn, x: torch.Tensor, index) -> tuple[tuple[int, int], ...]:
    x = x.detach().requires_grad_(True)
    y = fn(x)
    (grad,) = torch.autograd.grad(y[(0, slice(None), *index)].sum(), x)
    return _extent(grad)


# --- the geometry algebra against hand-computed values -------------------------------------------------


def test_conv_chain_matches_equations_5_to_7():
    # (kernel, stride, padding, dilation) per layer.
    chain = [(3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 1, 1)]
    g = Geometry.identity(1)
    for k, s, p, d in chain:
        g = g.conv(k, s, p, d)
    # Eq. 7: 1 + sum (k_z - 1) prod_{t<z} s_t = 1 + 2 * (1 + 1 + 2 + 2 + 4) = 21; stride 4.
    assert g.stride == (4,) and g.receptive_field == (21,)
    assert g.box((5,)) == ((20 - 10, 20 + 10),)


@pytest.mark.parametrize("seed", range(6))
def test_random_conv_chains_match_equations_5_to_7_literally(seed):
    rng = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(int(torch.randint(1, 7, (1,), generator=rng))):
        k = int(torch.randint(1, 6, (1,), generator=rng))
        s = int(torch.randint(1, 4, (1,), generator=rng))
        p = int(torch.randint(0, k, (1,), generator=rng))
        d = int(torch.randint(1, 3, (1,), generator=rng))
        layers.append((k, s, p, d))
    g = Geometry.identity(1)
    for k, s, p, d in layers:
        g = g.conv(k, s, p, d)
    for i in (0, 3, 11):
        # Eqs. 5-6 with the effective (dilated) kernel k_eff = d (k - 1) + 1, o_l = e_l = i.
        prod_all = math.prod(s for _, s, _, _ in layers)
        prefix = [math.prod(s for _, s, _, _ in layers[:z]) for z in range(len(layers))]
        start = i * prod_all - sum(p * pre for (_, _, p, _), pre in zip(layers, prefix))
        end = i * prod_all - sum(
            (1 + p - (d * (k - 1) + 1)) * pre for (k, _, p, d), pre in zip(layers, prefix)
        )
        assert g.box((i,)) == ((start, end),)
        rf = sum(d * (k - 1) * pre for (k, _, _, d), pre in zip(layers, prefix)) + 1  # Eq. 7
        assert g.receptive_field == (rf,) == (end - start + 1,)


def test_transposed_conv_geometry_by_hand():
    # conv k3/s2/p1: unit i reads [2i-1, 2i+1]; transposed k2/s2: output o reads unit o // 2.
    g = Geometry.identity(1).conv(3, 2, 1).transposed_conv(2, 2)
    (axis,) = g.axes
    assert axis.jump == 1 and axis.starts == (-1, -2) and axis.ends == (1, 0)
    assert g.box((6,)) == ((5, 7),) and g.box((7,)) == ((5, 7),)
    assert g.receptive_field == (3,)
    # Kernel 3 > stride 2: even outputs read one unit, odd outputs two; the field is the largest (rule).
    g = Geometry.identity(1).conv(1, 2, 0).transposed_conv(3, 2, 1)
    assert g.box((4,)) == ((4, 4),) and g.box((5,)) == ((4, 6),)
    assert g.receptive_field == (3,)
    with pytest.raises(ValueError, match="not an integer stride"):
        Geometry.identity(1).transposed_conv(2, 2)


def test_unknown_module_is_refused():
    with pytest.raises(TypeError, match="give it a propagate_geometry"):
        propagate_geometry(nn.Upsample(scale_factor=2), Geometry.identity(2))


# --- brute force on small operator chains ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "build", "geometry"),
    [
        (
            "transposed k3 s2 p1",
            lambda: nn.Sequential(nn.Conv2d(1, 2, 3, 2, 1), nn.ConvTranspose2d(2, 2, 3, 2, 1)),
            lambda g: g.conv(3, 2, 1).transposed_conv(3, 2, 1),
        ),
        (
            "dilated conv",
            lambda: nn.Sequential(nn.Conv2d(1, 2, 3, 2, 1), nn.Conv2d(2, 2, 3, 1, 4, dilation=4)),
            lambda g: g.conv(3, 2, 1).conv(3, 1, 4, 4),
        ),
    ],
)
def test_operator_chains_against_probe(name, build, geometry):
    module = _make_positive(build())
    g = geometry(Geometry.identity(2))
    x = torch.rand(1, 1, 48, 48, dtype=torch.float64) + 0.5
    for index in [(9, 9), (10, 11), (11, 10)]:
        assert _probe(module, x, index) == g.box(index), name


@pytest.mark.parametrize("factor", [2, 4])
def test_bilinear_resize_against_probe(factor):
    conv = _make_positive(nn.Conv2d(1, 2, 3, 4, 1))
    g = Geometry.identity(2).conv(3, 4, 1).resize(factor, "bilinear", align_corners=False)

    def fn(x):
        return nn.functional.interpolate(conv(x), scale_factor=factor, mode="bilinear", align_corners=False)

    x = torch.rand(1, 1, 64, 64, dtype=torch.float64) + 0.5
    for t in range(factor):
        index = (3 * factor + t, 3 * factor + t)
        assert _probe(fn, x, index) == g.box(index)


@pytest.mark.parametrize(
    "block",
    [
        lambda: Bottleneck(2, 8, 2, stride=2, dilation=1, norm_kind="batch"),
        lambda: BasicBlock(2, 4, 4, stride=1, dilation=2, norm_kind="batch"),
    ],
)
def test_residual_blocks_against_probe(block):
    module = _make_positive(block())
    g = propagate_geometry(module, Geometry.identity(2))
    x = torch.rand(1, module.conv1.in_channels, 32, 32, dtype=torch.float64) + 0.5
    for index in [(7, 7), (8, 7)]:
        assert _probe(module, x, index) == g.box(index)


# --- brute force on whole U-Nets ------------------------------------------------------------------------

PROBE_MODELS = {
    "2d": {
        "spatial_dims": 2,
        "features": (2, 3, 4, 4),
        # UAFR at some stages only, so both kinds of stage are probed.
        "uafr_layers": ["encoder2", "encoder4", "decoder3", "decoder1"],
    },
    "3d-anisotropic": {
        "spatial_dims": 3,
        "features": (2, 3, 4),
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
        "uafr": True,
    },
}


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@pytest.mark.slow
@pytest.mark.parametrize("key", list(PROBE_MODELS))
def test_unet_taps_against_probe(key):
    cfg = dict(PROBE_MODELS[key])
    sd = cfg.pop("spatial_dims")
    model = create_model("unet", spatial_dims=sd, in_channels=1, num_classes=2, norm="batch", **cfg)
    model = _make_positive(model)
    info, geometry = model.tap_info, model.tap_geometry
    for name, tap in info.items():
        print(
            f"unet {key} {name}: channels {tap.channels} stride {tap.stride} receptive field {tap.receptive_field}"
        )

    # Big enough that the probed voxels' fields lie inside the image (no border clipping).
    size = tuple(
        _round_up(max(t.receptive_field[a] + 8 * t.stride[a] for t in info.values()), model.divisor[a])
        for a in range(sd)
    )
    x = torch.rand(1, 1, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    x.requires_grad_(True)
    out = model(x)
    for name, tap in info.items():
        g = geometry[name]
        feature = out.taps[name]
        centre = tuple(n // 2 for n in feature.shape[2:])
        periods = max(axis.period for axis in g.axes)
        measured_rf = [0] * sd
        for t in range(periods):  # a diagonal walk visits every phase of every axis
            index = tuple(c + t for c in centre)
            (grad,) = torch.autograd.grad(feature[(0, slice(None), *index)].sum(), x, retain_graph=True)
            box = g.box(index)
            assert all(lo > 0 and hi < n - 1 for (lo, hi), n in zip(box, size)), "probe image too small"
            assert _extent(grad) == box, f"{name} at {index}"
            measured_rf = [max(m, hi - lo + 1) for m, (lo, hi) in zip(measured_rf, box)]
        assert tuple(measured_rf) == tap.receptive_field, name


def test_unet_rf_values_by_hand():
    """Default nnU-Net stages (two 3x3 convs, the first strided) by Eq. 7: 5, 11, 23, 47, 95."""
    model = UNet(spatial_dims=3, in_channels=1, num_classes=2, features=(2, 2, 2, 2, 2))
    rf = {n: t.receptive_field[0] for n, t in model.tap_info.items() if n.startswith("encoder")}
    # The seed 3D code hard-codes rf 23 (stride 4) and 47 (stride 8) for its encoder stages 3 and 4.
    assert rf == {"encoder1": 5, "encoder2": 11, "encoder3": 23, "encoder4": 47, "encoder5": 95}


@pytest.mark.parametrize(
    "model",
    [
        lambda: UNet(spatial_dims=2, in_channels=1, num_classes=2, features=(2, 2, 2, 2), uafr=True),
        lambda: UNet(
            spatial_dims=3,
            in_channels=1,
            num_classes=2,
            features=(2, 2, 2),
            strides=[1, [1, 2, 2], [2, 2, 2]],
            kernel_sizes=[[1, 3, 3], 3, 3],
        ),
        lambda: DeepLabV3Plus(
            spatial_dims=2,
            in_channels=1,
            num_classes=2,
            encoder_depth=18,
            encoder_width=2,
            aspp_channels=2,
            lowlevel_channels=2,
            decoder_channels=2,
        ),
    ],
)
def test_strides_match_tap_shape_ratios(model):
    net = model().eval()
    size = tuple(2 * d for d in net.divisor)
    with torch.no_grad():
        out = net(torch.randn(1, 1, *size))
    for name, tap in net.tap_info.items():
        shape = out.taps[name].shape[2:]
        assert tuple(s // n for s, n in zip(size, shape)) == tap.stride, name
        assert all(s % n == 0 for s, n in zip(size, shape)), name


def test_deeplab_rf_is_computed_not_hard_coded():
    kwargs = {"spatial_dims": 2, "in_channels": 1, "num_classes": 2, "encoder_width": 2, "aspp_channels": 2}
    small = DeepLabV3Plus(encoder_depth=18, **kwargs).tap_info
    big = DeepLabV3Plus(encoder_depth=34, **kwargs).tap_info
    assert small["stem"].receptive_field == (7, 7)  # conv 7x7 / 2
    assert small["encoder1"].receptive_field == (43, 43)  # + maxpool 3/2 (+2*2) + four 3x3 convs at stride 4
    assert big["encoder2"].receptive_field > small["encoder2"].receptive_field
    wider = DeepLabV3Plus(encoder_depth=18, aspp_rates=(6, 12, 24), **kwargs).tap_info
    assert wider["decoder"].receptive_field[0] - small["decoder"].receptive_field[0] == 2 * (24 - 18) * 16
    assert list(itertools.islice(small, 7)) == [
        "stem",
        "encoder1",
        "encoder2",
        "encoder3",
        "encoder4",
        "lowlevel",
        "decoder",
    ]
