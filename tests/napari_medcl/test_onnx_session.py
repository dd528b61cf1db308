"""Model loading: the ONNX/ModelSpec contract, bundled-model lookup, and the session's device."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from napari_medcl.errors import ModelError, PredictionError
from napari_medcl.onnx_session import (
    LoadedModel,
    _count_cpu_list,
    bundled_models,
    cuda_unavailable_reason,
    default_model_name,
    load_model,
    physical_cores,
)
from tests.onnx_models import (
    conv_model,
    make_spec,
    pointwise_model,
    save,
    save_with_external_data,
)


def test_loads_pointwise_model_on_cpu(tmp_path):
    path = save(pointwise_model(), tmp_path / "m.onnx")
    model = load_model(path, device="cpu", backend="onnxruntime")
    assert isinstance(model, LoadedModel)
    assert model.provider == "CPUExecutionProvider"
    assert model.provider == model.session.get_providers()[0]
    assert model.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.spec.uncertainty_maps == ("encoder1", "decoder1")
    assert model.path == path
    probs, maps = model.run(np.array([0.2, 0.8], np.float32).reshape(1, 1, 1, 1, 2))
    assert probs.shape == (1, 2, 1, 1, 2) and maps.shape == (1, 2, 1, 1, 2)
    assert probs[0, :, 0, 0].argmax(0).tolist() == [0, 1]


def test_auto_device_prints_no_onnxruntime_error_line(tmp_path, capfd):
    path = save(pointwise_model(), tmp_path / "m.onnx")
    model = load_model(path, device="auto", backend="onnxruntime")
    captured = capfd.readouterr()
    if cuda_unavailable_reason() is not None:  # this CPU-only machine
        assert model.provider == "CPUExecutionProvider"
    assert "[E:onnxruntime" not in captured.err + captured.out
    assert "[W:onnxruntime" not in captured.err + captured.out


def test_cuda_request_without_cuda_is_a_clear_error(tmp_path):
    reason = cuda_unavailable_reason()
    if reason is None:
        pytest.skip("CUDA loads here; the refusal path needs a machine without it")
    path = save(pointwise_model(), tmp_path / "m.onnx")
    with pytest.raises(ModelError, match="cuda was requested but CUDA cannot be used") as info:
        load_model(path, device="cuda")
    assert reason in str(info.value)


def test_unknown_device_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="device"):
        load_model(tmp_path / "m.onnx", device="tpu")


@pytest.mark.parametrize(
    ("builder", "message"),
    [
        (lambda: pointwise_model(with_spec=False), "has no medcl.spec metadata; export it with medcl-export"),
        (lambda: pointwise_model(graph_spatial_dims=2), "input 'image' must have rank 5"),
        (lambda: pointwise_model(probabilities_name="probs"), "has no output named 'probabilities'"),
        (lambda: pointwise_model(custom_domain="com.example"), "custom op domain 'com.example'"),
        (lambda: pointwise_model(graph_in_channels=3), "3 channels, the spec says 1"),
        (
            lambda: pointwise_model(spec=make_spec(num_classes=3)),
            "output 'probabilities' has 2 channels, the spec implies 3",
        ),
        (
            lambda: _without_uafr_output(pointwise_model()),
            "names 2 UAFR map\\(s\\) but the graph has no 'uafr_uncertainty'",
        ),
        (lambda: _with_spec_json(pointwise_model(), '{"name": "x"'), "invalid medcl.spec metadata"),
        (
            lambda: _with_spec_json(
                pointwise_model(), json.dumps({**make_spec().to_dict(), "format_version": 9})
            ),
            "format_version 9",
        ),
    ],
    ids=[
        "no-spec",
        "wrong-rank",
        "misnamed-output",
        "custom-domain",
        "wrong-channels",
        "wrong-classes",
        "missing-uafr",
        "bad-json",
        "newer-version",
    ],
)
def test_contract_violations_are_model_errors_naming_the_file(tmp_path, builder, message):
    path = save(builder(), tmp_path / "broken.onnx")
    with pytest.raises(ModelError, match=message) as info:
        load_model(path, device="cpu")
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def _without_uafr_output(model):
    for i, output in enumerate(model.graph.output):
        if output.name == "uafr_uncertainty":
            del model.graph.output[i]
            break
    return model


def _with_spec_json(model, text):
    for prop in model.metadata_props:
        if prop.key == "medcl.spec":
            prop.value = text
    return model


def test_uafr_output_without_spec_maps_is_refused(tmp_path):
    model = pointwise_model(maps=())
    donor = pointwise_model()
    model.graph.node.extend(n for n in donor.graph.node if n.output[0].startswith("uafr"))
    model.graph.initializer.extend(t for t in donor.graph.initializer if t.name.startswith("uafr"))
    model.graph.output.extend(o for o in donor.graph.output if o.name == "uafr_uncertainty")
    path = save(model, tmp_path / "m.onnx")
    with pytest.raises(ModelError, match="spec lists no uncertainty_maps"):
        load_model(path, device="cpu")


def test_external_data_model_is_refused(tmp_path):
    path = save_with_external_data(pointwise_model(), tmp_path / "ext.onnx")
    assert (tmp_path / "ext.onnx.data").exists()
    with pytest.raises(ModelError, match="external data"):
        load_model(path, device="cpu")


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"\x08\x07this is not protobuf" * 3, "not a valid ONNX")],
)
def test_not_an_onnx_file(tmp_path, content, message):
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        load_model(path, device="cpu")


def test_missing_file_folder_and_size_limit(tmp_path):
    with pytest.raises(ModelError, match="model file not found"):
        load_model(tmp_path / "absent.onnx")
    folder = tmp_path / "dir.onnx"
    folder.mkdir()
    with pytest.raises(ModelError, match="is not a file"):
        load_model(folder)
    path = save(pointwise_model(), tmp_path / "m.onnx")
    with pytest.raises(ModelError, match="above the 100-byte limit"):
        load_model(path, max_bytes=100)


def test_nan_model_loads_and_fails_only_at_prediction(tmp_path):
    model = load_model(save(pointwise_model(produce_nan=True), tmp_path / "nan.onnx"), device="cpu")
    probs, _ = model.run(np.zeros((1, 1, 2, 2, 2), np.float32))
    assert np.isnan(probs).all()


def test_run_errors_inside_the_graph_become_prediction_errors(tmp_path):
    # The conv model's skip connection needs even sizes; an odd window breaks it inside ORT.
    model = load_model(save(conv_model(), tmp_path / "conv.onnx"), device="cpu")
    with pytest.raises(PredictionError, match="failed on an input of shape"):
        model.run(np.zeros((1, 1, 5, 6, 6), np.float32))


def test_unknown_bundled_name_lists_what_is_available(tmp_path):
    with pytest.raises(
        ModelError, match="no bundled model named 'nope'; available: none yet; pass a .onnx path"
    ):
        load_model("nope", models_dir=tmp_path)
    with pytest.raises(ModelError, match="no bundled default model"):
        default_model_name(tmp_path)


def test_bundled_model_by_name_with_sha_check(tmp_path):
    path = save(pointwise_model(), tmp_path / "tiny.onnx")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = {"models": [{"name": "tiny", "file": "tiny.onnx", "sha256": sha}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert [m["name"] for m in bundled_models(tmp_path)] == ["tiny"]
    assert default_model_name(tmp_path) == "tiny"
    assert load_model("tiny", device="cpu", models_dir=tmp_path).sha256 == sha
    with pytest.raises(ModelError, match="available: tiny"):
        load_model("other", models_dir=tmp_path)
    manifest["models"][0]["sha256"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="does not match the manifest"):
        load_model("tiny", device="cpu", models_dir=tmp_path)


def test_physical_cores():
    assert physical_cores() >= 1
    assert _count_cpu_list("0") == 1
    assert _count_cpu_list("0,4\n") == 2
    assert _count_cpu_list("0-3,8-11") == 8


def test_shipped_models_load_under_their_manifest_checksum():
    """What `make demo` and `--model NAME` rely on: every bundled model loads (SHA-256 checked) and matches
    its manifest entry; the default is one of them; each is under the 10 MB budget."""
    models = bundled_models()
    assert models, "no bundled model in napari_medcl/models"
    assert default_model_name() in {m["name"] for m in models}
    for entry in models:
        loaded = load_model(entry["name"], device="cpu")
        assert loaded.sha256 == entry["sha256"]
        assert loaded.spec.summary() == entry["summary"]
        assert entry["bytes"] < 10 * 1024 * 1024
