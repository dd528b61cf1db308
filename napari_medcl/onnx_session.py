"""Loading a model: checks on the ONNX file and its spec, then a session on the right device and backend.

A model is one ``.onnx`` file (no external data, no custom op domains) carrying a ``ModelSpec`` as JSON under
the metadata key ``medcl.spec``. Loading hashes the bytes, checks them, and builds the session from the same
bytes, so what was hashed is what runs. ``device="auto"`` uses CUDA only when ONNX Runtime's CUDA provider
and its libraries really load; on a machine without them nothing is attempted, so ONNX Runtime prints no
error lines. The provider the session really uses is reported in ``LoadedModel.provider``.

Two backends read the same bytes: ONNX Runtime (always installed; CPU or CUDA) and, when the optional
``openvino`` package is installed, OpenVINO on the CPU (``napari_medcl.openvino_session``), optionally in
bfloat16. ``choose_backend`` says which one ``backend="auto"`` takes.

onnx, onnxruntime and openvino are imported inside functions: ``import napari_medcl`` must stay light.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl.errors import ModelError, UsageError
from napari_medcl.session import InferenceSession, run_checked
from napari_medcl.spec import METADATA_KEY, ModelSpec, SpecError

DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "onnxruntime", "openvino")
MAX_MODEL_BYTES = 2 * 1024**3
MODELS_DIR = Path(__file__).parent / "models"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# Op domains whose kernels ship with ONNX Runtime itself; anything else needs a custom op library.
STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A checked model and its ONNX Runtime session.

    ``provider`` is the execution provider the session really uses (``session.get_providers()[0]``), e.g.
    ``CPUExecutionProvider``; ``sha256`` the hash of the file's bytes as loaded.
    """

    path: Path
    sha256: str
    spec: ModelSpec
    provider: str
    session: Any

    @property
    def name(self) -> str:
        return self.spec.name

    def run(
        self, batch: np.ndarray, prompts: np.ndarray | None = None, *, with_features: bool = False
    ) -> tuple[np.ndarray, ...]:
        """Run the graph on ``batch`` float32 (N, C, *S) -> probabilities (N, K, *S), maps (N, U, *S) or None;
        with ``with_features`` (a model whose spec has ``features``) also its window features (N, F).
        ``prompts`` (N, P, *S): a prompt model's prompt channels (None: zero, an automatic prediction).

        Raises PredictionError when the outputs do not have the shapes the spec promises."""
        return run_checked(
            self, batch, lambda want, inputs: self.session.run(want, inputs), prompts, with_features
        )


def load_model(
    name_or_path: str | Path,
    *,
    device: str = "auto",
    backend: str = "auto",
    precision: str = "auto",
    max_bytes: int = MAX_MODEL_BYTES,
    models_dir: Path | None = None,
) -> InferenceSession:
    """Load a bundled model by name, or a ``.onnx`` file by path, and open it on ``device`` with ``backend``.

    ``device``: ``auto`` (CUDA when it really loads, else CPU), ``cpu``, or ``cuda`` (a ModelError when CUDA
    cannot be used; never a silent CPU fallback). ``backend``: ``onnxruntime`` (a LoadedModel),
    ``openvino`` (an ``OpenVINOSession``, CPU only, ``pip install napari-medcl[openvino]``) or ``auto``
    (see ``choose_backend``). ``precision``: ``fp32``, ``bf16`` (OpenVINO on a CPU with bfloat16 only; a
    UsageError otherwise) or ``auto`` (bf16 where it can run, else fp32; see ``choose_precision``). Every problem with the file is a ModelError naming it. Bundled names are looked
    up in ``models_dir/manifest.json`` and their SHA-256 checked before parsing.
    """
    if device not in DEVICES:
        raise UsageError(f"device must be one of {DEVICES}, got {device!r}")
    chosen = choose_backend(backend, device, precision)
    path, expected_sha = _resolve(name_or_path, models_dir)
    data = _read_bounded(path, max_bytes)
    sha = hashlib.sha256(data).hexdigest()
    if expected_sha is not None and sha != expected_sha.lower():
        raise ModelError(
            path, f"SHA-256 {sha} does not match the manifest ({expected_sha}); the file is damaged"
        )
    spec = check_model_bytes(data, path)
    if chosen == "openvino":
        from napari_medcl.openvino_session import open_openvino

        precision = choose_precision(chosen, precision)
        return open_openvino(data, path, sha, spec, precision=precision, threads=physical_cores())
    session = _create_session(data, path, device)
    return LoadedModel(path=path, sha256=sha, spec=spec, provider=session.get_providers()[0], session=session)


