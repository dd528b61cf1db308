"""Inference benchmark: the whole predict() pipeline vs the time spent inside ONNX Runtime, and peak memory.

Run: ``.venv/bin/python benchmarks/inference.py`` (also ``make bench``). Two cases, side by side from one run:

- 3D: a 160x192x160 float32 volume, a 3D U-Net (16/32/64/128 channels, 96^3 windows, 4 classes, 2 UAFR maps);
- 2D: a 512x512 float32 image, a 2D U-Net (32/64/128/256 channels, 256^2 windows, 3 classes, 2 UAFR maps).

The networks have random weights and are built with onnx.helper from numpy arrays (no training code, no
exporter); when torch is installed the same weights run in a functional torch copy of the network, for the
per-window ORT/torch eager ratio and a parity check. Memory: peak RSS (VmHWM, reset through
/proc/self/clear_refs before each case) against the RSS just before predict(), after the model was loaded and
windows were run until the RSS settled (so ONNX Runtime's arena for the window is part of that baseline and
is reported apart).
Each case runs in its own process, so one case's freed-but-kept heap does not hide the next one's memory.
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_medcl.onnx_session import load_model, physical_cores
from napari_medcl.prediction import predict
from napari_medcl.spec import METADATA_KEY, ModelSpec, default_classes
from napari_medcl.volume import Volume

AUX_CHANNELS = 8  # channels of each UAFR block's auxiliary softmax


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    patch: tuple[int, ...]
    channels: tuple[int, ...]
    num_classes: int


CASES = (
    Case("3D 160x192x160", (160, 192, 160), (96, 96, 96), (16, 32, 64, 128), 4),
    Case("2D 512x512", (512, 512), (256, 256), (32, 64, 128, 256), 3),
)


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
    spatial_dims: int, channels: tuple[int, ...], weights: dict, spec: ModelSpec
) -> onnx.ModelProto:
    """The U-Net as an ONNX graph: image (N, 1, *S) -> probabilities (N, K, *S), uafr_uncertainty (N, 2, *S)."""
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
    upsampled = node("Resize", [maps[1], "", "scales"], mode="linear")
    uafr_out = helper.make_node("Concat", [upsampled, maps[0]], ["uafr_uncertainty"], axis=1)
    probs_out = helper.make_node("Softmax", [conv(x, "head", pad=0)], ["probabilities"], axis=1)
    constants = {
        "axis1": np.array([1], np.int64),
        "neg_inv_log_m": np.array(-1.0 / math.log(AUX_CHANNELS), np.float32),
        "two": np.array(2.0, np.float32),
        "scales": np.array([1.0, 1.0] + [2.0] * d, np.float32),
    }
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


def unet_torch(spatial_dims: int, channels: tuple[int, ...], weights: dict):
    """The same network in torch eager (functional, same weights); None when torch is not installed."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    d = spatial_dims
    conv, conv_t = (F.conv2d, F.conv_transpose2d) if d == 2 else (F.conv3d, F.conv_transpose3d)
    pool = F.max_pool2d if d == 2 else F.max_pool3d
    mode = "bilinear" if d == 2 else "trilinear"
    w = {k: torch.from_numpy(v) for k, v in weights.items()}

    def block(x, name):
        x = F.relu(conv(x, w[name + "a"], w[name + "a_b"], padding=1))
        return F.relu(conv(x, w[name + "b"], w[name + "b_b"], padding=1))

    def uafr(x, level):
        logp = F.log_softmax(conv(x, w[f"aux{level}"], w[f"aux{level}_b"]), dim=1)
        entropy = -(logp.exp() * logp).sum(1, keepdim=True) / math.log(AUX_CHANNELS)
        return x * (2.0 - entropy), entropy

    @torch.inference_mode()
    def forward(image: np.ndarray) -> np.ndarray:
        x, skips = torch.from_numpy(image), []
        for level in range(len(channels)):
            x = block(pool(x, 2) if level else x, f"enc{level}")
            skips.append(x)
        maps = {}
        for level in reversed(range(len(channels) - 1)):
            up = conv_t(x, w[f"up{level}"], w[f"up{level}_b"], stride=2)
            x = block(torch.cat([up, skips[level]], 1), f"dec{level}")
            if level in (0, 1):
                x, maps[level] = uafr(x, level)
        probs = F.softmax(conv(x, w["head"], w["head_b"]), dim=1)
        _ = torch.cat([F.interpolate(maps[1], scale_factor=2, mode=mode), maps[0]], 1)
        return probs.numpy()

    torch.set_num_threads(physical_cores())
    return forward


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


