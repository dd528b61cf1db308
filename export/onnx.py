"""Export a trained network to one self-describing ONNX file, and verify the file against torch.

``to_onnx(checkpoint_or_model, path)`` traces :class:`~training.models.inference_wrapper.InferenceWrapper` with the TorchScript
exporter (``torch.onnx.export(..., dynamo=False)``: single file, eval-mode BatchNorm folded into the convs,
sub-second on small nets) and writes a graph that follows architecture.md §4.3:

- input ``image`` float32 (N, C_in, *S) with N and S dynamic; outputs ``probabilities`` (N, K, *S) and, for
  UAFR networks, ``uafr_uncertainty`` (N, U, *S) with K and U fixed in the graph; a prompt-conditioned
  network (``spec.prompts``) has a second input ``prompts`` float32 (N, P, *S): its prompt channels, kept
  apart from the image so that only the image is normalised and an automatic prediction feeds zeros;
- opset >= 17, weights inside the file, no BatchNormalization node, standard op domains only;
- InstanceNorm/GroupNorm traced as :class:`AxiswiseNorm` (ORT's own kernels lose ~2e-4 on 128^3 maps);
- the ModelSpec JSON under the metadata key ``medcl.spec``, with the export's own provenance added under
  ``training.export`` (tool and torch versions, opset, precision, sample shape, checkpoint SHA-256).

The bytes are checked with the product's own loader contract (``napari_medcl.onnx_session.check_model_bytes``)
before anything is written; with ``verify=True`` the written temporary file is read back and compared with
torch (:func:`verify_onnx`) before it is renamed onto ``path``, so a failed check leaves no file there.

``verify_onnx`` runs ``onnx.checker`` and then ONNX Runtime (CPU) against the torch wrapper on a batch of
two at a shape that differs from the export's sample shape, and on one odd shape (not a multiple of the
divisor; the networks pad internally). fp32 limits: max |diff| <= 1e-4 for probabilities and for the UAFR
maps, and the argmax equal on every voxel where torch's two best classes are further apart than twice that
limit (closer than that a flip is a tie, not an export error; such voxels are counted in the report). It
also times one window (the patch, batch 1) in ORT and in torch on CPU with the same number of threads.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import io
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.checkpoint_model import ExportError, check_spec_matches_model, load_checkpoint_model
from napari_medcl.onnx_session import STANDARD_DOMAINS, graph_nodes
from napari_medcl.spec import METADATA_KEY, ModelSpec, SpecError, default_classes
from training.models.inference_wrapper import OUTPUT_PROBABILITIES, OUTPUT_UNCERTAINTY, InferenceWrapper

__all__ = [
    "DEFAULT_OPSET",
    "AxiswiseNorm",
    "ExportError",
    "ExportReport",
    "ShapeCheck",
    "Tolerance",
    "VerifyReport",
    "check_contract",
    "to_onnx",
    "verify_onnx",
]

DEFAULT_OPSET = 17
MIN_OPSET = 17
INPUT_NAME = "image"
MAX_BYTES = 2 * 1024**3 - 1  # protobuf's limit for one message, so for a single-file model
# Warning categories the TorchScript exporter raises about itself (deprecation, tracer notes on shapes).
_EXPORTER_WARNINGS = (DeprecationWarning, FutureWarning, torch.jit.TracerWarning)


@dataclass(frozen=True)
class Tolerance:
    """Limits of one verification: max |diff| of probabilities and of UAFR maps, and the minimal fraction of
    voxels (among those that are not near-ties) whose argmax must agree."""

    probabilities: float
    uncertainty: float
    argmax_agreement: float


FP32_TOLERANCE = Tolerance(probabilities=1e-4, uncertainty=1e-4, argmax_agreement=1.0)
# fp16 weights and activations: ~1e-3 relative error per op compounds through the network; the limits are
# those of a usable CUDA variant, not of a bit-faithful copy.
FP16_TOLERANCE = Tolerance(probabilities=5e-2, uncertainty=5e-2, argmax_agreement=0.99)


@dataclass(frozen=True)
class ShapeCheck:
    """ORT vs torch on one input shape (N, C, *S).

    ``argmax_agreement``: fraction of all voxels with the same argmax; ``decided_agreement``: the same among
    voxels whose torch top-2 margin exceeds twice the probability limit; ``near_ties``: voxels left out."""

    shape: tuple[int, ...]
    probabilities_max_abs_diff: float
    uncertainty_max_abs_diff: float | None
    argmax_agreement: float
    decided_agreement: float
    near_ties: int
    passed: bool


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify_onnx` found. Times are seconds per window (batch 1, the patch) on CPU, minimum of
    ``repeats`` runs after one warm-up, ORT and torch with ``threads`` threads each, in the same process."""

    path: Path
    model_bytes: int
    opset: int
    precision: str
    op_counts: dict[str, int]
    checks: tuple[ShapeCheck, ...]
    tolerance: Tolerance
    window: tuple[int, ...]
    ort_seconds_per_window: float
    torch_seconds_per_window: float
    threads: int
    ort_version: str
    torch_version: str

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def summary(self) -> str:
        lines = [
            f"verified {self.path.name}: onnx.checker ok; {self.precision}, opset {self.opset}, "
            f"{self.model_bytes / 1e6:.2f} MB, {sum(self.op_counts.values())} nodes",
            "ops: " + ", ".join(f"{k} {v}" for k, v in self.op_counts.items()),
        ]
        t = self.tolerance
        for c in self.checks:
            unc = "-" if c.uncertainty_max_abs_diff is None else f"{c.uncertainty_max_abs_diff:.2e}"
            lines.append(
                f"ORT vs torch on {list(c.shape)}: probabilities max |diff| {c.probabilities_max_abs_diff:.2e} "
                f"(limit {t.probabilities:g}), uafr_uncertainty {unc} (limit {t.uncertainty:g}), argmax "
                f"agreement {100 * c.argmax_agreement:.4f}% ({100 * c.decided_agreement:.4f}% of decided "
                f"voxels, {c.near_ties} near-ties) -> {'ok' if c.passed else 'FAILED'}"
            )
        lines.append(
            f"CPU time per window {list(self.window)} ({self.threads} threads): ORT "
            f"{self.ort_seconds_per_window:.4f} s ({self.ort_version}), torch {self.torch_seconds_per_window:.4f} s "
            f"({self.torch_version}); ORT/torch {self.ort_seconds_per_window / self.torch_seconds_per_window:.2f}"
        )
        return "\n".join(lines)