def open_session(
    model: InferenceSession | str | Path | None,
    *,
    device: str = "auto",
    backend: str = "auto",
    precision: str = "auto",
) -> InferenceSession:
    """``model`` when it is a session already (a LoadedModel, an OpenVINOSession, a TorchSession), else the
    ONNX model it names (a bundled name or a path; None: the default bundled model) loaded on ``device`` with
    ``backend`` at ``precision`` (see ``load_model``)."""
    if isinstance(model, InferenceSession):
        return model
    name = default_model_name() if model is None else model
    return load_model(name, device=device, backend=backend, precision=precision)


def choose_backend(backend: str, device: str, precision: str = "auto") -> str:
    """The backend ``load_model`` uses: ``onnxruntime`` or ``openvino``.

    ``auto`` picks OpenVINO when it is installed and the model runs on the CPU (``device`` cpu, or auto on a
    machine where CUDA cannot be used), since it runs the bundled 3D model's windows faster than ONNX
    Runtime's CPU provider (docs/performance.md, "Backends"); ONNX Runtime otherwise. UsageError for an
    unknown backend or precision, OpenVINO asked for but not installed or with ``device`` cuda, and bf16
    anywhere but OpenVINO on a CPU that supports it."""
    from napari_medcl.openvino_session import PRECISIONS, openvino_bf16_supported, openvino_installed

    if backend not in BACKENDS:
        raise UsageError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if backend == "openvino":
        if not openvino_installed():
            raise UsageError(
                "backend openvino needs the openvino package: pip install 'napari-medcl[openvino]'"
            )
        if device == "cuda":
            raise UsageError("backend openvino runs on the CPU only; use device cpu or auto")
        chosen = "openvino"
    elif backend == "onnxruntime":
        chosen = "onnxruntime"
    else:
        on_cpu = device == "cpu" or (device == "auto" and cuda_unavailable_reason() is not None)
        chosen = "openvino" if on_cpu and openvino_installed() else "onnxruntime"
    if precision == "bf16":
        if chosen != "openvino":
            why = "openvino is not installed" if not openvino_installed() else f"backend {chosen}"
            raise UsageError(f"precision bf16 runs on OpenVINO's CPU device only ({why}); use fp32")
        if not openvino_bf16_supported():
            raise UsageError(
                "precision bf16 needs a CPU with bfloat16 support (AVX512-BF16 or AMX); this one has none: "
                "use fp32"
            )
    return chosen


def choose_precision(backend: str, precision: str) -> str:
    """The precision a session of ``backend`` (as ``choose_backend`` chose it) runs at: ``precision`` unless it
    is ``auto``, which is bf16 on OpenVINO with a CPU that has it and fp32 otherwise. bf16 became the default
    there because on the bundled 3D model's held-out block its labels agree with fp32 on >= 99.9% of voxels
    and its mean Dice moves by <= 0.002 (docs/performance.md, "Backends"; the manifest's "backends")."""
    from napari_medcl.openvino_session import openvino_bf16_supported

    if precision != "auto":
        return precision
    return "bf16" if backend == "openvino" and openvino_bf16_supported() else "fp32"


def available_backends() -> list[str]:
    """The backends ``backend=`` accepts on this machine, ``auto`` first: ``["auto", "onnxruntime"]``, plus
    ``"openvino"`` when it is installed (for a GUI choice list; imports nothing heavy)."""
    from napari_medcl.openvino_session import openvino_installed

    return ["auto", "onnxruntime"] + (["openvino"] if openvino_installed() else [])


def available_precisions(backend: str = "auto") -> list[str]:
    """The precisions ``precision=`` accepts with ``backend`` on this machine: ``["auto", "fp32"]``, plus
    ``"bf16"`` when that backend can be OpenVINO and the CPU has bfloat16 (this imports openvino once)."""
    from napari_medcl.openvino_session import openvino_bf16_supported

    can_be_openvino = backend in ("auto", "openvino")
    return ["auto", "fp32"] + (["bf16"] if can_be_openvino and openvino_bf16_supported() else [])


