"""One-command GPU check: environment, CUDA inference, an fp16 model, AMP training steps and a one-GPU DDP step.

Meant for the rare moments a GPU machine is at hand: ``bash benchmarks/gpu_check.sh [--dry-run] [-o FILE]``
runs every section below within a global time budget (7 minutes by default) and writes one JSON report
(``SCHEMA``), rewritten after every section, then prints a short table.

Sections (each in its own Python process, so a crash, a hang or a CUDA error in one is recorded and the
next one still runs; each numbered part of a section is a "step" with its own status):

- ``environment``: Python, torch (CUDA, cuDNN, GPU), ONNX Runtime (build, providers, why CUDA is unavailable)
  and whether the product's ``open_session(model, device="cuda")`` really runs on CUDAExecutionProvider
  (the execution provider recorded in a prediction's provenance).
- ``inference``: the bundled 3D and 2D models through ``napari_medcl.predict`` on the bundled sample and on a
  CT-size synthetic volume (512x512x300 at 0.8x0.8x1.5 mm), on CUDA: first and warm times, time inside ONNX
  Runtime, device memory, per-window latency; labels compared with a CPU run on the sample, and on the CT
  volume only when the CPU run is estimated to fit (the estimate and the decision are recorded).
- ``fp16``: an fp16 copy of the bundled 3D model, its speed and label agreement with the fp32 model.
- ``training``: steps of a real-size 3D preset (patch and batch from ``PRESET``) with bf16 and fp16 autocast,
  CE + Dice, + PDCR, + CCDC, built by ``training.building.build_training``: it/s and peak memory.
- ``finetune``: the bundled 3D model's fine-tuning recipe run as the widget's *Fine-tune* runs it (the
  ``medcl-train`` command of ``napari_medcl.learning``, in a subprocess), from its weights on two corrected
  cases (the sample and its mirror image, the model's labels standing in for the corrections), for
  ``FINETUNE_EPOCHS`` epochs on CUDA; the seconds per epoch after the first (data loading and augmentation
  included) and the recipe's whole run extrapolated from them. No
  replay (the original data is not on a GPU machine), which changes what a batch holds, not its size.
  Skipped, with the reason, where SimpleITK is missing.
- ``ddp``: a one-process NCCL process group (file store), an all-reduce and one DDP training step.

``--dry-run`` runs the same code on the CPU with tiny sizes (a crop of the sample, a tiny volume, one
training step of a narrow network, gloo instead of NCCL, the CPU execution provider) in well under a minute;
the test suite runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCHEMA = "napari-medcl-gpu-check/1"
SECTIONS = ("environment", "inference", "fp16", "training", "finetune", "ddp")
# Seconds held back for each section: a section may run until the global deadline minus what the sections
# after it hold, so a slow section cannot starve the later ones.
RESERVE = {"environment": 20, "inference": 150, "fp16": 50, "training": 70, "finetune": 60, "ddp": 40}
MIN_START = 10.0  # a section that would have less than this is skipped
GRACE = 15.0  # seconds a section's process gets past its deadline before it is killed
DEFAULT_BUDGET = 420.0
STATUSES = ("ok", "partial", "error", "skipped")
BUDGET_SKIP = "skipped: time budget"

MODELS = {"3d": "brain-tissue-3d", "2d": "brain-tissue-2d"}
SAMPLE = ROOT / "napari_medcl" / "data" / "mni152_t1_2mm.nii.gz"
CT_SHAPE, CT_SPACING = (300, 512, 512), (1.5, 0.8, 0.8)  # (z, y, x): 512x512x300 at 0.8x0.8x1.5 mm
TINY_CT_SHAPE = (10, 40, 40)
TINY_SAMPLE_BOX = (slice(34, 46), slice(30, 60), slice(25, 55))  # of the 80x95x77 sample at 2 mm
CT_CPU_MAX_SECONDS = 90.0  # the CPU run of the CT volume is done only when estimated below this
PRESET, PRESET_CLASSES = ROOT / "training" / "configs" / "msd-task02-heart-unet3d-pdcr.yaml", 2  # left atrium
DDP_PRESET, DDP_CLASSES = ROOT / "training" / "configs" / "quickstart-3d.yaml", 4  # brain tissue
FINETUNE_EPOCHS = 3  # the first one warms up (CUDA context, cuDNN's choice of kernels); the others are timed
LOSS_SETS = {
    "CE+Dice": ["loss.pdcr.enabled=false", "loss.ccdc.enabled=false"],
    "+ PDCR": ["loss.ccdc.enabled=false"],  # the preset's PDCR (RF-PDCR on encoder 3-4 + cross-layer)
    "+ CCDC": ["loss.pdcr.enabled=false", "loss.ccdc.enabled=true"],
}
# The dry run's networks and patches: narrow, and small patches the presets' strides allow.
DRY_TRAIN = {
    PRESET: ["model.features=[4,8,8,8,8,8]", "train.patch_size=[32,64,64]", "train.batch_size=1"],
    DDP_PRESET: ["model.features=[4,8,8,8]", "train.patch_size=[16,32,32]", "train.batch_size=1"],
}


# ---------------------------------------------------------------------------------------------------------
# Steps: what a section records, flushed to its JSON file after every change


@dataclass
class Context:
    """A section's settings and its steps; ``out`` is rewritten whenever a step starts or ends."""

    dry_run: bool
    deadline: float  # time.time() after which no new step starts
    workdir: Path
    out: Path
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def remaining(self) -> float:
        return self.deadline - time.time()

    def flush(self) -> None:
        write_json(self.out, {"steps": self.steps, "info": self.info})

    def skip(self, name: str, reason: str, **extra: Any) -> None:
        self.steps[name] = {"status": "skipped", "reason": reason, **extra}
        self.flush()

    def step(self, name: str, fn: Callable[[], dict[str, Any] | None], *, estimate: float = 0.0) -> Any:
        """Run ``fn`` as step ``name`` unless the section's time is up (or ``estimate`` seconds would pass
        its deadline); record its dict (status ok) or its exception (status error). Returns fn's dict or None."""
        if self.remaining() < max(estimate, 1.0):
            extra = {"estimate_seconds": round(estimate, 1)} if estimate else {}
            self.skip(name, BUDGET_SKIP, **extra)
            return None
        self.steps[name] = {"status": "running", "started": _now()}
        self.flush()
        start = time.perf_counter()
        try:
            value = fn() or {}
        except Exception as error:  # every failure is a finding to report, not a reason to stop
            self.steps[name] = {
                "status": "error",
                "error": f"{type(error).__name__}: {error}".strip()[:2000],
                "traceback": traceback.format_exc()[-3000:],
                "seconds": round(time.perf_counter() - start, 3),
            }
            self.flush()
            return None
        self.steps[name] = {"status": "ok", "seconds": round(time.perf_counter() - start, 3), **value}
        self.flush()
        return value


