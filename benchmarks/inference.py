"""Inference benchmark: the whole predict() pipeline vs the time spent inside ONNX Runtime, peak memory, and
each backend's share of the machine's measured fp32 peak.

Run: ``.venv/bin/python benchmarks/inference.py`` (also ``make bench``); ``--ct`` adds the CT-size case
(about 2 minutes more on two idle cores). Side by side from one run:

- 3D: a 160x192x160 float32 volume, a 3D U-Net (16/32/64/128 channels, 96^3 windows, 4 classes, 2 UAFR maps);
- 2D: a 512x512 float32 image, a 2D U-Net (32/64/128/256 channels, 256^2 windows, 3 classes, 2 UAFR maps);
- the bundled ``brain-tissue-3d`` model's 24x80x80 window (what users run), per window, and ``make demo``'s
  sample predicted once with it: its windows times the window's FLOPs over the peak is the least time any fp32
  CPU backend could take for the demo;
- with ``--ct``: a 512x512x300 CT-like volume (``ct_phantom``) through a 3D model and a 2D model over every
  slice, for time, windows and peak memory against the input + outputs.

The networks have random weights and are built with onnx.helper from numpy arrays (no training code, no
exporter); when torch is installed the same weights run in a functional torch copy of the network, for the
per-window ORT/torch eager ratio and a parity check. **FLOPs** are counted from each ONNX graph for its window
(``benchmarks/graph_flops.py``: Conv/ConvTranspose/MatMul/Gemm multiply-adds x 2). **The fp32 peak** is the best
of float32 matrix products (2048^2, numpy's BLAS and torch, as many threads as the inference backends,
``physical_cores()``) timed in turn with the windows, in the same process; each backend's GFLOP/s (graph FLOPs
per window / median seconds per window) is given as a share of it. OpenVINO fp32 is timed when ``openvino`` is
installed. Memory: peak RSS (VmHWM, reset through /proc/self/clear_refs before each case) against the RSS just
before predict(), after the model was loaded and windows were run until the RSS settled (so ONNX Runtime's
arena for the window is part of that baseline and is reported apart).
Each case runs in its own process, so one case's freed-but-kept heap does not hide the next one's memory.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from graph_flops import count_flops  # benchmarks/graph_flops.py

from napari_medcl.channel_softmax import cpu_graph
from napari_medcl.onnx_session import MODELS_DIR, load_model, physical_cores, session_options
from napari_medcl.openvino_session import openvino_installed
from napari_medcl.prediction import predict
from napari_medcl.spec import METADATA_KEY, ModelSpec, default_classes
from napari_medcl.tiling import window_shape
from napari_medcl.volume import Prediction, Volume

AUX_CHANNELS = 8  # channels of each UAFR block's auxiliary softmax
BUNDLED = "brain-tissue-3d"
CT_FOV_MM = (450.0, 409.6, 409.6)  # (z, y, x): 300 slices of 1.5 mm, 512 x 512 pixels of 0.8 mm
CT_NORMALIZATION = {"kind": "ct", "clip_low": -1000.0, "clip_high": 1000.0, "mean": 40.0, "std": 300.0}
MEMORY_TARGET = 3.0  # CT-size volume: peak increase <= 3 x (input + outputs)


@dataclass(frozen=True)
class Case:
    """``shape``: the image (a 3D shape with a 2D ``patch``: a 2D model over every slice); ``stem``: the
    network pools its window by this factor first and resizes its probabilities and maps back at the end (a
    low-resolution network, cheap per window, with full-resolution outputs and stitching); ``ct``: the image
    is ``ct_phantom`` in HU, else normal(100, 20) noise."""

    name: str
    shape: tuple[int, ...]
    patch: tuple[int, ...]
    channels: tuple[int, ...]
    num_classes: int
    stem: int = 1
    ct: bool = False

    @property
    def spatial_dims(self) -> int:
        return len(self.patch)


CASES = {
    "3d": Case("3D 160x192x160", (160, 192, 160), (96, 96, 96), (16, 32, 64, 128), 4),
    "2d": Case("2D 512x512", (512, 512), (256, 256), (32, 64, 128, 256), 3),
    "ct3d": Case("CT 512x512x300, 3D model", (300, 512, 512), (96, 96, 96), (16, 32, 64, 128), 8, 4, True),
    "ct2d": Case("CT 512x512x300, 2D model", (300, 512, 512), (256, 256), (8, 16, 32, 64), 8, 2, True),
}
# --quick: the same code paths on tiny images and networks (seconds; for tests).
QUICK_CASES = {
    "3d": Case("3D 20x40x36", (20, 40, 36), (16, 16, 16), (2, 4, 8, 16), 4),
    "2d": Case("2D 40x48", (40, 48), (32, 32), (4, 8, 16, 32), 3),
    "ct3d": Case("CT 48x40x24, 3D model", (24, 48, 40), (16, 16, 16), (2, 4, 8, 16), 8, 2, True),
    "ct2d": Case("CT 48x40x6, 2D model", (6, 48, 40), (32, 32), (2, 4, 8, 16), 8, 2, True),
}
MATMUL_SIZE, QUICK_MATMUL_SIZE = 2048, 256


# ---------------------------------------------------------------------------------------------------------
# The network: a plain U-Net with two UAFR blocks in the decoder, as numpy weights -> ONNX and torch.


def unet_weights(spatial_dims: int, channels: tuple[int, ...], num_classes: int, seed: int) -> dict:
    """He-initialised weights of a 4-level U-Net (BatchNorm folded away, so convs carry biases)."""
    rng = np.random.default_rng(seed)
    k3, k2, k1 = (3,) * spatial_dims, (2,) * spatial_dims, (1,) * spatial_dims
    w = {}

    def conv(name, cout, cin, kernel):
        w[name] = rng.normal(0, math.sqrt(2.0 / (cin * math.prod(kernel))), (cout, cin, *kernel)).astype("f4")
        w[name + "_b"] = rng.normal(0, 0.05, cout).astype("f4")

    previous = 1
    for level, c in enumerate(channels):
        conv(f"enc{level}a", c, previous, k3)
        conv(f"enc{level}b", c, c, k3)
        previous = c
    for level in reversed(range(len(channels) - 1)):
        c, below = channels[level], channels[level + 1]
        # ConvTranspose weights are (C_in, C_out, *k)
        w[f"up{level}"] = rng.normal(0, math.sqrt(1.0 / (below * 2**spatial_dims)), (below, c, *k2)).astype(
            "f4"
        )
        w[f"up{level}_b"] = np.zeros(c, "f4")
        conv(f"dec{level}a", c, 2 * c, k3)
        conv(f"dec{level}b", c, c, k3)
    for level in (1, 0):
        conv(f"aux{level}", AUX_CHANNELS, channels[level], k1)
    conv("head", num_classes, channels[0], k1)
    return w


def unet_onnx(
    spatial_dims: int, channels: tuple[int, ...], weights: dict, spec: ModelSpec, stem: int = 1
) -> onnx.ModelProto:
    """The U-Net as an ONNX graph: image (N, 1, *S) -> probabilities (N, K, *S), uafr_uncertainty (N, 2, *S).
    ``stem`` > 1: average-pool the image by ``stem`` first, resize the probabilities (softmax first) and the
    maps back (linear) at the end."""
    nodes, d = [], spatial_dims
    counter = iter(range(10**6))

    def node(op, inputs, **attrs):
        out = f"t{next(counter)}"
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def conv(x, name, pad=1):
        return node("Conv", [x, name, name + "_b"], pads=[pad] * (2 * d))

    def block(x, name):
        return node("Relu", [conv(node("Relu", [conv(x, name + "a")]), name + "b")])

    def uafr(x, level):
        """Normalised entropy U of softmax(aux(x)); returns x * (1 + (1 - U)) and U."""
        logp = node("LogSoftmax", [conv(x, f"aux{level}", pad=0)], axis=1)
        plogp = node("Mul", [node("Exp", [logp]), logp])
        entropy = node("Mul", [node("ReduceSum", [plogp, "axis1"], keepdims=1), "neg_inv_log_m"])
        return node("Mul", [x, node("Sub", ["two", entropy])]), entropy

    skips, x = [], "image"
    if stem > 1:
        x = node("AveragePool", [x], kernel_shape=[stem] * d, strides=[stem] * d)
    for level in range(len(channels)):
        if level:
            x = node("MaxPool", [x], kernel_shape=[2] * d, strides=[2] * d)
        x = block(x, f"enc{level}")
        skips.append(x)
    maps = {}
    for level in reversed(range(len(channels) - 1)):
        up = node("ConvTranspose", [x, f"up{level}", f"up{level}_b"], strides=[2] * d)
        x = block(node("Concat", [up, skips[level]], axis=1), f"dec{level}")
        if level in (0, 1):
            x, maps[level] = uafr(x, level)
    logits = conv(x, "head", pad=0)
    map0 = maps[0]
    if stem > 1:  # softmax at the network's resolution, then the probabilities resized (still sum to 1)
        probs = node("Softmax", [logits], axis=1)
        probs_out = helper.make_node("Resize", [probs, "", "stem_scales"], ["probabilities"], mode="linear")
        map0 = node("Resize", [map0, "", "stem_scales"], mode="linear")
    else:
        probs_out = helper.make_node("Softmax", [logits], ["probabilities"], axis=1)
    upsampled = node("Resize", [maps[1], "", "scales"], mode="linear")
    uafr_out = helper.make_node("Concat", [upsampled, map0], ["uafr_uncertainty"], axis=1)
    constants = {
        "axis1": np.array([1], np.int64),
        "neg_inv_log_m": np.array(-1.0 / math.log(AUX_CHANNELS), np.float32),
        "two": np.array(2.0, np.float32),
        "scales": np.array([1.0, 1.0] + [2.0 * stem] * d, np.float32),
    }
    if stem > 1:
        constants["stem_scales"] = np.array([1.0, 1.0] + [float(stem)] * d, np.float32)
    initializers = [numpy_helper.from_array(v, k) for k, v in {**weights, **constants}.items()]
    spatial = ["D", "H", "W"][-d:]
    graph = helper.make_graph(
        [*nodes, probs_out, uafr_out],
        "unet",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, *spatial])],
        [
            helper.make_tensor_value_info(
                "probabilities", TensorProto.FLOAT, ["N", spec.num_classes, *spatial]
            ),
            helper.make_tensor_value_info("uafr_uncertainty", TensorProto.FLOAT, ["N", 2, *spatial]),
        ],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="medcl-bench")
    model.ir_version = 8
    helper.set_model_props(model, {METADATA_KEY: spec.to_json()})
    onnx.checker.check_model(model)
    return model


def unet_torch(spatial_dims: int, channels: tuple[int, ...], weights: dict, stem: int = 1):
    """The same network in torch eager (functional, same weights); None when torch is not installed."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    d = spatial_dims
    conv, conv_t = (F.conv2d, F.conv_transpose2d) if d == 2 else (F.conv3d, F.conv_transpose3d)
    pool, average = (F.max_pool2d, F.avg_pool2d) if d == 2 else (F.max_pool3d, F.avg_pool3d)
    mode = "bilinear" if d == 2 else "trilinear"
    w = {k: torch.from_numpy(v) for k, v in weights.items()}

    def block(x, name):
        x = F.relu(conv(x, w[name + "a"], w[name + "a_b"], padding=1))
        return F.relu(conv(x, w[name + "b"], w[name + "b_b"], padding=1))

    def uafr(x, level):
        logp = F.log_softmax(conv(x, w[f"aux{level}"], w[f"aux{level}_b"]), dim=1)
        entropy = -(logp.exp() * logp).sum(1, keepdim=True) / math.log(AUX_CHANNELS)
        return x * (2.0 - entropy), entropy

    def resize(x, factor):
        return F.interpolate(x, scale_factor=factor, mode=mode) if factor > 1 else x

    @torch.inference_mode()
    def forward(image: np.ndarray) -> np.ndarray:
        x, skips = torch.from_numpy(image), []
        if stem > 1:
            x = average(x, stem)
        for level in range(len(channels)):
            x = block(pool(x, 2) if level else x, f"enc{level}")
            skips.append(x)
        maps = {}
        for level in reversed(range(len(channels) - 1)):
            up = conv_t(x, w[f"up{level}"], w[f"up{level}_b"], stride=2)
            x = block(torch.cat([up, skips[level]], 1), f"dec{level}")
            if level in (0, 1):
                x, maps[level] = uafr(x, level)
        probs = resize(F.softmax(conv(x, w["head"], w["head_b"]), dim=1), stem)
        _ = torch.cat([resize(maps[1], 2 * stem), resize(maps[0], stem)], 1)
        return probs.numpy()

    torch.set_num_threads(physical_cores())
    return forward


