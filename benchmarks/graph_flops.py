"""Floating-point operations of an ONNX graph for given input shapes, counted from the graph (no run).

``count_flops(model, {"image": (1, 1, 24, 80, 80)})`` fixes the inputs' shapes, runs ONNX shape inference,
folds the small shape computations it cannot follow (``Shape -> Gather -> Mod -> ... -> Pad`` chains, as
exported models compute their padding) into constants with ONNX's reference evaluator, and repeats until
every tensor's shape is known. Then:

- ``Conv``: 2 x N x C_out x prod(output spatial) x C_in/group x prod(kernel);
- ``ConvTranspose``: 2 x N x C_in x prod(input spatial) x C_out/group x prod(kernel);
- ``MatMul`` and ``Gemm``: 2 x (output elements) x K, the reduced dimension;

that is, multiply-adds counted as two operations, biases left out. Every other node (activations,
normalisation, softmax, resizing, pooling...) is elementwise-scale work: it is reported apart, as the
number of elements of each such node's largest input or output (about one operation per element), never
mixed into ``flops``. Nodes whose shapes stay unknown are listed in ``unknown`` rather than guessed.

A benchmark helper (``benchmarks/inference.py``); pure onnx + numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

DENSE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Nodes that only move shapes or metadata around: no arithmetic on the data worth counting.
SHAPE_OPS = frozenset({
    "Shape", "Size", "Gather", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Concat", "Slice", "Cast",
    "Constant", "ConstantOfShape", "Identity", "Transpose", "Expand", "Range",
})  # fmt: skip
# A folded shape computation larger than this many elements is not a shape computation: leave it alone.
_FOLD_LIMIT = 1 << 16


@dataclass(frozen=True)
class GraphFlops:
    """``flops``: the dense ops' floating-point operations (multiply-adds x 2), all of them together;
    ``by_op``: the same per op type; ``other_elements``: per op type, the elements the other (elementwise,
    normalisation, pooling, resizing...) nodes touch, one operation per element of each node's largest
    tensor; ``unknown``: names of nodes (dense or not) whose shapes could not be inferred."""

    flops: int
    by_op: dict[str, int] = field(default_factory=dict)
    other_elements: dict[str, int] = field(default_factory=dict)
    unknown: tuple[str, ...] = ()

    @property
    def other_total(self) -> int:
        return sum(self.other_elements.values())


def count_flops(
    model: onnx.ModelProto | str | Path, input_shapes: Mapping[str, Sequence[int]] | Sequence[int]
) -> GraphFlops:
    """The GraphFlops of ``model`` (a ModelProto, left unchanged, or a path) run on inputs of
    ``input_shapes`` (a mapping from graph input name to its full shape, batch axis included; a plain shape
    means the first graph input). Dynamic dimensions of the inputs are replaced by these shapes."""
    model = onnx.load(str(model)) if isinstance(model, (str, Path)) else _copy(model)
    graph = model.graph
    initializer_names = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializer_names]
    if not isinstance(input_shapes, Mapping):
        input_shapes = {inputs[0].name: tuple(input_shapes)}
    for value in inputs:
        if value.name not in input_shapes:
            continue
        shape = [int(n) for n in input_shapes[value.name]]
        dims = value.type.tensor_type.shape.dim
        if len(dims) and len(dims) != len(shape):
            raise ValueError(f"input {value.name!r} has rank {len(dims)}, got shape {shape}")
        del dims[:]
        for n in shape:
            dims.add().dim_value = n
    missing = set(input_shapes) - {i.name for i in inputs}
    if missing:
        raise ValueError(f"the graph has no input named {sorted(missing)}")
    model, shapes = _infer_and_fold(model)
    return _count(model.graph, shapes)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _shape_of(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = []
    for d in t.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(int(d.dim_value))
    return tuple(dims)


def _infer_and_fold(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...] | None]]:
    """Alternate shape inference with folding nodes whose inputs are all known constants (the initializers,
    or ``Shape`` of a tensor of known shape) into initializers, until nothing more folds."""
    from onnx.reference import ReferenceEvaluator

    for _ in range(100):
        model = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        graph = model.graph
        shapes: dict[str, tuple[int, ...] | None] = {
            v.name: _shape_of(v) for v in (*graph.input, *graph.value_info, *graph.output)
        }
        constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        shapes.update({name: tuple(array.shape) for name, array in constants.items()})
        folded, keep = {}, []
        for node in graph.node:
            value = _fold(node, constants, shapes, ReferenceEvaluator)
            if value is None:
                keep.append(node)
                continue
            for name, array in zip(node.output, value):
                constants[name] = folded[name] = np.asarray(array)
        if not folded:
            return model, shapes
        del graph.node[:]
        graph.node.extend(keep)
        graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in folded.items())
        # Stale value_info entries of folded tensors would clash with the new initializers.
        kept = [v for v in graph.value_info if v.name not in folded]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    raise RuntimeError("constant folding did not converge")


def _fold(node: onnx.NodeProto, constants: dict, shapes: dict, evaluator: type) -> list | None:
    """The outputs of ``node`` when they can be computed without the graph's inputs, else None."""
    if node.op_type == "Shape":
        shape = shapes.get(node.input[0])
        if shape is None:
            return None
        attrs = {a.name: a.i for a in node.attribute}
        return [np.array(shape[attrs.get("start", 0) : attrs.get("end", len(shape))], dtype=np.int64)]
    subgraph = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    if node.op_type in DENSE_OPS or any(a.type in subgraph for a in node.attribute):
        return None
    data_inputs = [name for name in node.input if name]
    if not all(name in constants for name in data_inputs):
        return None
    if any(constants[name].size > _FOLD_LIMIT for name in data_inputs):
        return None
    if node.domain not in ("", "ai.onnx"):
        return None
    try:
        outputs = evaluator(node).run(None, {name: constants[name] for name in data_inputs})
    except Exception:  # an op the reference evaluator cannot run: the node stays, its shape may stay unknown
        return None
    if any(np.asarray(o).size > _FOLD_LIMIT for o in outputs):
        return None
    return list(outputs)


def _count(graph: onnx.GraphProto, shapes: dict[str, tuple[int, ...] | None]) -> GraphFlops:
    by_op: dict[str, int] = {}
    other: dict[str, int] = {}
    unknown = []
    for node in graph.node:
        op = node.op_type
        if op in SHAPE_OPS:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if op in DENSE_OPS:
            known = [shapes.get(name) for name in (*node.input[:2], node.output[0])]
            if any(s is None for s in known):
                unknown.append(node.name or f"{op}:{node.output[0]}")
                continue
            x, w, y = known
            if op == "Conv":  # weight (C_out, C_in / group, *k)
                macs = math.prod(y) * w[1] * math.prod(w[2:])
            elif op == "ConvTranspose":  # weight (C_in, C_out / group, *k): each input feeds w[1] x k outputs
                macs = math.prod(x) * w[1] * math.prod(w[2:])
            elif op == "MatMul":
                macs = math.prod(y) * x[-1]
            else:  # Gemm: A is (M, K), or (K, M) with transA
                macs = math.prod(y) * (x[0] if attrs.get("transA", 0) else x[-1])
            by_op[op] = by_op.get(op, 0) + 2 * macs
            continue
        sizes = [shapes.get(name) for name in (*node.input, *node.output) if name]
        if any(s is None for s in sizes):
            unknown.append(node.name or f"{op}:{node.output[0]}")
            continue
        other[op] = other.get(op, 0) + max((math.prod(s) for s in sizes), default=0)
    return GraphFlops(sum(by_op.values()), by_op, other, tuple(unknown))
