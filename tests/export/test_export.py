"""Export: InferenceWrapper, to_onnx / verify_onnx, checkpoint loading, medcl-export, and the exported files
running through the product's inference (napari_medcl.predict, medcl-predict).

Checkpoints come from real (tiny, 2-iteration) medcl-train runs on tests/dataset_factory.py datasets: a 3D
U-Net with UAFR + PDCR and a 2D U-Net with BatchNorm, UAFR and a CCDC projection head. The error cases use
synthetic checkpoints written with training.checkpoint.save_checkpoint.

torch runs with one thread here: on a shared 2-core machine two OpenMP threads spend most of their time
waiting for each other (a tiny forward pass took 0.7 s instead of 8 ms).
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from export import ExportError, InferenceWrapper, spec_for_model, to_onnx, verify_onnx
from export import onnx as export_onnx
from export.checkpoint_model import load_checkpoint_model
from export.cli import main as export_main
from export.onnx import AxiswiseNorm
from napari_medcl import tiling
from napari_medcl.io import read_image
from napari_medcl.preprocess import normalize
from napari_medcl.spec import METADATA_KEY, PALETTE, ModelSpec
from napari_medcl.volume import Volume
from tests.dataset_factory import (
    blob_image,
    blob_labels,
    make_folder2d_dataset,
    make_msd_dataset,
    write_volume,
)
from training.building import build_model
from training.checkpoint import CHECKPOINT_FORMAT, CheckpointError
from training.config import CONFIG_VERSION, config_from_dict, config_to_dict
from training.models import create_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST_TRAIN = [
    "data.num_workers=0",
    "data.augmentation.enabled=false",
    "train.device=cpu",
    "train.epochs=1",
    "train.iterations_per_epoch=2",
    "train.batch_size=2",
]


def _train(config: Path, out: Path) -> Path:
    from training.cli import train_main

    argv = [str(config), "--set", f"output.dir={out}"]
    for item in FAST_TRAIN:
        argv += ["--set", item]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_main(argv) == 0
    finally:
        torch.set_num_threads(previous)
    return out / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def trained_3d(tmp_path_factory) -> Path:
    """A 3D U-Net + UAFR (+ deep supervision) + PDCR checkpoint from medcl-train."""
    base = tmp_path_factory.mktemp("train3d")
    root = make_msd_dataset(base / "Task99_Tiny", n_cases=3, shape=(12, 20, 18))
    config = base / "run.yaml"
    config.write_text(
        f"data: {{root: {root}, val_fraction: 0.34, crop_nonzero: false}}\n"
        "model: {features: [4, 8, 16], uafr: {enabled: true}}\n"
        "loss: {pdcr: {enabled: true, layers: {encoder2: 8, encoder3: 4}}}\n"
        "train: {patch_size: [8, 16, 16]}\n"
    )
    return _train(config, base / "out")


@pytest.fixture(scope="module")
def trained_2d(tmp_path_factory) -> Path:
    """A 2D U-Net with BatchNorm, UAFR and a CCDC projection head, on RGB images, from medcl-train."""
    base = tmp_path_factory.mktemp("train2d")
    root = make_folder2d_dataset(base / "isic", n_cases=4, shape=(40, 48))
    config = base / "run.yaml"
    config.write_text(
        f"data: {{root: {root}, layout: folder2d, val_fraction: 0.25}}\n"
        "model: {spatial_dims: 2, features: [4, 8, 16], norm: batch, projection_dim: 8,"
        " uafr: {enabled: true}}\n"
        "loss: {ccdc: {enabled: true, num_queries: 8, num_negatives: 8}}\n"
        "train: {patch_size: [16, 16]}\n"
    )
    return _train(config, base / "out")


@pytest.fixture(scope="module")
def exported_3d(trained_3d, tmp_path_factory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("onnx3d") / "tiny3d.onnx"
    report = to_onnx(trained_3d, path, verify=True)
    return path, report


def _batchnorm_model(spatial_dims: int, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A tiny U-Net with BatchNorm everywhere and running statistics that are not the identity."""
    torch.manual_seed(seed)
    model = create_model(
        "unet", spatial_dims=spatial_dims, in_channels=1, num_classes=3, features=[4, 8], norm="batch",
        uafr=True, **kwargs,
    )  # fmt: skip
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 1, *(8,) * spatial_dims) * 3 + 1)
    return model.eval()


