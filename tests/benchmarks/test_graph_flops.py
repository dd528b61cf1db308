"""benchmarks/graph_flops.py: FLOPs counted from an ONNX graph, checked against counts made by hand."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from benchmark_modules import benchmark_module
from onnx import TensorProto, helper, numpy_helper

from napari_medcl.onnx_session import MODELS_DIR


@pytest.fixture(scope="module")
def graph_flops():
    with benchmark_module("graph_flops") as module:
        yield module


def _hand_made_graph() -> onnx.ModelProto:
    """image (N, 3, H, W), dynamic -> padded to multiples of 8 by a computed Pad (Shape -> Gather -> Mod,
    as exported models do) -> Conv -> Relu -> grouped strided Conv -> ConvTranspose -> MatMul ->
    Flatten -> Transpose -> Gemm (transA)."""
    rng = np.random.default_rng(0)

    def const(name, array):
        return numpy_helper.from_array(np.asarray(array), name)

    initializers = [
        const("w1", rng.normal(size=(8, 3, 3, 3)).astype("f4")),
        const("b1", np.zeros(8, "f4")),
        const("w2", rng.normal(size=(8, 4, 3, 3)).astype("f4")),  # group 2: C_in / group = 4
        const("wt", rng.normal(size=(8, 2, 2, 2)).astype("f4")),  # ConvTranspose: (C_in, C_out, k, k)
        const("m", rng.normal(size=(16, 5)).astype("f4")),
        const("g", rng.normal(size=(160, 7)).astype("f4")),
        const("two", np.array([2], np.int64)),
        const("three", np.array([3], np.int64)),
        const("eight", np.array([8], np.int64)),
        const("zeros6", np.zeros(6, np.int64)),
    ]
    nodes = [
        helper.make_node("Shape", ["image"], ["shape"]),
        helper.make_node("Gather", ["shape", "two"], ["h"]),
        helper.make_node("Gather", ["shape", "three"], ["w"]),
        helper.make_node("Mod", ["h", "eight"], ["h8"]),
        helper.make_node("Sub", ["eight", "h8"], ["hpad0"]),
        helper.make_node("Mod", ["hpad0", "eight"], ["hpad"]),
        helper.make_node("Mod", ["w", "eight"], ["w8"]),
        helper.make_node("Sub", ["eight", "w8"], ["wpad0"]),
        helper.make_node("Mod", ["wpad0", "eight"], ["wpad"]),
        helper.make_node("Concat", ["zeros6", "hpad", "wpad"], ["pads"], axis=0),
        helper.make_node("Pad", ["image", "pads"], ["padded"]),
        helper.make_node("Conv", ["padded", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], group=2),
        helper.make_node("ConvTranspose", ["c2", "wt"], ["ct"], strides=[2, 2]),
        helper.make_node("MatMul", ["ct", "m"], ["mm"]),
        helper.make_node("Flatten", ["mm"], ["flat"], axis=1),
        helper.make_node("Transpose", ["flat"], ["flat_t"], perm=[1, 0]),
        helper.make_node("Gemm", ["flat_t", "g"], ["out"], transA=1),
    ]
    graph = helper.make_graph(
        nodes,
        "hand",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["A", "B"])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_counts_match_a_hand_count(graph_flops):
    model = _hand_made_graph()
    before = model.SerializeToString()
    result = graph_flops.count_flops(model, (1, 3, 10, 12))  # padded to 16 x 16
    # Conv 3 -> 8, 3x3, 16x16 out:                  8 * 16*16 * 3 * 9 = 55296 multiply-adds
    # Conv 8 -> 8, group 2, stride 2, 8x8 out:      8 * 8*8 * 4 * 9 = 18432
    # ConvTranspose 8 -> 2, 2x2, stride 2, 8x8 in:  8 * 8*8 * 2 * 4 = 4096 (out 1 x 2 x 16 x 16)
    # MatMul (1, 2, 16, 16) @ (16, 5):              (1*2*16*5) * 16 = 2560
    # Gemm (160, 1)^T @ (160, 7):                   1*7 * 160 = 1120
    assert result.by_op == {
        "Conv": 2 * (55296 + 18432),
        "ConvTranspose": 2 * 4096,
        "MatMul": 2 * 2560,
        "Gemm": 2 * 1120,
    }
    assert result.flops == 2 * (55296 + 18432 + 4096 + 2560 + 1120) == 163008
    assert result.unknown == ()
    # Elementwise work is counted apart: Relu over 8 x 16 x 16, Pad's output 3 x 16 x 16; Mod/Sub were folded.
    assert result.other_elements == {"Relu": 8 * 16 * 16, "Pad": 3 * 16 * 16}
    assert model.SerializeToString() == before  # the caller's model is left as it was


def test_batch_and_input_name(graph_flops):
    model = _hand_made_graph()
    one = graph_flops.count_flops(model, {"image": (1, 3, 16, 16)})
    two = graph_flops.count_flops(model, {"image": (2, 3, 16, 16)})
    assert one.flops == 163008  # already a multiple of 8: the same padded shape as above
    assert two.by_op == {op: 2 * flops for op, flops in one.by_op.items()}
    with pytest.raises(ValueError, match="no input named"):
        graph_flops.count_flops(model, {"volume": (1, 3, 16, 16)})
    with pytest.raises(ValueError, match="rank"):
        graph_flops.count_flops(model, (1, 3, 16))


def test_unknown_shapes_are_listed_not_guessed(graph_flops):
    model = _hand_made_graph()
    result = graph_flops.count_flops(model, {})  # no shape given: H and W stay symbolic
    assert result.flops == 0
    assert len(result.unknown) >= 4  # the dense nodes at least


def test_bundled_model_window(graph_flops):
    """The bundled 3D model (exported by torch, with dynamic N/D/H/W and padding computed in the graph):
    every node's shape is found for its window, and its convolutions dominate."""
    result = graph_flops.count_flops(MODELS_DIR / "brain-tissue-3d.onnx", (1, 1, 24, 80, 80))
    assert result.unknown == ()
    assert set(result.by_op) == {"Conv", "ConvTranspose"}
    assert 15e9 < result.flops < 30e9  # 22.1 GFLOP when this test was written
    assert result.other_total < result.flops / 20


@pytest.mark.torch
def test_matches_torch_flop_counter(graph_flops):
    """The benchmark's U-Net counted from its ONNX graph and by torch's FlopCounterMode on the same
    weights, in 2D and 3D."""
    pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    from napari_medcl.spec import ModelSpec, default_classes

    with benchmark_module("inference") as bench:
        for d, channels, patch in ((3, (4, 8, 16, 32), (16, 24, 32)), (2, (8, 16, 32, 64), (48, 64))):
            spec = ModelSpec(
                name="x",
                spatial_dims=d,
                in_channels=1,
                classes=default_classes(["background", "a", "b"]),
                patch_size=patch,
                divisor=(8,) * d,
                normalization={"kind": "zscore"},
                uncertainty_maps=("decoder2", "decoder1"),
            )
            weights = bench.unet_weights(d, channels, 3, seed=0)
            counted = graph_flops.count_flops(bench.unet_onnx(d, channels, weights, spec), (1, 1, *patch))
            forward = bench.unet_torch(d, channels, weights)
            with FlopCounterMode(display=False) as counter:
                forward(np.zeros((1, 1, *patch), np.float32))
            assert counted.flops == counter.get_total_flops() > 0