def case_spec(case: Case) -> ModelSpec:
    d = case.spatial_dims
    return ModelSpec(
        name=f"bench-{'ct-' if case.ct else ''}unet-{d}d",
        spatial_dims=d,
        in_channels=1,
        classes=default_classes(["background"] + [f"class{i}" for i in range(1, case.num_classes)]),
        patch_size=case.patch,
        divisor=(8 * case.stem,) * d,
        normalization=dict(CT_NORMALIZATION) if case.ct else {"kind": "zscore"},
        uncertainty_maps=("decoder2", "decoder1"),
    )


# ---------------------------------------------------------------------------------------------------------
# The CT-size volume


def ct_phantom(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, tuple[float, ...]]:
    """A CT-like float32 volume in Hounsfield units on a (Z, Y, X) grid covering ``CT_FOV_MM``, and its
    spacing: air (-1000) around an elliptic body (a subcutaneous fat layer of -100 around 40 HU soft tissue)
    holding two lungs (-850), liver (60), spleen (50), two kidneys (35), the aorta with contrast (180) and
    the spine (400, cortical rim 800), plus Gaussian noise (sigma 12 HU) on every voxel, air included. Every
    voxel is non-zero, so no masked shortcut applies. Built slice by slice (small temporaries)."""
    spacing = tuple(f / n for f, n in zip(CT_FOV_MM, shape))
    z = (np.arange(shape[0]) + 0.5) * spacing[0] - CT_FOV_MM[0] / 2
    y = ((np.arange(shape[1], dtype=np.float32) + 0.5) * spacing[1] - CT_FOV_MM[1] / 2)[:, None]
    x = ((np.arange(shape[2], dtype=np.float32) + 0.5) * spacing[2] - CT_FOV_MM[2] / 2)[None, :]
    # (HU, centre x, y, z, semi-axes x, y, z) in mm; later entries are drawn over earlier ones.
    organs = (
        (-850.0, -80, -10, 120, 65, 85, 110),  # lungs
        (-850.0, 80, -10, 120, 65, 85, 110),
        (60.0, -65, 10, -10, 90, 75, 80),  # liver
        (50.0, 90, 25, -10, 35, 45, 55),  # spleen
        (35.0, -70, 55, -90, 30, 25, 50),  # kidneys
        (35.0, 70, 55, -90, 30, 25, 50),
    )
    rng = np.random.default_rng(seed)
    out = np.empty(shape, dtype=np.float32)

    def inside(cx, cy, ax, ay, scale=1.0):
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= scale

    for k, zk in enumerate(z):
        plane = out[k]
        plane.fill(-1000.0)
        plane[inside(0, 0, 170, 120)] = -100.0
        plane[inside(0, 0, 155, 105)] = 40.0
        for hu, cx, cy, cz, ax, ay, az in organs:
            t = 1.0 - ((zk - cz) / az) ** 2
            if t > 0:
                plane[inside(cx, cy, ax, ay, t)] = hu
        plane[inside(15, 35, 12, 12)] = 180.0
        plane[inside(0, 75, 20, 18)] = 800.0
        plane[inside(0, 75, 16, 14)] = 400.0
        plane += rng.standard_normal(plane.shape, dtype=np.float32) * np.float32(12.0)
    return out, spacing