def _graph(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))


def _spec_of(path: Path) -> ModelSpec:
    return ModelSpec.from_json({p.key: p.value for p in _graph(path).metadata_props}[METADATA_KEY])


# ---------------------------------------------------------------------------------------------- wrapper


def test_wrapper_outputs_probabilities_and_upsampled_maps():
    model = _batchnorm_model(2)
    wrapper = InferenceWrapper(model)
    assert not model.training and wrapper.output_names == ("probabilities", "uafr_uncertainty")
    image = torch.randn(2, 1, 16, 24)
    with torch.no_grad():
        probs, maps = wrapper(image)
        out = model(image)
    assert probs.dtype == torch.float32 and probs.shape == (2, 3, 16, 24)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 16, 24))
    torch.testing.assert_close(probs, out.logits.softmax(1))
    names = model.uncertainty_names
    assert maps.shape == (2, len(names), 16, 24) and maps.min() >= 0 and maps.max() <= 1
    for i, name in enumerate(names):  # a multiple of the stride: plain bilinear resizing to the input size
        expected = F.interpolate(out.uncertainty[name], size=(16, 24), mode="bilinear", align_corners=False)
        torch.testing.assert_close(maps[:, i : i + 1], expected.clamp(0, 1))
    assert model.return_features  # switched off only inside the wrapper's forward
    with pytest.raises(RuntimeError, match="inference only"):
        wrapper.train()


def test_wrapper_without_uafr_has_one_output_and_maps_do_not_depend_on_the_input_size():
    plain = create_model("unet", spatial_dims=3, in_channels=1, num_classes=2, features=[4, 8])
    assert InferenceWrapper(plain).output_names == ("probabilities",)
    with torch.no_grad():
        (probs,) = InferenceWrapper(plain)(torch.randn(1, 1, 6, 8, 10))
    assert probs.shape == (1, 2, 6, 8, 10)
    # A stride-2 map has ceil(S / 2) voxels for S = 15 and 16 alike; voxel i of the input must get the same
    # value from it in both cases (upsampling by the stride, then cropping), not a size-dependent resize.
    wrapper = InferenceWrapper(_batchnorm_model(3))
    u = torch.rand(1, 1, 8, 8, 8)
    odd = wrapper._to_input_grid(u, (2, 2, 2), torch.Size((15, 15, 15)))
    even = wrapper._to_input_grid(u, (2, 2, 2), torch.Size((16, 16, 16)))
    assert odd.shape == (1, 1, 15, 15, 15)
    torch.testing.assert_close(odd, even[..., :15, :15, :15])