def bundled_models(models_dir: Path | None = None) -> list[dict[str, Any]]:
    """Entries of ``models/manifest.json`` (``name``, ``file``, ``sha256``, ...); [] when there is none."""
    manifest = (MODELS_DIR if models_dir is None else models_dir) / "manifest.json"
    if not manifest.is_file():
        return []
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        models = data["models"]
        if not isinstance(models, list) or not all(isinstance(m, dict) and "name" in m for m in models):
            raise ValueError("'models' must be a list of objects with a 'name'")
    except (ValueError, KeyError, TypeError) as error:
        raise ModelError(manifest, f"unreadable model manifest ({error})") from None
    return models


def bundled_weights(name: str, models_dir: Path | None = None) -> tuple[Path, str]:
    """(file, SHA-256) of the training weights shipped beside bundled model ``name`` (its manifest entry's
    ``weights``: a torch ``state_dict`` file that ``medcl-train --init-from NAME`` fine-tunes); ModelError when
    there is no such model or it ships none. Nothing is read here: the caller checks the hash as it loads."""
    models_dir = MODELS_DIR if models_dir is None else models_dir
    models = bundled_models(models_dir)
    for entry in models:
        if entry["name"] != name:
            continue
        weights = entry.get("weights")
        if not isinstance(weights, dict) or "file" not in weights or "sha256" not in weights:
            raise ModelError(
                models_dir / "manifest.json", f"bundled model {name!r} ships no training weights"
            )
        path = models_dir / str(weights["file"])
        if not path.is_file():
            raise ModelError(
                path, f"the weights of bundled model {name!r} are listed in the manifest but missing"
            )
        return path, str(weights["sha256"])
    available = ", ".join(m["name"] for m in models) or "none"
    raise ModelError(
        None, f"no bundled model named {name!r} (available: {available}); pass a checkpoint file"
    )


def default_model_name(models_dir: Path | None = None) -> str:
    """The bundled model used when none is named: the manifest's ``default`` entry, else its first model."""
    models_dir = MODELS_DIR if models_dir is None else models_dir
    models = bundled_models(models_dir)
    if not models:
        raise ModelError(None, "no bundled default model yet; pass a model file (--model PATH.onnx)")
    manifest = json.loads((models_dir / "manifest.json").read_text(encoding="utf-8"))
    return str(manifest.get("default", models[0]["name"]))


def _resolve(name_or_path: str | Path, models_dir: Path | None) -> tuple[Path, str | None]:
    """A model argument as (file path, SHA-256 expected by the manifest or None)."""
    models_dir = MODELS_DIR if models_dir is None else models_dir
    text = str(name_or_path)
    looks_like_path = (
        isinstance(name_or_path, Path) or text.endswith(".onnx") or os.sep in text or Path(text).exists()
    )
    if looks_like_path:
        path = Path(text).expanduser()
        if not path.exists():
            raise ModelError(path, "model file not found")
        if not path.is_file():
            raise ModelError(path, "is not a file; pass the .onnx model file")
        return path, None
    models = bundled_models(models_dir)
    for entry in models:
        if entry["name"] == text:
            if "file" not in entry or "sha256" not in entry:
                raise ModelError(models_dir / "manifest.json", f"entry {text!r} lacks 'file' or 'sha256'")
            path = models_dir / str(entry["file"])
            if not path.is_file():
                raise ModelError(path, f"bundled model {text!r} is listed in the manifest but missing")
            return path, str(entry["sha256"])
    available = ", ".join(m["name"] for m in models) or "none yet"
    raise ModelError(None, f"no bundled model named {text!r}; available: {available}; pass a .onnx path")