# ---------------------------------------------------------------------------------------------------------
# Measurement helpers


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory over a with-block: the kernel's VmHWM after resetting it, or sampling every 5 ms
    where /proc/self/clear_refs cannot be written."""

    def __enter__(self) -> PeakRSS:
        self.peak = rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._sampler = None
        except OSError:
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        if self._sampler is None:
            with open("/proc/self/status") as f:
                hwm = next(line for line in f if line.startswith("VmHWM:"))
            self.peak = max(self.peak, int(hwm.split()[1]) * 1024)
        else:
            self._stop.set()
            self._sampler.join()
            self.peak = max(self.peak, rss_bytes())


def interleaved_times(functions: list, repeats: int) -> list[list[float]]:
    """Seconds of each call of each function, calling them in turn ``repeats`` times so that all of them see
    the same background load (the machine may be shared)."""
    times = [[] for _ in functions]
    for _ in range(repeats):
        for fn, bucket in zip(functions, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return times


def interleaved_medians(functions: list, repeats: int) -> list[float]:
    """Median seconds of each function, timed in turn (``interleaved_times``)."""
    return [float(np.median(t)) for t in interleaved_times(functions, repeats)]


def blas_threads(threads: int) -> contextlib.AbstractContextManager:
    """numpy's BLAS limited to ``threads`` (threadpoolctl, when installed; else the library's default)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def matmul_functions(n: int) -> list[tuple[str, Callable[[], object]]]:
    """(label, function) pairs, each one float32 (n x n) @ (n x n) product: numpy's BLAS, and torch's when
    installed. 2 n^3 floating-point operations per call."""
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    c = np.empty((n, n), np.float32)
    functions = [(f"numpy {_blas_name()}", lambda: np.matmul(a, b, out=c))]
    try:
        import torch
    except ImportError:
        return functions
    torch.set_num_threads(physical_cores())
    ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.empty((n, n))
    functions.append(("torch", lambda: torch.mm(ta, tb, out=tc)))
    return functions


