"""Start a run from a trained model's weights (``init.from_checkpoint``, ``medcl-train --init-from``).

The source is a training checkpoint (``checkpoint_best.pt``: :data:`training.checkpoint.CHECKPOINT_FORMAT`),
a weights file (:data:`WEIGHTS_FORMAT`: a small dict with the network's ``state_dict``, the resolved config
and the ModelSpec, as shipped beside each bundled ONNX model), a bare ``state_dict`` (``training.pretrain``'s
``network.pt``; without a spec, the heads' shapes say whether the classes differ), or a bundled model's name, resolved through
``napari_medcl/models/manifest.json`` (its ``weights`` entry, SHA-256 checked). Every file is read with
``torch.load(weights_only=True)``.

Only the network's weights are taken: optimizer, schedule and epoch count start afresh, since fine-tuning is
a new run. Every layer must have the shape this run's network gives it; otherwise :class:`InitError` lists
the layers that differ, one line each. When the dataset's classes differ from the checkpoint's (names or
number), the output heads (the 1x1 segmentation head and the deep-supervision heads: :data:`HEAD_PREFIXES`)
keep the fresh, seeded initialisation if ``init.reinit_heads`` is true; without it the run stops and says so.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_medcl.errors import MedclError
from training.checkpoint import WEIGHTS_ONLY_FAILURES

__all__ = [
    "HEAD_PREFIXES",
    "WEIGHTS_FORMAT",
    "InitError",
    "InitialWeights",
    "apply_initial_weights",
    "initial_state",
    "load_initial_weights",
    "resolve_init_source",
    "save_weights_file",
]

WEIGHTS_FORMAT = "napari-medcl-weights"
# Parameters whose first axis is the number of classes, in both architectures (training/models).
HEAD_PREFIXES = ("head.", "deep_supervision_heads.")
MAX_LISTED_LAYERS = 25


class InitError(MedclError, ValueError):
    """The weights to start from cannot be used for this run; the message names the file and what differs."""


@dataclass(frozen=True, eq=False)
class InitialWeights:
    """What a run starts from: ``source`` as the user gave it, the file it resolved to and its SHA-256, the
    network's state dict, and the resolved config and ModelSpec dicts stored with it (None when absent)."""

    source: str
    path: Path
    sha256: str
    state_dict: Mapping[str, torch.Tensor]
    config: Mapping[str, Any] | None
    spec: Mapping[str, Any] | None

    @property
    def class_names(self) -> list[str] | None:
        classes = (self.spec or {}).get("classes")
        if not classes:
            return None
        return [str(c["name"]) for c in sorted(classes, key=lambda c: int(c["index"]))]

    def record(self) -> dict[str, Any]:
        """Plain JSON facts for the run's ModelSpec and log: source, file name, SHA-256, model name."""
        return {
            "source": self.source,
            "file": self.path.name,
            "sha256": self.sha256,
            "model": (self.spec or {}).get("name"),
        }


def resolve_init_source(source: str | Path, *, models_dir: Path | None = None) -> tuple[Path, str | None]:
    """(file, SHA-256 the manifest promises or None) for a checkpoint path or a bundled model's name."""
    text = str(source)
    path = Path(text).expanduser()
    if isinstance(source, Path) or path.suffix in (".pt", ".pth") or "/" in text or path.exists():
        if not path.is_file():
            raise InitError(f"init.from_checkpoint {text}: no such checkpoint file")
        return path, None
    from napari_medcl.errors import ModelError
    from napari_medcl.onnx_session import bundled_weights

    try:
        return bundled_weights(text, models_dir=models_dir)
    except ModelError as error:
        raise InitError(f"init.from_checkpoint: {error}") from None


