"""Training checkpoints: atomic writes, weights-only loading, validation, and every RNG state.

A checkpoint is a plain dict that ``torch.load(weights_only=True)`` can read back, so nothing in it may be an
arbitrary Python object: tensors, numbers, strings, lists, tuples and dicts only (RNG states are converted to
tensors and ints here). It holds:

=================  ======================================================================================
``format``         :data:`CHECKPOINT_FORMAT`, to tell our files from any other ``.pt``
``config_version`` the config schema version (:data:`training.config.CONFIG_VERSION`)
``config``         the resolved :class:`~training.config.TrainConfig` as a plain dict
``epoch``          number of completed epochs (1-based: 1 after the first epoch)
``model``          model ``state_dict`` (never a DDP or compiled wrapper's: keys have no prefixes)
``losses``         ``state_dict`` of the loss modules with parameters (PDCR's cross-layer projections)
``optimizer``      optimizer ``state_dict`` (model and loss parameters)
``scheduler``      LR scheduler ``state_dict``
``scaler``         GradScaler ``state_dict`` or None
``rng``            per process, :func:`capture_rng_state` of python, numpy, torch CPU/CUDA and the run's generator
``sampler``        ``{"seed": int, "epoch": int}`` of the patch sampler
``spec``           the :class:`napari_medcl.spec.ModelSpec` dict (what export embeds in the ONNX file)
``history``        the per-epoch metrics records written so far (so a resumed run rewrites metrics.jsonl)
``best``           ``{"epoch": int, "mean_dice": float}`` of the best validation so far
=================  ======================================================================================

Loading never falls back to ``weights_only=False`` (reliability.md §2.1).

:func:`save_run_checkpoint` and :func:`restore_run` turn a run's state into that dict and back; restoring
every state above is why a resumed run on CPU reproduces the uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from napari_medcl.errors import MedclError
from training.config import (
    CONFIG_VERSION,
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    migrate,
)
from training.runtime import Runtime, rank_seed

if TYPE_CHECKING:
    from training.building import TrainingParts

CHECKPOINT_FORMAT = "napari-medcl-checkpoint"
REQUIRED_KEYS = (
    "format",
    "config_version",
    "config",
    "epoch",
    "model",
    "losses",
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "sampler",
    "spec",
    "history",
    "best",
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "RunProgress",
    "capture_rng_state",
    "checkpoint_config",
    "load_checkpoint",
    "restore_rng_state",
    "restore_run",
    "save_checkpoint",
    "save_run_checkpoint",
]

# Arbitrary bytes make torch's weights-only unpickler fail in many ways (KeyError, IndexError, ...): each means
# "not a file of ours", never a reason to fall back to full unpickling. training.init_weights catches the same.
WEIGHTS_ONLY_FAILURES = (
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    EOFError,
    RuntimeError,
    ValueError,
    OSError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
)


# How the validation Dice in a checkpoint's "best" was measured: through napari_medcl.predict on the cases' own
# files (training.validation). Checkpoints without it measured on the preprocessed grid.
VALIDATION_KIND = "predictor"


class CheckpointError(MedclError, ValueError):
    """A checkpoint is missing, not ours, damaged, incomplete, or from an incompatible config version."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a kill mid-write leaves the previous file intact."""
    from napari_medcl.atomic import atomic_path

    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as file:
        recording = _RecordingFile(file)
        try:
            torch.save(state, recording)
        except RuntimeError:
            # torch reports a failed write (a full disk) only as "enforce fail ... unexpected pos N vs M";
            # atomic_path turns the OSError itself into an OutputError saying "disk full".
            if recording.error is not None:
                raise recording.error from None
            raise


class _RecordingFile:
    """A binary file that keeps the OSError of a failed write, which ``torch.save`` would otherwise hide."""

    def __init__(self, file: Any):
        self._file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self._file.flush()


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint with ``torch.load(weights_only=True)``; CheckpointError if unusable.

    An older ``config_version`` is migrated (``training.config.migrate``) where a migration exists.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except WEIGHTS_ONLY_FAILURES as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            path, f"not a readable napari-medcl checkpoint (torch.load, weights only: {first[:160]})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(path, "not a napari-medcl checkpoint (no 'format' marker)")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(path, f"incomplete checkpoint, missing {', '.join(missing)}")
    version = state["config_version"]
    if version != CONFIG_VERSION:
        try:
            state["config"] = migrate({**state["config"], "config_version": version}, source=str(path))
        except ConfigError as error:
            raise CheckpointError(path, f"written with config_version {version}: {error}") from None
        state["config_version"] = CONFIG_VERSION
    return state


def checkpoint_config(state: dict[str, Any], path: str | Path = "checkpoint") -> TrainConfig:
    """The resolved TrainConfig stored in a loaded checkpoint."""
    try:
        return config_from_dict(state["config"], source=f"{path} (stored config)")
    except ConfigError as error:
        raise CheckpointError(path, str(error)) from None