@pytest.mark.parametrize(
    "norm", [torch.nn.InstanceNorm3d(4, affine=True), torch.nn.InstanceNorm2d(4), torch.nn.GroupNorm(2, 4)]
)
def test_axiswise_norm_equals_torch_norm(norm):
    if norm.affine:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 4, *(6, 7, 5)[: 3 if isinstance(norm, torch.nn.InstanceNorm3d) else 2]) * 3 + 2
    with torch.no_grad():
        torch.testing.assert_close(AxiswiseNorm(norm)(x), norm(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(AxiswiseNorm(norm)(x.half()), norm(x).half(), rtol=1e-2, atol=1e-2)


def test_axiswise_norm_keeps_onnx_runtime_accurate_on_large_planes(tmp_path):
    import onnxruntime as ort

    norm = torch.nn.InstanceNorm3d(1, affine=False)
    x = torch.randn(1, 1, 128, 128, 128) * 3 + 5
    with torch.no_grad():
        exact = norm(x.double()).numpy()
    errors = {}
    for name, module in (("onnx op", norm), ("axiswise", AxiswiseNorm(norm))):
        path = tmp_path / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"])
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        errors[name] = float(np.abs(session.run(None, {"x": x.numpy()})[0] - exact).max())
    # ORT's InstanceNormalization sums 2M values in one float32 accumulator; the axis-wise form does not
    assert errors["axiswise"] < 1e-5 < errors["onnx op"], errors


# ---------------------------------------------------------------------------------------------- to_onnx


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_registry_model_exports_verified_with_batchnorm_folded(tmp_path, spatial_dims):
    model = _batchnorm_model(spatial_dims, projection_dim=4)
    spec = spec_for_model(model, name=f"bn-{spatial_dims}d", patch_size=(8,) * spatial_dims)
    path = tmp_path / "model.onnx"
    report = to_onnx(model, path, spec=spec, verify=True)
    assert model.return_features and not model.training  # the caller's network is left as it was
    graph = _graph(path)
    ops = {n.op_type for n in graph.graph.node}
    assert "BatchNormalization" not in ops and report.op_counts.get("BatchNormalization") is None
    assert {"Conv", "Softmax", "LogSoftmax", "Resize"} <= ops
    # 4 encoder + 2 decoder convs, 2 per UAFR block (3 blocks), the 1x1 head; no CCDC projection head
    assert report.op_counts["Conv"] == 13
    assert all(n.domain in ("", "ai.onnx") for n in graph.graph.node)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert [f.name for f in tmp_path.iterdir()] == ["model.onnx"]  # one file, no .data beside it
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)
    # N and the spatial axes are dynamic; channels and classes are fixed
    image = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert image == ["N", 1, *("DHW"[-spatial_dims:])]
    outputs = {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.graph.output
    }
    assert outputs["probabilities"][:2] == ["N", 3] and outputs["uafr_uncertainty"][:2] == ["N", 3]
    stored = _spec_of(path)
    assert stored.uncertainty_maps == tuple(model.uncertainty_names) and stored.divisor == (2,) * spatial_dims
    assert stored.training["export"]["sample_shape"] == [4] * spatial_dims  # 2 x divisor, not the patch
    verify = report.verify
    assert verify is not None and verify.passed and len(verify.checks) == 2
    main, odd = verify.checks
    assert main.shape == (2, 1, *(8,) * spatial_dims) and odd.shape == (1, 1, *(3,) * spatial_dims)
    assert main.probabilities_max_abs_diff <= 1e-4 and main.uncertainty_max_abs_diff <= 1e-4
    assert main.decided_agreement == 1.0 and verify.ort_seconds_per_window > 0
    assert verify.model_bytes == path.stat().st_size and "ORT vs torch" in report.summary()


def test_verify_catches_a_model_that_is_not_the_exported_one(tmp_path):
    model = _batchnorm_model(2)
    path = tmp_path / "model.onnx"
    to_onnx(model, path, spec=spec_for_model(model, name="a", patch_size=(8, 8)))
    other = _batchnorm_model(2, seed=1)
    with pytest.raises(ExportError, match="disagrees with torch"):
        verify_onnx(path, other)
    assert verify_onnx(path, model, shape=(12, 8)).checks[0].shape == (2, 1, 12, 8)
    with pytest.raises(ValueError, match="sample shape"):
        verify_onnx(path, model, shape=(4, 4))
    with pytest.raises(ValueError, match="multiple of the divisor"):
        verify_onnx(path, model, shape=(9, 8))


def test_failed_verification_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    model = _batchnorm_model(2)
    spec = spec_for_model(model, name="a", patch_size=(8, 8))
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous model")
    monkeypatch.setattr(export_onnx, "FP32_TOLERANCE", export_onnx.Tolerance(0.0, 0.0, 1.0))
    with pytest.raises(ExportError, match="disagrees with torch"):
        to_onnx(model, path, spec=spec, verify=True)
    assert path.read_bytes() == b"previous model"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["model.onnx"]  # the temporary file is gone
    path.unlink()
    with pytest.raises(ExportError):
        to_onnx(model, path, spec=spec, verify=True)
    assert not path.exists()


def test_export_argument_errors(tmp_path):
    model = _batchnorm_model(2)
    spec = spec_for_model(model, name="a", patch_size=(8, 8))
    with pytest.raises(ValueError, match="opset"):
        to_onnx(model, tmp_path / "m.onnx", spec=spec, opset=16)
    with pytest.raises(ValueError, match="multiple of the divisor"):
        to_onnx(model, tmp_path / "m.onnx", spec=spec, sample_shape=(5, 8))
    with pytest.raises(ValueError, match="needs spec"):
        to_onnx(model, tmp_path / "m.onnx")
    wrong = spec_for_model(
        create_model("unet", spatial_dims=2, in_channels=1, num_classes=3), name="b", patch_size=(8, 8)
    )
    with pytest.raises(ExportError, match="does not describe the network"):
        to_onnx(model, tmp_path / "m.onnx", spec=wrong)
    assert not list(tmp_path.iterdir())


def test_fp16_variant_keeps_float32_io_softmax_and_entropy(tmp_path):
    model = _batchnorm_model(3)
    spec = spec_for_model(model, name="half", patch_size=(8, 8, 8))
    path = tmp_path / "half.onnx"
    report = to_onnx(model, path, spec=spec, fp16=True, verify=True)
    assert report.precision == "fp16" and report.verify.precision == "fp16" and report.verify.passed
    graph = onnx.shape_inference.infer_shapes(_graph(path))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer)
    float32 = onnx.TensorProto.FLOAT
    for value in [*graph.graph.input, *graph.graph.output]:
        assert value.type.tensor_type.elem_type == float32
    types = {v.name: v.type.tensor_type.elem_type for v in graph.graph.value_info}
    nodes = [n for n in graph.graph.node if n.op_type in ("Softmax", "LogSoftmax", "Log", "Exp")]
    assert nodes and all(types.get(n.input[0], float32) == float32 for n in nodes)
    assert _spec_of(path).training["export"]["precision"] == "fp16"


