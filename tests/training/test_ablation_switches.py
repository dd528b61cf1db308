"""The ablation switches outside the PDCR formula: attention blocks in UAFR's place (SE, CBAM), UAFR without F,
RF windows with or without UAFR, CCDC's two-pixel region, notices for settings without effect, the PDCR gradient
ratio, and every switch reachable from a YAML file."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from training.building import build_losses, build_model  # noqa: E402
from training.config import (  # noqa: E402
    CCDCConfig,
    LossConfig,
    ModelConfig,
    PDCRConfig,
    TrainConfig,
    UAFRConfig,
    config_from_dict,
    config_notices,
    config_to_yaml,
    load_config,
)
from training.diagnostics import pdcr_gradient_ratio  # noqa: E402
from training.losses.ccdc import CCDCLoss, region_embeddings  # noqa: E402
from training.models import create_model, normalized_entropy_from_logits  # noqa: E402
from training.models.attention import CBAM, SqueezeExcitation  # noqa: E402
from training.models.uafr import UAFR  # noqa: E402

pytestmark = pytest.mark.torch

SMALL_3D = {"features": [4, 8, 8, 8, 8]}


# ---------------------------------------------------------------------------------------- attention blocks


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_se_is_a_per_channel_gain_and_cbam_a_gated_map(spatial_dims):
    torch.manual_seed(0)
    x = torch.randn(2, 8, *([6] * spatial_dims))
    with torch.no_grad():
        out, u = SqueezeExcitation(8, spatial_dims)(x)
        assert u is None and out.shape == x.shape
        # one gain per (b, c), in (0, 1): the same at every voxel
        flat = (out / x).flatten(2)
        torch.testing.assert_close(flat, flat[..., :1].expand_as(flat), rtol=1e-4, atol=1e-5)
        assert float(flat.min()) > 0 and float(flat.max()) < 1
        out, u = CBAM(8, spatial_dims)(x)
        assert u is None and out.shape == x.shape
        spatial_gain = (out / x).flatten(2)
        assert float(spatial_gain.std(-1).max()) > 1e-3  # not a per-channel constant: the spatial gate acts


def test_uafr_without_f_is_the_entropy_of_the_feature_itself():
    q = torch.randn(2, 5, 4, 6)
    block = UAFR(5, 2, use_f=False)
    assert not list(block.parameters())
    out, u = block(q)
    torch.testing.assert_close(u, normalized_entropy_from_logits(q))
    torch.testing.assert_close(out, q * (2 - u))
    # with F the map is not that of the feature
    _, u_f = UAFR(5, 2)(q)
    assert not torch.allclose(u_f, u)


@pytest.mark.parametrize(("name", "spatial_dims"), [("unet", 2), ("unet", 3), ("deeplabv3plus", 2)])
@pytest.mark.parametrize("block", ["se", "cbam"])
def test_models_build_attention_blocks_at_the_uafr_sites(name, spatial_dims, block):
    options = (
        {"encoder_depth": 18, "encoder_width": 8} if name == "deeplabv3plus" else {"features": [4, 8, 16]}
    )
    model = create_model(
        name, spatial_dims=spatial_dims, in_channels=1, num_classes=2, uafr=True, uafr_block=block, **options
    )
    kind = SqueezeExcitation if block == "se" else CBAM
    assert model.uafr and all(isinstance(b, kind) for b in model.uafr.values())
    assert model.uncertainty_names == [] and model.uncertainty_strides == {}
    model.eval()
    out = model(torch.randn(1, 1, *([32] * spatial_dims)))
    assert out.uncertainty == {} and out.logits.shape[2:] == (32,) * spatial_dims
    # CBAM's spatial conv widens the receptive field; SE's global pooling is not counted
    plain = create_model(name, spatial_dims=spatial_dims, in_channels=1, num_classes=2, **options)
    tap = "encoder2"
    wider = model.tap_info[tap].receptive_field > plain.tap_info[tap].receptive_field
    assert wider == (block == "cbam")
    assert model.tap_info_without_uafr[tap] == plain.tap_info[tap]


def test_uafr_block_and_use_f_reach_the_model_from_the_config():
    cfg = TrainConfig(
        model=ModelConfig(
            spatial_dims=2, **{"features": (4, 8, 16)}, uafr=UAFRConfig(enabled=True, block="cbam")
        )
    )
    assert all(isinstance(b, CBAM) for b in build_model(cfg, 1, 2).uafr.values())
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, uafr=UAFRConfig(enabled=True, use_f=False))
    )
    model = build_model(cfg, 1, 2)
    assert all(isinstance(b, UAFR) and b.attention is None for b in model.uafr.values())
    assert model.uncertainty_names  # UAFR without F still gives its uncertainty maps


# ---------------------------------------------------------------------------------------- RF windows


def test_rf_windows_leave_uafr_out_by_default_as_the_authors_code():
    base = TrainConfig(
        model=ModelConfig(
            spatial_dims=3, features=tuple(SMALL_3D["features"]), uafr=UAFRConfig(enabled=True)
        ),
        loss=LossConfig(pdcr=PDCRConfig(enabled=True, mode="rf", layers={"encoder3": 8, "encoder4": 8})),
    )
    model = build_model(base, 1, 3)
    _, pdcr, _ = build_losses(base, model, 3)
    assert pdcr.tap_info["encoder3"].receptive_field == (23, 23, 23)
    assert pdcr.tap_info["encoder4"].receptive_field == (47, 47, 47)
    with_uafr = dataclasses.replace(
        base, loss=LossConfig(pdcr=dataclasses.replace(base.loss.pdcr, rf_includes_uafr=True))
    )
    _, pdcr, _ = build_losses(with_uafr, model, 3)
    assert pdcr.tap_info["encoder3"].receptive_field == (37, 37, 37)
    assert pdcr.tap_info["encoder4"].receptive_field == (77, 77, 77)
    from training.building import pdcr_notes

    lines = pdcr_notes(pdcr, (32, 64, 64))
    assert any(
        "encoder3" in line and "receptive field [37, 37, 37]" in line and "windows 31x37x37" in line
        for line in lines
    )


# ---------------------------------------------------------------------------------------- CCDC region


def test_two_pixel_region_is_the_pixel_and_its_right_neighbour():
    torch.manual_seed(0)
    emb = torch.randn(1, 4, 3, 5)
    index = torch.tensor([1 * 5 + 2, 2 * 5 + 4])  # (1, 2) and the last column (2, 4), clamped
    got = region_embeddings(emb, index, size=2)
    unit = F.normalize(emb[0], dim=0)
    expected = torch.stack(
        [F.normalize(unit[:, 1, 2] + unit[:, 1, 3], dim=0), F.normalize(unit[:, 2, 4] + unit[:, 2, 4], dim=0)]
    )
    torch.testing.assert_close(got, expected)
    four = region_embeddings(emb, index, size=4)
    assert not torch.allclose(four, got)
    # stride 2: the neighbour two columns away
    torch.testing.assert_close(
        region_embeddings(emb, index[:1], size=2, stride=2)[0],
        F.normalize(unit[:, 1, 2] + unit[:, 1, 4], dim=0),
    )


def test_region_size_reaches_the_ccdc_loss():
    torch.manual_seed(0)
    emb = torch.randn(2, 8, 12, 12)
    labels = torch.randint(0, 3, (2, 12, 12))
    probs = torch.randn(2, 3, 12, 12).softmax(1)
    values = {}
    for size in (2, 4):
        loss = CCDCLoss(CCDCConfig(region_size=size, num_queries=16, num_negatives=16))
        assert loss.options["region_size"] == size
        values[size] = float(loss(emb, probs, labels, generator=torch.Generator().manual_seed(1)))
    assert abs(values[2] - values[4]) > 1e-5


# ---------------------------------------------------------------------------------------- notices


def test_notices_name_every_setting_without_effect():
    assert config_notices(TrainConfig()) == []
    cfg = config_from_dict(
        {
            "model": {"uafr": {"enabled": False, "m": 3, "layers": ["encoder1"]}},
            "loss": {
                "pdcr": {
                    "enabled": True,
                    "mode": "rf",
                    "layers": {"encoder3": 8},
                    "patch_sizes": [3, 5],
                    "cross_samples": 16,
                    "rigid_threshold": 0.7,
                    "rf_includes_uafr": True,
                },
                "ccdc": {"enabled": True, "fixed_threshold": 0.9, "fixed_easy_fraction": 0.3, "core_topk": 8},
            },
        }
    )
    notes = config_notices(cfg)
    for key in (
        "model.uafr.m",
        "model.uafr.layers",
        "loss.pdcr.patch_sizes",
        "loss.pdcr.cross_samples",
        "loss.pdcr.rigid_threshold",
        "loss.pdcr.rf_includes_uafr",
        "loss.ccdc.fixed_threshold",
        "loss.ccdc.fixed_easy_fraction",
        "loss.ccdc.core_topk",
    ):
        assert sum(note.startswith(key + " ") for note in notes) == 1, (key, notes)
    assert len(notes) == 9
    cfg = config_from_dict({"loss": {"ccdc": {"enabled": True, "region": False, "region_stride": 2}}})
    assert config_notices(cfg) == [
        "loss.ccdc.region_stride has no effect: region is false (pixel-level queries)"
    ]
    cfg = config_from_dict({"model": {"uafr": {"enabled": True, "block": "se", "hidden": 8}}})
    assert config_notices(cfg) == ["model.uafr.hidden has no effect: block is se"]
    cfg = config_from_dict({"loss": {"pdcr": {"weight": 0.1}}})
    assert config_notices(cfg) == ["loss.pdcr.weight has no effect: loss.pdcr.enabled is false"]


def test_notices_are_written_into_config_yaml_and_it_reads_back(tmp_path):
    cfg = config_from_dict({"loss": {"pdcr": {"enabled": True, "mode": "rf", "patch_sizes": [3]}}})
    text = config_to_yaml(cfg)
    assert "# notice: loss.pdcr.patch_sizes has no effect" in text
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert load_config(path) == cfg


# ---------------------------------------------------------------------------------------- gradient ratio


def _ratio_setup(**pdcr):
    cfg = TrainConfig(
        model=ModelConfig(spatial_dims=2, features=(8, 16, 32), deep_supervision=False),
        loss=LossConfig(pdcr=PDCRConfig(enabled=True, layers={"encoder2": 32, "encoder3": 16}, **pdcr)),
    )
    torch.manual_seed(0)
    model = build_model(cfg, 1, 2)
    seg, loss, _ = build_losses(cfg, model, 2)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 1, 32, 32, generator=g)
    label = (image[:, 0] > 0.3).long()
    return model, seg, loss, image, label


def test_gradient_ratio_measures_strength_and_leaves_the_run_alone():
    model, seg, pdcr, image, label = _ratio_setup()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    ratio = pdcr_gradient_ratio(model, seg, pdcr, image, label, generator=generator)
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched
    assert torch.equal(generator.get_state(), state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN buffers restored
    assert all(p.grad is None for p in model.parameters())
    assert math.isfinite(ratio) and ratio > 0
    # by hand: the ratio of the two gradient norms over the parameters both reach
    out = model(image)
    g_seg = torch.autograd.grad(
        seg([out.logits], label).loss, list(model.parameters()), retain_graph=True, allow_unused=True
    )
    g_reg = torch.autograd.grad(
        pdcr(out.taps, label, generator=torch.Generator().manual_seed(5)).loss,
        list(model.parameters()),
        allow_unused=True,
    )
    shared = [(a, b) for a, b in zip(g_seg, g_reg) if a is not None and b is not None]
    assert 0 < len(shared) < len(g_seg)  # the segmentation head is not shared
    hand = math.sqrt(sum(float(b.pow(2).sum()) for _, b in shared)) / math.sqrt(
        sum(float(a.pow(2).sum()) for a, _ in shared)
    )
    assert ratio == pytest.approx(hand, rel=1e-4)
    # the summed reduction with weight 0.1 is far stronger than the mean with 0.01
    strong = pdcr_gradient_ratio(*_ratio_setup(reduction="sum", weight=0.1)[:5])
    assert strong > 1000 * ratio


# ---------------------------------------------------------------------------------------- YAML reachability


def test_every_ablation_switch_is_reachable_from_yaml(tmp_path):
    path = tmp_path / "ablations.yaml"
    path.write_text(
        "model:\n  uafr: {enabled: true, block: cbam, use_f: false}\n"
        "loss:\n"
        "  pdcr: {enabled: true, form: authors, reduction: sum, cross_weight: 0.01, rf_includes_uafr: true,\n"
        "         affinity: dice, constant_affinity: 0.4, rigid_threshold: 0.6, series: ratio,\n"
        "         layer_modes: {encoder2: rf, decoder2: h}}\n"
        "  ccdc: {enabled: true, region_size: 2}\n"
        "data: {require_subjects: true}\n"
    )
    cfg = load_config(path)
    p = cfg.loss.pdcr
    assert (p.form, p.reduction, p.cross_weight, p.rf_includes_uafr) == ("authors", "sum", 0.01, True)
    assert (p.affinity, p.constant_affinity, p.rigid_threshold, p.series) == ("dice", 0.4, 0.6, "ratio")
    assert p.layer_modes == {"encoder2": "rf", "decoder2": "h"}
    assert (cfg.model.uafr.block, cfg.model.uafr.use_f) == ("cbam", False)
    assert cfg.loss.ccdc.region_size == 2 and cfg.data.require_subjects is True
    with pytest.raises(ValueError, match="form"):
        config_from_dict({"loss": {"pdcr": {"form": "shifted"}}})


# one entry per row of docs/methods.md's mapping table that a setting reaches: (YAML text, dotted key, value)
MAPPING_ROWS = [
    ("loss: {pdcr: {form: paper}}", "loss.pdcr.form", "paper"),
    ("loss: {pdcr: {form: authors}}", "loss.pdcr.form", "authors"),
    ("loss: {pdcr: {reduction: sum, weight: 0.1, cross_weight: 0.01}}", "loss.pdcr.reduction", "sum"),
    ("loss: {pdcr: {affinity: l1}}", "loss.pdcr.affinity", "l1"),
    ("loss: {pdcr: {affinity: l2}}", "loss.pdcr.affinity", "l2"),
    ("loss: {pdcr: {mode: rf}}", "loss.pdcr.mode", "rf"),
    ("loss: {pdcr: {series: ratio}}", "loss.pdcr.series", "ratio"),
    ("loss: {pdcr: {position_encoding: true}}", "loss.pdcr.position_encoding", True),
    ("loss: {pdcr: {affinity: dice}}", "loss.pdcr.affinity", "dice"),
    ("loss: {pdcr: {affinity: constant, constant_affinity: 0.5}}", "loss.pdcr.affinity", "constant"),
    ("loss: {pdcr: {affinity: rigid, rigid_threshold: 0.5}}", "loss.pdcr.affinity", "rigid"),
    ("loss: {pdcr: {affinity: center}}", "loss.pdcr.affinity", "center"),
    ("loss: {pdcr: {mode: rf, layer_modes: {decoder1: h}}}", "loss.pdcr.layer_modes", {"decoder1": "h"}),
    ("loss: {pdcr: {rf_includes_uafr: true}}", "loss.pdcr.rf_includes_uafr", True),
    ("model: {uafr: {enabled: true, block: se}}", "model.uafr.block", "se"),
    ("model: {uafr: {enabled: true, block: cbam}}", "model.uafr.block", "cbam"),
    ("model: {uafr: {enabled: true, use_f: false}}", "model.uafr.use_f", False),
    ("loss: {pdcr: {layers: {encoder2: 16}}}", "loss.pdcr.layers", {"encoder2": 16}),
    (
        "loss: {pdcr: {cross_pairs: [[encoder2, decoder1]]}}",
        "loss.pdcr.cross_pairs",
        (("encoder2", "decoder1"),),
    ),
    (
        "model: {uafr: {enabled: true, layers: [encoder1, decoder1]}}",
        "model.uafr.layers",
        ("encoder1", "decoder1"),
    ),
    ("model: {uafr: {enabled: true, m: 4}}", "model.uafr.m", 4),
    ("model: {uafr: {enabled: true, kernel_size: 5}}", "model.uafr.kernel_size", 5),
    (
        "loss: {ccdc: {adaptive_threshold: false, fixed_threshold: 0.9}}",
        "loss.ccdc.adaptive_threshold",
        False,
    ),
    ("loss: {ccdc: {adaptive_ratio: false, fixed_easy_fraction: 0.3}}", "loss.ccdc.adaptive_ratio", False),
    ("loss: {ccdc: {query_mode: easy}}", "loss.ccdc.query_mode", "easy"),
    ("loss: {ccdc: {query_mode: hard}}", "loss.ccdc.query_mode", "hard"),
    ("loss: {ccdc: {query_mode: easy_to_hard}}", "loss.ccdc.query_mode", "easy_to_hard"),
    ("loss: {ccdc: {negative_sampling: random}}", "loss.ccdc.negative_sampling", "random"),
    ("loss: {ccdc: {negative_sampling: uniform}}", "loss.ccdc.negative_sampling", "uniform"),
    ("loss: {ccdc: {negative_sampling: dynamic}}", "loss.ccdc.negative_sampling", "dynamic"),
    ("loss: {ccdc: {region_size: 2}}", "loss.ccdc.region_size", 2),
    ("loss: {ccdc: {region: false}}", "loss.ccdc.region", False),
    ("loss: {ccdc: {region_stride: 2}}", "loss.ccdc.region_stride", 2),
    ("loss: {ccdc: {strong_threshold: 0.9}}", "loss.ccdc.strong_threshold", 0.9),
    ("data: {require_subjects: true}", "data.require_subjects", True),
]


@pytest.mark.parametrize(("text", "key", "value"), MAPPING_ROWS, ids=[row[0] for row in MAPPING_ROWS])
def test_each_mapping_row_loads_and_builds(tmp_path, text, key, value):
    path = tmp_path / "row.yaml"
    path.write_text(text + "\n")
    cfg = load_config(path)
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    assert node == value
    # the PDCR and UAFR rows build on a small 2D U-Net (decoder taps too, for layer_modes)
    if key.startswith(("loss.pdcr", "model.uafr")):
        layers = {"encoder2": 16, "decoder1": 16}
        pdcr = dataclasses.replace(cfg.loss.pdcr, enabled=True, layers=layers)
        cfg = dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, spatial_dims=2, features=(4, 8, 16)),
            loss=dataclasses.replace(cfg.loss, pdcr=pdcr),
        )
        model = build_model(cfg, 1, 2)
        _, loss, _ = build_losses(cfg, model, 2)
        out = model(torch.randn(2, 1, 32, 32))
        value = loss(
            out.taps, (torch.rand(2, 32, 32) > 0.5).long(), generator=torch.Generator().manual_seed(0)
        )
        assert math.isfinite(float(value.loss.detach()))


@pytest.mark.slow
def test_a_run_warns_logs_and_records_its_notices_and_pdcr_windows(tmp_path):
    from tests.dataset_factory import make_msd_dataset
    from training.cli import train_main

    root = make_msd_dataset(tmp_path / "ds", n_cases=3, shape=(8, 16, 16))
    out = tmp_path / "out"
    overrides = [
        f"data.root={root}",
        f"output.dir={out}",
        "data.val_fraction=0.34",
        "data.num_workers=0",
        "data.augmentation.enabled=false",
        "model.features=[4, 8, 16]",
        "loss.pdcr.enabled=true",
        "loss.pdcr.mode=rf",
        "loss.pdcr.layers={encoder2: 8}",
        "loss.pdcr.patch_sizes=[3]",  # no effect in RF mode
        "train.device=cpu",
        "train.epochs=1",
        "train.iterations_per_epoch=1",
        "train.patch_size=[8, 16, 16]",
    ]
    config = tmp_path / "run.yaml"
    config.write_text("model: {spatial_dims: 3}\n")
    argv = [str(config), *(item for override in overrides for item in ("--set", override))]
    with pytest.warns(UserWarning, match="loss.pdcr.patch_sizes has no effect"):
        assert train_main(argv) == 0
    log = (out / "train.log").read_text()
    assert "notice: loss.pdcr.patch_sizes has no effect" in log
    assert "PDCR tap encoder2: mode rf, stride [2, 2, 2], receptive field [11, 11, 11]" in log
    assert "PDCR / segmentation gradient-norm ratio" in log
    assert "# notice: loss.pdcr.patch_sizes has no effect" in (out / "config.yaml").read_text()
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["train"]["pdcr_grad_ratio"] > 0


@pytest.mark.parametrize(("block", "use_f"), [("se", True), ("cbam", True), ("uafr", False)])
def test_attention_variants_export_and_verify(tmp_path, block, use_f):
    pytest.importorskip("onnxruntime")
    from export.onnx import to_onnx
    from training.model_spec import spec_for_model

    torch.manual_seed(0)
    model = create_model(
        "unet", spatial_dims=2, in_channels=1, num_classes=3, features=[4, 8, 16], uafr=True,
        uafr_block=block, uafr_use_f=use_f,
    )  # fmt: skip
    report = to_onnx(
        model, tmp_path / "m.onnx", spec=spec_for_model(model, name="m", patch_size=(16, 16)), verify=True
    )
    assert report.verify is not None
    assert len(report.spec.uncertainty_maps) == (0 if block != "uafr" else 5)