# The check is of ONNX Runtime (its CUDA provider, and its CPU provider as the reference): never OpenVINO.
ORT = "onnxruntime"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    os.replace(temp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, tuple, set)):
        return list(np.asarray(value).tolist()) if isinstance(value, np.ndarray) else list(value)
    return str(value)


# ---------------------------------------------------------------------------------------------------------
# Section: environment


def section_environment(ctx: Context) -> None:
    ctx.step("python", lambda: {"python": sys.version.split()[0], "platform": platform.platform(),
                                "cpus": os.cpu_count(), "numpy": np.__version__})  # fmt: skip
    ctx.step("torch", _torch_environment)
    ctx.step("onnxruntime", _ort_environment)
    ctx.step("ort_session", lambda: _ort_session_check(ctx))
    ctx.step("simpleitk", _simpleitk_version)


def _torch_environment() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
        )
    info["nvidia_smi"] = _nvidia_smi()
    return info


def _nvidia_smi() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"not available ({type(error).__name__})"
    return done.stdout.strip() or done.stderr.strip()


def _ort_environment() -> dict[str, Any]:
    import onnxruntime as ort

    from napari_medcl.onnx_session import cuda_unavailable_reason

    info: dict[str, Any] = {
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
    }
    with contextlib.suppress(ImportError):
        from onnxruntime.capi import build_and_package_info as build

        info["package"] = getattr(build, "package_name", None)
        info["built_for_cuda"] = getattr(build, "cuda_version", None)
        info["built_for_cudnn"] = getattr(build, "cudnn_version", None)
    info["cuda_unavailable_reason"] = cuda_unavailable_reason()
    return info


def _ort_session_check(ctx: Context) -> dict[str, Any]:
    """The product's own session on ``ctx.device`` and the provider a prediction's provenance records."""
    from napari_medcl.onnx_session import CUDA, open_session
    from napari_medcl.prediction import predict

    session = open_session(MODELS["3d"], device=ctx.device, backend=ORT)
    prediction = predict(tiny_volume((8, 16, 16)), session)
    provider = prediction.provenance.execution_provider
    return {
        "device_requested": ctx.device,
        "session_provider": session.provider,
        "execution_provider": provider,
        "cuda_provider_loaded": provider == CUDA,
    }


def _simpleitk_version() -> dict[str, Any]:
    try:
        import SimpleITK
    except ImportError:
        return {"simpleitk": None, "note": "missing: the sample is read with the NIfTI fallback reader"}
    return {"simpleitk": SimpleITK.Version_VersionString()}


# ---------------------------------------------------------------------------------------------------------
# Inputs


def tiny_volume(shape: tuple[int, ...], spacing: tuple[float, ...] = (1.0, 1.0, 1.0)):
    from napari_medcl.volume import Volume

    rng = np.random.default_rng(0)
    return Volume(rng.random(shape, dtype=np.float32) + 0.1, spacing, (0.0,) * len(shape), np.eye(len(shape)))