def _blas_name() -> str:
    try:
        config = np.show_config(mode="dicts")
        return str(config["Build Dependencies"]["blas"]["name"])
    except Exception:  # older numpy: no dict mode
        return "BLAS"


@dataclass
class Timed:
    """A per-window function timed among the others: ``status`` says why it did not run (None: it ran)."""

    label: str
    run: Callable[[], object] | None
    status: str | None = None


def time_windows(engines: list[Timed], flops: int, repeats: int, matmul_n: int) -> dict:
    """Every engine's window and every fp32 matrix product, called in turn ``repeats`` times after a warm-up.

    Returns ``peak`` (the best GFLOP/s of any matrix product, and each one's best), and per engine its
    median seconds per window, GFLOP/s (``flops`` / median) and share of the peak."""
    matmuls = matmul_functions(matmul_n)
    ready = [e for e in engines if e.run is not None]
    with blas_threads(physical_cores()):
        for fn in [e.run for e in ready] + [f for _, f in matmuls]:
            fn()  # warm-up
        times = interleaved_times([e.run for e in ready] + [f for _, f in matmuls], repeats)
    matmul_flops = 2 * matmul_n**3
    best = {label: matmul_flops / min(t) / 1e9 for (label, _), t in zip(matmuls, times[len(ready) :])}
    peak = max(best.values())
    rows = []
    for engine in engines:
        row = {
            "backend": engine.label,
            "status": engine.status,
            "window_s": None,
            "gflops": None,
            "share": None,
        }
        if engine.run is not None:
            t = times[ready.index(engine)]
            row["window_s"] = float(np.median(t))
            row["gflops"] = flops / row["window_s"] / 1e9
            row["share"] = row["gflops"] / peak
        rows.append(row)
    return {
        "peak_gflops": peak,
        "matmul": {label: round(v, 1) for label, v in best.items()},
        "matmul_n": matmul_n,
        "repeats": repeats,
        "engines": rows,
    }