def load_initial_weights(source: str | Path, *, models_dir: Path | None = None) -> InitialWeights:
    """Resolve ``source``, check the manifest's SHA-256 when it has one, and read the file weights-only."""
    from training.checkpoint import CHECKPOINT_FORMAT

    path, expected = resolve_init_source(source, models_dir=models_dir)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InitError(f"{path}: cannot be read ({error.strerror or error})") from None
    sha = hashlib.sha256(data).hexdigest()
    if expected is not None and sha != expected.lower():
        raise InitError(
            f"{path}: SHA-256 {sha} does not match the manifest ({expected}); the file is damaged"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except WEIGHTS_ONLY_FAILURES as error:  # not ours; never a reason to unpickle arbitrary objects
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InitError(
            f"{path}: not a readable checkpoint (torch.load, weights only: {first[:160]})"
        ) from None
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        # A bare state dict, such as training.pretrain's network.pt: weights without a config or spec.
        return InitialWeights(
            source=str(source), path=path, sha256=sha, state_dict=state, config=None, spec=None
        )
    if not isinstance(state, dict) or state.get("format") not in (CHECKPOINT_FORMAT, WEIGHTS_FORMAT):
        raise InitError(
            f"{path}: not a napari-medcl checkpoint, weights file or network state dict; "
            "start from checkpoint_best.pt of a run, a network state dict or a bundled model's name"
        )
    weights = state.get("model")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise InitError(f"{path}: has no network weights ('model' state dict)")
    return InitialWeights(
        source=str(source),
        path=path,
        sha256=sha,
        state_dict=weights,
        config=state.get("config"),
        spec=state.get("spec"),
    )


def apply_initial_weights(
    model: nn.Module,
    weights: InitialWeights,
    *,
    class_names: Sequence[str],
    reinit_heads: bool,
    extra_input_channels: int = 0,
) -> list[str]:
    """Copy ``weights`` into ``model`` (the bare network, in place); returns lines for the run's log.
    What is copied, and the errors, are those of :func:`initial_state`."""
    given, lines, skip_heads = _initial_state(
        model, weights, class_names=class_names, reinit_heads=reinit_heads,
        extra_input_channels=extra_input_channels,
    )  # fmt: skip
    model.load_state_dict(given, strict=not skip_heads)
    return lines


def initial_state(
    model: nn.Module,
    weights: InitialWeights,
    *,
    class_names: Sequence[str],
    reinit_heads: bool,
    extra_input_channels: int = 0,
) -> dict[str, torch.Tensor]:
    """The tensors ``apply_initial_weights`` copies into ``model``, by name, in ``model``'s shapes (the
    output heads left out when they start afresh; widened input layers with their zero channels). The
    weight anchor (``training.start_weights``) pulls toward them. ``model`` is not changed.

    ``extra_input_channels``: this network takes that many more input channels than the checkpoint's (the
    prompt channels of ``model.prompts``, after the image's). The layers that read the input (a weight of
    the checkpoint's shape but for that many more input channels on axis 1) are expanded: the checkpoint's
    weights for the image channels, zero for the new ones, so the network starts out computing exactly what
    the checkpoint's did whatever the new channels hold; the log names them.

    ``class_names``: the dataset's classes. InitError when they differ from the checkpoint's and
    ``reinit_heads`` is false, or when any layer (heads excepted when they are re-initialised) is missing,
    unexpected or of another shape."""
    return _initial_state(
        model, weights, class_names=class_names, reinit_heads=reinit_heads,
        extra_input_channels=extra_input_channels,
    )[0]  # fmt: skip


def _initial_state(
    model: nn.Module,
    weights: InitialWeights,
    *,
    class_names: Sequence[str],
    reinit_heads: bool,
    extra_input_channels: int = 0,
) -> tuple[dict[str, torch.Tensor], list[str], bool]:
    """(state to load, log lines, whether the heads are left out): the work of ``apply_initial_weights``."""
    theirs = weights.class_names
    ours = list(class_names)
    classes_differ = theirs is not None and theirs != ours
    if theirs is None:
        # No spec: the heads' shapes are the only evidence of the classes.
        head = weights.state_dict.get("head.weight")
        classes_differ = head is not None and int(head.shape[0]) != len(ours)
    if classes_differ and not reinit_heads:
        their_text = ", ".join(theirs) if theirs is not None else "another number of classes"
        raise InitError(
            f"{weights.path}: its classes ({their_text}) differ from the dataset's ({', '.join(ours)}); set "
            "init.reinit_heads: true to start the output heads afresh and keep every other layer"
        )
    skip_heads = classes_differ and reinit_heads
    own = model.state_dict()
    given = dict(weights.state_dict)
    if skip_heads:
        own = {k: v for k, v in own.items() if not k.startswith(HEAD_PREFIXES)}
        given = {k: v for k, v in given.items() if not k.startswith(HEAD_PREFIXES)}
    expanded = []
    if extra_input_channels:
        given, expanded = _expand_inputs(own, given, extra_input_channels)
    problems = layer_differences(own, given)
    if problems:
        shown = problems[:MAX_LISTED_LAYERS]
        more = len(problems) - len(shown)
        raise InitError(
            f"{weights.path}: {len(problems)} layer(s) differ from this config's network; make model.* match "
            "the checkpoint's config"
            + "".join(f"\n  {line}" for line in shown)
            + (f"\n  ... and {more} more" if more else "")
        )
    lines = [
        f"init: weights from {weights.source} ({weights.path.name}, sha256 {weights.sha256[:12]}): "
        f"{len(given)} tensors loaded"
    ]
    if expanded:
        lines.append(
            f"init: {extra_input_channels} input channel(s) added to {', '.join(expanded)}: their weights "
            "start at zero, so the network starts equal to the checkpoint's"
        )
    if skip_heads:
        missing = set(model.state_dict()) - set(given)
        heads = sorted({k.rsplit(".", 1)[0] for k in missing})
        lines.append(
            f"init: classes {', '.join(ours)} differ from the checkpoint's ({', '.join(theirs or ['?'])}): "
            f"output heads started afresh ({', '.join(heads)})"
        )
    return given, lines, skip_heads


def _expand_inputs(
    own: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], extra: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``given`` with every input-reading weight widened by ``extra`` zero input channels (see
    ``apply_initial_weights``), and the names of the layers widened."""
    out = dict(given)
    names = []
    for key, theirs in given.items():
        mine = own.get(key)
        if mine is None or theirs.ndim < 3 or mine.ndim != theirs.ndim:
            continue
        if (
            mine.shape[1] - theirs.shape[1] == extra
            and mine.shape[:1] + mine.shape[2:] == theirs.shape[:1] + theirs.shape[2:]
        ):
            wide = torch.zeros(mine.shape, dtype=theirs.dtype)
            wide[:, : theirs.shape[1]] = theirs
            out[key] = wide
            names.append(key.rsplit(".", 1)[0])
    if not names:
        raise InitError(
            f"no layer of the checkpoint reads the input with {extra} fewer channels than this network's; "
            "model.prompts expects a checkpoint of the same network without prompt channels"
        )
    return out, names


def layer_differences(own: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list[str]:
    """One plain line per layer that differs between this network's state dict and the checkpoint's."""
    lines = []
    for key in own:
        if key not in given:
            lines.append(f"{key}: not in the checkpoint (this network: {_shape(own[key])})")
        elif tuple(own[key].shape) != tuple(given[key].shape):
            lines.append(f"{key}: checkpoint {_shape(given[key])}, this network {_shape(own[key])}")
    lines += [f"{key}: in the checkpoint only ({_shape(given[key])})" for key in given if key not in own]
    return lines


def _shape(tensor: torch.Tensor) -> str:
    return "[" + ", ".join(str(int(s)) for s in tensor.shape) + "]"


def save_weights_file(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    config: Mapping[str, Any],
    spec: Mapping[str, Any],
    notes: str = "",
) -> Path:
    """Write a weights file (:data:`WEIGHTS_FORMAT`) atomically: what a bundled model ships beside its ONNX."""
    from napari_medcl.atomic import atomic_path

    state = {
        "format": WEIGHTS_FORMAT,
        "model": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        "config": dict(config),
        "spec": dict(spec),
        "notes": notes,
    }
    path = Path(path)
    with atomic_path(path) as temp:
        torch.save(state, temp)
    return path