def ct_volume(dry_run: bool):
    """A CT-size float32 volume, non-zero everywhere (a CT has no zero background to crop away): smooth
    blobs plus noise. (300, 512, 512) at (1.5, 0.8, 0.8) mm; (10, 40, 40) in a dry run."""
    from napari_medcl.volume import Volume

    shape = TINY_CT_SHAPE if dry_run else CT_SHAPE
    rng = np.random.default_rng(1)
    coarse = rng.random(tuple(max(2, s // 16) for s in shape), dtype=np.float32)
    smooth = coarse
    for axis, size in enumerate(shape):  # nearest upsampling, axis by axis, then cut to the shape
        smooth = np.repeat(smooth, -(-size // coarse.shape[axis]), axis=axis)
    array = smooth[tuple(slice(0, s) for s in shape)] * 100.0 + 50.0
    array += rng.standard_normal(shape, dtype=np.float32) * 5.0
    return Volume(np.ascontiguousarray(array, dtype=np.float32), CT_SPACING, (0.0, 0.0, 0.0), np.eye(3))


def sample_volume(dry_run: bool) -> tuple[Any, str]:
    """The bundled sample (a central crop in a dry run) and the reader used."""
    try:
        from napari_medcl.io import read_image

        volume, reader = read_image(SAMPLE), "napari_medcl.io.read_image"
    except ImportError as error:  # no SimpleITK on the machine
        volume, reader = read_nifti_minimal(SAMPLE), f"minimal NIfTI reader ({error})"
    if dry_run:
        volume = volume.crop(TINY_SAMPLE_BOX)
    return volume, reader


def read_nifti_minimal(path: Path):
    """A NIfTI-1 .nii.gz as a Volume with its spacing (identity direction, zero origin): enough for timing
    and agreement checks where SimpleITK is not installed."""
    from napari_medcl.volume import Volume

    with gzip.open(path) as file:
        data = file.read()
    dim = np.frombuffer(data[40:56], "<i2")
    dtypes = {2: "u1", 4: "<i2", 8: "<i4", 16: "<f4", 64: "<f8", 512: "<u2"}
    code = int(np.frombuffer(data[70:72], "<i2")[0])
    pixdim = np.frombuffer(data[76:108], "<f4")
    offset = int(np.frombuffer(data[108:112], "<f4")[0])
    slope, inter = (float(v) for v in np.frombuffer(data[112:120], "<f4"))
    nx, ny, nz = (int(v) for v in dim[1:4])
    array = np.frombuffer(data, dtypes[code], count=nx * ny * nz, offset=offset).reshape(nz, ny, nx)
    array = array.astype(np.float32) * (slope or 1.0) + inter
    spacing = tuple(float(v) for v in pixdim[3:0:-1])
    return Volume(array, spacing, (0.0, 0.0, 0.0), np.eye(3))


def model_grid_voxels(volume, spec) -> float:
    """Voxels of ``volume`` resampled to the model's spacing (in-plane only for a 2D model)."""
    shape = np.asarray(volume.spatial_shape, dtype=float)
    if spec.spacing is None:
        return float(np.prod(shape))
    spacing = np.asarray(volume.spacing, dtype=float)
    d = spec.spatial_dims
    target = np.array(list(spacing[: len(shape) - d]) + list(spec.spacing), dtype=float)
    return float(np.prod(shape * spacing / target))


# ---------------------------------------------------------------------------------------------------------
# Device memory, polled while a step runs (ONNX Runtime's CUDA arena is invisible to torch's counters)


class DeviceMemory:
    """Device-wide memory in use (NVML, else torch.cuda.mem_get_info); ``peak_mib`` is polled during a
    ``with`` block and reported above ``baseline`` (taken before the session was opened)."""

    def __init__(self, enabled: bool):
        self.read: Callable[[], int] | None = None
        self.source = "not measured (CPU)"
        if enabled:
            self.read, self.source = _memory_reader()
        self.baseline = self.read() if self.read else 0
        self.peak = self.baseline
        self._stop = threading.Event()

    def __enter__(self) -> DeviceMemory:
        if self.read is not None:
            self.peak = self.read()
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.read is not None:
            self._stop.set()
            self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.read())

    def peak_mib(self) -> float | None:
        return None if self.read is None else round((self.peak - self.baseline) / 2**20, 1)


def _memory_reader() -> tuple[Callable[[], int] | None, str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return (lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)), "NVML, device-wide"
    except Exception:  # no nvidia-ml-py, or NVML does not load: try torch
        pass
    try:
        import torch

        if torch.cuda.is_available():

            def used() -> int:
                free, total = torch.cuda.mem_get_info(0)
                return int(total - free)

            return used, "torch.cuda.mem_get_info, device-wide (torch's context included in the baseline)"
    except ImportError:
        pass
    return None, "not measurable (neither nvidia-ml-py nor torch with CUDA)"


# ---------------------------------------------------------------------------------------------------------
# Section: inference


def section_inference(ctx: Context) -> None:
    loaded = ctx.step("inputs", lambda: _load_inputs(ctx))
    if loaded is None:
        return
    sample, ct = ctx.info.pop("_sample"), ctx.info.pop("_ct")
    for key in ("3d", "2d"):
        _inference_for_model(ctx, key, sample, ct)


def _load_inputs(ctx: Context) -> dict[str, Any]:
    sample, reader = sample_volume(ctx.dry_run)
    ct = ct_volume(ctx.dry_run)
    ctx.info["_sample"], ctx.info["_ct"] = sample, ct
    return {
        "sample": {"shape": sample.spatial_shape, "spacing": sample.spacing, "reader": reader},
        "ct": {"shape": ct.spatial_shape, "spacing": ct.spacing, "gib": round(ct.array.nbytes / 2**30, 2)},
    }


def timed_predict(volume, session, memory: DeviceMemory | None = None, **options: Any):
    """(prediction, wall seconds) of one ``napari_medcl.predict`` with an open session."""
    from napari_medcl.prediction import predict

    with memory if memory is not None else contextlib.nullcontext():
        start = time.perf_counter()
        prediction = predict(volume, session, **options)
        seconds = time.perf_counter() - start
    return prediction, seconds


def run_record(prediction, seconds: float, volume) -> dict[str, Any]:
    p = prediction.provenance
    voxels = int(np.prod(volume.spatial_shape))
    return {
        "execution_provider": p.execution_provider,
        "seconds": round(seconds, 3),
        "ort_seconds": round(p.timings.get("ort_seconds", float("nan")), 3),
        "windows": p.tiling.windows,
        "batch_size": p.tiling.batch_size,
        "timings": {k: round(v, 3) for k, v in p.timings.items()},
        "model_grid": list(p.preprocessing.model_grid_shape),
        "voxels_per_second": round(voxels / seconds, 1),
    }


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Fraction of voxels with the same label, and how many differ."""
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    differ = int(np.count_nonzero(a != b))
    return {"agreement": round(1.0 - differ / a.size, 7), "differing_voxels": differ}


def _inference_for_model(ctx: Context, key: str, sample, ct) -> None:
    from napari_medcl.onnx_session import open_session

    name, state = MODELS[key], {}

    def gpu_sample() -> dict[str, Any]:
        memory = DeviceMemory(enabled=not ctx.dry_run)
        start = time.perf_counter()
        state["session"] = session = open_session(name, device=ctx.device, backend=ORT)
        state["memory"] = memory
        load = time.perf_counter() - start
        _, first = timed_predict(sample, session, memory)  # warm-up: cuDNN picks its convolution algorithms
        prediction, warm = timed_predict(sample, session, memory)
        state["sample_labels"] = prediction.labels.array
        state["sample_warm"] = warm
        state["sample_grid"] = float(np.prod(prediction.provenance.preprocessing.model_grid_shape))
        record = run_record(prediction, warm, sample)
        return {**record, "device_requested": ctx.device, "load_seconds": round(load, 3), "first_seconds": round(first, 3),
                "warm_seconds": round(warm, 3), "device_memory_peak_mib": memory.peak_mib(),
                "device_memory_source": memory.source}  # fmt: skip

    def cpu_sample() -> dict[str, Any]:
        state["cpu_session"] = session = open_session(name, device="cpu", backend=ORT)
        prediction, seconds = timed_predict(sample, session)
        state["sample_cpu"] = seconds
        state["sample_grid"] = float(np.prod(prediction.provenance.preprocessing.model_grid_shape))
        result = run_record(prediction, seconds, sample)
        if "sample_labels" in state:
            result["labels_vs_cuda_run"] = agreement(prediction.labels.array, state["sample_labels"])
        return result

    def windows() -> dict[str, Any]:
        return window_latency(state["session"], dry_run=ctx.dry_run)

    def windows_rewritten() -> dict[str, Any]:
        # On the CPU the product runs channel-axis softmaxes as reductions (napari_medcl.channel_softmax);
        # whether the CUDA provider gains from it too is measured here, on the same provider and options.
        import onnxruntime as ort

        from napari_medcl.channel_softmax import cpu_graph
        from napari_medcl.onnx_session import session_options

        session = state["session"]
        providers = session.session.get_providers()
        options = session.session.get_provider_options()
        rewritten = ort.InferenceSession(
            cpu_graph(session.path.read_bytes()), session_options(),
            providers=[(p, options.get(p, {})) for p in providers],
        )  # fmt: skip
        other = dataclasses.replace(session, session=rewritten, provider=rewritten.get_providers()[0])
        x = np.random.default_rng(1).random(
            (1, session.spec.in_channels, *session.spec.patch_size), np.float32
        )
        diff = max(float(np.abs(a - b).max()) for a, b in zip(session.run(x), other.run(x)))
        return {"file": window_latency(session, dry_run=ctx.dry_run),
                "rewritten": window_latency(other, dry_run=ctx.dry_run), "max_abs_diff": diff}  # fmt: skip

    def gpu_ct() -> dict[str, Any]:
        memory = state["memory"]
        prediction, seconds = timed_predict(ct, state["session"], memory)
        state["ct_labels"] = prediction.labels.array
        record = run_record(prediction, seconds, ct)
        if key == "3d":  # the fp16 section compares its labels with these
            np.save(ctx.workdir / "ct_3d_labels.npy", prediction.labels.array)
            write_json(ctx.workdir / "ct_3d_fp32.json", record)
        return {**record, "device_requested": ctx.device, "device_memory_peak_mib": memory.peak_mib(),
                "device_memory_source": memory.source}  # fmt: skip

    def gpu_ct_batch32() -> dict[str, Any]:
        prediction, seconds = timed_predict(ct, state["session"], state["memory"], batch_size=32)
        record = run_record(prediction, seconds, ct)
        if "ct_labels" in state:
            record["labels_vs_default_batch"] = agreement(prediction.labels.array, state["ct_labels"])
        return record

    ctx.step(f"{key}/sample/cuda", gpu_sample)
    ctx.step(f"{key}/sample/cpu", cpu_sample)
    if "session" not in state:
        ctx.skip(f"{key}/window", "no session: the sample step failed")
        ctx.skip(f"{key}/ct/cuda", "no session: the sample step failed")
    else:
        ctx.step(f"{key}/window", windows)
        ctx.step(f"{key}/window/channel-softmax-rewritten", windows_rewritten)
        spec = state["session"].spec
        scale = model_grid_voxels(ct, spec) / state["sample_grid"]  # the sample's grid after its crop
        ctx.step(f"{key}/ct/cuda", gpu_ct, estimate=state["sample_warm"] * scale)
        ctx.step(f"{key}/ct/cuda/batch32", gpu_ct_batch32, estimate=state["sample_warm"] * scale)
    _ct_on_cpu(ctx, key, ct, state)


def _ct_on_cpu(ctx: Context, key: str, ct, state: dict[str, Any]) -> None:
    """Run the CT volume on the CPU only when the sample's CPU time, scaled by model-grid voxels, says it
    fits under CT_CPU_MAX_SECONDS and the section's remaining time."""
    name = f"{key}/ct/cpu"
    if "cpu_session" not in state or "sample_cpu" not in state:
        ctx.skip(name, "no CPU run of the sample to estimate from")
        return
    estimate = state["sample_cpu"] * model_grid_voxels(ct, state["cpu_session"].spec) / state["sample_grid"]
    limit = min(CT_CPU_MAX_SECONDS, ctx.remaining() - 5.0)
    decision = {"estimate_seconds": round(estimate, 1), "limit_seconds": round(limit, 1)}
    if estimate > limit:
        ctx.skip(name, f"estimated {estimate:.0f} s on the CPU, above the {limit:.0f} s limit", **decision)
        return

    def run() -> dict[str, Any]:
        prediction, seconds = timed_predict(ct, state["cpu_session"])
        result = {**run_record(prediction, seconds, ct), **decision}
        if "ct_labels" in state:
            result["labels_vs_cuda_run"] = agreement(prediction.labels.array, state["ct_labels"])
        return result

    ctx.step(name, run)


def window_latency(session, *, dry_run: bool) -> dict[str, Any]:
    """Milliseconds per window of ``session.run`` at the patch size, batch 1, 8 and 32 (1 in a dry run),
    median of several calls after a warm-up: the model's own speed, without stitching."""
    spec = session.spec
    result: dict[str, Any] = {"patch": list(spec.patch_size)}
    reps = 1 if dry_run else 20
    for batch in (1,) if dry_run else (1, 8, 32):
        x = np.random.default_rng(0).random((batch, spec.in_channels, *spec.patch_size), dtype=np.float32)
        session.run(x)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            session.run(x)
            times.append(time.perf_counter() - start)
        result[f"batch{batch}_ms_per_window"] = round(1000 * float(np.median(times)) / batch, 3)
    return result


# ---------------------------------------------------------------------------------------------------------
# Section: fp16


def section_fp16(ctx: Context) -> None:
    from napari_medcl.onnx_session import open_session

    path = ctx.workdir / "brain-tissue-3d-fp16.onnx"
    state: dict[str, Any] = {}
    if ctx.step("convert", lambda: write_fp16_model(MODELS["3d"], path)) is None:
        return

    def sessions() -> dict[str, Any]:
        state["fp16"] = open_session(path, device=ctx.device, backend=ORT)
        state["fp32"] = open_session(MODELS["3d"], device=ctx.device, backend=ORT)
        return {"fp16_provider": state["fp16"].provider, "fp32_provider": state["fp32"].provider}

    def windows() -> dict[str, Any]:
        fp32 = window_latency(state["fp32"], dry_run=ctx.dry_run)
        fp16 = window_latency(state["fp16"], dry_run=ctx.dry_run)
        speedup = {k: round(fp32[k] / fp16[k], 3) for k in fp16 if k.endswith("_ms_per_window")}
        return {"fp32": fp32, "fp16": fp16, "fp32_over_fp16": speedup}

    def sample() -> dict[str, Any]:
        volume, _ = sample_volume(ctx.dry_run)
        timed_predict(volume, state["fp16"])  # warm-up
        p16, s16 = timed_predict(volume, state["fp16"])
        timed_predict(volume, state["fp32"])
        p32, s32 = timed_predict(volume, state["fp32"])
        return {
            "fp16": run_record(p16, s16, volume),
            "fp32": run_record(p32, s32, volume),
            "labels_fp16_vs_fp32": agreement(p16.labels.array, p32.labels.array),
            "top_class_error_max_abs_diff": _max_diff(p16.top_class_error, p32.top_class_error),
        }

    def ct() -> dict[str, Any]:
        volume = ct_volume(ctx.dry_run)
        prediction, seconds = timed_predict(volume, state["fp16"])
        result: dict[str, Any] = {"fp16": run_record(prediction, seconds, volume)}
        reference = ctx.workdir / "ct_3d_labels.npy"
        if reference.is_file():  # written by the inference section's fp32 run on the same volume
            result["labels_fp16_vs_fp32"] = agreement(prediction.labels.array, np.load(reference))
            result["fp32"] = json.loads((ctx.workdir / "ct_3d_fp32.json").read_text(encoding="utf-8"))
        else:
            result["labels_fp16_vs_fp32"] = "no fp32 run of the CT volume in the inference section"
        return result

    if ctx.step("sessions", sessions) is None:
        return
    ctx.step("window", windows)
    ctx.step("sample", sample)
    fp32_ct = ctx.workdir / "ct_3d_fp32.json"
    estimate = json.loads(fp32_ct.read_text(encoding="utf-8"))["seconds"] if fp32_ct.is_file() else 0.0
    ctx.step("ct", ct, estimate=estimate)


def _max_diff(a, b) -> float | None:
    if a is None or b is None:
        return None
    return round(float(np.max(np.abs(a.array - b.array))), 6)


def write_fp16_model(name: str, path: Path) -> dict[str, Any]:
    """An fp16 copy of the bundled model ``name`` at ``path``, checked by the product's own loader.

    ``medcl-export --fp16`` would be the project's way, but it exports from the training checkpoint, which
    the bundled models do not ship with. onnxconverter-common's converter is used when installed, else
    onnxruntime's copy of it (onnxruntime.transformers.float16), with the softmax, entropy, norms and
    resizing kept in float32; when its graph fails the product's checks, the convolutions alone are
    converted (:func:`convs_to_fp16`, what torch's fp16 autocast does).
    """
    import onnx

    from napari_medcl.errors import ModelError
    from napari_medcl.onnx_session import MODELS_DIR, bundled_models, check_model_bytes

    entry = next(m for m in bundled_models() if m["name"] == name)
    source = onnx.load(str(MODELS_DIR / entry["file"]))
    result: dict[str, Any] = {
        "project_export": "not usable: medcl-export --fp16 needs the training checkpoint"
    }
    try:
        converted, tool = _converter_fp16(source)
        data = converted.SerializeToString()
        check_model_bytes(data, path)
        result["method"] = f"{tool} (keep_io_types, softmax/entropy/norms/resize in float32)"
    except (ImportError, ModelError, Exception) as error:  # any converter failure falls back
        result["converter_error"] = f"{type(error).__name__}: {error}"[:1000]
        converted = convs_to_fp16(source)
        data = converted.SerializeToString()
        check_model_bytes(data, path)
        result["method"] = (
            "Conv/ConvTranspose in float16, the rest float32 (benchmarks/gpu_check.convs_to_fp16)"
        )
    path.write_bytes(data)
    casts = sum(1 for n in converted.graph.node if n.op_type == "Cast")
    return {**result, "path": str(path), "mib": round(len(data) / 2**20, 2), "cast_nodes": casts}


FP32_OPS = ["Softmax", "LogSoftmax", "Exp", "Log", "ReduceMean", "ReduceSum", "Sqrt", "Div", "Pow", "Resize",
            "Clip", "Neg", "Sub"]  # fmt: skip


def _converter_fp16(model):
    try:
        from onnxconverter_common.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        tool = "onnxconverter_common.float16"
    except ImportError:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        tool = "onnxruntime.transformers.float16"
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS))
    return convert_float_to_float16(model, keep_io_types=True, op_block_list=block), tool


def convs_to_fp16(model):
    """A copy of ``model`` whose Conv and ConvTranspose nodes run in float16: their input is cast to
    float16, their weights and bias are stored in float16, their output is cast back to float32. Every
    other op (norms, softmax, entropy, resizing) stays float32, as under torch's fp16 autocast."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    half: dict[str, str] = {}
    nodes = []
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            nodes.append(node)
            continue
        x16 = f"{node.output[0]}__input_fp16"
        nodes.append(helper.make_node("Cast", [node.input[0]], [x16], to=TensorProto.FLOAT16))
        inputs = [x16]
        for name in node.input[1:]:
            if name in initializers:
                if name not in half:
                    half[name] = f"{name}__fp16"
                    array = numpy_helper.to_array(initializers[name]).astype(np.float16)
                    graph.initializer.append(numpy_helper.from_array(array, half[name]))
                inputs.append(half[name])
            else:
                cast = f"{name}__{node.output[0]}__fp16"
                nodes.append(helper.make_node("Cast", [name], [cast], to=TensorProto.FLOAT16))
                inputs.append(cast)
        y16 = f"{node.output[0]}__fp16"
        conv = helper.make_node(node.op_type, inputs, [y16], name=node.name)
        conv.attribute.extend(node.attribute)
        nodes.append(conv)
        nodes.append(helper.make_node("Cast", [y16], [node.output[0]], to=TensorProto.FLOAT))
    used = {i for n in nodes for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return model


# ---------------------------------------------------------------------------------------------------------
# Section: training


def section_training(ctx: Context) -> None:
    _dry_run_threads(ctx)
    for amp in ("bf16", "fp16"):
        for losses, overrides in LOSS_SETS.items():
            ctx.step(
                f"{amp}/{losses}",
                lambda a=amp, o=overrides: train_steps(ctx, PRESET, [*o, f"train.amp_dtype={a}"]),
            )


def _dry_run_threads(ctx: Context) -> None:
    """One torch thread in a dry run: its tensors are tiny, and the test machines have two shared cores."""
    if ctx.dry_run:
        import torch

        torch.set_num_threads(1)


def _config(ctx: Context, preset: Path, overrides: list[str]):
    from training.config import load_config

    extra = (
        ["train.device=cpu", "train.amp_cpu=true", *DRY_TRAIN[preset]]
        if ctx.dry_run
        else ["train.device=cuda"]
    )
    return load_config(preset, [*overrides, *extra])


def _parts(cfg, dist, num_classes: int):
    """Runtime, and network, losses, optimizer and schedule as a training run builds them (for a dataset of
    one channel and ``num_classes`` classes)."""
    from types import SimpleNamespace

    from training.building import build_training
    from training.runtime import resolve_runtime

    runtime = resolve_runtime(cfg, dist)
    classes = ["background", *(f"class{i}" for i in range(1, num_classes))]
    info = SimpleNamespace(class_names=classes, in_channels=1, median_shape=None)
    return runtime, build_training(cfg, info, runtime)


def synthetic_batch(batch: int, patch: tuple[int, ...], num_classes: int, device):
    """Image (B, 1, *S) and blobby labels (B, *S): argmax of upsampled low-resolution noise."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(batch, num_classes, *(max(2, s // 16) for s in patch), generator=g)
    labels = F.interpolate(coarse, size=patch, mode="trilinear", align_corners=False).argmax(1)
    image = labels.float().unsqueeze(1) + 0.5 * torch.randn(batch, 1, *patch, generator=g)
    return image.to(device), labels.to(device)


def optimizer_step(runtime, parts, grad_clip: float, image, label, progress: float = 0.0) -> float:
    """One training iteration as ``training.loop.train_epoch`` runs it; the loss as a float."""
    import torch
    from torch import nn

    with runtime.autocast():
        loss, _ = parts.step(image, label, parts.generator, progress)
    parts.optimizer.zero_grad(set_to_none=True)
    runtime.scaler.scale(loss).backward()
    if grad_clip > 0:
        runtime.scaler.unscale_(parts.optimizer)
        nn.utils.clip_grad_norm_([p for g in parts.optimizer.param_groups for p in g["params"]], grad_clip)
    runtime.scaler.step(parts.optimizer)
    runtime.scaler.update()
    parts.scheduler.step()
    return float(loss.detach().float().cpu()) if torch.is_tensor(loss) else float(loss)


def train_steps(ctx: Context, preset: Path, overrides: list[str]) -> dict[str, Any]:
    """Warm-up steps, then timed steps of the preset's network and losses on one synthetic batch."""
    import torch

    from training.runtime import DistInfo

    cfg = _config(ctx, preset, overrides)
    runtime, parts = _parts(cfg, DistInfo(), PRESET_CLASSES)
    device, clip = runtime.device, cfg.train.grad_clip
    image, label = synthetic_batch(runtime.local_batch, parts.patch_size, PRESET_CLASSES, device)
    warmup, steps = (0, 1) if ctx.dry_run else (2, 5)
    cuda = device.type == "cuda"
    for _ in range(warmup):
        optimizer_step(runtime, parts, clip, image, label)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        losses.append(optimizer_step(runtime, parts, clip, image, label))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "device": str(device),
        "amp": runtime.amp_text,
        "patch": list(parts.patch_size),
        "batch": runtime.local_batch,
        "features": list(cfg.model.features or ()),
        "parameters_m": round(sum(p.numel() for p in parts.step.parameters()) / 1e6, 2),
        "warmup_steps": warmup,
        "steps": steps,
        "it_per_s": round(steps / seconds, 3),
        "losses": [round(v, 4) for v in losses],
        "finite": all(np.isfinite(losses)),
        "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
    }
    del parts, image, label
    if cuda:
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------------------------------------------
# Section: finetune


def section_finetune(ctx: Context) -> None:
    _dry_run_threads(ctx)
    try:
        import SimpleITK  # noqa: F401  (training reads its cases through napari_medcl.io)
    except ImportError as error:
        for name in ("corrections", "run"):
            ctx.skip(name, f"needs SimpleITK to write and read the corrected cases ({error})")
        return
    cases = ctx.step("corrections", lambda: write_corrections(ctx.workdir / "corrections", ctx.dry_run))
    if cases is not None:
        ctx.step("run", lambda: finetune_run(ctx, ctx.workdir / "corrections"))


def write_corrections(folder: Path, dry_run: bool) -> dict[str, Any]:
    """Two corrected cases for a timing run: the bundled sample (its crop in a dry run) and its left-right
    mirror image, each with the bundled 3D model's labels as the correction
    (``napari_medcl.corrections.add_correction``)."""
    from napari_medcl.corrections import add_correction
    from napari_medcl.onnx_session import load_model
    from napari_medcl.prediction import predict

    image, _ = sample_volume(dry_run)
    session = load_model(MODELS["3d"], device="cpu", precision="fp32")
    prediction = predict(image, session)
    labels = prediction.labels
    mirrored = dataclasses.replace(image, array=np.ascontiguousarray(image.array[..., ::-1]))
    mirrored_labels = np.ascontiguousarray(labels.array[..., ::-1])
    for case_id, scan, truth in (("sample", image, labels.array), ("mirrored", mirrored, mirrored_labels)):
        add_correction(folder, scan, truth, model=prediction.provenance, model_labels=truth,
                       case_id=case_id)  # fmt: skip
    return {"cases": 2, "shape": list(image.array.shape)}


def finetune_run(ctx: Context, corrections: Path) -> dict[str, Any]:
    """The widget's *Fine-tune* command (``napari_medcl.learning.plan_fine_tune`` and ``train_command``) for a
    few epochs; seconds per epoch and the recipe's whole run extrapolated (the first epoch plus its other
    epochs at the mean of the timed ones)."""
    from napari_medcl.learning import plan_fine_tune, train_command
    from training.config import load_config

    epochs = 2 if ctx.dry_run else FINETUNE_EPOCHS
    overrides = ["init.replay=null", f"train.epochs={epochs}", f"train.val_every={epochs}",
                 f"train.device={ctx.device}"]  # fmt: skip
    if ctx.dry_run:
        overrides += ["data.num_workers=0", "train.iterations_per_epoch=2", "train.patch_size=[16,32,32]"]
    plan = plan_fine_tune(MODELS["3d"], corrections, overrides=overrides)
    start = time.perf_counter()
    done = subprocess.run(train_command(plan), cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(
            f"medcl-train exited {done.returncode}: {(done.stdout + done.stderr).strip()[-1500:]}"
        )
    metrics = (plan.run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    seconds = [float(json.loads(line)["seconds"]) for line in metrics]
    recipe = load_config(plan.config).train
    return {
        "device": ctx.device,
        "recipe": plan.config.name,
        "epochs": epochs,
        "iterations_per_epoch": load_config(plan.run_dir / "config.yaml").train.iterations_per_epoch,
        "epoch_seconds": [round(v, 2) for v in seconds],
        "wall_seconds": round(wall, 1),
        "preset_epochs": recipe.epochs,
        "preset_estimate_seconds": round(seconds[0] + float(np.mean(seconds[1:])) * (recipe.epochs - 1), 1),
    }


# ---------------------------------------------------------------------------------------------------------
# Section: ddp


def section_ddp(ctx: Context) -> None:
    import torch
    import torch.distributed as dist

    _dry_run_threads(ctx)
    backend = "gloo" if ctx.dry_run else "nccl"
    store = ctx.workdir / "ddp_store"
    state: dict[str, Any] = {}

    def init() -> dict[str, Any]:
        from datetime import timedelta

        if backend == "nccl":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, init_method=store.as_uri(), rank=0, world_size=1,
                                timeout=timedelta(seconds=60))  # fmt: skip
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if backend == "nccl" else None
        return {"backend": dist.get_backend(), "init_method": "file store", "world_size": 1, "nccl": nccl}

    def all_reduce() -> dict[str, Any]:
        device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
        tensor = torch.arange(4, dtype=torch.float32, device=device)
        dist.all_reduce(tensor)
        dist.barrier()
        if tensor.cpu().tolist() != [0.0, 1.0, 2.0, 3.0]:
            raise RuntimeError(f"all_reduce over one process changed the tensor: {tensor.tolist()}")
        return {"values": tensor.cpu().tolist()}

    def ddp_step() -> dict[str, Any]:
        from torch.nn.parallel import DistributedDataParallel

        from training.runtime import DistInfo

        cfg = _config(ctx, DDP_PRESET, [])
        runtime, parts = _parts(cfg, DistInfo(), DDP_CLASSES)
        ids = [0] if backend == "nccl" else None
        step = DistributedDataParallel(parts.step, device_ids=ids)  # as build_training wraps it
        parts = dataclasses.replace(parts, step=step)
        image, label = synthetic_batch(runtime.local_batch, parts.patch_size, DDP_CLASSES, runtime.device)
        loss = optimizer_step(runtime, parts, cfg.train.grad_clip, image, label)
        state["ok"] = np.isfinite(loss)
        return {"loss": round(loss, 4), "finite": bool(np.isfinite(loss)), "amp": runtime.amp_text,
                "patch": list(parts.patch_size)}  # fmt: skip

    try:
        if ctx.step("init", init) is not None:
            ctx.step("all_reduce", all_reduce)
            ctx.step("ddp_train_step", ddp_step)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    ctx.info["passed"] = all(s.get("status") == "ok" for s in ctx.steps.values()) and bool(state.get("ok"))


# ---------------------------------------------------------------------------------------------------------
# The run: one process per section, a global time budget, the report and its table

SECTION_FUNCTIONS = {
    "environment": section_environment,
    "inference": section_inference,
    "fp16": section_fp16,
    "training": section_training,
    "finetune": section_finetune,
    "ddp": section_ddp,
}


def run_section_process(name: str, *, dry_run: bool, deadline: float, workdir: Path) -> dict[str, Any]:
    """Run section ``name`` in a child process until ``deadline`` (+ GRACE); its record for the report."""
    out = workdir / f"{name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--workdir", str(workdir),
               "--deadline", repr(deadline)] + (["--dry-run"] if dry_run else [])  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    start = time.perf_counter()
    killed = False
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
        try:
            code = process.wait(timeout=max(1.0, deadline - time.time() + GRACE))
        except subprocess.TimeoutExpired:
            process.kill()
            code, killed = process.wait(), True
        log.seek(0)
        output = log.read()
    record: dict[str, Any] = {"seconds": round(time.perf_counter() - start, 2)}
    data = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {"steps": {}, "info": {}}
    steps = data.get("steps", {})
    for step in steps.values():
        if step.get("status") == "running":  # the step the kill interrupted
            step.update(status="error", error=f"killed: {BUDGET_SKIP} (the section ran past its deadline)")
    record["steps"] = steps
    record.update({k: v for k, v in data.get("info", {}).items() if not k.startswith("_")})
    states = [s["status"] for s in steps.values()]
    if killed:
        record["error"] = f"killed at the section's deadline ({BUDGET_SKIP})"
    elif code != 0:
        record["error"] = f"exit status {code}: " + output.strip()[-2000:]
    if (killed or code != 0) and "ok" not in states:
        record["status"] = "error"
    elif states and all(s == "ok" for s in states) and not killed and code == 0:
        record["status"] = "ok"
    else:
        record["status"] = "partial" if "ok" in states else "error"
        if not states and "error" not in record:
            record["error"] = "the section recorded no step"
    if code != 0 or killed:
        record["output_tail"] = output.strip()[-2000:]
    return record


def section_deadlines(start: float, budget: float) -> dict[str, float]:
    """Each section's deadline: the global one minus what the later sections hold back."""
    deadlines, held = {}, 0.0
    for name in reversed(SECTIONS):
        deadlines[name] = start + budget - held
        held += RESERVE[name]
    return deadlines


def run_check(*, dry_run: bool, output: Path, budget: float, sections: tuple[str, ...] = SECTIONS) -> dict:
    start = time.time()
    deadlines = section_deadlines(start, budget)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": "dry-run" if dry_run else "gpu",
        "started": _now(),
        "budget_seconds": budget,
        "command": sys.argv,
        "sections": {name: {"status": "skipped", "reason": "not run yet"} for name in SECTIONS},
    }
    with tempfile.TemporaryDirectory(prefix="medcl-gpu-check-") as workdir:
        for name in SECTIONS:
            remaining = deadlines[name] - time.time()
            if name not in sections:
                report["sections"][name] = {"status": "skipped", "reason": "not selected (--sections)"}
            elif remaining < MIN_START:
                report["sections"][name] = {"status": "skipped", "reason": BUDGET_SKIP}
            else:
                print(f"[gpu-check] {name} (up to {remaining:.0f} s)", flush=True)
                report["sections"][name] = run_section_process(
                    name, dry_run=dry_run, deadline=deadlines[name], workdir=Path(workdir)
                )
            report["wall_seconds"] = round(time.time() - start, 1)
            write_json(output, report)
    report["finished"] = _now()
    write_json(output, report)
    return report