def file_graph_engine(path: Path | str, window: np.ndarray) -> Timed:
    """ONNX Runtime CPU on the file's own graph, channel softmaxes and all: what the product ran before it
    rewrote them (napari_medcl.channel_softmax), timed beside it."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        Path(path).read_bytes(), session_options(), providers=["CPUExecutionProvider"]
    )
    feed = {session.get_inputs()[0].name: window}
    return Timed("ONNX Runtime CPU, file's graph", lambda: session.run(None, feed))


def openvino_engine(path: Path | str, window: np.ndarray) -> Timed:
    """OpenVINO fp32 on ``window``, or why it cannot run here."""
    label = "OpenVINO CPU fp32"
    if not openvino_installed():
        return Timed(label, None, "not installed")
    try:
        model = load_model(path, device="cpu", backend="openvino", precision="fp32")
    except Exception as error:  # ModelError, UsageError, or an OpenVINO runtime error
        return Timed(label, None, f"cannot run: {str(error).splitlines()[0]}")
    return Timed(label, lambda: model.run(window))


CONV_OPS = ("Conv", "FusedConv", "ConvTranspose", "NchwcConv")


def ort_profile(model: bytes | Path, window: np.ndarray, runs: int = 2) -> dict[str, float]:
    """Seconds per window in each op type's kernels, from ONNX Runtime's profiler on a session opened as the
    product opens it (the graph ``cpu_graph`` makes of the file, all graph optimisations, one thread per
    physical core, no spinning); the first run
    (arena allocation) is left out. Separate from the interleaved timing: read it as shares of the time."""
    import onnxruntime as ort

    data = cpu_graph(model.read_bytes() if isinstance(model, Path) else model)
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: window}
        for _ in range(runs + 1):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    model_runs = sorted((e["ts"], e["dur"]) for e in events if e.get("name") == "model_run")
    after_first = model_runs[0][0] + model_runs[0][1]
    seconds: dict[str, float] = {}
    for event in events:
        if (
            event.get("cat") == "Node"
            and event["name"].endswith("_kernel_time")
            and event["ts"] >= after_first
        ):
            op = event["args"]["op_name"]
            seconds[op] = seconds.get(op, 0.0) + event["dur"] * 1e-6 / runs
    return dict(sorted(seconds.items(), key=lambda item: -item[1]))


def prediction_arrays(image: np.ndarray, prediction: Prediction) -> dict[str, int]:
    """Bytes of the input and of every array the Prediction holds, each buffer counted once."""
    arrays = {
        "input": image,
        "labels": prediction.labels.array,
        "entropy": prediction.entropy.array,
    }
    if prediction.top_class_error is not None:
        arrays["top_class_error"] = prediction.top_class_error.array
    for name, volume in prediction.uncertainty_maps.items():
        arrays[f"map {name}"] = volume.array
    if prediction.uafr_uncertainty is not None:  # a copy of the last map, or a view of it
        arrays["uafr_uncertainty"] = prediction.uafr_uncertainty.array
    if prediction.probabilities is not None:
        arrays["probabilities"] = prediction.probabilities.array
    sizes, seen = {}, []
    for name, array in arrays.items():
        if any(np.may_share_memory(array, other) for other in seen):
            continue
        seen.append(array)
        sizes[name] = int(array.nbytes)
    return sizes


def run_case(case: Case, folder: Path, *, device: str, repeats: int, with_torch: bool, quick: bool) -> dict:
    d = case.spatial_dims
    spec = case_spec(case)
    weights = unet_weights(d, case.channels, case.num_classes, seed=d)
    graph = unet_onnx(d, case.channels, weights, spec, stem=case.stem)
    path = folder / f"unet{d}d.onnx"
    onnx.save_model(graph, str(path))
    window_grid = window_shape(spec.patch_size, spec.divisor)
    flops = count_flops(graph, (1, 1, *window_grid))
    del graph
    if case.ct:
        start = time.perf_counter()
        image, spacing = ct_phantom(case.shape)
        made_in = time.perf_counter() - start
    else:
        image = np.random.default_rng(0).normal(100.0, 20.0, size=case.shape).astype(np.float32)
        spacing, made_in = (1.0,) * image.ndim, None
    volume = Volume(image, spacing, (0.0,) * image.ndim, np.eye(image.ndim))

    rss_start = rss_bytes()
    model = load_model(path, device=device, backend="onnxruntime")  # OpenVINO has its own row
    window = np.random.default_rng(1).normal(size=(1, 1, *window_grid)).astype(np.float32)
    # Warm-up until the RSS settles: the first run sizes ORT's arena, the second allocates the block its
    # memory-pattern planner laid out for this window shape. Both are per-session costs, whatever the image.
    for _ in range(4):
        settled = rss_bytes()
        model.run(window)
        if rss_bytes() - settled < 2**20:
            break
    gc.collect()
    rss_before = rss_bytes()
    with PeakRSS() as peak:
        prediction = predict(volume, model, overlap=0.5)
    timings = prediction.provenance["timings"]
    data = prediction_arrays(image, prediction)
    grid = prediction.provenance["tiling"]["padded_grid"]
    plane = math.prod(grid[-2:]) * 4  # float32 bytes of one (Y, X) plane of the padded grid
    depth = case.patch[0] if d == 3 else 1
    row = {
        "case": case.name,
        "network": {
            "dims": d,
            "channels": list(case.channels),
            "stem": case.stem,
            "classes": case.num_classes,
            "maps": 2,
            "window": list(window_grid),
        },
        "image": "CT phantom (HU)" if case.ct else "normal(100, 20)",
        "image_seconds": made_in,
        "provider": model.provider,
        "windows": prediction.provenance["tiling"]["windows"],
        "pipeline_s": timings["total"],
        "ort_s": timings["ort_seconds"],
        "overhead": timings["total"] / timings["ort_seconds"],
        "voxels_per_s": image.size / timings["total"],
        "peak_rss": peak.peak,
        "rss_before": rss_before,
        "ort_arena": rss_before - rss_start,
        "increase": peak.peak - rss_before,
        "data_bytes": sum(data.values()),
        "data": data,
        "accumulator_bytes": (case.num_classes + 2 + 1) * depth * plane,
        "graph_flops": flops.flops,
        "graph_other": flops.other_total,
        "graph_unknown": len(flops.unknown),
        "ort_window_s": None,
        "torch_window_s": None,
        "parity": None,
        "timings": timings,
        "backends": None,
    }
    del prediction
    if case.ct:  # the CT networks stand in for speed; their per-window figures are not the point
        return row
    # Per-window forward times, after predict() so that importing torch does not count in its memory.
    forward = unet_torch(d, case.channels, weights, stem=case.stem) if with_torch else None
    engines = [Timed("ONNX Runtime CPU", lambda: model.run(window)), file_graph_engine(path, window)]
    if forward is not None:
        engines.append(Timed("torch eager", lambda: forward(window)))
        row["parity"] = float(np.abs(forward(window) - model.run(window)[0]).max())
    else:
        engines.append(Timed("torch eager", None, "skipped" if not with_torch else "not installed"))
    engines.append(openvino_engine(path, window))
    backends = time_windows(engines, flops.flops, repeats, QUICK_MATMUL_SIZE if quick else MATMUL_SIZE)
    backends["ort_ops"] = ort_profile(path, window)
    row["backends"] = backends
    row["ort_window_s"] = backends["engines"][0]["window_s"]
    row["torch_window_s"] = backends["engines"][2]["window_s"]
    return row


def run_bundled(*, repeats: int, with_torch: bool, quick: bool) -> dict:
    """The bundled 3D model's window: FLOPs, and seconds per window on each backend beside the fp32 peak."""
    path = MODELS_DIR / f"{BUNDLED}.onnx"
    model = load_model(path, device="cpu", backend="onnxruntime", precision="fp32")
    spec = model.spec
    window_grid = window_shape(spec.patch_size, spec.divisor)
    flops = count_flops(path, (1, spec.in_channels, *window_grid))
    window = np.random.default_rng(1).uniform(0, 1, size=(1, spec.in_channels, *window_grid)).astype("f4")
    engines = [Timed("ONNX Runtime CPU", lambda: model.run(window)), file_graph_engine(path, window)]
    parity = None
    torch_engine = Timed("torch eager", None, "skipped")
    if with_torch:
        try:
            torch_session = bundled_torch_session(spec)
        except ImportError as error:
            torch_engine = Timed("torch eager", None, f"not installed ({error.name})")
        except Exception as error:  # the shipped weights do not load into this version's training code
            torch_engine = Timed("torch eager", None, f"cannot run: {str(error).splitlines()[0]}")
        else:
            torch_engine = Timed("torch eager", lambda: torch_session.run(window))
            parity = float(np.abs(torch_session.run(window)[0] - model.run(window)[0]).max())
    engines.append(torch_engine)
    engines.append(openvino_engine(path, window))
    backends = time_windows(engines, flops.flops, repeats, QUICK_MATMUL_SIZE if quick else MATMUL_SIZE)
    backends["ort_ops"] = ort_profile(path, window)
    return {
        "case": f"{BUNDLED} (bundled), window {'x'.join(map(str, window_grid))}",
        "graph_flops": flops.flops,
        "graph_other": flops.other_total,
        "graph_unknown": len(flops.unknown),
        "parity": parity,
        "backends": backends,
        **({} if quick else {"demo": demo_windows(model)}),
    }


