"""Tiny ONNX models built with onnx.helper for the inference tests (no torch needed).

The pointwise models make exact oracles: every output voxel depends only on the same input voxel, so the
labels of a sliding-window prediction must equal a threshold of the image whatever the tiling.
Importable by any test: ``from tests.onnx_models import pointwise_model, save``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from napari_medcl.spec import METADATA_KEY, ModelSpec, default_classes

OPSET = 17
IR_VERSION = 8


def make_spec(
    *,
    spatial_dims: int = 3,
    num_classes: int = 2,
    in_channels: int = 1,
    maps: tuple[str, ...] = ("encoder1", "decoder1"),
    patch: tuple[int, ...] | None = None,
    divisor: tuple[int, ...] | None = None,
    spacing: tuple[float, ...] | None = None,
    normalization: dict[str, Any] | None = None,
    name: str = "test-model",
    nonzero_is_foreground: bool = False,
) -> ModelSpec:
    """A ModelSpec with small defaults (patch 8 per axis, divisor 1, normalisation none)."""
    return ModelSpec(
        name=name,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        classes=default_classes(["background"] + [f"class{i}" for i in range(1, num_classes)]),
        patch_size=patch or (8,) * spatial_dims,
        divisor=divisor or (1,) * spatial_dims,
        spacing=spacing,
        normalization=normalization or {"kind": "none"},
        uncertainty_maps=maps,
        nonzero_is_foreground=nonzero_is_foreground,
    )


def _tensor(name: str, shape: list[Any]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _const(name: str, value: Any) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _spatial(spatial_dims: int) -> list[str]:
    return ["D", "H", "W"][-spatial_dims:]


def _model(
    nodes: list[onnx.NodeProto],
    initializers: list[onnx.TensorProto],
    spec: ModelSpec | None,
    *,
    input_shape: list[Any],
    outputs: dict[str, list[Any]],
    extra_opsets: dict[str, int] | None = None,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "test",
        [_tensor("image", input_shape)],
        [_tensor(name, shape) for name, shape in outputs.items()],
        initializer=initializers,
    )
    opsets = [helper.make_opsetid("", OPSET)]
    opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="napari-medcl-tests")
    model.ir_version = IR_VERSION
    if spec is not None:
        helper.set_model_props(model, {METADATA_KEY: spec.to_json()})
    return model


def _uafr_nodes(source: str, count: int, out: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``count`` pointwise maps in [0, 1]: sigmoid(c_i * source) with c_i = 1, -1, 2, -2, ..."""
    nodes, inits, names = [], [], []
    for i in range(count):
        factor = (i // 2 + 1) * (1 if i % 2 == 0 else -1)
        inits.append(_const(f"uafr_c{i}", factor))
        nodes.append(helper.make_node("Mul", [source, f"uafr_c{i}"], [f"uafr_s{i}"]))
        nodes.append(helper.make_node("Sigmoid", [f"uafr_s{i}"], [f"uafr_m{i}"]))
        names.append(f"uafr_m{i}")
    nodes.append(helper.make_node("Concat", names, [out], axis=1))
    return nodes, inits


def pointwise_model(
    *,
    threshold: float = 0.5,
    k: float = 50.0,
    spec: ModelSpec | None = None,
    with_spec: bool = True,
    graph_spatial_dims: int | None = None,
    graph_in_channels: int | str = "C",
    probabilities_name: str = "probabilities",
    produce_nan: bool = False,
    custom_domain: str | None = None,
    **spec_kwargs: Any,
) -> onnx.ModelProto:
    """probabilities = softmax([0, k * (mean_c(x) - threshold)]) per voxel, so labels == (x > threshold).

    UAFR maps: sigmoid(+-c * (x - threshold)), one per name in ``spec.uncertainty_maps``. The keyword
    arguments after ``spec`` break the contract on purpose for the loader tests (graph rank, static
    channel count, output name, NaN output, a node in a custom op domain)."""
    spec = spec or make_spec(**spec_kwargs)
    dims = graph_spatial_dims or spec.spatial_dims
    spatial = _spatial(dims)
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["mean", "threshold"], ["shifted"]),
        helper.make_node("Mul", ["shifted", "k"], ["logit"]),
        helper.make_node("Sub", ["logit", "logit"], ["zero"]),
        helper.make_node("Concat", ["zero", "logit"], ["logits"], axis=1),
        helper.make_node("Softmax", ["logits"], ["softmax"], axis=1),
    ]
    inits = [_const("threshold", threshold), _const("k", k)]
    last = "softmax"
    if produce_nan:
        inits.append(_const("nan", math.nan))
        nodes.append(helper.make_node("Mul", [last, "nan"], ["with_nan"]))
        last = "with_nan"
    extra_opsets = None
    if custom_domain is not None:
        nodes.append(helper.make_node("Scale", [last], ["custom"], domain=custom_domain))
        extra_opsets = {custom_domain: 1}
        last = "custom"
    nodes.append(helper.make_node("Identity", [last], [probabilities_name]))
    outputs = {probabilities_name: ["N", 2, *spatial]}
    if spec.uncertainty_maps:
        more_nodes, more_inits = _uafr_nodes("shifted", len(spec.uncertainty_maps), "uafr_uncertainty")
        nodes += more_nodes
        inits += more_inits
        outputs["uafr_uncertainty"] = ["N", len(spec.uncertainty_maps), *spatial]
    return _model(
        nodes,
        inits,
        spec if with_spec else None,
        input_shape=["N", graph_in_channels, *spatial],
        outputs=outputs,
        extra_opsets=extra_opsets,
    )