def _read_bounded(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ModelError(path, f"is {size} bytes, above the {max_bytes}-byte limit for a model file")
        if size == 0:
            raise ModelError(path, "is empty, not an ONNX model")
        return path.read_bytes()
    except OSError as error:
        raise ModelError(path, f"cannot be read ({error.strerror or error})") from None


def check_model_bytes(data: bytes, path: Path) -> ModelSpec:
    """Parse and check ONNX bytes against the model contract (architecture.md §4.3); return the spec."""
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception as error:  # protobuf raises DecodeError, a plain Exception subclass
        raise ModelError(path, f"is not a valid ONNX file ({type(error).__name__})") from None
    if not model.HasField("graph"):
        raise ModelError(path, "is not a valid ONNX model (no graph)")
    external = [t.name for t in _all_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ModelError(
            path,
            f"keeps weights in external data files ({external[0]}...); models must be one self-contained file "
            "(export with external_data=False)",
        )
    try:
        onnx.checker.check_model(model)
    except Exception as error:  # onnx.checker.ValidationError and friends
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(path, f"fails the ONNX checker: {first}") from None
    local_functions = {f.domain for f in model.functions}
    for node in graph_nodes(model.graph):
        if node.domain not in STANDARD_DOMAINS and node.domain not in local_functions:
            raise ModelError(
                path,
                f"uses the custom op domain {node.domain!r} (node {node.op_type}); only standard ONNX ops run",
            )
    metadata = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in metadata:
        raise ModelError(path, f"has no {METADATA_KEY} metadata; export it with medcl-export")
    try:
        spec = ModelSpec.from_json(metadata[METADATA_KEY])
    except SpecError as error:
        raise ModelError(path, f"invalid {METADATA_KEY} metadata: {error}") from None
    _check_graph(model.graph, spec, path)
    return spec


def _check_graph(graph: Any, spec: ModelSpec, path: Path) -> None:
    """The graph's inputs and outputs must be the ones the spec describes (architecture.md §4.3)."""
    import onnx

    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    rank = 2 + spec.spatial_dims
    names = ["image", "prompts"] if spec.prompts is not None else ["image"]
    if [i.name for i in inputs] != names:
        raise ModelError(
            path,
            f"must have the input(s) {names} (the spec {'declares' if spec.prompts else 'has no'} prompt "
            f"channels), has {[i.name for i in inputs]}",
        )
    if spec.prompts is not None:
        prompts = _tensor_shape(inputs[1], onnx, path)
        p = len(spec.prompts["channels"])
        if prompts is None or len(prompts) != 2 + spec.spatial_dims or prompts[1] not in (None, p):
            raise ModelError(path, f"input 'prompts' must be (N, {p}, *S) as the spec's prompts say")
    image = _tensor_shape(inputs[0], onnx, path)
    if image is None or len(image) != rank:
        raise ModelError(
            path,
            f"input 'image' must have rank {rank} (N, C, {'D, H, W' if spec.spatial_dims == 3 else 'H, W'}) "
            f"for a {spec.spatial_dims}D model, has {'an unknown rank' if image is None else f'rank {len(image)}'}",
        )
    if image[1] is not None and image[1] != spec.in_channels:
        raise ModelError(path, f"input 'image' has {image[1]} channels, the spec says {spec.in_channels}")
    outputs = {o.name: o for o in graph.output}
    allowed = {"probabilities", "uafr_uncertainty"} | ({"features"} if spec.features is not None else set())
    if "probabilities" not in outputs:
        raise ModelError(path, f"has no output named 'probabilities' (outputs: {sorted(outputs)})")
    extra = sorted(set(outputs) - allowed)
    if extra:
        raise ModelError(path, f"has unexpected outputs {extra}; the contract allows {sorted(allowed)}")
    u = len(spec.uncertainty_maps)
    if u and "uafr_uncertainty" not in outputs:
        raise ModelError(
            path, f"the spec names {u} UAFR map(s) but the graph has no 'uafr_uncertainty' output"
        )
    if not u and "uafr_uncertainty" in outputs:
        raise ModelError(path, "has a 'uafr_uncertainty' output but the spec lists no uncertainty_maps")
    if spec.features is not None:
        if "features" not in outputs:
            raise ModelError(
                path, "the spec describes window features but the graph has no 'features' output"
            )
        shape = _tensor_shape(outputs["features"], onnx, path)
        channels = spec.features.get("channels")
        if shape is not None and (len(shape) != 2 or shape[1] not in (None, channels)):
            raise ModelError(path, f"output 'features' must be (N, {channels}) as the spec says, is {shape}")
    for name, channels in (("probabilities", spec.num_classes), ("uafr_uncertainty", u)):
        if name not in outputs:
            continue
        shape = _tensor_shape(outputs[name], onnx, path)
        if shape is not None and len(shape) != rank:
            raise ModelError(path, f"output {name!r} has rank {len(shape)}, expected {rank}")
        if shape is not None and shape[1] is not None and shape[1] != channels:
            raise ModelError(path, f"output {name!r} has {shape[1]} channels, the spec implies {channels}")


def _tensor_shape(value_info: Any, onnx: Any, path: Path) -> list[int | None] | None:
    """Static dims of a graph input/output (None for a dynamic dim); None when the rank is unknown.

    Raises ModelError for a non-float32 tensor."""
    tensor_type = value_info.type.tensor_type
    if tensor_type.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.UNDEFINED):
        kind = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        raise ModelError(path, f"{value_info.name!r} must be float32, is {kind}")
    if not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]