def capture_rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every random state the run draws from, as weights-only-safe values (tensors, ints, tuples)."""
    version, keys, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "keys": torch.tensor(keys, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state() if generator is not None else None,
    }
    return state


def restore_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Put back what :func:`capture_rng_state` saved (CUDA states only when as many devices are present)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(k) for k in py["keys"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"].cpu())


# ---------------------------------------------------------------------------------------------- a run's state


@dataclass
class RunProgress:
    """How far a run has come: epochs completed, their metrics records, and the best validation so far
    (``best["validation"]`` says how that Dice was measured: ``VALIDATION_KIND``)."""

    epochs_done: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": None, "mean_dice": None})

    def add(self, record: dict[str, Any]) -> bool:
        """Count one more epoch with its metrics record; True when its validation is the best so far."""
        self.epochs_done = record["epoch"]
        self.history.append(record)
        val = record["val"]
        improved = val is not None and (
            self.best["mean_dice"] is None or val["mean_dice"] > self.best["mean_dice"]
        )
        if improved:
            self.best = {
                "epoch": record["epoch"],
                "mean_dice": val["mean_dice"],
                "validation": VALIDATION_KIND,
            }
        return improved


def save_run_checkpoint(
    out: Path,
    cfg: TrainConfig,
    parts: TrainingParts,
    runtime: Runtime,
    progress: RunProgress,
    spec: dict[str, Any],
    *,
    last: str,
    best: str | None,
    trained_model: dict[str, Any] | None = None,
) -> None:
    """Write the run's state to ``out / last`` (and ``out / best`` when given), on rank 0.

    Every process takes part: each one's random states are gathered so that a resume restores them all.
    ``trained_model``: the network's trained state when ``parts.model`` holds other weights for the result
    (``init.weight_mix``): kept as ``trained_model``, which a resume continues from.
    """
    dist = runtime.dist
    rng = capture_rng_state(parts.generator)
    if dist.world_size > 1:
        gathered: list[Any] = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, rng)
        per_rank = [_to_cpu(r) for r in gathered]
    else:
        per_rank = [rng]
    if not dist.is_main:
        return
    scaler = runtime.scaler
    state = {
        "format": CHECKPOINT_FORMAT,
        "config_version": CONFIG_VERSION,
        "config": config_to_dict(cfg),
        "epoch": progress.epochs_done,
        "model": parts.model.state_dict(),
        "losses": parts.losses.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "rng": per_rank,
        "sampler": {"seed": cfg.train.seed, "epoch": progress.epochs_done},
        "spec": spec,
        "history": list(progress.history),
        "best": dict(progress.best),
    }
    if trained_model is not None:
        state["trained_model"] = trained_model
    save_checkpoint(state, out / last)
    if best is not None:
        save_checkpoint(state, out / best)


def restore_run(
    state: dict[str, Any], parts: TrainingParts, runtime: Runtime, seed: int
) -> tuple[RunProgress, str | None]:
    """Put a loaded checkpoint's states back into ``parts`` and ``runtime``'s scaler; (progress, note).

    The note, else None, says that the checkpoint came from another number of processes, whose random
    streams cannot be matched: they are re-seeded from ``seed``, the rank and the epoch instead.
    """
    dist = runtime.dist
    # A run with init.weight_mix saved its result as "model" and goes on from the trained weights.
    parts.model.load_state_dict(state.get("trained_model") or state["model"])
    parts.losses.load_state_dict(state["losses"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] is not None:
        runtime.scaler.load_state_dict(state["scaler"])
    best, notes = dict(state["best"]), []
    if best.get("mean_dice") is not None and best.get("validation") != VALIDATION_KIND:
        # A Dice measured another way cannot be compared with the ones to come.
        notes.append(
            f"the best validation Dice so far ({best['mean_dice']:.4f}, epoch {best['epoch']}) was measured on "
            "the preprocessed grid, before validation ran through the product's predictor: "
            "checkpoint_best.pt is chosen anew from the next validation on"
        )
        best = {"epoch": None, "mean_dice": None}
    progress = RunProgress(epochs_done=int(state["epoch"]), history=list(state["history"]), best=best)
    per_rank = state["rng"]
    if len(per_rank) == dist.world_size:
        restore_rng_state(per_rank[dist.rank], parts.generator)
    else:
        restore_rng_state(per_rank[0], None)
        parts.generator.manual_seed(rank_seed(seed, 7, dist.rank, progress.epochs_done))
        notes.append(
            f"checkpoint was written by {len(per_rank)} processes, this run has {dist.world_size}: "
            "random streams are re-seeded, so losses will not match an uninterrupted run exactly"
        )
    return progress, "; ".join(notes) or None


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value