# ---------------------------------------------------------------------------------------------- checkpoints


def _torch_sliding_window(wrapper: InferenceWrapper, volume: Volume, spec: ModelSpec, overlap: float):
    """The reference: the torch network through napari_medcl.tiling's windows and Gaussian weights."""
    array = volume.array if volume.channel_axis else volume.array[None]
    data = normalize(array, spec.normalization)  # (C, *S)
    if spec.spatial_dims == 2:
        data = data[:, None]  # a 2D image is a depth-1 volume
    grid = data.shape[1:]
    window = tiling.window_shape(spec.patch_size, spec.divisor)
    window = window if spec.spatial_dims == 3 else (1, *window)
    pads = tiling.padding(grid, window)
    padded = np.pad(data, ((0, 0), *pads))
    crop = tuple(slice(b, b + n) for (b, _), n in zip(pads, grid))
    accumulator = tiling.Accumulator(
        padded.shape[1:], window, spec.num_classes, len(spec.uncertainty_maps), crop=crop
    )
    for box in tiling.window_boxes(padded.shape[1:], window, overlap):
        x = torch.from_numpy(np.ascontiguousarray(padded[(slice(None), *box)]))[None]
        if spec.spatial_dims == 2:
            x = x[:, :, 0]
        with torch.no_grad():
            probs, maps = (t[0].numpy() for t in wrapper(x))
        if spec.spatial_dims == 2:
            probs, maps = probs[:, None], maps[:, None]
        accumulator.add(box, probs.copy(), maps.copy())
    result = accumulator.finish()
    if spec.spatial_dims == 2:
        return result.labels[0], result.maps[:, 0], result.entropy[0]
    return result.labels, result.maps, result.entropy


