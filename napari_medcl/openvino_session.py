"""An OpenVINO session on the same checked ``.onnx`` file: the second CPU backend (``pip install napari-medcl[openvino]``).

OpenVINO reads the ONNX bytes that ``load_model`` hashed and checked, and compiles them for the CPU once
(the input shape stays dynamic, so windows of any shape run). ``precision`` is the CPU plugin's inference
precision: ``fp32``, or ``bf16`` on a CPU whose OpenVINO device reports ``BF16`` among its optimisation
capabilities (AVX512-BF16 or AMX); the graph's inputs and outputs stay float32 either way.

openvino is imported inside functions: ``import napari_medcl`` must stay light.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl.errors import ModelError, UsageError
from napari_medcl.spec import ModelSpec

PRECISIONS = ("auto", "fp32", "bf16")  # what ``precision=`` accepts; a session runs at fp32 or bf16
_HINTS = {"fp32": "f32", "bf16": "bf16"}


def openvino_installed() -> bool:
    """Whether the ``openvino`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("openvino") is not None


@functools.cache
def openvino_bf16_supported() -> bool:
    """Whether OpenVINO's CPU device computes in bfloat16 natively here (``BF16`` in its
    ``OPTIMIZATION_CAPABILITIES``); False when openvino is not installed; asked once."""
    if not openvino_installed():
        return False
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@dataclass(frozen=True, eq=False)
class OpenVINOSession:
    """A checked model compiled by OpenVINO for the CPU (implements ``InferenceSession``).

    ``provider`` names backend, device and precision, e.g. ``OpenVINO CPU fp32``; ``compiled`` is the
    ``openvino.CompiledModel``."""

    path: Path
    sha256: str
    spec: ModelSpec
    provider: str
    precision: str
    compiled: Any

    @property
    def name(self) -> str:
        return self.spec.name

    def run(
        self, batch: np.ndarray, prompts: np.ndarray | None = None, *, with_features: bool = False
    ) -> tuple[np.ndarray, ...]:
        """Run the graph on ``batch`` float32 (N, C, *S) -> probabilities (N, K, *S), maps (N, U, *S) or None;
        with ``with_features`` also the window features (N, F) (``LoadedModel.run``).

        Raises PredictionError when the outputs do not have the shapes the spec promises."""
        from napari_medcl.session import run_checked

        def infer(want: list[str], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
            # A request per call: the session may be shared between threads (the widget's workers).
            results = self.compiled.create_infer_request().infer(inputs)
            return [results[self.compiled.output(name)] for name in want]

        return run_checked(self, batch, infer, prompts, with_features)


def open_openvino(
    data: bytes, path: Path, sha256: str, spec: ModelSpec, *, precision: str, threads: int
) -> OpenVINOSession:
    """Compile the checked ONNX ``data`` for OpenVINO's CPU device at ``precision`` with ``threads``
    inference threads. UsageError for bf16 on a CPU without it; ModelError when OpenVINO cannot compile it."""
    if precision not in _HINTS:
        raise UsageError(f"precision must be fp32 or bf16 here, got {precision!r}")
    import openvino as ov

    core = ov.Core()
    if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        cpu = core.get_property("CPU", "FULL_DEVICE_NAME")
        raise UsageError(
            f"precision bf16 needs a CPU with bfloat16 support (AVX512-BF16 or AMX); this one ({cpu}) "
            "has none: use precision fp32"
        )
    config = {
        "INFERENCE_PRECISION_HINT": _HINTS[precision],
        "INFERENCE_NUM_THREADS": int(threads),
        "PERFORMANCE_HINT": "LATENCY",
    }
    try:
        compiled = core.compile_model(core.read_model(data), "CPU", config)
    except Exception as error:  # openvino raises RuntimeError for graphs it cannot read or compile
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(path, f"OpenVINO cannot compile it: {first}") from None
    return OpenVINOSession(
        path=path,
        sha256=sha256,
        spec=spec,
        provider=f"OpenVINO CPU {precision}",
        precision=precision,
        compiled=compiled,
    )
