"""What a prediction runs its windows through: an inference session.

``predict_iter`` takes any object with this shape. The product's own are ``LoadedModel`` (an ONNX Runtime
session on a checked ``.onnx`` file, ``napari_medcl.onnx_session``) and ``OpenVINOSession`` (OpenVINO on the
same bytes, ``napari_medcl.openvino_session``); training validates and ``medcl-evaluate``
scores a checkpoint with a torch session (``training.torch_session.TorchSession``) through the same
preprocessing, windows, stitching and rules, so a checkpoint's Dice is the one its export would give.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from napari_medcl.errors import PredictionError
from napari_medcl.spec import ModelSpec


@runtime_checkable
class InferenceSession(Protocol):
    """A model ready to run: ``spec`` describes it; ``provider`` says where it runs (e.g.
    ``CPUExecutionProvider``, ``OpenVINO CPU bf16``, ``torch (cuda:0)``); ``path`` and ``sha256`` name the file it came from (for
    provenance; None when it has none)."""

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def provider(self) -> str: ...

    @property
    def path(self) -> Path | None: ...

    @property
    def sha256(self) -> str | None: ...

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """batch float32 (N, C, *S) -> probabilities (N, K, *S) float32 and the UAFR maps (N, U, *S) float32
        in network order, or None when ``spec.uncertainty_maps`` is empty. The product's sessions also take
        ``run(batch, prompts)`` for a model with prompt channels (``spec.prompts``; ``graph_inputs``), and
        ``run(batch, with_features=True)`` for a model with window features (``spec.features``), which adds
        them (N, F) as a third item; a session whose spec has no ``features`` is never asked for them."""
        ...


def checked_outputs(
    session: InferenceSession, batch: np.ndarray, names: list[str], outputs: list[np.ndarray]
) -> tuple[np.ndarray, ...]:
    """The outputs ``names`` of one run of ``session`` on ``batch`` as (probabilities, maps or None) float32,
    and the window features (N, F) when ``names`` ends with ``features``.

    Raises PredictionError when they do not have the shapes the spec promises."""
    spec = session.spec
    n, spatial = batch.shape[0], tuple(batch.shape[2:])
    expected = {
        "probabilities": (n, spec.num_classes, *spatial),
        "uafr_uncertainty": (n, len(spec.uncertainty_maps), *spatial),
    }
    if spec.features is not None:
        expected["features"] = (n, spec.features["channels"])
    for name, array in zip(names, outputs):
        shape = expected[name]
        if array.shape != shape:
            raise PredictionError(
                f"model {spec.name!r} ({session.path}) returned {name} of shape {array.shape} for an input "
                f"of shape {batch.shape}; expected {shape}"
            )
    probs = np.asarray(outputs[0], dtype=np.float32)
    maps = np.asarray(outputs[1], dtype=np.float32) if spec.uncertainty_maps else None
    if names[-1] == "features":
        return probs, maps, np.asarray(outputs[-1], dtype=np.float32)
    return probs, maps


def graph_inputs(
    spec: ModelSpec, batch: np.ndarray, prompts: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The graph's inputs by name: ``image`` = ``batch`` (N, C, *S) and, for a model with prompt channels
    (``spec.prompts``), ``prompts`` (N, P, *S): as given, or all zero (an automatic prediction) when None.
    PredictionError when prompts are given to a model without them or have the wrong shape."""
    inputs = {"image": np.ascontiguousarray(batch, dtype=np.float32)}
    if spec.prompts is None:
        if prompts is not None:
            raise PredictionError(f"model {spec.name!r} takes no prompt channels")
        return inputs
    expected = (batch.shape[0], len(spec.prompts["channels"]), *batch.shape[2:])
    if prompts is None:
        prompts = np.zeros(expected, dtype=np.float32)
    if tuple(prompts.shape) != expected:
        raise PredictionError(
            f"model {spec.name!r}: prompts of shape {tuple(prompts.shape)} for an image batch of shape "
            f"{tuple(batch.shape)}; expected {expected}"
        )
    inputs["prompts"] = np.ascontiguousarray(prompts, dtype=np.float32)
    return inputs


def run_checked(
    session: InferenceSession,
    batch: np.ndarray,
    infer: Callable[[list[str], dict[str, np.ndarray]], list[np.ndarray]],
    prompts: np.ndarray | None = None,
    with_features: bool = False,
) -> tuple[np.ndarray, ...]:
    """One run of a session's graph: ``infer(output names, inputs by name)`` gives the outputs (inputs:
    ``graph_inputs``: the batch float32 (N, C, *S) and a prompt model's ``prompts``); a failure of the engine
    becomes one PredictionError line naming the model, and the outputs are checked (``checked_outputs``). The
    ONNX Runtime and OpenVINO sessions differ only in ``infer``. ``with_features``: also return the window
    features (the spec's ``features`` output); PredictionError for a model without them."""
    spec = session.spec
    want = ["probabilities"] + (["uafr_uncertainty"] if spec.uncertainty_maps else [])
    if with_features:
        if spec.features is None:
            raise PredictionError(f"model {spec.name!r} ({session.path}) has no window features output")
        want.append("features")
    inputs = graph_inputs(spec, batch, prompts)
    try:
        outputs = infer(want, inputs)
    except Exception as error:  # the engines' own error classes, often with multi-line messages
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PredictionError(
            f"model {spec.name!r} ({session.path}) failed on an input of shape {batch.shape}: {first}"
        ) from None
    return checked_outputs(session, batch, want, outputs)