@pytest.mark.slow
@pytest.mark.parametrize("which", ["3d", "2d"])
def test_exported_checkpoint_predicts_like_torch(which, trained_3d, trained_2d, tmp_path):
    from napari_medcl import load_model, predict

    checkpoint = trained_3d if which == "3d" else trained_2d
    path = tmp_path / f"{which}.onnx"
    report = to_onnx(checkpoint, path, verify=True)
    spec = report.spec
    assert report.verify.passed and report.export_seconds < 60
    rng = np.random.default_rng(3)
    if which == "3d":
        shape = (20, 40, 36)  # larger than the 8x16x16 patch on every axis
        image = blob_image(blob_labels(shape, 3, rng), rng)
        volume = Volume(image, spec.spacing, (0.0,) * 3, np.eye(3))
    else:
        shape = (40, 52)
        gray = np.clip(blob_image(blob_labels(shape, 2, rng), rng, body_margin=0), 0, 255)
        rgb = np.stack([gray, gray * 0.8 + 20, 255 - gray]).astype(np.float32)
        volume = Volume(rgb, spec.spacing or (1.0, 1.0), (0.0, 0.0), np.eye(2), channel_axis=True)
    loaded = load_model(path, device="cpu", backend="onnxruntime")  # the export against torch, in fp32
    assert loaded.spec == spec
    prediction = predict(volume, loaded, overlap=0.5)
    assert prediction.provenance["tiling"]["windows"] > 1
    wrapper = load_checkpoint_model(checkpoint).model
    labels, maps, entropy = _torch_sliding_window(InferenceWrapper(wrapper), volume, spec, 0.5)
    assert labels.shape == shape == prediction.labels.array.shape
    assert np.mean(prediction.labels.array == labels) >= 0.999
    for i, name in enumerate(spec.uncertainty_maps):
        np.testing.assert_allclose(prediction.uncertainty_maps[name].array, maps[i], atol=1e-3)
    np.testing.assert_allclose(prediction.uafr_uncertainty.array, maps[-1], atol=1e-3)
    np.testing.assert_allclose(prediction.entropy.array, entropy, atol=1e-3)


@pytest.mark.slow
def test_spec_comes_from_the_checkpoint_with_provenance(exported_3d, trained_3d):
    path, report = exported_3d
    spec = _spec_of(path)
    assert spec == report.spec
    dataset = json.loads((trained_3d.parents[1] / "Task99_Tiny" / "dataset.json").read_text())
    assert spec.class_names == list(dataset["labels"]) == ["background", "class1", "class2"]
    assert [c.color for c in spec.classes] == list(PALETTE[:3])
    state = torch.load(trained_3d, weights_only=True)
    assert spec.patch_size == tuple(state["config"]["train"]["patch_size"]) == (8, 16, 16)
    model = load_checkpoint_model(trained_3d).model
    assert spec.uncertainty_maps == tuple(model.uncertainty_names) and len(spec.uncertainty_maps) == 5
    assert spec.divisor == model.divisor == (4, 4, 4)
    assert spec.spacing == pytest.approx((2.0, 1.0, 1.2))
    training = spec.training
    assert (
        training["method"] == "unet3d+uafr+h-pdcr" and training["uafr"] is True and training["ccdc"] is None
    )
    assert training["pdcr"]["layers"] == {"encoder2": 8, "encoder3": 4}
    assert training["dataset"] == "Task99_Tiny" and training["code_version"]
    assert training["metrics"]["val_mean_dice"] == state["best"]["mean_dice"]
    export = training["export"]
    assert export["opset"] == 17 and export["precision"] == "fp32" and export["sample_shape"] == [8, 8, 8]
    assert export["checkpoint"]["epoch"] == 1 and len(export["checkpoint"]["sha256"]) == 64
    # deep-supervision heads are dropped: only the final 1x1 head produces 3 channels
    graph = _graph(path)
    heads = [t for t in graph.graph.initializer if list(t.dims)[:1] + list(t.dims)[2:] == [3, 1, 1, 1]]
    assert len(heads) == 1
    assert {o.name for o in graph.graph.output} == {"probabilities", "uafr_uncertainty"}
    # verify_onnx also takes the checkpoint itself as the reference
    assert verify_onnx(path, trained_3d, shape=(8, 16, 20)).checks[0].shape == (2, 1, 8, 16, 20)