def demo_windows(model) -> dict:
    """``make demo``'s prediction of the bundled sample with ``model`` at the default settings: how many windows
    it runs and how long the whole ``predict()`` takes, so that its FLOPs can be set against the fp32 peak."""
    from napari_medcl.demo import sample_path
    from napari_medcl.io import read_image

    volume = read_image(sample_path())
    start = time.perf_counter()
    prediction = predict(volume, model)
    seconds = time.perf_counter() - start
    return {"windows": int(prediction.provenance["tiling"]["windows"]), "seconds": seconds}


def bundled_torch_session(spec: ModelSpec):
    """The bundled model's network in torch eager, from the training weights shipped beside it (a
    ``TorchSession``, the session ``medcl-evaluate`` uses). ImportError without torch or the training code."""
    import torch

    from training.building import build_model
    from training.config import config_from_dict
    from training.init_weights import load_initial_weights
    from training.torch_session import TorchSession

    weights = load_initial_weights(BUNDLED)
    network = build_model(config_from_dict(dict(weights.config)), spec.in_channels, spec.num_classes)
    network.load_state_dict(weights.state_dict, strict=True)
    torch.set_num_threads(physical_cores())
    return TorchSession(network, spec)


# ---------------------------------------------------------------------------------------------------------
# Report


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def print_table(rows: list[dict]) -> None:
    def fmt(row, key, spec):
        value = row[key]
        return "n/a" if value is None else format(value, spec)

    lines = [
        ("execution provider", lambda r: r["provider"]),
        ("windows (overlap 0.5)", lambda r: str(r["windows"])),
        ("pipeline time, s", lambda r: f"{r['pipeline_s']:.2f}"),
        ("time inside ORT, s", lambda r: f"{r['ort_s']:.2f}"),
        ("overhead ratio (pipeline / ORT)", lambda r: f"{r['overhead']:.3f}"),
        ("  of which preprocess / stitch+reduce / postprocess, s", _breakdown),
        ("voxels/s (whole pipeline)", lambda r: f"{r['voxels_per_s']:.3g}"),
        ("peak RSS, MiB", lambda r: mib(r["peak_rss"])),
        ("RSS before predict, MiB (model + ORT arena)", lambda r: mib(r["rss_before"])),
        ("  of which ORT session + arena for one window, MiB", lambda r: mib(r["ort_arena"])),
        ("peak increase during predict, MiB", lambda r: mib(r["increase"])),
        ("input + outputs, MiB", lambda r: mib(r["data_bytes"])),
        ("peak increase / (input + outputs)", lambda r: f"{r['increase'] / r['data_bytes']:.2f}"),
        ("graph GFLOP per window", lambda r: f"{r['graph_flops'] / 1e9:.2f}"),
        ("ORT s per window", lambda r: fmt(r, "ort_window_s", ".3f")),
        ("torch eager s per window", lambda r: fmt(r, "torch_window_s", ".3f")),
        (
            "ORT / torch eager",
            lambda r: (
                "n/a" if r["torch_window_s"] is None else f"{r['ort_window_s'] / r['torch_window_s']:.2f}"
            ),
        ),
        ("max abs diff ORT vs torch (probabilities)", lambda r: fmt(r, "parity", ".1e")),
    ]
    header = "| | " + " | ".join(r["case"] for r in rows) + " |"
    print(header)
    print("|---" * (len(rows) + 1) + "|")
    for label, cell in lines:
        print(f"| {label} | " + " | ".join(cell(r) for r in rows) + " |")


