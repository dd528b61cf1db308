"""Window features for the verdict: expose a model's bottleneck as a graph output and measure its training cases.

``add_feature_output(proto)`` appends two nodes to an exported graph: a GlobalAveragePool of the network's
deepest encoder activation (the data input of its first upsampling node, ConvTranspose or Resize) and a
Flatten, giving the output ``features`` (N, F). Every existing node, weight and output stays as it was
(``check_only_features_added``), so probabilities, maps and labels are unchanged.

``measure_features(model_bytes, cases, ...)`` runs the model through the product's own ``predict`` on each
training case and returns ``napari_medcl.feature_distance.FeatureStats`` fitted on their windows.
``medcl-calibrate --features`` uses both. onnx and numpy only; never torch.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from napari_medcl.feature_distance import FEATURES_OUTPUT

__all__ = ["add_feature_output", "check_only_features_added", "measure_features"]

UPSAMPLING_OPS = ("ConvTranspose", "Resize", "Upsample")
_POOLED = "medcl_features_pooled"


def bottleneck_tensor(proto: Any) -> str:
    """The name of the graph's deepest encoder activation: the data input of its first upsampling node.
    ValueError when the graph has none (not an encoder-decoder network)."""
    for node in proto.graph.node:
        if node.op_type in UPSAMPLING_OPS:
            return node.input[0]
    raise ValueError(
        f"the graph has no upsampling node ({', '.join(UPSAMPLING_OPS)}), so no bottleneck to take "
        "window features from"
    )


def add_feature_output(proto: Any) -> tuple[str, int]:
    """Add the ``features`` output (N, F) to ``proto`` in place; return (pooled tensor name, F).
    ValueError when the graph already has it, has no bottleneck, or its channel count cannot be inferred."""
    import onnx
    from onnx import TensorProto, helper, shape_inference

    graph = proto.graph
    if any(o.name == FEATURES_OUTPUT for o in graph.output):
        raise ValueError(f"the graph already has a {FEATURES_OUTPUT!r} output")
    tensor = bottleneck_tensor(proto)
    inferred = shape_inference.infer_shapes(proto)
    channels = None
    for info in (*inferred.graph.value_info, *inferred.graph.output):
        if info.name == tensor:
            dims = info.type.tensor_type.shape.dim
            channels = dims[1].dim_value if len(dims) > 1 and dims[1].HasField("dim_value") else None
    if not channels:
        raise ValueError(f"the channel count of {tensor!r} cannot be inferred from the graph")
    graph.node.append(helper.make_node("GlobalAveragePool", [tensor], [_POOLED], name="medcl_features_pool"))
    graph.node.append(
        helper.make_node("Flatten", [_POOLED], [FEATURES_OUTPUT], axis=1, name="medcl_features_flatten")
    )
    graph.output.append(helper.make_tensor_value_info(FEATURES_OUTPUT, TensorProto.FLOAT, ["N", channels]))
    onnx.checker.check_model(proto)
    return tensor, int(channels)


def check_only_features_added(before: Any, after: Any) -> bool:
    """Whether graph ``after`` is graph ``before`` plus the feature nodes and output, nothing else."""
    import onnx

    copy = onnx.GraphProto()
    copy.CopyFrom(after)
    keep = [n for n in copy.node if FEATURES_OUTPUT not in n.output and _POOLED not in n.output]
    outputs = [o for o in copy.output if o.name != FEATURES_OUTPUT]
    del copy.node[:]
    copy.node.extend(keep)
    del copy.output[:]
    copy.output.extend(outputs)
    return copy.SerializeToString() == before.SerializeToString()


def measure_features(
    model_bytes: bytes,
    cases: Sequence[Any],
    layout: Any,
    progress: Callable[[str], None] = lambda _: None,
) -> Any:
    """FeatureStats of ``cases`` (``training.data.layouts.CaseFiles`` of ``layout``) as the model in
    ``model_bytes`` (a spec with unmeasured ``features``) sees them through ``predict`` (ONNX Runtime, fp32,
    CPU). DatasetError for a case that cannot be read."""
    from napari_medcl.feature_distance import FeatureStats
    from napari_medcl.onnx_session import load_model
    from napari_medcl.prediction import predict
    from training.data.check import read_case
    from training.data.layouts import DatasetError

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(model_bytes)
        session = load_model(path, device="cpu", backend="onnxruntime", precision="fp32")
        per_case = {}
        for number, case in enumerate(cases, 1):
            image, _, problems = read_case(case, layout)
            if problems or image is None:
                raise DatasetError(problems or [f"case {case.case_id}: cannot be read"], root=layout.root)
            progress(f"[{number}/{len(cases)}] {case.case_id}: window features")
            prediction = predict(image, session, device="cpu", backend="onnxruntime", precision="fp32")
            per_case[case.case_id] = prediction.window_features
    return FeatureStats.fit(session.spec.features["tensor"], per_case)