@pytest.mark.slow
def test_medcl_predict_runs_the_export_on_an_anisotropic_nifti(exported_3d, tmp_path, capsys):
    from napari_medcl.cli import main as predict_main

    path, _ = exported_3d
    rng = np.random.default_rng(5)
    image = blob_image(blob_labels((9, 30, 26), 3, rng), rng)
    angle = np.deg2rad(20)
    direction = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    source = write_volume(
        tmp_path / "scan.nii.gz",
        image,
        spacing=(3.5, 0.8, 1.1),
        origin=(-10.0, 5.0, 2.5),
        direction=direction,
    )
    out = tmp_path / "out"
    assert (
        predict_main([str(source), "-o", str(out), "--model", str(path), "--device", "cpu", "--quiet"]) == 0
    )
    original = read_image(source)
    files = sorted(f.name for f in out.iterdir())
    assert files == [
        "scan.json",
        "scan_entropy.nii.gz",
        "scan_labels.nii.gz",
        "scan_top_class_error.nii.gz",
        "scan_uncertainty.nii.gz",
    ]
    for name in files[1:]:
        written = read_image(out / name)
        assert written.spatial_shape == original.spatial_shape
        np.testing.assert_allclose(written.spacing, original.spacing, rtol=1e-6)
        np.testing.assert_allclose(written.origin, original.origin, atol=1e-5)
        np.testing.assert_allclose(written.direction, original.direction, atol=1e-6)
    labels = read_image(out / "scan_labels.nii.gz").array
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}
    for name in ("scan_uncertainty.nii.gz", "scan_entropy.nii.gz", "scan_top_class_error.nii.gz"):
        values = read_image(out / name).array
        assert values.min() >= 0 and values.max() <= 1 and values.std() > 0
    sidecar = json.loads((out / "scan.json").read_text())
    assert sidecar["preprocessing"]["resampled"] is True  # 3.5 x 0.8 x 1.1 mm -> the model's 2 x 1 x 1.2 mm
    assert sidecar["model"]["uncertainty_maps"] == list(_spec_of(path).uncertainty_maps)


