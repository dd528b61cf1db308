"""A training checkpoint -> the trained network (weights loaded strictly) and its ModelSpec.

The one loader behind ``medcl-export`` (``export.load_checkpoint_model``), ``medcl-evaluate`` on a checkpoint
and the accuracy benchmark (``training.torch_session.load_checkpoint_session``). Reading goes through
``training.checkpoint.load_checkpoint``: ``torch.load(weights_only=True)`` and never a fallback to full
unpickling, so a checkpoint carrying a pickle payload is refused before any of it runs. The network is
rebuilt from the checkpoint's own resolved config with ``training.building.build_model`` (the builder training
used; pretrained encoder weights are not read again, they are in the state dict), and the ModelSpec is the
one training stored beside the weights, cross-checked against the rebuilt network.

Every problem is one line naming the file: ``CheckpointError`` for a file that is not a napari-medcl
checkpoint, an incomplete one, or one written by an incompatible config version; ``NetworkMismatchError``
when the weights do not fit the architecture or the stored spec contradicts it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_medcl.errors import MedclError
from napari_medcl.spec import ModelSpec, SpecError

__all__ = ["NetworkMismatchError", "TrainedNetwork", "check_spec_matches_model", "load_trained_network"]


class NetworkMismatchError(MedclError, ValueError):
    """A checkpoint's weights, config and spec do not describe one network. One line; names the file."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


@dataclass(frozen=True, eq=False)
class TrainedNetwork:
    """``model``: the network in eval mode on CPU, weights loaded strictly; ``spec``: its ModelSpec;
    ``config``: the resolved ``TrainConfig``; ``epoch``: completed epochs; ``sha256``: of the file's bytes."""

    path: Path
    model: nn.Module
    spec: ModelSpec
    config: Any
    epoch: int
    sha256: str


def load_trained_network(path: str | Path) -> TrainedNetwork:
    """Load ``path`` (weights only), rebuild its network, load the state dict strictly, read its ModelSpec.

    Raises CheckpointError (not a checkpoint, incomplete, foreign config version) or NetworkMismatchError
    (weights that do not fit the architecture, a stored spec that is invalid or contradicts the network)."""
    from napari_medcl.io import sha256_file
    from training.building import build_model
    from training.checkpoint import CheckpointError, checkpoint_config, load_checkpoint
    from training.errors import RunError

    path = Path(path)
    try:
        state = load_checkpoint(path, map_location="cpu")
    except CheckpointError:
        raise
    except Exception as error:
        # The weights-only unpickler can fail on arbitrary bytes with any exception type (KeyError,
        # IndexError, UnicodeDecodeError...); whatever it is, the file is not a checkpoint we can read.
        raise CheckpointError(
            path, f"not a readable napari-medcl checkpoint (torch.load, weights only: {type(error).__name__})"
        ) from None
    cfg = checkpoint_config(state, path)
    try:
        spec = ModelSpec.from_dict(state["spec"])
    except SpecError as error:
        raise NetworkMismatchError(path, f"the stored ModelSpec is invalid: {error}") from None
    if spec.spatial_dims != cfg.model.spatial_dims:
        raise NetworkMismatchError(
            path,
            f"the stored spec is {spec.spatial_dims}D but the stored config builds a "
            f"{cfg.model.spatial_dims}D model",
        )
    # The pretrained encoder's weights are in the state dict already; its file may be gone.
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, encoder_weights=None))
    try:
        model = build_model(cfg, spec.in_channels, spec.num_classes)
    except RunError as error:
        raise NetworkMismatchError(
            path, f"cannot rebuild the network from the stored config: {error}"
        ) from None
    weights = state["model"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise NetworkMismatchError(path, "the 'model' entry is not a state dict of tensors")
    _load_strict(model, weights, path)
    model.eval()
    check_spec_matches_model(spec, model, path)
    return TrainedNetwork(
        path=path, model=model, spec=spec, config=cfg, epoch=int(state["epoch"]), sha256=sha256_file(path)
    )


def check_spec_matches_model(spec: ModelSpec, model: nn.Module, path: str | Path | None = None) -> None:
    """NetworkMismatchError unless the spec describes this network: dims, channels, classes, UAFR maps and divisor.

    The spec's divisor may be a multiple of the network's (a stricter promise), never something else."""
    problems = []
    if spec.spatial_dims != model.spatial_dims:
        problems.append(f"spatial_dims {spec.spatial_dims} vs the network's {model.spatial_dims}")
    prompt_channels = len(spec.prompts["channels"]) if spec.prompts is not None else 0
    if spec.in_channels + prompt_channels != model.in_channels:
        problems.append(
            f"in_channels {spec.in_channels} (+ {prompt_channels} prompt channels) vs the network's "
            f"{model.in_channels}"
        )
    if spec.num_classes != model.num_classes:
        problems.append(f"{spec.num_classes} classes vs the network's {model.num_classes}")
    if tuple(spec.uncertainty_maps) != tuple(model.uncertainty_names):
        problems.append(
            f"uncertainty_maps {list(spec.uncertainty_maps)} vs the network's UAFR blocks "
            f"{list(model.uncertainty_names)}"
        )
    divisor = tuple(int(d) for d in model.divisor)
    if len(spec.divisor) != len(divisor) or any(s % d for s, d in zip(spec.divisor, divisor)):
        problems.append(f"divisor {list(spec.divisor)} is not a multiple of the network's {list(divisor)}")
    if problems:
        raise NetworkMismatchError(
            path, "the ModelSpec does not describe the network: " + "; ".join(problems)
        )


def _load_strict(model: nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict(strict=True)`` with the mismatch summarised on one line."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [
        f"{k} {list(weights[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} with another shape (e.g. {'; '.join(shapes[:2])})")
    if problems:
        raise NetworkMismatchError(
            path, "the weights do not match the architecture of the stored config: " + ", ".join(problems)
        )
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:  # anything the checks above missed (dtype a copy cannot convert...)
        first = str(error).strip().splitlines()[0]
        raise NetworkMismatchError(path, f"the weights cannot be loaded: {first}") from None