def nearest_class_model(num_classes: int, *, k: float = 20.0, **spec_kwargs: Any) -> onnx.ModelProto:
    """K classes; logits_c = -k (x - c)^2, so labels == clip(round(x), 0, K - 1) (x away from half-integers)."""
    spec = make_spec(num_classes=num_classes, **spec_kwargs)
    spatial = _spatial(spec.spatial_dims)
    centres = np.arange(num_classes, dtype=np.float32).reshape((1, num_classes) + (1,) * spec.spatial_dims)
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["mean", "centres"], ["d"]),  # (N, K, *S)
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        helper.make_node("Mul", ["d2", "negk"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    inits = [_const("centres", centres), _const("negk", -k)]
    outputs = {"probabilities": ["N", num_classes, *spatial]}
    if spec.uncertainty_maps:
        more_nodes, more_inits = _uafr_nodes("mean", len(spec.uncertainty_maps), "uafr_uncertainty")
        nodes += more_nodes
        inits += more_inits
        outputs["uafr_uncertainty"] = ["N", len(spec.uncertainty_maps), *spatial]
    return _model(nodes, inits, spec, input_shape=["N", "C", *spatial], outputs=outputs)


def conv_model(
    *, num_classes: int = 3, features: int = 4, seed: int = 0, **spec_kwargs: Any
) -> onnx.ModelProto:
    """A small conv net: 3^d conv, a stride-2 conv, nearest resize x2 and a skip addition, a 1^d head.

    The skip addition only works when every spatial size is even, so the spec's divisor (default 2) must be
    honoured by the tiler. The UAFR map is the normalised entropy of a 2-channel auxiliary head."""
    spec_kwargs.setdefault("divisor", (2,) * spec_kwargs.get("spatial_dims", 3))
    spec_kwargs.setdefault("maps", ("encoder1",))
    spec = make_spec(num_classes=num_classes, **spec_kwargs)
    d, c, f = spec.spatial_dims, spec.in_channels, features
    rng = np.random.default_rng(seed)
    spatial = _spatial(d)

    def weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        fan_in = math.prod(shape[1:])
        return _const(name, rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape))

    inits = [
        weight("w1", (f, c) + (3,) * d),
        _const("b1", rng.normal(0, 0.1, f)),
        weight("w2", (f, f) + (3,) * d),
        _const("b2", rng.normal(0, 0.1, f)),
        weight("w3", (num_classes, f) + (1,) * d),
        _const("b3", rng.normal(0, 0.1, num_classes)),
        weight("w4", (2, f) + (1,) * d),
        _const("scales", [1.0, 1.0] + [2.0] * d),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        _const("inv_log2", 1.0 / math.log(2.0)),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1] * (2 * d)),
        helper.make_node("Relu", ["c1"], ["a1"]),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], pads=[1] * (2 * d), strides=[2] * d),
        helper.make_node("Relu", ["c2"], ["a2"]),
        helper.make_node("Resize", ["a2", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Add", ["up", "a1"], ["skip"]),
        helper.make_node("Conv", ["skip", "w3", "b3"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("Conv", ["skip", "w4"], ["aux"]),
        helper.make_node("LogSoftmax", ["aux"], ["logp"], axis=1),
        helper.make_node("Exp", ["logp"], ["p"]),
        helper.make_node("Mul", ["p", "logp"], ["plogp"]),
        helper.make_node("ReduceSum", ["plogp", "axis1"], ["neg_entropy"], keepdims=1),
        helper.make_node("Neg", ["neg_entropy"], ["entropy"]),
        helper.make_node("Mul", ["entropy", "inv_log2"], ["uafr_uncertainty"]),
    ]
    outputs = {
        "probabilities": ["N", num_classes, *spatial],
        "uafr_uncertainty": ["N", 1, *spatial],
    }
    if len(spec.uncertainty_maps) != 1:
        raise ValueError("conv_model has exactly one UAFR map")
    return _model(nodes, inits, spec, input_shape=["N", c, *spatial], outputs=outputs)


def save(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write ``model`` as one .onnx file and return its path."""
    path = Path(path)
    onnx.save_model(model, str(path))
    return path


def save_with_external_data(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write ``model`` with every initializer in a ``<name>.data`` file beside it (the loader must refuse)."""
    path = Path(path)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=0,
    )
    return path


def pointwise_labels(image: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """The oracle of :func:`pointwise_model` for a single-channel image: uint8 (image > threshold)."""
    return (np.asarray(image) > threshold).astype(np.uint8)
