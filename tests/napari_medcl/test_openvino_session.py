"""The OpenVINO backend: which backend ``auto`` picks, the errors for a wrong choice, parity with ONNX Runtime
on the tiny test models, and provenance naming the backend that ran."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medcl import onnx_session, openvino_session
from napari_medcl.errors import UsageError
from napari_medcl.onnx_session import (
    LoadedModel,
    available_backends,
    available_precisions,
    choose_backend,
    load_model,
)
from napari_medcl.prediction import predict
from napari_medcl.session import InferenceSession
from napari_medcl.volume import Volume
from tests.onnx_models import conv_model, nearest_class_model, pointwise_model, save


def _volume(array: np.ndarray) -> Volume:
    return Volume(array, (1.0,) * array.ndim, (0.0,) * array.ndim, np.eye(array.ndim))


@pytest.fixture
def fake_machine(monkeypatch):
    """Set whether openvino is installed, whether CUDA loads, and whether the CPU has bf16."""

    def configure(*, openvino: bool, cuda: bool = False, bf16: bool = True) -> None:
        monkeypatch.setattr(openvino_session, "openvino_installed", lambda: openvino)
        monkeypatch.setattr(openvino_session, "openvino_bf16_supported", lambda: openvino and bf16)
        monkeypatch.setattr(
            onnx_session, "cuda_unavailable_reason", lambda: None if cuda else "no NVIDIA driver found"
        )

    return configure


@pytest.mark.parametrize(
    ("openvino", "cuda", "device", "expected"),
    [
        (True, False, "cpu", "openvino"),
        (True, False, "auto", "openvino"),  # auto without CUDA runs on the CPU
        (True, True, "auto", "onnxruntime"),  # CUDA loads: ONNX Runtime's CUDA provider
        (True, True, "cpu", "openvino"),
        (True, True, "cuda", "onnxruntime"),
        (False, False, "cpu", "onnxruntime"),
        (False, False, "auto", "onnxruntime"),
    ],
)
def test_auto_backend_picks_openvino_on_the_cpu_when_installed(
    fake_machine, openvino, cuda, device, expected
):
    fake_machine(openvino=openvino, cuda=cuda)
    assert choose_backend("auto", device) == expected
    assert choose_backend("onnxruntime", device) == "onnxruntime"


def test_unknown_backend_or_precision_is_a_usage_error(tmp_path):
    path = save(pointwise_model(), tmp_path / "m.onnx")
    with pytest.raises(UsageError, match="backend must be one of"):
        load_model(path, device="cpu", backend="tensorrt")
    with pytest.raises(UsageError, match="precision must be one of"):
        load_model(path, device="cpu", precision="fp16")
    with pytest.raises(UsageError, match="backend must be one of"):
        predict(_volume(np.zeros((4, 4, 4), np.float32)), path, backend="ov")


def test_bf16_where_it_cannot_run_is_a_usage_error(fake_machine):
    fake_machine(openvino=True, bf16=False)
    with pytest.raises(UsageError, match="bf16 needs a CPU with bfloat16 support"):
        choose_backend("auto", "cpu", "bf16")
    fake_machine(openvino=True, bf16=True)
    assert choose_backend("openvino", "cpu", "bf16") == "openvino"
    with pytest.raises(UsageError, match="bf16 runs on OpenVINO's CPU device only"):
        choose_backend("onnxruntime", "cpu", "bf16")
    fake_machine(openvino=True, cuda=True)
    with pytest.raises(UsageError, match="bf16 runs on OpenVINO's CPU device only"):
        choose_backend("auto", "auto", "bf16")  # auto picks CUDA here
    fake_machine(openvino=False)
    with pytest.raises(UsageError, match="openvino is not installed"):
        choose_backend("auto", "cpu", "bf16")


def test_openvino_asked_for_but_unusable_is_a_usage_error(fake_machine):
    fake_machine(openvino=False)
    with pytest.raises(UsageError, match=r"pip install 'napari-medcl\[openvino\]'"):
        choose_backend("openvino", "cpu")
    fake_machine(openvino=True)
    with pytest.raises(UsageError, match="runs on the CPU only"):
        choose_backend("openvino", "cuda")


def test_available_backends_and_precisions(fake_machine):
    fake_machine(openvino=False)
    assert available_backends() == ["auto", "onnxruntime"]
    assert available_precisions() == ["auto", "fp32"]
    fake_machine(openvino=True, bf16=True)
    assert available_backends() == ["auto", "onnxruntime", "openvino"]
    assert available_precisions("openvino") == ["auto", "fp32", "bf16"]
    assert available_precisions("onnxruntime") == ["auto", "fp32"]
    fake_machine(openvino=True, bf16=False)
    assert available_precisions("auto") == ["auto", "fp32"]


# ---------------------------------------------------------------------------------------------------------
# With openvino installed (the [openvino] extra, part of [all])

needs_openvino = pytest.mark.skipif(
    not openvino_session.openvino_installed(), reason="openvino is not installed (pip install '.[openvino]')"
)


@needs_openvino
@pytest.mark.parametrize(
    ("builder", "shape"),
    [
        (lambda: pointwise_model(), (2, 1, 5, 6, 7)),
        (lambda: nearest_class_model(4), (1, 1, 6, 5, 4)),
        (lambda: conv_model(), (2, 1, 8, 6, 10)),
        (lambda: conv_model(spatial_dims=2, num_classes=4), (3, 1, 12, 10)),
        (lambda: conv_model(in_channels=2, features=6), (1, 2, 4, 8, 6)),
    ],
)
def test_openvino_matches_onnxruntime_on_the_tiny_models(tmp_path, builder, shape):
    path = save(builder(), tmp_path / "m.onnx")
    reference = load_model(path, device="cpu", backend="onnxruntime")
    session = load_model(path, device="cpu", backend="openvino", precision="fp32")
    assert isinstance(session, openvino_session.OpenVINOSession) and isinstance(session, InferenceSession)
    assert session.provider == "OpenVINO CPU fp32"
    assert session.sha256 == reference.sha256 and session.spec == reference.spec
    batch = np.random.default_rng(0).uniform(-1.0, 2.0, size=shape).astype(np.float32)
    probs, maps = session.run(batch)
    want_probs, want_maps = reference.run(batch)
    assert probs.dtype == np.float32 and probs.shape == want_probs.shape
    np.testing.assert_allclose(probs, want_probs, atol=1e-5)
    np.testing.assert_allclose(maps, want_maps, atol=1e-5)
    # another shape on the same compiled model (the input stays dynamic)
    other = batch[:1, :, : shape[2] // 2 * 2 or 1]
    np.testing.assert_allclose(session.run(other)[0], reference.run(other)[0], atol=1e-5)


@needs_openvino
def test_openvino_bf16_stays_close_to_fp32(tmp_path):
    if not openvino_session.openvino_bf16_supported():
        with pytest.raises(UsageError, match="bf16"):
            load_model(save(conv_model(), tmp_path / "m.onnx"), device="cpu", precision="bf16")
        return
    path = save(conv_model(), tmp_path / "m.onnx")
    session = load_model(path, device="cpu", backend="openvino", precision="bf16")
    assert session.provider == "OpenVINO CPU bf16"
    batch = np.random.default_rng(1).uniform(0.0, 1.0, size=(1, 1, 8, 8, 8)).astype(np.float32)
    probs, _ = session.run(batch)
    reference, _ = load_model(path, device="cpu", backend="onnxruntime").run(batch)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, reference, atol=5e-2)


@needs_openvino
def test_provenance_names_the_backend_that_ran(tmp_path):
    path = save(pointwise_model(), tmp_path / "m.onnx")
    image = np.random.default_rng(2).uniform(0.0, 1.0, size=(9, 10, 11)).astype(np.float32)
    image[np.abs(image - 0.5) < 0.05] = 0.9  # no voxel near the threshold
    expected = (image > 0.5).astype(np.uint8)
    for backend, provider in (("openvino", "OpenVINO CPU fp32"), ("onnxruntime", "CPUExecutionProvider")):
        prediction = predict(_volume(image), path, device="cpu", backend=backend, precision="fp32")
        assert prediction.provenance["execution_provider"] == provider
        np.testing.assert_array_equal(prediction.labels.array, expected)
    assert isinstance(load_model(path, device="cpu", backend="onnxruntime"), LoadedModel)


@needs_openvino
def test_openvino_run_errors_become_prediction_errors(tmp_path):
    from napari_medcl.errors import PredictionError

    session = load_model(save(conv_model(), tmp_path / "conv.onnx"), device="cpu", backend="openvino")
    assert session.precision == ("bf16" if openvino_session.openvino_bf16_supported() else "fp32")  # auto
    with pytest.raises(PredictionError, match="failed on an input of shape"):
        session.run(np.zeros((1, 1, 5, 6, 6), np.float32))  # the skip addition needs even sizes


def test_cli_backend_and_precision_options(tmp_path, capsys):
    from napari_medcl import cli

    path = save(pointwise_model(), tmp_path / "m.onnx")
    image = tmp_path / "in.npy"
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(image), "-o", str(tmp_path / "out"), "--model", str(path), "--backend", "tensorrt"])
    assert exit_info.value.code == 2
    argv = [str(image), "-o", str(tmp_path / "out"), "--model", str(path), "--device", "cpu"]
    assert cli.main([*argv, "--backend", "onnxruntime", "--precision", "bf16"]) == 1
    assert "precision bf16 runs on OpenVINO's CPU device only" in capsys.readouterr().err


def test_auto_precision_is_bf16_only_on_openvino_with_a_bf16_cpu(fake_machine):
    from napari_medcl.onnx_session import choose_precision

    fake_machine(openvino=True, bf16=True)
    assert choose_precision("openvino", "auto") == "bf16"
    assert choose_precision("openvino", "fp32") == "fp32"
    assert choose_precision("onnxruntime", "auto") == "fp32"
    fake_machine(openvino=True, bf16=False)
    assert choose_precision("openvino", "auto") == "fp32"
    assert choose_backend("auto", "cpu", "auto") == "openvino"  # auto never raises for want of bf16