def summary(step: dict[str, Any]) -> str:
    """The figures of one step worth a table cell."""
    if step.get("status") != "ok":
        return (step.get("error") or step.get("reason") or "").splitlines()[0][:90]
    parts = []
    for key in ("execution_provider", "cuda_provider_loaded", "gpu", "torch", "onnxruntime", "amp", "backend",
                "method", "warm_seconds", "ort_seconds", "it_per_s", "peak_memory_mib",
                "device_memory_peak_mib", "batch1_ms_per_window", "batch8_ms_per_window", "loss",
                "epoch_seconds", "preset_estimate_seconds"):  # fmt: skip
        if step.get(key) is not None:
            parts.append(f"{key}={step[key]}")
    for key, value in step.items():
        if key.startswith("labels_") and isinstance(value, dict):
            parts.append(f"{key}={value['agreement']}")
        elif key in ("fp32_over_fp16",):
            parts.append(f"{key}={value}")
    return "; ".join(parts)[:160]


def print_table(report: dict[str, Any]) -> None:
    print(
        f"\nGPU check ({report['mode']}), {report.get('wall_seconds', '?')} s of a {report['budget_seconds']:.0f} s budget"
    )
    print(f"{'section':<12} {'step':<24} {'status':<8} {'s':>7}  figures")
    for name, section in report["sections"].items():
        print(f"{name:<12} {'':<24} {section['status']:<8} {section.get('seconds', ''):>7}  "
              f"{section.get('error') or section.get('reason') or ''}"[:200].rstrip())  # fmt: skip
        for step_name, step in section.get("steps", {}).items():
            seconds = step.get("seconds", "")
            print(f"{'':<12} {step_name:<24} {step['status']:<8} {seconds!s:>7}  {summary(step)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, gloo: checks the script")
    parser.add_argument("-o", "--output", type=Path, default=Path("gpu_check_report.json"))
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for all sections")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # a child process's section
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section:
        ctx = Context(dry_run=args.dry_run, deadline=args.deadline, workdir=args.workdir,
                      out=args.workdir / f"{args.section}.json")  # fmt: skip
        ctx.flush()
        SECTION_FUNCTIONS[args.section](ctx)
        ctx.flush()
        return 0
    report = run_check(
        dry_run=args.dry_run, output=args.output, budget=args.budget, sections=tuple(args.sections)
    )
    print_table(report)
    print(f"\nreport: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