def demo_floor(row: dict) -> str:
    """The least time any fp32 CPU backend could take for ``make demo``'s windows, at the peak measured in the
    same run: a bundled row of ``run_bundled`` that carries ``demo``."""
    demo, peak = row["demo"], row["backends"]["peak_gflops"]
    total = demo["windows"] * row["graph_flops"] / 1e9
    return (
        f"make demo's sample: {demo['windows']} windows x {row['graph_flops'] / 1e9:.2f} GFLOP = {total:.0f} "
        f"GFLOP, at least {total / peak:.1f} s on any fp32 CPU backend at this run's peak of {peak:.0f} GFLOP/s; "
        f"ONNX Runtime's whole predict() took {demo['seconds']:.1f} s"
    )


def print_peak_table(rows: list[dict]) -> None:
    """Each model's window on each backend as a share of the fp32 peak measured beside it."""
    print(
        "| model, window | GFLOP per window (graph) | backend | s per window (median) | GFLOP/s "
        "| share of fp32 peak | fp32 peak, GFLOP/s (best matmul: per library) |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        b = row["backends"]
        matmul = ", ".join(f"{label} {value:.0f}" for label, value in b["matmul"].items())
        for engine in b["engines"]:
            if engine["window_s"] is None:
                cells = ["n/a", engine["status"], "n/a"]
            else:
                cells = [f"{engine['window_s']:.3f}", f"{engine['gflops']:.1f}", f"**{engine['share']:.0%}**"]
            print(
                f"| {row['case']} | {row['graph_flops'] / 1e9:.2f} | {engine['backend']} | "
                + " | ".join(cells)
                + f" | {b['peak_gflops']:.0f} ({matmul}) |"
            )
    ratios = []
    for row in rows:
        by = {e["backend"]: e for e in row["backends"]["engines"]}
        ort, torch_, ov = by["ONNX Runtime CPU"], by["torch eager"], by["OpenVINO CPU fp32"]
        file_graph = by["ONNX Runtime CPU, file's graph"]
        if ort["window_s"] and file_graph["window_s"]:
            ratios.append(
                f"{row['case']}: ORT time, channel softmaxes as reductions / file's graph "
                f"{ort['window_s'] / file_graph['window_s']:.2f}"
            )
        if ort["window_s"] and torch_["window_s"]:
            ratios.append(f"{row['case']}: ORT / torch eager time {ort['window_s'] / torch_['window_s']:.2f}")
        if row["parity"] is not None:
            ratios.append(
                f"{row['case']}: max abs diff of probabilities ORT vs torch eager {row['parity']:.1e}"
            )
        if ort["window_s"] and ov["window_s"]:
            ratios.append(
                f"{row['case']}: OpenVINO fp32 speed-up over ORT {ort['window_s'] / ov['window_s']:.2f}"
            )
    ratios += [demo_floor(row) for row in rows if "demo" in row]
    for line in ratios:
        print(f"# {line}")
    for row in rows:
        b = row["backends"]
        ops = b["ort_ops"]
        total = sum(ops.values())
        conv = sum(v for op, v in ops.items() if op in CONV_OPS)
        rest = ", ".join(f"{op} {v / total:.0%}" for op, v in list(ops.items())[:6] if op not in CONV_OPS)
        conv_rate = row["graph_flops"] / conv / 1e9 if conv else float("nan")
        print(
            f"# ONNX Runtime's profiler, {row['case']}: {total:.3f} s of kernels per window; convolutions "
            f"{conv / total:.0%} of it, at {conv_rate:.1f} GFLOP/s = {conv_rate / b['peak_gflops']:.0%} of the "
            f"peak; then {rest}"
        )
    repeats = rows[0]["backends"]["repeats"] if rows else 0
    n = rows[0]["backends"]["matmul_n"] if rows else 0
    print(
        f"# medians of {repeats} interleaved calls per backend; peak: best of the same number of float32 "
        f"{n}x{n} matrix products, timed in turn with the windows, {physical_cores()} threads"
    )


def print_ct_table(rows: list[dict]) -> None:
    def network(r):
        n = r["network"]
        stem = f", pooled x{n['stem']} inside" if n["stem"] > 1 else ""
        return (
            f"{n['dims']}D U-Net {'/'.join(map(str, n['channels']))}{stem}, window "
            f"{'x'.join(map(str, n['window'][-n['dims'] :]))}, {n['classes']} classes, {n['maps']} maps"
        )

    def data(r):
        return " + ".join(f"{name} {mib(size)}" for name, size in r["data"].items())

    def ratio(r):
        value = r["increase"] / r["data_bytes"]
        return f"**{value:.2f}** ({'met' if value <= MEMORY_TARGET else 'MISSED'})"

    lines = [
        ("network (random weights)", network),
        ("graph GFLOP per window", lambda r: f"{r['graph_flops'] / 1e9:.2f}"),
        ("windows (overlap 0.5)", lambda r: str(r["windows"])),
        ("wall time of predict(), s", lambda r: f"{r['pipeline_s']:.1f}"),
        ("time inside ORT, s", lambda r: f"{r['ort_s']:.1f}"),
        ("  preprocess / stitch+reduce / postprocess, s", _breakdown),
        ("RSS before predict (model + ORT arena), MiB", lambda r: mib(r["rss_before"])),
        ("peak RSS, MiB", lambda r: mib(r["peak_rss"])),
        ("peak increase during predict, MiB", lambda r: mib(r["increase"])),
        ("input + outputs, MiB", lambda r: mib(r["data_bytes"])),
        ("  of which, MiB", data),
        (
            "  accumulator buffer (K + U + 1) x window depth x Y x X float32, MiB",
            lambda r: mib(r["accumulator_bytes"]),
        ),
        (f"peak increase / (input + outputs), target <= {MEMORY_TARGET:g}", ratio),
    ]
    print("| | " + " | ".join(r["case"] for r in rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    for label, cell in lines:
        print(f"| {label} | " + " | ".join(cell(r) for r in rows) + " |")


def _breakdown(row: dict) -> str:
    t = row["timings"]
    stitch = t["inference"] - t["ort_seconds"]
    return f"{t['preprocess']:.2f} / {stitch:.2f} / {t['postprocess']:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="per-window timing repeats (median)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch eager comparison")
    parser.add_argument(
        "--ct", action="store_true", help="add the CT-size case (512x512x300, ~2 min on two idle cores)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny images and networks: checks the code paths"
    )
    parser.add_argument("--json", type=Path, help="also write every row to this JSON file")
    parser.add_argument(
        "--only", choices=(*CASES, "bundled"), help="run one case in this process, print it as JSON"
    )
    args = parser.parse_args(argv)
    cases = QUICK_CASES if args.quick else CASES
    if args.only is not None:
        options = {"repeats": args.repeats, "with_torch": not args.no_torch, "quick": args.quick}
        if args.only == "bundled":
            row = run_bundled(**options)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                row = run_case(cases[args.only], Path(tmp), device=args.device, **options)
        print(json.dumps(row))
        return 0
    print(header())
    rows = {}
    keys = ["3d", "2d", "bundled"] + (["ct3d", "ct2d"] if args.ct else [])
    for key in keys:
        # One process per case: RSS figures would otherwise include what the previous case left in the heap.
        start = time.perf_counter()
        command = [sys.executable, __file__, "--only", key, "--device", args.device]
        command += ["--repeats", str(args.repeats)]
        command += ["--no-torch"] * args.no_torch + ["--quick"] * args.quick
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return result.returncode
        rows[key] = json.loads(result.stdout.strip().splitlines()[-1])
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(
            f"# {rows[key]['case']}: measured in {time.perf_counter() - start:.0f} s; load average {load}",
            flush=True,
        )
    print()
    print_table([rows["3d"], rows["2d"]])
    print()
    print_peak_table([rows["3d"], rows["2d"], rows["bundled"]])
    if args.ct:
        print()
        print_ct_table([rows["ct3d"], rows["ct2d"]])
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json is not None:
        args.json.write_text(json.dumps({"header": header(), "rows": rows}, indent=1))
    return 0


def header() -> str:
    import onnxruntime

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    if openvino_installed():
        import openvino

        openvino_version = openvino.__version__
    else:
        openvino_version = "not installed"
    return (
        f"# {platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{physical_cores()} ORT/torch/BLAS threads; onnxruntime {onnxruntime.__version__}, torch {torch_version}, "
        f"openvino {openvino_version}, numpy {np.__version__}, Python {platform.python_version()}; "
        f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


if __name__ == "__main__":
    sys.exit(main())
