"""Softmax over the channel axis without transposes, for ONNX Runtime's CPU provider.

ONNX Runtime's CPU kernels for ``Softmax`` and ``LogSoftmax`` (opset 13 and later) work along the last axis
only: for a channel axis they transpose the whole (N, C, *S) tensor there and back. In an exported model the
final softmax and the UAFR blocks' log-softmax run over the channels, and on a 3D window those transposes took
21-28% of the kernel time of the benchmark U-Net (docs/performance.md, "Fractions of the fp32 peak").

``cpu_graph`` (model bytes in, model bytes out; what ``load_model`` gives the CPU provider) and
``rewrite_channel_softmax`` (a parsed model, in place) replace each such node by the same function written
with reductions over that axis, which the CPU provider runs in place:

    z = x - ReduceMax(x);  Softmax = Exp(z) / ReduceSum(Exp(z));  LogSoftmax = z - Log(ReduceSum(Exp(z)))

Subtracting the maximum keeps it exact for any logits (no overflow, the largest term is exp(0) = 1). The graph
that runs is then not byte for byte the file's: its outputs differ by float32 rounding (at most 2.1e-6 on a
window of the bundled 3D model). Nodes over the last axis, and models of opset 12 or older (whose softmax
flattens every axis after ``axis``), are left as they are.
"""

from __future__ import annotations

from typing import Any

__all__ = ["cpu_graph", "rewrite_channel_softmax"]

_SOFTMAX_OPS = ("Softmax", "LogSoftmax")
# From these opset versions on, the reductions take their axes as an input tensor instead of an attribute.
_AXES_AS_INPUT = {"ReduceSum": 13, "ReduceMax": 18}


def cpu_graph(data: bytes) -> bytes:
    """``data`` (a serialised ONNX model) with its channel-axis softmaxes rewritten; ``data`` itself when there
    is none to rewrite."""
    import onnx

    model = onnx.load_model_from_string(data)
    return model.SerializeToString() if rewrite_channel_softmax(model) else data


def rewrite_channel_softmax(model: Any) -> int:
    """Rewrite every Softmax / LogSoftmax of ``model`` (an onnx.ModelProto) that is not over the last axis of
    a tensor of known rank; return how many were rewritten. Subgraphs (If, Loop) are left alone."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    graph = model.graph
    if opset < 13 or not any(node.op_type in _SOFTMAX_OPS for node in graph.node):
        return 0
    ranks = _known_ranks(model)
    taken = {n for node in graph.node for n in (*node.input, *node.output)} | {
        t.name for t in graph.initializer
    }
    nodes, rewritten = [], 0
    for node in graph.node:
        rank = (
            ranks.get(node.input[0])
            if node.op_type in _SOFTMAX_OPS and node.domain in ("", "ai.onnx")
            else None
        )
        if rank is None or _axis(node) % rank == rank - 1:
            nodes.append(node)
            continue
        prefix = _fresh(f"{node.name or node.output[0]}/channel_softmax", taken)
        new_nodes, axes = _as_reductions(node, _axis(node) % rank, opset, prefix)
        taken.update(n for new in new_nodes for n in new.output)
        graph.initializer.append(axes)
        nodes += new_nodes
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
    return rewritten


def _as_reductions(node: Any, axis: int, opset: int, prefix: str) -> tuple[list[Any], Any]:
    """The nodes computing ``node`` (Softmax or LogSoftmax over ``axis``) with reductions, every new tensor
    named under ``prefix``; and the int64 axes initializer they read (when the opset wants axes as input)."""
    from onnx import helper, numpy_helper

    axes = numpy_helper.from_array(_int64([axis]), f"{prefix}/axes")

    def reduce(op: str, source: str, target: str) -> Any:
        if opset >= _AXES_AS_INPUT[op]:
            return helper.make_node(op, [source, axes.name], [target], keepdims=1)
        return helper.make_node(op, [source], [target], axes=[axis], keepdims=1)

    x, y = node.input[0], node.output[0]
    shifted, exp, total = f"{prefix}/shifted", f"{prefix}/exp", f"{prefix}/sum"
    nodes = [
        reduce("ReduceMax", x, f"{prefix}/max"),
        helper.make_node("Sub", [x, f"{prefix}/max"], [shifted]),
        helper.make_node("Exp", [shifted], [exp]),
        reduce("ReduceSum", exp, total),
    ]
    if node.op_type == "Softmax":
        nodes.append(helper.make_node("Div", [exp, total], [y]))
    else:
        nodes += [
            helper.make_node("Log", [total], [f"{prefix}/log_sum"]),
            helper.make_node("Sub", [shifted, f"{prefix}/log_sum"], [y]),
        ]
    return nodes, axes


def _axis(node: Any) -> int:
    """The node's ``axis`` attribute; -1 (the default from opset 13 on) when absent."""
    return next((int(a.i) for a in node.attribute if a.name == "axis"), -1)


def _known_ranks(model: Any) -> dict[str, int]:
    """Rank of every tensor whose rank ONNX shape inference can tell (dynamic sizes are fine)."""
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model, strict_mode=False)
    ranks = {}
    graph = inferred.graph
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor = value.type.tensor_type
        if tensor.HasField("shape"):
            ranks[value.name] = len(tensor.shape.dim)
    return ranks


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while any(t == name or t.startswith(f"{name}/") for t in taken):
        k += 1
        name = f"{base}_{k}"
    return name


def _int64(values: list[int]) -> Any:
    import numpy as np

    return np.asarray(values, dtype=np.int64)
