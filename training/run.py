"""One training run, start to end: ``train(cfg)`` runs the experiment a :class:`~training.config.TrainConfig`
describes and writes into ``cfg.output.dir``::

    config.yaml          the resolved config (every key)
    train.log            text log; the first line says ``world size N``
    metrics.jsonl        one JSON object per epoch: {"epoch", "train": {"loss", "ce", "dice", "pdcr"?,
                         "ccdc"?, "anchor"?}, "val": {"dice": {class: v}, "mean_dice", "cases"} or null on epochs
                         without validation (train.val_every), "lr", "seconds"}
    curves.png           loss terms and validation Dice per epoch, refreshed every epoch
    checkpoint_last.pt   after every epoch (see training/checkpoint.py for its content)
    checkpoint_best.pt   the epoch with the best mean validation Dice
    summary.json         when the run starts from trained weights (init.from_checkpoint): mean Dice before and
                         after on the held-out cases and on the original validation cases (training.replay)

The parts, in the order a run uses them: ``runtime`` (processes, device, precision), ``building`` (network,
losses, optimizer, schedule, seeded), ``checkpoint`` (resume and save), ``loop`` (an epoch of training),
``validation`` and ``reporting``. A distributed run (torchrun) gives each process its share of every epoch's
patches and of the validation cases; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
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
from training.init_weights import (
    InitialWeights,
    apply_initial_weights,
    initial_state,
    load_initial_weights,
)
from training.loop import train_epoch
from training.model_spec import carried_error_model, method_name, run_spec
from training.replay import (
    SUMMARY,
    Replay,
    find_replay_root,
    prepare_replay,
    summary_from,
    summary_line,
    write_summary,
)
from training.reporting import RunLog, epoch_line, write_metrics
from training.runtime import DistInfo, Runtime, barrier, process_group, resolve_runtime
from training.start_weights import WeightAnchor, WeightMix
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
    error_model: dict[str, Any] | None = None  # the error map carried from them (carried_error_model)


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
            init_lines, data = _initialise(cfg, parts, _resumed(data, state), init_weights)
            anchor, mix = _start_guards(cfg, parts, data, init_weights)
            init_lines += [guard.describe() for guard in (anchor, mix) if guard is not None]
            replay, replay_line = _replay(cfg, init_weights, data, dist)
            if dist.is_main:
                data = dataclasses.replace(data, profile=_training_profile(cfg, data, replay))
            _log_setup(
                log, cfg, runtime, data, parts, progress, out, resumed=state is not None, rng_note=rng_note
            )
            for line in init_lines:
                log(line)
            if replay_line:
                log(replay_line)
            start = _start_scores(
                cfg, runtime, data, parts, progress, out, replay, log, resumed=state is not None
            )
            for epoch in range(progress.epochs_done, cfg.train.epochs):
                record = _epoch(epoch, cfg, runtime, data, parts, progress, out, log, replay, anchor, mix)
                if start is not None and dist.is_main:
                    summary = {
                        **summary_from(start, progress.history, progress.best["epoch"]),
                        "start": start,
                    }
                    write_summary(out, summary)
                    if epoch + 1 == cfg.train.epochs:
                        log(summary_line(summary))
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
    return RunData(info=info, train_cases=train_cases, val_cases=val_cases)


def _initialise(
    cfg: TrainConfig, parts: TrainingParts, data: RunData, weights: InitialWeights | None
) -> tuple[list[str], RunData]:
    """Load ``weights`` (``init.from_checkpoint``) into the network (every rank read the same file, so the
    processes agree without a broadcast); the log lines, and ``data`` with the source and the error map it
    carries recorded for the spec."""
    if weights is None:
        return [], data
    lines = apply_initial_weights(
        parts.model, weights, class_names=list(data.info.class_names), reinit_heads=cfg.init.reinit_heads,
        extra_input_channels=_extra_input_channels(parts, data, weights),
    )  # fmt: skip
    error_model, line = carried_error_model(weights.spec)
    return lines + ([line] if line else []), dataclasses.replace(
        data, init=weights.record(), error_model=error_model
    )


def _resumed(data: RunData, state: dict[str, Any] | None) -> RunData:
    """``data`` with the start a resumed run had (its weights' record, the error map carried from them), as
    its last checkpoint's spec holds them."""
    if state is None:
        return data
    spec = state.get("spec") or {}
    init = (spec.get("training") or {}).get("init_from")
    return dataclasses.replace(data, init=init, error_model=spec.get("error_model"))


def _extra_input_channels(parts: TrainingParts, data: RunData, weights: InitialWeights) -> int:
    """How many more input channels the network has than ``weights``' (model.prompts' prompt channels)."""
    if (weights.spec or {}).get("prompts") is not None:  # already a prompt network: its input layer has them
        return 0
    return int(parts.model.in_channels) - int(data.info.in_channels)


def _start_guards(
    cfg: TrainConfig, parts: TrainingParts, data: RunData, weights: InitialWeights | None
) -> tuple[WeightAnchor | None, WeightMix | None]:
    """The L2-SP pull toward the loaded weights (``init.anchor_weight``) and the weight-space mix with them
    (``init.weight_mix``), each None when off. A resumed run (``weights`` None) reads its starting weights
    again: both refer to where the run began, not to where it was stopped."""
    i = cfg.init
    mixing = i.weight_mix < 1 or any(share < 1 for share in i.weight_mix_layers.values())
    if i.from_checkpoint is None or (i.anchor_weight <= 0 and not mixing):
        return None, None
    if weights is None:
        weights = load_initial_weights(i.from_checkpoint)
    start = initial_state(
        parts.model, weights, class_names=list(data.info.class_names), reinit_heads=i.reinit_heads,
        extra_input_channels=_extra_input_channels(parts, data, weights),
    )  # fmt: skip
    anchor = WeightAnchor(parts.model, start, i.anchor_weight) if i.anchor_weight > 0 else None
    mix = WeightMix(parts.model, start, i.weight_mix, i.weight_mix_layers) if mixing else None
    return anchor, mix


def _replay(
    cfg: TrainConfig, weights: InitialWeights | None, data: RunData, dist: DistInfo
) -> tuple[Replay | None, str | None]:
    """The replay of the original training data (init.replay) and the log line saying which, or why none."""
    if cfg.init.from_checkpoint is None and cfg.init.replay in (None, "auto"):
        return None, None
    if weights is None and cfg.init.from_checkpoint is not None and cfg.init.replay == "auto":
        weights = load_initial_weights(cfg.init.from_checkpoint)  # a resumed run: only its recorded recipe
    original = dict(weights.config) if weights is not None and weights.config is not None else None
    recipe_root = (original or {}).get("data", {}).get("root")
    root, line = find_replay_root(cfg.init.replay, cfg.init.from_checkpoint, recipe_root)
    if root is None:
        return None, line
    # Rank 0 fills the replay dataset's preprocessing cache first, as for the run's own data.
    replay = None
    if dist.is_main:
        replay = prepare_replay(cfg, root, original, seed=cfg.train.seed, class_names=data.info.class_names)
    barrier(dist)
    if not dist.is_main:
        replay = prepare_replay(cfg, root, original, seed=cfg.train.seed, class_names=data.info.class_names)
    line += (
        f"; {100 * replay.fraction:.0f}% of every batch from its {len(replay.train_cases)} training case(s), "
        f"{len(replay.val_cases)} original validation case(s) scored before and after"
    )
    return replay, line


def _start_scores(
    cfg: TrainConfig,
    runtime: Runtime,
    data: RunData,
    parts: TrainingParts,
    progress: RunProgress,
    out: Path,
    replay: Replay | None,
    log: RunLog,
    *,
    resumed: bool,
) -> dict[str, Any] | None:
    """Mean Dice of the starting weights on the held-out cases and the original validation cases (what
    summary.json compares the fine-tuned model with); a resumed run reads them back from summary.json."""
    if cfg.init.from_checkpoint is None:
        return None
    if resumed:
        import json

        try:
            return json.loads((out / SUMMARY).read_text(encoding="utf-8"))["start"]
        except (OSError, ValueError, KeyError):
            return None  # stopped before its first summary: no "before" to compare with
    session = _session(cfg, runtime, data, parts, progress)
    start: dict[str, Any] = {
        "replay": None if replay is None else {"root": str(replay.root), "fraction": replay.fraction}
    }
    for key, cases, what in (
        ("held_out", data.val_cases, "held-out cases"),
        ("original", replay.val_cases if replay is not None else [], "original validation cases"),
    ):
        start[key] = _scores(cfg, runtime, session, cases)
        if start[key] is not None:
            log(f"before fine-tuning: {what} ({len(cases)}): mean Dice {start[key]['mean_dice']:.4f}")
    if runtime.dist.is_main:
        write_summary(out, {**summary_from(start, [], None), "start": start})
    return start


def _session(
    cfg: TrainConfig, runtime: Runtime, data: RunData, parts: TrainingParts, progress: RunProgress
) -> Any:
    spec = run_spec(
        cfg, data.info, parts.model, parts.patch_size, best=progress.best, epochs=len(progress.history),
        profile=data.profile, init=data.init,
    )  # fmt: skip
    return validation_session(parts.model, spec, runtime.device, runtime.autocast)


def _scores(cfg: TrainConfig, runtime: Runtime, session: Any, cases: list[Any]) -> dict[str, Any] | None:
    """Validation Dice on ``cases`` with their ids (None when there are none)."""
    if not cases:
        return None
    t = cfg.train
    scores = validate(
        session, cases, overlap=t.val_overlap, batch_size=t.val_batch_size, max_cases=t.val_max_cases,
        dist=runtime.dist,
    )  # fmt: skip
    shown = cases if t.val_max_cases is None else cases[: t.val_max_cases]
    return {**scores, "case_ids": [case.case_id for case in shown]}


def _training_profile(cfg: TrainConfig, data: RunData, replay: Replay | None) -> dict[str, Any]:
    """The profile of every case the run trains on as their files hold them (at most ``MAX_PROFILE_CASES``
    read), under the normalisation the model will carry: the run's training cases and, when it replays the
    original training data, those too (the fine-tuned model has seen both). Stored in every spec the run
    writes."""
    from training.data.layouts import discover
    from training.data.profile import dataset_profile

    def part(root: Any, prepared: list[Any]) -> tuple[Any, list[Any]]:
        layout = discover(cfg.data.layout, root)
        wanted = {case.case_id for case in prepared}
        return layout, [case for case in layout.cases if case.case_id in wanted]

    parts = [part(cfg.data.root, data.train_cases)]
    if replay is not None:
        parts.append(part(replay.root, replay.train_cases))
    return dataset_profile(parts, data.info.normalization)


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
    if runtime.amp_note:
        log(runtime.amp_note)
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
    replay: Replay | None = None,
    anchor: WeightAnchor | None = None,
    mix: WeightMix | None = None,
) -> dict[str, Any]:
    """Train one epoch, validate when due, checkpoint and report; the epoch's metrics record. With ``mix``
    the validation and the checkpoints' ``model`` are the mixed weights (the trained ones are kept in the
    checkpoint for a resume)."""
    t = cfg.train
    started = time.perf_counter()
    train_terms = train_epoch(
        epoch, cfg, runtime, parts, data.train_cases, last_checkpoint=out / LAST, log=log,
        replay=None if replay is None else (replay.train_cases, replay.fraction), anchor=anchor,
    )  # fmt: skip
    with mix.applied(parts.model) if mix is not None else contextlib.nullcontext() as trained:
        val = original = None
        if (epoch + 1) % max(1, t.val_every) == 0 or epoch + 1 == t.epochs:
            session = _session(cfg, runtime, data, parts, progress)
            # No held-out cases (data.val_cases: []): no validation Dice, and no checkpoint_best.pt.
            val = _scores(cfg, runtime, session, data.val_cases)
            original = _scores(cfg, runtime, session, replay.val_cases) if replay is not None else None
        record = {
            "epoch": epoch + 1,
            "train": train_terms,
            "val": val,
            "lr": parts.optimizer.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - started, 3),
        }
        if replay is not None:
            record["original_val"] = original
        improved = progress.add(record)
        spec = _spec(cfg, data, parts, progress)
        save_run_checkpoint(
            out, cfg, parts, runtime, progress, spec, last=LAST, best=BEST if improved else None,
            trained_model=trained,
        )  # fmt: skip
    if runtime.dist.is_main:
        write_metrics(out, progress.history, list(data.info.class_names)[1:])
        log(epoch_line(record, t.epochs))
        if original is not None:
            log(f"epoch {epoch + 1}: original validation cases: mean Dice {original['mean_dice']:.4f}")
    return record


def _spec(cfg: TrainConfig, data: RunData, parts: TrainingParts, progress: RunProgress) -> dict[str, Any]:
    spec = run_spec(
        cfg, data.info, parts.model, parts.patch_size, best=progress.best, epochs=len(progress.history),
        profile=data.profile, init=data.init, error_model=data.error_model,
    )  # fmt: skip
    return spec.to_dict()