@pytest.mark.slow
def test_cli_exports_with_name_colours_and_report(trained_2d, tmp_path, capsys):
    out = tmp_path / "skin.onnx"
    code = export_main(
        [
            str(trained_2d),
            "-o",
            str(out),
            "--verify",
            "--name",
            "skin-2d",
            "--class-colors",
            "#000000",
            "#FF8800",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    spec = _spec_of(out)
    assert spec.name == "skin-2d" and [c.color for c in spec.classes] == ["#000000", "#ff8800"]
    assert spec.in_channels == 3 and spec.training["ccdc"] is not None
    assert "exported" in text and "ORT vs torch" in text and "CPU time per window" in text
    graph = _graph(out)
    assert "BatchNormalization" not in {n.op_type for n in graph.graph.node}


# ---------------------------------------------------------------------------------------------- errors


def _synthetic_checkpoint(path: Path, **changes) -> Path:
    """A complete checkpoint of a tiny 3D U-Net + UAFR built from the config module (no training)."""
    cfg = config_from_dict({"model": {"features": [4, 8], "uafr": {"enabled": True}}})
    model = build_model(cfg, 1, 2)
    spec = spec_for_model(model, name="synthetic", patch_size=(8, 8, 8))
    state = {
        "format": CHECKPOINT_FORMAT,
        "config_version": CONFIG_VERSION,
        "config": config_to_dict(cfg),
        "epoch": 1,
        "model": model.state_dict(),
        "losses": {},
        "optimizer": {},
        "scheduler": {},
        "scaler": None,
        "rng": [],
        "sampler": {"seed": 0, "epoch": 1},
        "spec": spec.to_dict(),
        "history": [],
        "best": {"epoch": 1, "mean_dice": 0.5},
    }
    state.update(changes)
    drop = [k for k, v in state.items() if v is _DROP]
    for key in drop:
        del state[key]
    torch.save(state, path)
    return path


_DROP = object()


class _Payload:
    """Unpickling this would run code: it creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _cli_error(argv: list[str], capsys) -> str:
    assert export_main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_synthetic_checkpoint_exports(tmp_path):
    checkpoint = _synthetic_checkpoint(tmp_path / "ok.pt")
    report = to_onnx(checkpoint, tmp_path / "ok.onnx")
    assert report.spec.name == "synthetic" and (tmp_path / "ok.onnx").is_file()


def test_checkpoint_errors_are_one_line_naming_the_file(tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    assert "notes.pt: not a readable napari-medcl checkpoint" in _cli_error([str(text), "-o", out], capsys)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    assert "foreign.pt: not a napari-medcl checkpoint" in _cli_error([str(foreign), "-o", out], capsys)
    missing = tmp_path / "absent.pt"
    assert "absent.pt: no such checkpoint file" in _cli_error([str(missing), "-o", out], capsys)
    incomplete = _synthetic_checkpoint(tmp_path / "incomplete.pt", optimizer=_DROP, spec=_DROP)
    assert "incomplete checkpoint, missing optimizer, spec" in _cli_error(
        [str(incomplete), "-o", out], capsys
    )
    newer = _synthetic_checkpoint(tmp_path / "newer.pt", config_version=CONFIG_VERSION + 1)
    assert "newer.pt: written with config_version" in _cli_error([str(newer), "-o", out], capsys)
    older = _synthetic_checkpoint(tmp_path / "older.pt", config_version=0)
    assert "cannot be migrated" in _cli_error([str(older), "-o", out], capsys)
    assert not (tmp_path / "m.onnx").exists()


def test_weights_that_do_not_fit_the_architecture(tmp_path, capsys):
    good = torch.load(_synthetic_checkpoint(tmp_path / "good.pt"), weights_only=True)["model"]
    fewer = {k: v for k, v in good.items() if not k.startswith("head.")}
    path = _synthetic_checkpoint(tmp_path / "fewer.pt", model=fewer)
    with pytest.raises(
        ExportError, match=r"fewer.pt: the weights do not match .* 2 missing \(e.g. head.weight"
    ):
        load_checkpoint_model(path)
    reshaped = dict(good, **{"head.weight": torch.zeros(5, 4, 1, 1, 1)})
    path = _synthetic_checkpoint(tmp_path / "reshaped.pt", model=reshaped)
    assert "with another shape (e.g. head.weight [5, 4, 1, 1, 1] vs [2, 4, 1, 1, 1])" in _cli_error(
        [str(path), "-o", str(tmp_path / "m.onnx")], capsys
    )
    extra = dict(good, **{"stray.weight": torch.zeros(1)})
    with pytest.raises(ExportError, match="1 unexpected"):
        load_checkpoint_model(_synthetic_checkpoint(tmp_path / "extra.pt", model=extra))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_payload_is_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "pwned"
    assert not marker.exists()
    payload = tmp_path / "payload.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "evil": _Payload(marker)}, payload)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Payload(marker)))
    for path in (payload, raw):
        with pytest.raises(CheckpointError, match="not a readable napari-medcl checkpoint"):
            load_checkpoint_model(path)
        assert "not a readable napari-medcl checkpoint" in _cli_error(
            [str(path), "-o", str(tmp_path / "m.onnx")], capsys
        )
    assert not marker.exists()
    # the payload is real: full unpickling would have created the file
    with open(raw, "rb") as file:
        pickle.load(file).close()
    assert marker.exists()
    os.remove(marker)


def test_cli_user_errors(tmp_path, capsys):
    checkpoint = _synthetic_checkpoint(tmp_path / "ok.pt")
    assert "--opset must be at least 17" in _cli_error(
        [str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--opset", "13"], capsys
    )
    assert "colours" in _cli_error(
        [str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--class-colors", "red", "#00ff00"], capsys
    )
    assert "1 colours given for 2 classes" in _cli_error(
        [str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--class-colors", "#000000"], capsys
    )
    assert "does not exist" in _cli_error([str(checkpoint), "-o", str(tmp_path / "no" / "m.onnx")], capsys)
    assert not (tmp_path / "m.onnx").exists()