@dataclass(frozen=True)
class ExportReport:
    """What :func:`to_onnx` wrote. ``load_seconds``: reading the checkpoint and rebuilding the network;
    ``export_seconds``: tracing, checking and writing the file (verification not included)."""

    path: Path
    spec: ModelSpec
    precision: str
    opset: int
    sample_shape: tuple[int, ...]
    model_bytes: int
    op_counts: dict[str, int]
    load_seconds: float
    export_seconds: float
    verify: VerifyReport | None

    def summary(self) -> str:
        lines = [
            f"exported {self.path} ({self.model_bytes / 1e6:.2f} MB, {self.precision}, opset {self.opset}) in "
            f"{self.export_seconds:.2f} s (+ {self.load_seconds:.2f} s loading)",
            f"model: {self.spec.summary()}",
            f"outputs: probabilities ({self.spec.num_classes} classes)"
            + (
                f", uafr_uncertainty ({', '.join(self.spec.uncertainty_maps)})"
                if self.spec.uncertainty_maps
                else ""
            ),
            f"traced at sample shape {list(self.sample_shape)}; inputs must be multiples of "
            f"{list(self.spec.divisor)} (other sizes are padded inside the graph)",
        ]
        if self.verify is not None:
            lines.append(self.verify.summary())
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- export


