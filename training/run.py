"""One training run, start to end: ``train(cfg)`` runs the experiment a :class:`~training.config.TrainConfig`
describes and writes into ``cfg.output.dir``::

    config.yaml          the resolved config (every key)
    train.log            text log; the first line says ``world size N``
    metrics.jsonl        one JSON object per epoch: {"epoch", "train": {"loss", "ce", "dice", "pdcr"?,
                         "ccdc"?}, "val": {"dice": {class: v}, "mean_dice", "cases"} or null on epochs
                         without validation (train.val_every), "lr", "seconds"}
    curves.png           loss terms and validation Dice per epoch, refreshed every epoch
    checkpoint_last.pt   after every epoch (see training/checkpoint.py for its content)
    checkpoint_best.pt   the epoch with the best mean validation Dice

The parts, in the order a run uses them: ``runtime`` (processes, device, precision), ``building`` (network,
losses, optimizer, schedule, seeded), ``checkpoint`` (resume and save), ``loop`` (an epoch of training),
``validation`` and ``reporting``. A distributed run (torchrun) gives each process its share of every epoch's
patches and of the validation cases; only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.building import TrainingParts, build_training
from training.checkpoint import (
    RunProgress,
    checkpoint_config,
    load_checkpoint,
    restore_run,
    save_run_checkpoint,
)
from training.config import TrainConfig, config_to_yaml, diff_configs
from training.errors import RunError, TrainingError
from training.init_weights import InitialWeights, apply_initial_weights, load_initial_weights
from training.loop import train_epoch
from training.model_spec import method_name, run_spec
from training.reporting import RunLog, epoch_line, write_metrics
from training.runtime import DistInfo, Runtime, barrier, process_group, resolve_runtime
from training.validation import read_validation_cases, validate, validation_session

__all__ = ["DistInfo", "RunError", "TrainResult", "TrainingError", "train"]

LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"
# Keys that may differ between the stored config and the one given with --resume: where things live and
# how fast they are read, never what is trained.
RESUME_MAY_DIFFER = ("data.root", "data.cache_dir", "data.num_workers", "output.dir", "train.val_every")


@dataclass(frozen=True)
class TrainResult:
    """What a finished run left behind; ``history`` holds the metrics.jsonl records."""

    output_dir: Path
    epochs: int
    best_epoch: int | None
    best_mean_dice: float | None
    last_checkpoint: Path
    best_checkpoint: Path | None
    history: tuple[dict[str, Any], ...]


@dataclass(frozen=True, eq=False)
class RunData:
    """The prepared dataset: its description (training.data's DatasetInfo), the cases of each split, and the
    training-data profile of the training cases (``ModelSpec.training_profile``; None on ranks other than 0,
    which never write a spec); ``init`` says which weights the network started from, for the spec."""

    info: Any
    train_cases: list[Any]
    val_cases: list[Any]
    profile: dict[str, Any] | None = None
    init: dict[str, Any] | None = None  # the weights the run started from (InitialWeights.record())


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    dist: DistInfo | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train as ``cfg`` says (see the module docstring); ``resume`` continues from ``checkpoint_last.pt``.

    ``dist`` describes a torchrun process (None: single process). ``on_epoch_end(record)`` is called on
    every rank after an epoch's checkpoint and logs are written (a test hook; an exception raised there
    stops the run as a crash would). User mistakes raise RunError, ConfigError or DatasetError.
    """
    dist = dist or DistInfo()
    with process_group(cfg, dist):
        runtime = resolve_runtime(cfg, dist)
        out = Path(cfg.output.dir).expanduser()
        state = _open_output(cfg, out, resume=resume, dist=dist)
        log = RunLog(out / "train.log", dist.is_main, append=state is not None)
        try:
            log.first(f"world size {dist.world_size}")
            # Read before the data are prepared, so that a wrong name or file stops the run at once.
            init_weights = (
                load_initial_weights(cfg.init.from_checkpoint)
                if state is None and cfg.init.from_checkpoint is not None
                else None
            )
            data = _prepare_data(cfg, dist)
            parts = build_training(cfg, data.info, runtime)
            progress, rng_note = (
                restore_run(state, parts, runtime, cfg.train.seed)
                if state is not None
                else (RunProgress(), None)
            )
            # A resumed run's weights come from its own last checkpoint; the start it had is in its config.
            init_lines, data = _initialise(cfg, parts, data, init_weights)
            _log_setup(
                log, cfg, runtime, data, parts, progress, out, resumed=state is not None, rng_note=rng_note
            )
            for line in init_lines:
                log(line)
            for epoch in range(progress.epochs_done, cfg.train.epochs):
                record = _epoch(epoch, cfg, runtime, data, parts, progress, out, log)
                if on_epoch_end is not None:
                    on_epoch_end(record)
        finally:
            log.close()
    best = progress.best
    return TrainResult(
        output_dir=out,
        epochs=len(progress.history),
        best_epoch=best["epoch"],
        best_mean_dice=best["mean_dice"],
        last_checkpoint=out / LAST,
        best_checkpoint=out / BEST if best["epoch"] is not None else None,
        history=tuple(progress.history),
    )


def _open_output(cfg: TrainConfig, out: Path, *, resume: bool, dist: DistInfo) -> dict[str, Any] | None:
    """The checkpoint to resume from (None for a new run), after checking that ``out`` may be used as asked;
    rank 0 then writes config.yaml there."""
    last = out / LAST
    state = None
    if resume:
        if not last.is_file():
            raise RunError(f"{out}: nothing to resume (no {LAST}); start without --resume")
        state = load_checkpoint(last, map_location="cpu")
        stored = checkpoint_config(state, last)
        changed = [k for k in diff_configs(stored, cfg) if k not in RESUME_MAY_DIFFER]
        if changed:
            raise RunError(
                f"{last}: the config differs from the run being resumed in {', '.join(changed)}; "
                "resume with the same config (only paths and val_every may change)"
            )
        if state["epoch"] >= cfg.train.epochs:
            raise RunError(f"{last}: the run already finished its {cfg.train.epochs} epochs")
    elif last.exists():
        raise RunError(
            f"{out} already holds a training run ({LAST}); pass --resume to continue it or choose another output.dir"
        )
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        # A kill during a write leaves its temporary file (checkpoint, metrics, curves); the file under
        # the final name is the previous, complete one. No grace period: the run folder has one writer.
        from napari_medcl.atomic import sweep_stale_temps, write_text_atomic

        if removed := sweep_stale_temps(out, older_than_s=0.0):
            print(f"removed {len(removed)} temporary file(s) left by a killed run in {out}", file=sys.stderr)
        write_text_atomic(out / "config.yaml", config_to_yaml(cfg))
    barrier(dist)
    return state


def _prepare_data(cfg: TrainConfig, dist: DistInfo) -> RunData:
    from training.data import PatchDataset, prepare_dataset

    d = cfg.model.spatial_dims
    # Rank 0 fills the preprocessing cache first; the others then read it instead of racing to write it.
    if dist.is_main:
        result = prepare_dataset(cfg.data, spatial_dims=d, seed=cfg.train.seed)
    barrier(dist)
    if not dist.is_main:
        result = prepare_dataset(cfg.data, spatial_dims=d, seed=cfg.train.seed)
    info, train_cases, prepared_val = result
    # Validation runs the product's predictor on the cases as their files hold them (training.validation).
    val_cases = read_validation_cases(cfg.data, [case.case_id for case in prepared_val])
    if cfg.data.num_workers > 0 and cfg.data.augmentation.enabled:
        # DataLoader workers are forked anew every epoch (the dataset's epoch must reach them); drawing
        # one sample here first loads the augmentation library in this process, so that each worker
        # inherits it instead of importing it again. Done before any seeding, so results do not change.
        PatchDataset(
            train_cases[:1],
            cfg.train.patch_size or (8,) * d,
            spatial_dims=d,
            samples_per_epoch=1,
            foreground_fraction=0.0,
            augmentation=cfg.data.augmentation,
            seed=0,
        )[0]
    profile = _training_profile(cfg, info, train_cases) if dist.is_main else None
    return RunData(info=info, train_cases=train_cases, val_cases=val_cases, profile=profile)


def _initialise(
    cfg: TrainConfig, parts: TrainingParts, data: RunData, weights: InitialWeights | None
) -> tuple[list[str], RunData]:
    """Load ``weights`` (``init.from_checkpoint``) into the network (every rank read the same file, so the
    processes agree without a broadcast); the log lines, and ``data`` with the source recorded for the spec."""
    if weights is None:
        return [], data
    extra = int(parts.model.in_channels) - int(data.info.in_channels)  # prompt channels (model.prompts)
    theirs = (weights.spec or {}).get("prompts")
    if theirs is not None:  # already a prompt network: its input layer has them
        extra = 0
    lines = apply_initial_weights(
        parts.model, weights, class_names=list(data.info.class_names), reinit_heads=cfg.init.reinit_heads,
        extra_input_channels=extra,
    )  # fmt: skip
    return lines, dataclasses.replace(data, init=weights.record())


def _training_profile(cfg: TrainConfig, info: Any, train_cases: list[Any]) -> dict[str, Any]:
    """The profile of the training cases as their files hold them (at most ``MAX_PROFILE_CASES`` read),
    under the normalisation the model will carry: stored in every spec the run writes."""
    from training.data.layouts import discover
    from training.data.profile import dataset_profile

    layout = discover(cfg.data.layout, cfg.data.root)
    wanted = {case.case_id for case in train_cases}
    cases = [case for case in layout.cases if case.case_id in wanted]
    return dataset_profile(layout, cases, info.normalization)


def _log_setup(
    log: RunLog,
    cfg: TrainConfig,
    runtime: Runtime,
    data: RunData,
    parts: TrainingParts,
    progress: RunProgress,
    out: Path,
    *,
    resumed: bool,
    rng_note: str | None,
) -> None:
    from napari_medcl.spec import SpecError

    info = data.info
    try:  # fail now, not at the first checkpoint, if the model cannot describe itself
        _spec(cfg, data, parts, progress)
    except SpecError as error:
        raise RunError(f"the trained model's ModelSpec would be invalid: {error}") from None
    n_params = sum(p.numel() for p in parts.model.parameters())
    if resumed:
        log(f"resumed from {out / LAST} after epoch {progress.epochs_done}")
    if rng_note:
        log(rng_note)
    if parts.sync_note:
        log(parts.sync_note)
    for note in parts.notes:
        log(note)
    log(
        f"device {runtime.device}, {runtime.amp_text}, compile {'on' if cfg.train.compile else 'off'}, "
        f"global batch {cfg.train.batch_size} ({runtime.local_batch} per process), "
        f"patch {list(parts.patch_size)}"
    )
    log(
        f"dataset {getattr(info, 'name', cfg.data.root)!r}: {len(data.train_cases)} training / "
        f"{len(data.val_cases)} validation cases, {info.in_channels} channel(s), classes "
        f"{', '.join(info.class_names)}"
    )
    if getattr(info, "nonzero_is_foreground", False):
        log(
            "every case is labelled background exactly where its image is zero: inference will label "
            "every non-zero voxel with a foreground class"
        )
    log(f"model {method_name(cfg)}: {n_params / 1e6:.2f} M parameters; output {out}")


def _epoch(
    epoch: int,
    cfg: TrainConfig,
    runtime: Runtime,
    data: RunData,
    parts: TrainingParts,
    progress: RunProgress,
    out: Path,
    log: RunLog,
) -> dict[str, Any]:
    """Train one epoch, validate when due, checkpoint and report; the epoch's metrics record."""
    t = cfg.train
    started = time.perf_counter()
    train_terms = train_epoch(
        epoch, cfg, runtime, parts, data.train_cases, last_checkpoint=out / LAST, log=log
    )
    val = None
    if (epoch + 1) % max(1, t.val_every) == 0 or epoch + 1 == t.epochs:
        spec = run_spec(
            cfg, data.info, parts.model, parts.patch_size, best=progress.best, epochs=len(progress.history),
            profile=data.profile, init=data.init,
        )  # fmt: skip
        session = validation_session(parts.model, spec, runtime.device, runtime.autocast)
        val = validate(
            session,
            data.val_cases,
            overlap=t.val_overlap,
            batch_size=t.val_batch_size,
            max_cases=t.val_max_cases,
            dist=runtime.dist,
        )
    record = {
        "epoch": epoch + 1,
        "train": train_terms,
        "val": val,
        "lr": parts.optimizer.param_groups[0]["lr"],
        "seconds": round(time.perf_counter() - started, 3),
    }
    improved = progress.add(record)
    spec = _spec(cfg, data, parts, progress)
    save_run_checkpoint(out, cfg, parts, runtime, progress, spec, last=LAST, best=BEST if improved else None)
    if runtime.dist.is_main:
        write_metrics(out, progress.history, list(data.info.class_names)[1:])
        log(epoch_line(record, t.epochs))
    return record


def _spec(cfg: TrainConfig, data: RunData, parts: TrainingParts, progress: RunProgress) -> dict[str, Any]:
    spec = run_spec(
        cfg, data.info, parts.model, parts.patch_size, best=progress.best, epochs=len(progress.history),
        profile=data.profile, init=data.init,
    )  # fmt: skip
    return spec.to_dict()
