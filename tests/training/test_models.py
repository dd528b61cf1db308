"""Registry-driven tests of every segmentation network, 2D and 3D, plus registry and weight-loading checks."""

from __future__ import annotations

import io
import itertools
import math

import pytest

torch = pytest.importorskip("torch")

from training.models import (  # noqa: E402
    SegmentationOutput,
    TapInfo,
    create_model,
    list_models,
    register_model,
)
from training.models.deeplabv3plus import DeepLabV3Plus  # noqa: E402
from training.models.registry import get_model_entry  # noqa: E402
from training.models.unet import UNet  # noqa: E402

pytestmark = pytest.mark.torch

# Tiny configurations so every model runs in well under a second on CPU. A newly registered model must add
# one here (the KeyError in _tiny says so) to join the registry-driven test.
TINY = {
    ("unet", 2): {"features": (4, 8, 16)},
    ("unet", 3): {
        "features": (4, 8, 16),
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
    },
    ("deeplabv3plus", 2): {
        "encoder_depth": 18,
        "encoder_width": 4,
        "aspp_channels": 8,
        "lowlevel_channels": 4,
        "decoder_channels": 8,
    },
}
ODD_SHAPE = {2: (37, 45), 3: (19, 27, 23)}
EXPECTED_SITES = {
    "unet": ["encoder1", "encoder2", "encoder3", "decoder2", "decoder1"],
    "deeplabv3plus": ["stem", "encoder1", "encoder2", "encoder3", "encoder4", "lowlevel", "concat"],
}


def _tiny(name: str, spatial_dims: int) -> dict:
    try:
        return dict(TINY[(name, spatial_dims)])
    except KeyError:
        raise KeyError(
            f"add a tiny test configuration for model {name!r} ({spatial_dims}D) to TINY"
        ) from None


def _combinations():
    for sd in (2, 3):
        for name in list_models(spatial_dims=sd):
            accepted = get_model_entry(name).accepted_kwargs()
            ds_options = (False, True) if "deep_supervision" in accepted else (False,)
            for uafr, ds, proj in itertools.product((False, True), ds_options, (None, 6)):
                yield pytest.param(
                    name, sd, uafr, ds, proj, id=f"{name}-{sd}d-uafr{uafr:d}-ds{ds:d}-proj{proj}"
                )


def _grid(spatial, stride):
    return tuple(math.ceil(s / st) for s, st in zip(spatial, stride))


@pytest.mark.parametrize(
    ("name", "spatial_dims", "uafr", "deep_supervision", "projection_dim"), _combinations()
)
def test_forward_backward_odd_sizes(name, spatial_dims, uafr, deep_supervision, projection_dim):
    torch.manual_seed(0)
    kwargs = _tiny(name, spatial_dims)
    if deep_supervision:
        kwargs["deep_supervision"] = True
    model = create_model(
        name,
        spatial_dims=spatial_dims,
        in_channels=2,
        num_classes=3,
        uafr=uafr,
        projection_dim=projection_dim,
        **kwargs,
    )
    spatial = ODD_SHAPE[spatial_dims]
    image = torch.randn(2, 2, *spatial)
    out = model(image)
    assert isinstance(out, SegmentationOutput)
    assert model.spatial_dims == spatial_dims and model.num_classes == 3
    assert len(model.divisor) == spatial_dims

    assert out.logits.shape == (2, 3, *spatial)
    tensors = [out.logits, *out.deep_supervision, *out.taps.values(), *out.uncertainty.values()]
    if out.embedding is not None:
        tensors.append(out.embedding)
    assert all(torch.isfinite(t).all() for t in tensors)

    # UAFR maps: count, names, order, range, grid.
    expected_sites = EXPECTED_SITES[name] if uafr else []
    assert model.uncertainty_names == expected_sites
    assert list(out.uncertainty) == expected_sites
    for site, u in out.uncertainty.items():
        assert u.shape == (2, 1, *_grid(spatial, model.uncertainty_strides[site]))
        assert float(u.detach().min()) >= 0.0 and float(u.detach().max()) <= 1.0
        assert u.requires_grad  # not detached

    # Taps match tap_info.
    info = model.tap_info
    assert list(out.taps) == list(info)
    for tap, feat in out.taps.items():
        assert isinstance(info[tap], TapInfo)
        assert feat.shape == (2, info[tap].channels, *_grid(spatial, info[tap].stride))
        assert len(info[tap].receptive_field) == spatial_dims

    # Deep supervision: finest first, on the decoder grids.
    if deep_supervision:
        n_stages = len(kwargs["features"])
        assert len(out.deep_supervision) == n_stages - 2
        for k, logits in enumerate(out.deep_supervision, start=2):
            assert logits.shape == (2, 3, *_grid(spatial, info[f"decoder{k}"].stride))
    else:
        assert out.deep_supervision == []

    # Projection head.
    assert model.embedding_channels == projection_dim
    if projection_dim is None:
        assert out.embedding is None
    else:
        assert out.embedding.shape[:2] == (2, projection_dim)
        emb_stride = (1,) * spatial_dims if name == "unet" else info["decoder"].stride
        assert out.embedding.shape[2:] == _grid(spatial, emb_stride)

    # Random weights on every output so no parameter's gradient cancels by symmetry (norms centre sums).
    outputs = [out.logits, *out.deep_supervision] + ([out.embedding] if out.embedding is not None else [])
    loss = sum((t * torch.randn_like(t)).sum() for t in outputs)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(("name", "spatial_dims"), [("unet", 2), ("unet", 3), ("deeplabv3plus", 2)])