def to_onnx(
    checkpoint_or_model: str | Path | nn.Module,
    path: str | Path,
    *,
    spec: ModelSpec | None = None,
    opset: int = DEFAULT_OPSET,
    verify: bool = False,
    fp16: bool = False,
    sample_shape: Sequence[int] | None = None,
    name: str | None = None,
    class_colors: Sequence[str] | None = None,
) -> ExportReport:
    """Export a checkpoint file (or a network) to ``path`` as one ONNX file with its ModelSpec inside.

    ``checkpoint_or_model``: a napari-medcl training checkpoint (its stored spec is used unless ``spec`` is
    given), or a registry network, which needs ``spec`` (see :func:`training.model_spec.spec_for_model`). ``opset`` >= 17.
    ``sample_shape``: the spatial shape traced (multiples of the divisor; default: the patch, capped at
    twice the divisor per axis, since the graph is dynamic anyway). ``fp16``: weights and activations in
    float16, inputs/outputs, norms and softmax/entropy in float32 (meant for the CUDA provider). ``name`` / ``class_colors`` replace the spec's name / colours ('#rrggbb', one per class).
    ``verify``: run :func:`verify_onnx` on the written file before it is moved onto ``path``.

    Raises ExportError (or training.checkpoint.CheckpointError for an unusable checkpoint) with one line;
    on any failure nothing is left under ``path`` (an existing file there is kept as it was).
    """
    from napari_medcl.atomic import atomic_path

    path = Path(path)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    start = time.perf_counter()
    model, spec, checkpoint = _resolve_source(checkpoint_or_model, spec)
    spec = _customise(spec, name, class_colors)
    check_spec_matches_model(spec, model, checkpoint.path if checkpoint else None)
    load_seconds = time.perf_counter() - start

    start = time.perf_counter()
    sample = _sample_shape(spec, sample_shape)
    precision = "fp16" if fp16 else "fp32"
    spec = dataclasses.replace(
        spec, training={**spec.training, "export": _provenance(opset, precision, sample, checkpoint)}
    )
    reference = _detached_copy(model)
    traced = _with_axiswise_norms(copy.deepcopy(reference))
    traced = traced.half() if fp16 else traced
    wrapper = InferenceWrapper(
        traced, dtype=torch.float16 if fp16 else torch.float32, prompt_channels=_prompt_channels(spec)
    )
    proto = _trace(wrapper, spec, sample, opset, path)
    data = _finish(proto, spec, path)
    report_verify = None
    with atomic_path(path) as temp:
        temp.write_bytes(data)
        export_seconds = time.perf_counter() - start
        if verify:
            report_verify = _verify(temp.read_bytes(), reference, path)
    return ExportReport(
        path=path,
        spec=spec,
        precision=precision,
        opset=opset,
        sample_shape=sample,
        model_bytes=len(data),
        op_counts=_op_counts(proto.graph),
        load_seconds=load_seconds,
        export_seconds=export_seconds,
        verify=report_verify,
    )


def _resolve_source(source: Any, spec: ModelSpec | None) -> tuple[nn.Module, ModelSpec, Any]:
    """(network, spec, CheckpointModel or None) from a checkpoint path or a network."""
    if isinstance(source, (str, Path)):
        checkpoint = load_checkpoint_model(source)
        return checkpoint.model, spec if spec is not None else checkpoint.spec, checkpoint
    if isinstance(source, InferenceWrapper):
        source = source.model
    if isinstance(source, nn.Module):
        if spec is None:
            raise ValueError(
                "exporting a network without a checkpoint needs spec=...; build one with export.spec_for_model"
            )
        return source, spec, None
    raise TypeError(f"expected a checkpoint path or a torch network, got {type(source).__name__}")


def _customise(spec: ModelSpec, name: str | None, class_colors: Sequence[str] | None) -> ModelSpec:
    if name is not None:
        spec = dataclasses.replace(spec, name=name)
    if class_colors is not None:
        colors = [str(c).strip().lower() for c in class_colors]
        bad = [
            c
            for c in colors
            if not (len(c) == 7 and c[0] == "#" and all(x in "0123456789abcdef" for x in c[1:]))
        ]
        if bad:
            raise SpecError(f"class colours must look like '#rrggbb', got {bad[0]!r}")
        spec = dataclasses.replace(spec, classes=default_classes(spec.class_names, colors))
    return spec