def graph_nodes(graph: Any):
    """Every node of a graph, including those of subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                yield from graph_nodes(sub)


def _all_tensors(graph: Any):
    """Every stored tensor of a graph: initializers, sparse initializers and tensor attributes, recursively."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                yield from _all_tensors(sub)


# ---------------------------------------------------------------------------------------------------------
# Session and device


def physical_cores() -> int:
    """CPU cores this process may use, counting each physical core once.

    Logical CPUs come from the affinity mask (os.cpu_count() where there is none); when
    ``thread_siblings_list`` shows several hardware threads per core, they are divided by that number."""
    try:
        logical = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        logical = os.cpu_count() or 1
    try:
        siblings = _count_cpu_list(
            Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read_text(encoding="ascii")
        )
    except (OSError, ValueError):
        siblings = 1
    return max(1, logical // siblings) if siblings > 1 else max(1, logical)


def _count_cpu_list(text: str) -> int:
    """Number of CPUs in a Linux cpu list such as ``0,4`` or ``0-1``."""
    count = 0
    for part in text.strip().split(","):
        if "-" in part:
            low, high = part.split("-")
            count += int(high) - int(low) + 1
        elif part:
            count += 1
    return count


def cuda_unavailable_reason() -> str | None:
    """Why ONNX Runtime's CUDA provider cannot run here, or None when it can be loaded.

    Checks, without asking ONNX Runtime to create the provider (which would print error lines): the wheel
    has a CUDA provider, the NVIDIA driver library loads, and the provider library with all the CUDA/cuDNN
    libraries it links against loads (after ``onnxruntime.preload_dlls`` looked in the nvidia-* wheels)."""
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime build ({ort.__version__}) has no CUDA provider; install onnxruntime-gpu"
    capi = Path(ort.__file__).parent / "capi"
    provider_lib = capi / "libonnxruntime_providers_cuda.so"
    shared_lib = capi / "libonnxruntime_providers_shared.so"
    if os.name != "posix" or not provider_lib.is_file():
        return None  # cannot probe (e.g. Windows); the session's provider list will tell
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver found (libcuda.so.1 does not load)"
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        # It prints its findings to stdout; the probe below reports what matters.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
            preload(directory="")
    try:
        ctypes.CDLL(str(shared_lib), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(provider_lib))
    except OSError as error:
        detail = str(error).split(": ", 1)[-1]
        try:
            from onnxruntime.capi.build_and_package_info import cuda_version
        except ImportError:
            cuda_version = "?"
        cuda = cuda_version or "?"
        return f"the CUDA provider library does not load ({detail}); it needs CUDA {cuda} and cuDNN 9"
    # cuDNN is opened only when the provider is created, so the library load above does not test it.
    for name in ("libcudnn.so.9", "libcudnn.so"):
        try:
            ctypes.CDLL(name)
            return None
        except OSError:
            continue
    return "cuDNN 9 (libcudnn.so.9) does not load; install it, e.g. pip install onnxruntime-gpu[cudnn]"


def _cpu_graph_or_same(data: bytes) -> bytes:
    """The graph the CPU provider runs faster (napari_medcl.channel_softmax), or ``data`` unchanged when the
    rewrite cannot be made: it only saves time, so it never stands between a valid model and its session."""
    from napari_medcl.channel_softmax import cpu_graph

    try:
        return cpu_graph(data)
    except Exception:  # onnx's shape inference raises its own errors on graphs the checker accepted
        return data


def session_options() -> Any:
    """The onnxruntime.SessionOptions every product session is opened with (benchmarks open theirs alike)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = physical_cores()
    # Spinning workers slow down the numpy stitching that runs between session.run calls.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3  # warnings (e.g. unused initializers) are not the user's business
    return options


def _create_session(data: bytes, path: Path, device: str) -> Any:
    import onnxruntime as ort

    options = session_options()
    providers: list[Any] = [CPU]
    if device in ("auto", "cuda"):
        reason = cuda_unavailable_reason()
        if reason is None:
            providers = [(CUDA, {"cudnn_conv_algo_search": "HEURISTIC"}), CPU]
        elif device == "cuda":
            raise ModelError(path, f"--device cuda was requested but CUDA cannot be used: {reason}")
    if providers == [CPU]:
        data = _cpu_graph_or_same(data)
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=providers)
    except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph/... classes
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(path, f"ONNX Runtime cannot open it: {first}") from None
    if device == "cuda" and session.get_providers()[0] != CUDA:
        raise ModelError(
            path, "--device cuda was requested but ONNX Runtime could not create the CUDA provider"
        )
    return session