def test_return_features_off_keeps_outputs(name, spatial_dims):
    torch.manual_seed(0)
    model = create_model(
        name,
        spatial_dims=spatial_dims,
        in_channels=1,
        num_classes=2,
        uafr=True,
        projection_dim=4,
        **_tiny(name, spatial_dims),
    ).eval()
    image = torch.randn(1, 1, *ODD_SHAPE[spatial_dims])
    with torch.no_grad():
        full = model(image)
        model.return_features = False
        lean = model(image)
    assert lean.taps == {} and lean.embedding is None
    torch.testing.assert_close(lean.logits, full.logits)
    assert list(lean.uncertainty) == list(full.uncertainty)


def test_padding_is_invisible_inside_the_image():
    """Logits of an odd-sized image equal those of the same image already padded to the divisor (cropped)."""
    torch.manual_seed(0)
    model = create_model("unet", spatial_dims=2, in_channels=1, num_classes=2, features=(4, 8, 16)).eval()
    image = torch.randn(1, 1, 37, 45)
    padded = torch.nn.functional.pad(image, (0, 48 - 45, 0, 40 - 37))
    with torch.no_grad():
        a = model(image).logits
        b = model(padded).logits[..., :37, :45]
    torch.testing.assert_close(a, b)


def test_unet_defaults_and_anisotropy():
    model = UNet(spatial_dims=3, in_channels=1, num_classes=2)
    assert model.features == (32, 64, 128, 256, 320, 320)
    assert model.divisor == (32, 32, 32)
    model2d = UNet(spatial_dims=2, in_channels=1, num_classes=2, n_stages=7, max_features=256)
    assert model2d.features == (32, 64, 128, 256, 256, 256, 256)
    aniso = UNet(
        spatial_dims=3,
        in_channels=1,
        num_classes=2,
        features=(4, 8, 16, 16),
        strides=[1, [1, 2, 2], [2, 2, 2], [1, 2, 2]],
        kernel_sizes=[[1, 3, 3], [1, 3, 3], 3, 3],
    )
    assert aniso.divisor == (2, 8, 8)
    assert aniso.tap_info["encoder4"].stride == (2, 8, 8)
    assert aniso.tap_info["encoder1"].receptive_field == (1, 5, 5)


def test_unet_argument_errors():
    with pytest.raises(ValueError, match="first stage must have stride 1"):
        UNet(spatial_dims=2, in_channels=1, num_classes=2, features=(4, 8), strides=[2, 2])
    with pytest.raises(ValueError, match="number of stages disagrees"):
        UNet(spatial_dims=2, in_channels=1, num_classes=2, features=(4, 8, 16), strides=[1, 2])
    with pytest.raises(ValueError, match="must be odd"):
        UNet(spatial_dims=2, in_channels=1, num_classes=2, features=(4, 8), kernel_sizes=[3, 4])
    with pytest.raises(ValueError, match="valid names: encoder1"):
        UNet(spatial_dims=2, in_channels=1, num_classes=2, features=(4, 8), uafr_layers=["encoder9"])
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        UNet(spatial_dims=4, in_channels=1, num_classes=2)
    with pytest.raises(ValueError, match="norm must be one of"):
        UNet(spatial_dims=2, in_channels=1, num_classes=2, features=(4, 8), norm="layer")
    model = UNet(spatial_dims=2, in_channels=1, num_classes=2, features=(4, 8))
    with pytest.raises(ValueError, match=r"got shape \(1, 3, 16, 16\)"):
        model(torch.zeros(1, 3, 16, 16))


