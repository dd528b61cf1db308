"""A torch network as an inference session: what training validates with and ``medcl-evaluate`` scores a
checkpoint with.

``TorchSession`` has the shape of ``napari_medcl.session.InferenceSession``, so a torch network runs through
``napari_medcl.predict`` like an exported model: the same reading, cropping, normalisation, resampling,
windows, Gaussian stitching and label rules. Its outputs are those of the ONNX graph (``InferenceWrapper``):
softmax probabilities in float32 and, when the spec names UAFR maps, every block's map on the window's grid.
A checkpoint's validation Dice is therefore the Dice ``medcl-predict`` gives with its export.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_medcl.errors import PredictionError, UsageError
from napari_medcl.spec import ModelSpec
from training.models.inference_wrapper import InferenceWrapper

__all__ = ["TorchSession", "load_checkpoint_session"]


class TorchSession:
    """Runs ``model`` (a registry network) on batches of windows, in eval mode and without gradients; the
    model's own mode is restored after each batch, so training can validate mid-run.

    ``autocast``: a context-manager factory for mixed precision (training's AMP), None for float32.
    ``path``/``sha256``: the checkpoint the network came from, for provenance (None during training)."""

    def __init__(
        self,
        model: nn.Module,
        spec: ModelSpec,
        *,
        device: torch.device | str = "cpu",
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
        path: Path | None = None,
        sha256: str | None = None,
    ):
        names = tuple(getattr(model, "uncertainty_names", ()))
        if tuple(spec.uncertainty_maps) not in ((), names):
            raise ValueError(
                f"spec {spec.name!r} names the UAFR maps {list(spec.uncertainty_maps)}, the network has {list(names)}"
            )
        self.model = model
        self.spec = spec
        self.device = torch.device(device)
        self.autocast = autocast or contextlib.nullcontext
        self.path = path
        self.sha256 = sha256
        self.provider = f"torch ({self.device})"

    def run(
        self, batch: np.ndarray, prompts: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """batch float32 (N, C, *S) -> probabilities (N, K, *S), UAFR maps (N, U, *S) or None. ``prompts``
        (N, P, *S): the prompt channels of a model with ``spec.prompts`` (None: all zero, an automatic
        prediction)."""
        was_training = self.model.training
        try:
            channels = len(self.spec.prompts["channels"]) if self.spec.prompts is not None else 0
            wrapper = InferenceWrapper(self.model, prompt_channels=channels)  # puts the network in eval mode
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            extra = (wrapper.prompt_channels,) if self.spec.prompts is not None else ()
            if extra:
                p = (
                    torch.zeros((x.shape[0], extra[0], *x.shape[2:]), dtype=x.dtype, device=x.device)
                    if prompts is None
                    else torch.from_numpy(np.ascontiguousarray(prompts, dtype=np.float32)).to(self.device)
                )
                extra = (p,)
            with torch.no_grad(), self.autocast():
                outputs = wrapper(x, *extra)
        except RuntimeError as error:  # e.g. CUDA out of memory, a shape the network cannot take
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise PredictionError(
                f"network {self.spec.name!r} failed on an input of shape {batch.shape}: {first}"
            ) from error
        finally:
            self.model.train(was_training)
        probabilities = outputs[0].float().cpu().numpy()
        if not self.spec.uncertainty_maps:
            return probabilities, None
        return probabilities, outputs[1].float().cpu().numpy()


def load_checkpoint_session(
    path: Path, device: str = "auto", *, uncertainty_maps: bool = False
) -> tuple[TorchSession, Any]:
    """(TorchSession running the checkpoint's network, its TrainConfig).

    ``device``: auto (CUDA when torch sees a GPU), cpu or cuda (a UsageError without one). Without
    ``uncertainty_maps`` the session returns probabilities only (scoring needs labels alone). Raises what
    ``training.trained_network.load_trained_network`` raises for a file that is not a usable checkpoint."""
    from training.trained_network import load_trained_network

    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA GPU")
    target = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    network = load_trained_network(path)
    spec = network.spec if uncertainty_maps else dataclasses.replace(network.spec, uncertainty_maps=())
    session = TorchSession(
        network.model.to(target), spec, device=target, path=network.path, sha256=network.sha256
    )
    return session, network.config