def _sample_shape(spec: ModelSpec, sample_shape: Sequence[int] | None) -> tuple[int, ...]:
    """The traced spatial shape: given (checked) or the patch rounded to the divisor, at most 2 x divisor."""
    divisor = tuple(int(d) for d in spec.divisor)
    if sample_shape is None:
        window = tuple(-(-p // d) * d for p, d in zip(spec.patch_size, divisor))
        return tuple(min(w, 2 * d) for w, d in zip(window, divisor))
    sample = tuple(int(s) for s in sample_shape)
    if len(sample) != spec.spatial_dims or any(s < 1 for s in sample):
        raise ValueError(f"sample_shape must be {spec.spatial_dims} positive sizes, got {list(sample_shape)}")
    if any(s % d for s, d in zip(sample, divisor)):
        raise ValueError(f"sample_shape {list(sample)} must be a multiple of the divisor {list(divisor)}")
    return sample


def _provenance(opset: int, precision: str, sample: tuple[int, ...], checkpoint: Any) -> dict[str, Any]:
    import napari_medcl

    record: dict[str, Any] = {
        "tool": "napari-medcl medcl-export",
        "code_version": napari_medcl.__version__,
        "torch_version": str(torch.__version__),  # a TorchVersion would not load weights-only
        "exporter": "torch.onnx.export (TorchScript tracer, dynamo=False)",
        "opset": opset,
        "precision": precision,
        "sample_shape": list(sample),
        "checkpoint": None,
    }
    if checkpoint is not None:
        record["checkpoint"] = {
            "file": checkpoint.path.name,
            "sha256": checkpoint.sha256,
            "epoch": checkpoint.epoch,
        }
    return record


def _detached_copy(model: nn.Module) -> nn.Module:
    """A float32 CPU copy in eval mode, so exporting never moves, casts or re-modes the caller's network."""
    clone = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    return clone.eval().requires_grad_(False)


class AxiswiseNorm(nn.Module):
    """InstanceNorm / GroupNorm (input statistics) for the traced graph, statistics reduced one axis at a time.

    ONNX Runtime's CPU kernels for InstanceNormalization and ReduceMean accumulate a whole plane in float32 in
    one running sum: on a 128^3 map they are off by ~2e-4 (torch: 5e-7), enough to break the 1e-4 parity of
    the default 3D U-Net. Averaging over W, then H, then D sums at most one axis length at a time (error
    ~2e-6 in ORT). Computed in float32 also inside an fp16 graph; output in the input's dtype.
    x (N, C, *S) -> (N, C, *S).
    """

    def __init__(self, norm: nn.Module):
        super().__init__()
        group_norm = isinstance(norm, nn.GroupNorm)
        self.channels = norm.num_channels if group_norm else norm.num_features
        self.groups = norm.num_groups if group_norm else self.channels
        self.eps = float(norm.eps)
        self.weight = norm.weight if norm.affine else None
        self.bias = norm.bias if norm.affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, n, spatial = x.dtype, x.shape[0], x.shape[2:]
        grouped = x.float().reshape(n, self.groups, self.channels // self.groups, *spatial)  # (N, G, C/G, *S)

        def mean(t: torch.Tensor) -> torch.Tensor:  # (N, G, C/G, *S) -> (N, G, 1, 1...)
            for axis in range(t.ndim - 1, 1, -1):
                t = t.mean(dim=axis, keepdim=True)
            return t

        centered = grouped - mean(grouped)
        y = centered * torch.rsqrt(mean(centered * centered) + self.eps)
        y = y.reshape(n, self.channels, *spatial)
        if self.weight is not None:
            shape = (1, self.channels) + (1,) * len(spatial)
            y = y * self.weight.float().reshape(shape) + self.bias.float().reshape(shape)
        return y.to(dtype)


_INPUT_STAT_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm)


def _with_axiswise_norms(model: nn.Module) -> nn.Module:
    """Replace (in place) every norm that normalises with the input's own statistics by AxiswiseNorm."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _INPUT_STAT_NORMS) and not getattr(child, "track_running_stats", False):
                setattr(parent, name, AxiswiseNorm(child))
    return model


def _prompt_channels(spec: ModelSpec) -> int:
    """P, the prompt channels a prompt model's graph takes as its second input (0 for other models)."""
    return len(spec.prompts["channels"]) if spec.prompts is not None else 0


def _sample_inputs(spec: ModelSpec, batch: int, spatial: Sequence[int], generator: Any = None) -> tuple:
    """(image,) or (image, prompts) for the graph: random (seeded by ``generator``) or zeros when None.
    Random prompts are drawn in [0, 1), the range of click maps and one-hot segmentations."""
    if generator is None:
        image = torch.zeros(batch, spec.in_channels, *spatial)
        prompts = torch.zeros(batch, _prompt_channels(spec), *spatial)
    else:
        image = torch.randn(batch, spec.in_channels, *spatial, generator=generator)
        prompts = torch.rand(batch, _prompt_channels(spec), *spatial, generator=generator)
    return (image, prompts) if spec.prompts is not None else (image,)


def _trace(
    wrapper: InferenceWrapper, spec: ModelSpec, sample: tuple[int, ...], opset: int, path: Path
) -> Any:
    """Trace the wrapper on a (1, C, *sample) input (and (1, P, *sample) prompts for a prompt model) ->
    ModelProto with dynamic N and spatial dims."""
    import onnx

    axes = {0: "N", **{2 + i: a for i, a in enumerate("DHW"[-spec.spatial_dims :])}}
    names = list(wrapper.output_names)
    inputs = _sample_inputs(spec, 1, sample)
    input_names = list(wrapper.input_names)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The exporter's own deprecation notices; the tracer's warnings about Python ints taken from
            # shapes are expected (the pads and crops read shapes) and verify checks other shapes anyway.
            for category in _EXPORTER_WARNINGS:
                warnings.simplefilter("ignore", category)
            torch.onnx.export(
                wrapper,
                inputs,
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=input_names,
                output_names=names,
                dynamic_axes={n: dict(axes) for n in [*input_names, *names]},
                do_constant_folding=True,
            )
    except Exception as error:  # the exporter raises many types (RuntimeError, OnnxExporterError, ...)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(path, f"torch.onnx.export failed: {first}") from error
    return onnx.load_model_from_string(buffer.getvalue())


def _finish(proto: Any, spec: ModelSpec, path: Path) -> bytes:
    """Fix the class/map axes in the output types, embed the spec, check the contract; -> file bytes."""
    from napari_medcl.errors import ModelError
    from napari_medcl.onnx_session import check_model_bytes

    channels = {OUTPUT_PROBABILITIES: spec.num_classes, OUTPUT_UNCERTAINTY: len(spec.uncertainty_maps)}
    for output in proto.graph.output:
        dim = output.type.tensor_type.shape.dim[1]
        dim.Clear()
        dim.dim_value = channels[output.name]
    for graph_input, channels in zip(proto.graph.input, (spec.in_channels, _prompt_channels(spec))):
        dim = graph_input.type.tensor_type.shape.dim[1]
        dim.Clear()
        dim.dim_value = channels
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, spec.to_json()
    proto.doc_string = f"napari-medcl model {spec.name}: {spec.intended_use}"
    check_contract(proto, path)
    data = proto.SerializeToString()
    if len(data) > MAX_BYTES:
        raise ExportError(
            path, f"the model is {len(data)} bytes; a single-file ONNX model must stay under 2 GB"
        )
    try:
        check_model_bytes(data, path)
    except ModelError as error:
        raise ExportError(path, f"the product's loader would refuse the export: {error.problem}") from None
    return data


def check_contract(proto: Any, path: Path | None = None) -> None:
    """ExportError unless the graph has opset >= 17, weights inside, standard domains and no BatchNorm."""
    import onnx

    opset = _default_opset(proto)
    if opset < MIN_OPSET:
        raise ExportError(path, f"opset {opset} is below {MIN_OPSET}")
    domains = sorted({o.domain for o in proto.opset_import if o.domain not in STANDARD_DOMAINS})
    nodes = list(graph_nodes(proto.graph))
    domains += sorted({n.domain for n in nodes if n.domain not in STANDARD_DOMAINS} - set(domains))
    if domains:
        raise ExportError(path, f"the graph uses custom op domains {domains}")
    batchnorms = [n.name or n.op_type for n in nodes if n.op_type == "BatchNormalization"]
    if batchnorms:
        raise ExportError(
            path,
            f"{len(batchnorms)} BatchNormalization node(s) left (e.g. {batchnorms[0]}); they must be folded",
        )
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(path, f"weights stored as external data ({external[0]}...); it must be one file")


# ---------------------------------------------------------------------------------------------- verify


def verify_onnx(
    path: str | Path,
    model_or_checkpoint: str | Path | nn.Module,
    *,
    shape: Sequence[int] | None = None,
    repeats: int = 3,
) -> VerifyReport:
    """Check an exported file with onnx.checker, then ONNX Runtime (CPU) against torch.

    ``model_or_checkpoint``: the trained network or its checkpoint (the fp32 reference, also for an fp16
    file). ``shape``: the spatial shape of the main check (multiple of the divisor, different from the
    export's sample shape; default: the patch rounded up to the divisor, grown by one divisor on the last
    axis if that is the sample shape). Raises ExportError when a check fails.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ExportError(path, f"cannot be read ({error.strerror or error})") from None
    if isinstance(model_or_checkpoint, (str, Path)):
        reference = load_checkpoint_model(model_or_checkpoint).model
    elif isinstance(model_or_checkpoint, nn.Module):
        source = model_or_checkpoint
        reference = _detached_copy(source.model if isinstance(source, InferenceWrapper) else source)
    else:
        raise TypeError(
            f"expected a checkpoint path or a torch network, got {type(model_or_checkpoint).__name__}"
        )
    return _verify(data, reference, path, shape=shape, repeats=repeats)


def _verify(
    data: bytes, reference: nn.Module, path: Path, *, shape: Sequence[int] | None = None, repeats: int = 3
) -> VerifyReport:
    import onnx
    import onnxruntime as ort

    try:
        proto = onnx.load_model_from_string(data)
        onnx.checker.check_model(proto, full_check=True)
    except Exception as error:  # DecodeError, ValidationError, InferenceError
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(path, f"fails onnx.checker: {first}") from None
    check_contract(proto, path)
    from napari_medcl.errors import ModelError
    from napari_medcl.onnx_session import check_model_bytes

    try:  # the very checks the product runs before it loads a model: spec present, graph matching it
        spec = check_model_bytes(data, path)
    except ModelError as error:
        raise ExportError(path, error.problem) from None
    check_spec_matches_model(spec, reference, path)
    fp16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    tolerance = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    main, odd, window = _check_shapes(spec, shape, path)

    threads = torch.get_num_threads()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Spinning ORT workers would steal the cores torch uses next (onnxruntime#13808).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    wrapper = InferenceWrapper(reference, prompt_channels=_prompt_channels(spec))
    names = list(wrapper.output_names)
    generator = torch.Generator().manual_seed(0)

    checks = []
    for batch, spatial in [(2, main)] + ([(1, odd)] if odd is not None else []):
        inputs = _sample_inputs(spec, batch, spatial, generator)
        image = inputs[0]
        with torch.inference_mode():
            expected = [t.numpy() for t in wrapper(*inputs)]
        try:
            got = session.run(names, {n: t.numpy() for n, t in zip(wrapper.input_names, inputs)})
        except Exception as error:  # onnxruntime's own exception classes
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ExportError(
                path, f"ONNX Runtime fails on an input of shape {list(image.shape)}: {first}"
            ) from None
        checks.append(_compare(expected, got, tuple(image.shape), tolerance, path))
    ort_seconds, torch_seconds = _time_window(session, wrapper, spec, window, max(1, int(repeats)))
    import onnxruntime

    report = VerifyReport(
        path=path,
        model_bytes=len(data),
        opset=_default_opset(proto),
        precision="fp16" if fp16 else "fp32",
        op_counts=_op_counts(proto.graph),
        checks=tuple(checks),
        tolerance=tolerance,
        window=window,
        ort_seconds_per_window=ort_seconds,
        torch_seconds_per_window=torch_seconds,
        threads=threads,
        ort_version=f"onnxruntime {onnxruntime.__version__}",
        torch_version=f"torch {torch.__version__}",
    )
    failed = [c for c in checks if not c.passed]
    if failed:
        c = failed[0]
        raise ExportError(
            path,
            f"ONNX Runtime disagrees with torch on {list(c.shape)}: probabilities max |diff| "
            f"{c.probabilities_max_abs_diff:.3g} (limit {tolerance.probabilities:g}), uafr_uncertainty "
            f"{c.uncertainty_max_abs_diff} (limit {tolerance.uncertainty:g}), argmax agreement on decided voxels "
            f"{100 * c.decided_agreement:.4f}% (limit {100 * tolerance.argmax_agreement:g}%)",
        )
    return report


def _check_shapes(
    spec: ModelSpec, shape: Sequence[int] | None, path: Path
) -> tuple[tuple[int, ...], tuple[int, ...] | None, tuple[int, ...]]:
    """(main check shape, odd shape or None, timing window) for a spec, honouring a requested shape."""
    divisor = tuple(spec.divisor)
    window = tuple(-(-p // d) * d for p, d in zip(spec.patch_size, divisor))
    recorded = (spec.training.get("export") or {}).get("sample_shape")
    sample = tuple(recorded) if recorded else None
    if shape is None:
        main = window if window != sample else (*window[:-1], window[-1] + divisor[-1])
    else:
        main = tuple(int(s) for s in shape)
        if len(main) != spec.spatial_dims or any(s < 1 for s in main):
            raise ValueError(f"shape must be {spec.spatial_dims} positive sizes, got {list(shape)}")
        if any(s % d for s, d in zip(main, divisor)):
            raise ValueError(f"shape {list(main)} must be a multiple of the divisor {list(divisor)}")
        if main == sample:
            raise ValueError(f"shape {list(main)} is the export's sample shape; verify on another one")
    base = sample or main
    odd = tuple(max(1, s - 1) for s in base)
    if all(o % d == 0 for o, d in zip(odd, divisor)):
        odd = None  # every size is a multiple of the divisor: no odd shape exists
    return main, odd, window


def _compare(
    expected: list[np.ndarray],
    got: list[np.ndarray],
    shape: tuple[int, ...],
    tolerance: Tolerance,
    path: Path,
) -> ShapeCheck:
    p_ref, p_ort = expected[0], np.asarray(got[0])
    if p_ort.shape != p_ref.shape:
        raise ExportError(path, f"probabilities have shape {p_ort.shape} in ORT, {p_ref.shape} in torch")
    p_diff = float(np.max(np.abs(p_ort - p_ref)))
    u_diff = None
    if len(expected) > 1:
        u_ref, u_ort = expected[1], np.asarray(got[1])
        if u_ort.shape != u_ref.shape:
            raise ExportError(
                path, f"uafr_uncertainty has shape {u_ort.shape} in ORT, {u_ref.shape} in torch"
            )
        u_diff = float(np.max(np.abs(u_ort - u_ref)))
    same = p_ort.argmax(1) == p_ref.argmax(1)
    top2 = np.sort(p_ref, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 2 * tolerance.probabilities
    agreement = float(same.mean())
    decided_agreement = float(same[decided].mean()) if decided.any() else 1.0
    finite = math.isfinite(p_diff) and (u_diff is None or math.isfinite(u_diff))
    passed = (
        finite
        and p_diff <= tolerance.probabilities
        and (u_diff is None or u_diff <= tolerance.uncertainty)
        and decided_agreement >= tolerance.argmax_agreement
    )
    return ShapeCheck(shape, p_diff, u_diff, agreement, decided_agreement, int((~decided).sum()), passed)


def _time_window(
    session: Any, wrapper: InferenceWrapper, spec: ModelSpec, window: tuple[int, ...], repeats: int
) -> tuple[float, float]:
    """Minimum seconds of ``repeats`` runs (after a warm-up) of ORT and of torch on one window."""
    inputs = _sample_inputs(spec, 1, window, torch.Generator().manual_seed(1))
    feed = {n: t.numpy() for n, t in zip(wrapper.input_names, inputs)}

    def best(run) -> float:
        run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    ort_seconds = best(lambda: session.run(None, feed))
    with torch.inference_mode():
        torch_seconds = best(lambda: wrapper(*inputs))
    return ort_seconds, torch_seconds


# ---------------------------------------------------------------------------------------------- graph helpers


def _default_opset(proto: Any) -> int:
    return max((o.version for o in proto.opset_import if o.domain in STANDARD_DOMAINS), default=0)


def _op_counts(graph: Any) -> dict[str, int]:
    """Op type -> number of nodes, most frequent first."""
    return dict(collections.Counter(n.op_type for n in graph_nodes(graph)).most_common())