def test_uafr_layers_place_blocks_by_name():
    model = UNet(
        spatial_dims=2,
        in_channels=1,
        num_classes=2,
        features=(4, 8, 16),
        uafr_layers=["decoder1", "encoder2"],
    )
    assert model.uncertainty_names == ["encoder2", "decoder1"]  # computation order, not argument order
    out = model(torch.randn(1, 1, 20, 20))
    assert list(out.uncertainty) == ["encoder2", "decoder1"]
    # The UAFR gate widens the field of the stage it follows (3x3 conv on a stride-2 grid: +4).
    plain = UNet(spatial_dims=2, in_channels=1, num_classes=2, features=(4, 8, 16))
    rf = model.tap_info["encoder2"].receptive_field[0]
    assert rf == plain.tap_info["encoder2"].receptive_field[0] + 4


def test_create_model_drops_none_kwargs():
    model = create_model(
        "unet",
        spatial_dims=2,
        in_channels=1,
        num_classes=2,
        features=(4, 8),
        deep_supervision=None,
        projection_dim=None,
        not_an_option=None,
    )
    assert model.embedding_channels is None and len(model.deep_supervision_heads) == 0


def test_create_model_errors():
    with pytest.raises(ValueError, match="available models: deeplabv3plus, unet"):
        create_model("vnet", spatial_dims=3, in_channels=1, num_classes=2)
    with pytest.raises(ValueError, match=r"supports spatial_dims \(2,\), got spatial_dims=3"):
        create_model("deeplabv3plus", spatial_dims=3, in_channels=1, num_classes=2)
    with pytest.raises(ValueError, match="2D only"):
        DeepLabV3Plus(spatial_dims=3, in_channels=1, num_classes=2)
    with pytest.raises(ValueError, match="does not accept deep_supervision; accepted options: encoder_depth"):
        create_model("deeplabv3plus", spatial_dims=2, in_channels=1, num_classes=2, deep_supervision=True)
    with pytest.raises(ValueError, match="already registered"):
        register_model("unet")(UNet)
    assert list_models() == ["deeplabv3plus", "unet"]
    assert list_models(spatial_dims=3) == ["unet"]


def test_deeplab_strides_and_default_encoder():
    model = DeepLabV3Plus(spatial_dims=2, in_channels=1, num_classes=2, **_tiny("deeplabv3plus", 2))
    strides = {name: info.stride for name, info in model.tap_info.items()}
    assert strides == {
        "stem": (2, 2),
        "encoder1": (4, 4),
        "encoder2": (8, 8),
        "encoder3": (16, 16),
        "encoder4": (16, 16),
        "lowlevel": (4, 4),
        "decoder": (4, 4),
    }
    # Dilated last stage: field grows with stride 16 steps while the grid stays at 16.
    assert model.tap_info["encoder4"].receptive_field[0] > model.tap_info["encoder3"].receptive_field[0]
    default = DeepLabV3Plus(spatial_dims=2, in_channels=3, num_classes=2)
    assert default.encoder.depth == 50 and default.tap_info["encoder4"].channels == 2048


