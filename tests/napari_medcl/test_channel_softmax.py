"""The CPU provider's graph: channel-axis softmaxes written as reductions, same outputs, the file untouched."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import napari_medcl.channel_softmax as channel_softmax
from napari_medcl.channel_softmax import cpu_graph, rewrite_channel_softmax
from napari_medcl.onnx_session import MODELS_DIR, load_model
from tests.onnx_models import pointwise_model, save


def softmax_graph(opset: int) -> onnx.ModelProto:
    """x (N, C, D, H, W) -> softmax over C, log-softmax over C (axis given as -4), softmax over W."""
    shape = ["N", "C", "D", "H", "W"]
    nodes = [
        helper.make_node("Softmax", ["x"], ["soft"], axis=1),
        helper.make_node("LogSoftmax", ["x"], ["log_soft"], axis=-4),
        helper.make_node("Softmax", ["x"], ["soft_last"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "softmaxes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
            for n in ("soft", "log_soft", "soft_last")
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def run(data: bytes, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_channel_softmaxes_become_reductions_with_the_same_outputs(opset):
    model = softmax_graph(opset)
    original = model.SerializeToString()
    assert rewrite_channel_softmax(model) == 2
    onnx.checker.check_model(model, full_check=True)
    ops = [node.op_type for node in model.graph.node]
    assert "LogSoftmax" not in ops and ops.count("Softmax") == 1  # the last-axis one stays
    assert "Transpose" not in ops
    # Logits in the thousands: a softmax written without the maximum subtracted would overflow to nan.
    x = np.random.default_rng(0).normal(0.0, 800.0, size=(2, 3, 2, 4, 5)).astype(np.float32)
    before, after = run(original, {"x": x}), run(model.SerializeToString(), {"x": x})
    for a, b in zip(before, after):
        assert np.isfinite(b).all()
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


def test_old_opsets_and_graphs_without_channel_softmax_are_left_as_they_are():
    old = softmax_graph(12)  # before opset 13, Softmax(axis=1) is over every axis after 1 at once
    assert rewrite_channel_softmax(old) == 0
    assert [n.op_type for n in old.graph.node] == ["Softmax", "LogSoftmax", "Softmax"]
    data = softmax_graph(12).SerializeToString()
    assert cpu_graph(data) is data
    last_axis_only = helper.make_model(
        helper.make_graph(
            [helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
            "last",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    data = last_axis_only.SerializeToString()
    assert cpu_graph(data) is data


def test_bundled_model_runs_without_softmax_nodes_and_gives_the_same_outputs():
    data = (MODELS_DIR / "brain-tissue-3d.onnx").read_bytes()
    rewritten = cpu_graph(data)
    ops = [node.op_type for node in onnx.load_model_from_string(rewritten).graph.node]
    assert "Softmax" not in ops and "LogSoftmax" not in ops
    window = np.random.default_rng(1).normal(size=(1, 1, 8, 32, 32)).astype(np.float32)
    for a, b in zip(run(data, {"image": window}), run(rewritten, {"image": window})):
        np.testing.assert_allclose(b, a, atol=2e-5)


def test_cpu_sessions_run_the_rewritten_graph_and_open_when_it_cannot_be_made(tmp_path, monkeypatch):
    path = save(pointwise_model(), tmp_path / "m.onnx")
    seen = []
    real = channel_softmax.cpu_graph
    monkeypatch.setattr(channel_softmax, "cpu_graph", lambda data: seen.append(real(data)) or seen[-1])
    model = load_model(path, device="cpu", backend="onnxruntime")
    assert len(seen) == 1 and seen[0] != path.read_bytes()  # the test model's softmax is over its channels
    assert model.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()  # the file's, as read
    image = np.array([0.2, 0.8], np.float32).reshape(1, 1, 1, 1, 2)
    assert model.run(image)[0][0, :, 0, 0].argmax(0).tolist() == [0, 1]

    def broken(data):
        raise RuntimeError("shape inference failed")

    monkeypatch.setattr(channel_softmax, "cpu_graph", broken)
    model = load_model(path, device="cpu", backend="onnxruntime")
    assert model.run(image)[0][0, :, 0, 0].argmax(0).tolist() == [0, 1]