def interleaved_medians(functions: list, repeats: int) -> list[float]:
    """Median seconds of each function, calling them in turn ``repeats`` times so that all of them see the
    same background load (the machine may be shared)."""
    times = [[] for _ in functions]
    for _ in range(repeats):
        for fn, bucket in zip(functions, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def run_case(case: Case, folder: Path, *, device: str, repeats: int, with_torch: bool) -> dict:
    d = len(case.shape)
    spec = ModelSpec(
        name=f"bench-unet-{d}d",
        spatial_dims=d,
        in_channels=1,
        classes=default_classes(["background"] + [f"class{i}" for i in range(1, case.num_classes)]),
        patch_size=case.patch,
        divisor=(8,) * d,
        normalization={"kind": "zscore"},
        uncertainty_maps=("decoder2", "decoder1"),
    )
    weights = unet_weights(d, case.channels, case.num_classes, seed=d)
    path = folder / f"unet{d}d.onnx"
    onnx.save_model(unet_onnx(d, case.channels, weights, spec), str(path))
    image = np.random.default_rng(0).normal(100.0, 20.0, size=case.shape).astype(np.float32)
    volume = Volume(image, (1.0,) * d, (0.0,) * d, np.eye(d))

    rss_start = rss_bytes()
    model = load_model(path, device=device)
    window = np.random.default_rng(1).normal(size=(1, 1, *case.patch)).astype(np.float32)
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
    outputs = [prediction.labels, prediction.entropy, prediction.uafr_uncertainty]
    outputs += list(prediction.uncertainty_maps.values())
    data_bytes = image.nbytes + sum(v.array.nbytes for v in outputs)
    row = {
        "case": case.name,
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
        "data_bytes": data_bytes,
        "ort_window_s": None,
        "torch_window_s": None,
        "parity": None,
        "timings": timings,
    }
    del prediction, outputs
    # Per-window forward times, after predict() so that importing torch does not count in its memory.
    forward = unet_torch(d, case.channels, weights) if with_torch else None
    functions = [lambda: model.run(window)]
    if forward is not None:
        forward(window)  # warm-up
        functions.append(lambda: forward(window))
        row["parity"] = float(np.abs(forward(window) - model.run(window)[0]).max())
    medians = interleaved_medians(functions, repeats)
    row["ort_window_s"] = medians[0]
    row["torch_window_s"] = medians[1] if forward is not None else None
    return row


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


def _breakdown(row: dict) -> str:
    t = row["timings"]
    stitch = t["inference"] - t["ort_seconds"]
    return f"{t['preprocess']:.2f} / {stitch:.2f} / {t['postprocess']:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="per-window timing repeats (median)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch eager comparison")
    parser.add_argument("--only", choices=("3d", "2d"), help="run one case in this process, print it as JSON")
    args = parser.parse_args(argv)
    if args.only is not None:
        case = next(c for c in CASES if c.name.lower().startswith(args.only))
        with tempfile.TemporaryDirectory() as tmp:
            row = run_case(
                case, Path(tmp), device=args.device, repeats=args.repeats, with_torch=not args.no_torch
            )
        print(json.dumps(row))
        return 0
    print(header())
    rows = []
    for key in ("3d", "2d"):
        # One process per case: RSS figures would otherwise include what the previous case left in the heap.
        start = time.perf_counter()
        command = [
            sys.executable,
            __file__,
            "--only",
            key,
            "--device",
            args.device,
            "--repeats",
            str(args.repeats),
        ]
        result = subprocess.run(
            command + (["--no-torch"] if args.no_torch else []), capture_output=True, text=True
        )
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return result.returncode
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(f"# {rows[-1]['case']}: measured in {time.perf_counter() - start:.0f} s", flush=True)
    print_table(rows)
    return 0


def header() -> str:
    import onnxruntime

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    return (
        f"# {platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{physical_cores()} ORT/torch threads; onnxruntime {onnxruntime.__version__}, torch {torch_version}, "
        f"numpy {np.__version__}, Python {platform.python_version()}; "
        f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


if __name__ == "__main__":
    sys.exit(main())