def test_deeplab_encoder_weights_roundtrip(tmp_path):
    torch.manual_seed(0)
    tiny = _tiny("deeplabv3plus", 2)
    source = DeepLabV3Plus(spatial_dims=2, in_channels=1, num_classes=2, **tiny)
    state = source.encoder.state_dict()
    state["fc.weight"] = torch.zeros(10, 32)  # a torchvision ResNet checkpoint carries its classifier
    path = tmp_path / "encoder.pt"
    torch.save(state, path)
    loaded = DeepLabV3Plus(spatial_dims=2, in_channels=1, num_classes=2, encoder_weights=str(path), **tiny)
    for key, value in source.encoder.state_dict().items():
        torch.testing.assert_close(loaded.encoder.state_dict()[key], value)
    torch.save({"state_dict": source.encoder.state_dict()}, tmp_path / "ckpt.pt")
    DeepLabV3Plus(spatial_dims=2, in_channels=1, num_classes=2, encoder_weights=tmp_path / "ckpt.pt", **tiny)

    with pytest.raises(
        ValueError, match=r"encoder\.pt: weights do not fit the ResNet-18 encoder .*conv1\.weight"
    ):
        DeepLabV3Plus(spatial_dims=2, in_channels=3, num_classes=2, encoder_weights=path, **tiny)
    wrong_depth = {**tiny, "encoder_depth": 34}
    with pytest.raises(ValueError, match="missing layer1.2.conv1.weight"):
        DeepLabV3Plus(spatial_dims=2, in_channels=1, num_classes=2, encoder_weights=path, **wrong_depth)
    with pytest.raises(FileNotFoundError, match="nothing.pt: encoder weights file not found"):
        DeepLabV3Plus(spatial_dims=2, in_channels=1, num_classes=2, encoder_weights=tmp_path / "nothing.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: cannot read encoder weights"):
        DeepLabV3Plus(
            spatial_dims=2, in_channels=1, num_classes=2, encoder_weights=tmp_path / "junk.pt", **tiny
        )


class _ExportWrapper(torch.nn.Module):
    """(image) -> (probabilities, uncertainty maps...): a dataclass cannot leave a traced graph."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        out = self.model(image)
        return (torch.softmax(out.logits.float(), dim=1), *out.uncertainty.values())


@pytest.mark.slow
@pytest.mark.parametrize(("name", "spatial_dims"), [("unet", 2), ("unet", 3), ("deeplabv3plus", 2)])
def test_onnx_export_with_uafr(name, spatial_dims):
    """Legacy TorchScript export with dynamic sizes; ONNX Runtime on a different odd size matches eager."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = create_model(
        name, spatial_dims=spatial_dims, in_channels=1, num_classes=3, uafr=True, **_tiny(name, spatial_dims)
    )
    wrapper = _ExportWrapper(model).eval()
    sample = torch.randn(1, 1, *([32] * spatial_dims))
    axes = {0: "batch", **{2 + a: f"s{a}" for a in range(spatial_dims)}}
    buffer = io.BytesIO()
    torch.onnx.export(
        wrapper,
        (sample,),
        buffer,
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        dynamic_axes={"image": axes},
    )
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    image = torch.randn(2, 1, *ODD_SHAPE[spatial_dims])
    got = session.run(None, {"image": image.numpy()})
    with torch.no_grad():
        want = wrapper(image)
    assert len(got) == 1 + len(model.uncertainty_names)
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape)
        assert abs(g - w.numpy()).max() < 1e-4


@pytest.mark.parametrize(
    "options",
    [
        {"norm": "batch", "activation": "relu"},
        {"norm": "group", "dropout": 0.2, "uafr": True, "uafr_norm": "instance", "uafr_m": 3},
        {"norm": "instance", "uafr": True, "uafr_kernel_size": 1, "uafr_hidden": 4},
    ],
)
def test_unet_norm_activation_dropout_options(options):
    torch.manual_seed(0)
    model = create_model("unet", spatial_dims=2, in_channels=1, num_classes=2, features=(8, 16), **options)
    out = model(torch.randn(2, 1, 13, 17))
    assert out.logits.shape == (2, 2, 13, 17) and torch.isfinite(out.logits).all()
    out.logits.square().mean().backward()
    norms = {type(m).__name__ for m in model.encoder.modules()}
    assert {"batch": "BatchNorm2d", "group": "GroupNorm", "instance": "InstanceNorm2d"}[
        options["norm"]
    ] in norms


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_projection_level_puts_the_embedding_on_that_decoder_grid(spatial_dims):
    shape = (1, 1, 19, 27, 23)[: 2 + spatial_dims]
    common = {"spatial_dims": spatial_dims, "in_channels": 1, "num_classes": 3, "features": (4, 8, 16)}
    model = create_model("unet", projection_dim=8, projection_level=2, **common)
    out = model(torch.randn(*shape))
    stride = model.tap_info["decoder2"].stride
    assert out.embedding.shape[1] == 8
    assert tuple(out.embedding.shape[2:]) == tuple(-(-s // t) for s, t in zip(shape[2:], stride))
    out.embedding.sum().backward()
    assert model.projection[0].weight.grad is not None
    with pytest.raises(ValueError, match="projection_level"):
        create_model("unet", projection_dim=8, projection_level=3, **common)
