"""The train/validate loop: AMP, DDP, atomic checkpoints with every RNG state, exact resume, logs and curves.

``train(cfg)`` runs one experiment described by a :class:`~training.config.TrainConfig` and writes into
``cfg.output.dir``::

    config.yaml          the resolved config (every key)
    train.log            text log; the first line says ``world size N``
    metrics.jsonl        one JSON object per epoch: {"epoch", "train": {"loss", "ce", "dice", "pdcr"?,
                         "ccdc"?}, "val": {"dice": {class: v}, "mean_dice", "cases"} or null on epochs
                         without validation (train.val_every), "lr", "seconds"}
    curves.png           loss terms and validation Dice per epoch, refreshed every epoch
    checkpoint_last.pt   after every epoch (see training/checkpoint.py for its content)
    checkpoint_best.pt   the epoch with the best mean validation Dice

Reproducibility, and why resume is exact: the model is built after ``torch.manual_seed(seed)``; the patch
dataset draws every sample from (seed, epoch, index), so an epoch's data do not depend on what ran before;
PDCR and CCDC draw only from a ``torch.Generator`` owned by the engine; python, numpy, torch (CPU and CUDA)
and that generator's states are saved per rank in every checkpoint and restored on resume, together with
model, optimizer (PDCR projections included), scheduler and grad-scaler states. On CPU a resumed run
therefore reproduces the uninterrupted run's losses bit for bit.

Distributed data parallel: the CLI reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by ``torchrun``) and
passes them as :class:`DistInfo`; the engine uses NCCL on GPU and gloo on CPU, gives each rank its share of
every epoch's patch indices, and lets only rank 0 write. ``train.batch_size`` is the global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng_state,
    checkpoint_config,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from training.config import CONFIG_VERSION, TrainConfig, config_to_dict, config_to_yaml, diff_configs

__all__ = [
    "DistInfo",
    "RunError",
    "TrainResult",
    "TrainStep",
    "TrainingError",
    "build_losses",
    "build_model",
    "lr_factor",
    "predict_case",
    "resolve_patch_size",
    "train",
]

LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"
# Keys that may differ between the stored config and the one given with --resume: where things live and
# how fast they are read, never what is trained.
RESUME_MAY_DIFFER = ("data.root", "data.cache_dir", "data.num_workers", "output.dir", "train.val_every")
DEFAULT_PROJECTION_DIM = 256
AUTO_PATCH_CAP = {2: 256, 3: 128}


class RunError(ValueError):
    """A run cannot start as asked (output folder holds another run, nothing to resume, config changed)."""


class TrainingError(RuntimeError):
    """Training itself failed (the loss became NaN or infinite)."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a distributed run (from torchrun's environment, read by the CLI)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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


# ---------------------------------------------------------------------------------------------- building


def build_model(cfg: TrainConfig, in_channels: int, num_classes: int) -> nn.Module:
    """The network ``cfg.model`` describes, for a dataset with these channels and classes."""
    from training.models import create_model

    m = cfg.model
    deep_supervision = m.deep_supervision
    if deep_supervision is None and m.name == "unet":
        deep_supervision = True
    projection_dim = m.projection_dim
    if projection_dim is None and cfg.loss.ccdc.enabled:
        projection_dim = DEFAULT_PROJECTION_DIM
    kwargs = {
        "features": _lists(m.features),
        "n_stages": m.n_stages,
        "base_features": m.base_features,
        "max_features": m.max_features,
        "strides": _lists(m.strides),
        "kernel_sizes": _lists(m.kernel_sizes),
        "deep_supervision": deep_supervision,
        "encoder_depth": m.encoder_depth,
        "encoder_weights": m.encoder_weights,
        "norm": m.norm,
        "dropout": m.dropout,
        "projection_dim": projection_dim,
        "projection_level": m.projection_level,
    }
    if m.uafr.enabled:
        kwargs.update(
            uafr=True,
            uafr_layers=_lists(m.uafr.layers),
            uafr_m=m.uafr.m,
            uafr_hidden=m.uafr.hidden,
            uafr_kernel_size=m.uafr.kernel_size,
            uafr_norm=m.uafr.norm,
        )
    try:
        return create_model(
            m.name, spatial_dims=m.spatial_dims, in_channels=in_channels, num_classes=num_classes, **kwargs
        )
    except (TypeError, ValueError) as error:
        raise RunError(f"model: {error}") from None


def _lists(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_lists(v) for v in value]
    return value


def _default_pdcr_layers(model: nn.Module, spatial_dims: int) -> dict[str, int]:
    """The middle encoder taps with N = 128/64/32 by depth (methods.md §1.4): strides 2, 4, 8 when present."""
    wanted = {2: 128, 4: 64, 8: 32}
    layers: dict[str, int] = {}
    for name, info in model.tap_info.items():
        if "decoder" in name or name in ("lowlevel", "concat"):
            continue
        stride = max(info.stride)
        if stride in wanted and stride not in {max(model.tap_info[n].stride) for n in layers}:
            layers[name] = wanted[stride]
    if not layers:
        raise RunError(f"loss.pdcr.layers: no default taps found; set them from {sorted(model.tap_info)}")
    return layers


class TrainStep(nn.Module):
    """The network and the losses with parameters in one module, so that DDP also averages the gradients
    of PDCR's cross-layer projections. ``forward(image, label, generator, progress) -> (loss, terms)``:
    image (B, C, *S) float, label (B, *S) int64; terms are detached scalars (loss, ce, dice, pdcr?, ccdc?).
    """

    def __init__(self, model: nn.Module, seg_loss: nn.Module, pdcr: nn.Module | None, ccdc: nn.Module | None):
        super().__init__()
        self.model = model
        self.seg_loss = seg_loss
        self.pdcr = pdcr
        self.ccdc = ccdc

    def forward(
        self, image: Tensor, label: Tensor, generator: torch.Generator | None = None, progress: float = 0.0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.model(image)
        seg = self.seg_loss([out.logits, *out.deep_supervision], label)
        loss = seg.loss
        terms = {"ce": seg.ce, "dice": seg.dice}
        if self.pdcr is not None:
            pdcr = self.pdcr(out.taps, label, generator=generator)
            loss = loss + pdcr.loss
            terms["pdcr"] = pdcr.loss.detach()
        if self.ccdc is not None:
            # The head with its input, not the dense embedding: CCDC runs the head with gradient only at the
            # pixels it samples as queries (same loss and gradients, docs/performance.md "Losses").
            embedding = out.projection
            size = tuple(embedding.shape[2:])
            with torch.no_grad():
                probs = out.logits.detach().float().softmax(1)
                labels = label
                if size != tuple(label.shape[1:]):
                    # labels nearest, probabilities linear, both to the embedding's grid (methods.md §5.2)
                    from training.losses.segmentation import downsample_labels

                    mode = "bilinear" if len(size) == 2 else "trilinear"
                    probs = F.interpolate(probs, size=size, mode=mode, align_corners=False)
                    labels = downsample_labels(label, size)
            ccdc = self.ccdc(embedding, probs, labels, generator=generator, progress=progress)
            loss = loss + ccdc
            terms["ccdc"] = ccdc.detach()
        terms["loss"] = loss.detach()
        return loss, terms


def build_losses(cfg: TrainConfig, model: nn.Module, num_classes: int) -> tuple[nn.Module, Any, Any]:
    """(segmentation loss, PDCRLoss or None, CCDCLoss or None) as ``cfg.loss`` says, for ``model``'s taps.

    The segmentation loss takes ``[logits, *deep_supervision]`` (nnU-Net weights over the heads); a bad
    PDCR/CCDC setting (unknown tap name, no projection head) is a RunError naming the key.
    """
    from training.losses.segmentation import DeepSupervisionLoss, ce_dice_loss

    def seg_base(logits: Tensor, labels: Tensor):
        return ce_dice_loss(
            logits,
            labels,
            ce_weight=cfg.loss.ce_weight,
            dice_weight=cfg.loss.dice_weight,
            batch_dice=cfg.loss.batch_dice,
        )

    seg = DeepSupervisionLoss(seg_base)
    pdcr = ccdc = None
    p = cfg.loss.pdcr
    if p.enabled:
        from training.losses.pdcr import PDCRLoss

        layers = (
            dict(p.layers) if p.layers is not None else _default_pdcr_layers(model, cfg.model.spatial_dims)
        )
        try:
            pdcr = PDCRLoss(
                model.tap_info,
                num_classes=num_classes,
                layers=layers,
                mode=p.mode,
                patch_sizes=_lists(p.patch_sizes),
                cross_pairs=[tuple(pair) for pair in p.cross_pairs],
                cross_samples=p.cross_samples,
                proj_channels=p.proj_channels,
                position_encoding=p.position_encoding,
                temperature=p.temperature,
                weight=p.weight,
                spatial_dims=cfg.model.spatial_dims,
            )
        except ValueError as error:
            raise RunError(f"loss.pdcr: {error}") from None
    c = cfg.loss.ccdc
    if c.enabled:
        from training.losses.ccdc import CCDCLoss

        if getattr(model, "embedding_channels", None) is None:
            raise RunError("loss.ccdc needs a projection head: set model.projection_dim")
        try:
            ccdc = CCDCLoss(
                weight=c.weight,
                temperature=c.temperature,
                strong_threshold=c.strong_threshold,
                num_queries=c.num_queries,
                num_negatives=c.num_negatives,
                region=c.region,
                region_stride=c.region_stride,
                adaptive_threshold=c.adaptive_threshold,
                fixed_threshold=c.fixed_threshold,
                adaptive_ratio=c.adaptive_ratio,
                fixed_easy_fraction=c.fixed_easy_fraction,
                query_mode=c.query_mode,
                negative_sampling=c.negative_sampling,
                core_fallback=c.core_fallback,
                core_topk=c.core_topk,
            )
        except ValueError as error:
            raise RunError(f"loss.ccdc: {error}") from None
    return seg, pdcr, ccdc


def _build_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=t.lr,
            momentum=t.momentum,
            nesterov=t.nesterov and t.momentum > 0,
            weight_decay=t.weight_decay,
        )
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def lr_factor(step: int, *, total: int, warmup: int, kind: str, exponent: float, floor: float) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps (per-iteration schedule).

    Linear warm-up over ``warmup`` steps, then ``poly``: (1 - t)^exponent (nnU-Net), ``cosine``:
    0.5 (1 + cos(pi t)), or ``constant``, with t the fraction of the post-warm-up steps done; never below
    ``floor`` (= min_lr / lr).
    """
    if warmup > 0 and step < warmup:
        return max(floor, (step + 1) / warmup)
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    if kind == "poly":
        value = (1.0 - t) ** exponent
    elif kind == "cosine":
        value = 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        value = 1.0
    return max(floor, value)


def resolve_patch_size(
    cfg: TrainConfig, median_shape: Sequence[int] | None, divisor: Sequence[int]
) -> tuple[int, ...]:
    """``train.patch_size``, checked against the model's divisor, or the automatic choice (see TrainSettings)."""
    d = cfg.model.spatial_dims
    if cfg.train.patch_size is not None:
        patch = tuple(int(p) for p in cfg.train.patch_size)
        if len(patch) != d:
            raise RunError(f"train.patch_size must have {d} entries for a {d}D model, got {list(patch)}")
        bad = [p for p, k in zip(patch, divisor) if p % k]
        if bad or min(patch) < 1:
            good = [max(k, -(-p // k) * k) for p, k in zip(patch, divisor)]
            raise RunError(
                f"train.patch_size {list(patch)} must be a multiple of the model's divisor {list(divisor)} "
                f"on every axis; e.g. {good}"
            )
        return patch
    if median_shape is None:
        raise RunError("train.patch_size is not set and the dataset gives no median shape; set it")
    cap = AUTO_PATCH_CAP[d]
    median = list(median_shape)[-d:]
    return tuple(max(k, (min(int(s), cap) // k) * k) for s, k in zip(median, divisor))


# ---------------------------------------------------------------------------------------------- inference


@torch.no_grad()
def predict_case(
    model: nn.Module,
    image: np.ndarray,
    *,
    spatial_dims: int,
    patch_size: Sequence[int],
    divisor: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> np.ndarray:
    """Sliding-window labels of one whole case with the product's tiling (napari_medcl.tiling).

    image (C, *S) float32, S = (H, W) or (D, H, W) (a 2D model runs slice by slice over a volume)
    -> labels (*S) uint8/uint16. Windows are Gaussian-weighted and stitched exactly as ``medcl-predict``
    stitches ONNX outputs.
    """
    from napari_medcl import tiling

    was_training = model.training
    model.eval()
    try:
        spatial = tuple(image.shape[1:])
        grid = spatial if len(spatial) == 3 else (1, *spatial)
        patch = tuple(tiling.window_shape(tuple(patch_size), tuple(divisor)))
        window = patch if spatial_dims == 3 else (1, *patch)
        if len(spatial) == 2 and spatial_dims == 3:
            raise ValueError(f"a 3D model cannot run on a 2D image of shape {image.shape}")
        volume = image.reshape(image.shape[0], *grid)
        pads = tiling.padding(grid, window)
        padded = np.pad(volume, ((0, 0), *pads)) if any(sum(p) for p in pads) else volume
        crop = tuple(slice(before, before + size) for (before, _), size in zip(pads, grid))
        shape = tuple(padded.shape[1:])
        acc = tiling.Accumulator(shape, window, num_classes, 0, crop=crop)
        boxes = tiling.window_boxes(shape, window, overlap)
        ctx = autocast or contextlib.nullcontext
        for start in range(0, len(boxes), batch_size):
            chunk = boxes[start : start + batch_size]
            batch = np.stack([padded[(slice(None), *box)] for box in chunk])  # (n, C, *window)
            x = torch.from_numpy(batch).to(device)
            if spatial_dims == 2:
                x = x[:, :, 0]  # (n, C, 1, h, w) -> (n, C, h, w)
            with ctx():
                logits = model(x).logits
            probs = logits.float().softmax(1)
            if spatial_dims == 2:
                probs = probs.unsqueeze(2)
            probs = probs.cpu().numpy()
            for box, p in zip(chunk, probs):
                acc.add(box, p)
        labels = acc.finish().labels
        return labels.reshape(spatial)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------- run


class _RunLog:
    """train.log (rank 0 only) plus the same lines on stdout."""

    def __init__(self, path: Path, enabled: bool, append: bool):
        self.enabled = enabled
        self._file = open(path, "a" if append else "w", encoding="utf-8") if enabled else None  # noqa: SIM115

    def __call__(self, line: str) -> None:
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._file.write(f"{stamp} {line}\n")
        self._file.flush()
        print(line, flush=True)

    def first(self, line: str) -> None:
        if self.enabled:
            self._file.write(line + "\n")
            self._file.flush()
            print(line, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _resolve_device(cfg: TrainConfig, dist: DistInfo) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise RunError("train.device is 'cuda' but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if dist.world_size > 1:
            torch.cuda.set_device(dist.local_rank)
            return torch.device("cuda", dist.local_rank)
        return torch.device("cuda")
    return torch.device("cpu")


def _autocast_factory(cfg: TrainConfig, device: torch.device) -> tuple[Callable[[], Any], bool, str]:
    """(context factory, use a grad scaler, description)."""
    t = cfg.train
    if device.type == "cuda" and t.amp:
        dtype = torch.bfloat16 if t.amp_dtype == "bf16" else torch.float16
        return (lambda: torch.autocast("cuda", dtype=dtype)), dtype == torch.float16, f"amp {t.amp_dtype}"
    if device.type == "cpu" and t.amp_cpu:
        return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), False, "amp bf16 (cpu)"
    return contextlib.nullcontext, False, "amp off"


def _rank_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from the run seed and integers (epoch, rank...), stable across runs and platforms."""
    value = seed & 0xFFFFFFFFFFFF
    for part in parts:
        value = (value * 6364136223846793005 + part + 1442695040888963407) % (1 << 63)
    return value


def _all_reduce(tensor: Tensor, dist: DistInfo) -> Tensor:
    if dist.world_size > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def _barrier(dist: DistInfo) -> None:
    if dist.world_size > 1:
        torch.distributed.barrier()


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
    created_group = False
    if dist.world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if _resolve_device(cfg, dist).type == "cuda" else "gloo"
        torch.distributed.init_process_group(
            backend, rank=dist.rank, world_size=dist.world_size, timeout=timedelta(minutes=60)
        )
        created_group = True
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    try:
        return _Run(cfg, resume=resume, dist=dist, on_epoch_end=on_epoch_end).run()
    finally:
        if torch.are_deterministic_algorithms_enabled() != previous[0]:
            torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark = previous[1]
        if created_group:
            torch.distributed.destroy_process_group()


class _Run:
    """One training run's state; ``run()`` is the loop. Split out of ``train`` only to keep functions short."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool,
        dist: DistInfo,
        on_epoch_end: Callable[[dict[str, Any]], None] | None,
    ):
        self.cfg = cfg
        self.resume = resume
        self.dist = dist
        self.on_epoch_end = on_epoch_end
        self.out = Path(cfg.output.dir).expanduser()
        t = cfg.train
        if t.batch_size % dist.world_size:
            raise RunError(
                f"train.batch_size {t.batch_size} (global) must be divisible by the {dist.world_size} processes"
            )
        self.local_batch = t.batch_size // dist.world_size
        self.device = _resolve_device(cfg, dist)
        self.autocast, use_scaler, self.amp_text = _autocast_factory(cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        # Only touched when asked: the setter imports torch's compiler stack (seconds of start-up).
        if t.deterministic != torch.are_deterministic_algorithms_enabled():
            torch.use_deterministic_algorithms(t.deterministic, warn_only=self.device.type == "cuda")
        torch.backends.cudnn.benchmark = self.device.type == "cuda" and not t.deterministic

    # ---- setup ------------------------------------------------------------------------------------------

    def _prepare_output(self) -> dict[str, Any] | None:
        last = self.out / LAST
        state = None
        if self.resume:
            if not last.is_file():
                raise RunError(f"{self.out}: nothing to resume (no {LAST}); start without --resume")
            state = load_checkpoint(last, map_location="cpu")
            stored = checkpoint_config(state, last)
            changed = [k for k in diff_configs(stored, self.cfg) if k not in RESUME_MAY_DIFFER]
            if changed:
                raise RunError(
                    f"{last}: the config differs from the run being resumed in {', '.join(changed)}; "
                    "resume with the same config (only paths and val_every may change)"
                )
            if state["epoch"] >= self.cfg.train.epochs:
                raise RunError(f"{last}: the run already finished its {self.cfg.train.epochs} epochs")
        elif last.exists():
            raise RunError(
                f"{self.out} already holds a training run ({LAST}); pass --resume to continue it "
                "or choose another output.dir"
            )
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            # A kill during a write leaves its temporary file (checkpoint, metrics, curves); the file under
            # the final name is the previous, complete one. No grace period: the run folder has one writer.
            from napari_medcl.atomic import sweep_stale_temps, write_text_atomic

            if removed := sweep_stale_temps(self.out, older_than_s=0.0):
                print(
                    f"removed {len(removed)} temporary file(s) left by a killed run in {self.out}",
                    file=sys.stderr,
                )

            write_text_atomic(self.out / "config.yaml", config_to_yaml(self.cfg))
        _barrier(self.dist)
        return state

    def _prepare_data(self) -> None:
        from training.data import PatchDataset, prepare_dataset

        cfg = self.cfg
        d = cfg.model.spatial_dims
        # Rank 0 fills the preprocessing cache first; the others then read it instead of racing to write it.
        if self.dist.is_main:
            result = prepare_dataset(cfg.data, spatial_dims=d, seed=cfg.train.seed)
        _barrier(self.dist)
        if not self.dist.is_main:
            result = prepare_dataset(cfg.data, spatial_dims=d, seed=cfg.train.seed)
        self.info, self.train_cases, self.val_cases = result
        self.PatchDataset = PatchDataset
        if cfg.data.num_workers > 0 and cfg.data.augmentation.enabled:
            # DataLoader workers are forked anew every epoch (the dataset's epoch must reach them); drawing
            # one sample here first loads the augmentation library in this process, so that each worker
            # inherits it instead of importing it again. Done before any seeding, so results do not change.
            patch = cfg.train.patch_size or (8,) * d
            PatchDataset(
                self.train_cases[:1],
                patch,
                spatial_dims=d,
                samples_per_epoch=1,
                foreground_fraction=0.0,
                augmentation=cfg.data.augmentation,
                seed=0,
            )[0]

    def _build(self, state: dict[str, Any] | None) -> None:
        cfg, t = self.cfg, self.cfg.train
        seed = t.seed
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        torch.manual_seed(seed)
        info = self.info
        self.class_names = list(info.class_names)
        self.num_classes = len(self.class_names)
        model = build_model(cfg, info.in_channels, self.num_classes)
        self.patch_size = resolve_patch_size(cfg, getattr(info, "median_shape", None), model.divisor)
        seg, pdcr, ccdc = build_losses(cfg, model, self.num_classes)
        self.model = model.to(self.device)
        network: nn.Module = self.model
        if t.compile:
            network = torch.compile(self.model)
        step = TrainStep(network, seg, pdcr, ccdc).to(self.device)
        self.sync_note = None
        if t.sync_batchnorm and self.dist.world_size > 1:
            if self.device.type == "cuda":
                # converts in place below the top module, so self.model is converted too
                step = nn.SyncBatchNorm.convert_sync_batchnorm(step)
            else:
                self.sync_note = "train.sync_batchnorm ignored: SyncBatchNorm needs CUDA"
        self.losses = nn.ModuleDict({k: v for k, v in (("pdcr", step.pdcr),) if v is not None})
        params = [p for p in step.parameters() if p.requires_grad]
        self.optimizer = _build_optimizer(cfg, params)
        total = t.epochs * t.iterations_per_epoch
        floor = t.min_lr / t.lr if t.lr > 0 else 0.0
        warmup = t.warmup_epochs * t.iterations_per_epoch

        def factor(step_index: int) -> float:
            return lr_factor(
                step_index,
                total=total,
                warmup=warmup,
                kind=t.scheduler,
                exponent=t.poly_exponent,
                floor=floor,
            )

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # A projection head without CCDC gets no gradient; DDP must then look for unused parameters.
            unused = getattr(self.model, "projection", None) is not None and step.ccdc is None
            self.step = DistributedDataParallel(step, device_ids=ids, find_unused_parameters=unused)
        else:
            self.step = step
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(_rank_seed(seed, 7, self.dist.rank))
        self.start_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": None, "mean_dice": None}
        self.rng_note = None
        if state is not None:
            self._restore(state)

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.losses.load_state_dict(state["losses"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best = dict(state["best"])
        per_rank = state["rng"]
        if len(per_rank) == self.dist.world_size:
            restore_rng_state(per_rank[self.dist.rank], self.generator)
        else:
            restore_rng_state(per_rank[0], None)
            self.generator.manual_seed(_rank_seed(self.cfg.train.seed, 7, self.dist.rank, self.start_epoch))
            self.rng_note = (
                f"checkpoint was written by {len(per_rank)} processes, this run has {self.dist.world_size}: "
                "random streams are re-seeded, so losses will not match an uninterrupted run exactly"
            )

    # ---- loop -------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        state = self._prepare_output()
        log = _RunLog(self.out / "train.log", self.dist.is_main, append=state is not None)
        try:
            log.first(f"world size {self.dist.world_size}")
            self._prepare_data()
            self._build(state)
            self._log_setup(log, state)
            for epoch in range(self.start_epoch, self.cfg.train.epochs):
                record = self._epoch(epoch, log)
                if self.on_epoch_end is not None:
                    self.on_epoch_end(record)
        finally:
            log.close()
        best = self.best
        return TrainResult(
            output_dir=self.out,
            epochs=len(self.history),
            best_epoch=best["epoch"],
            best_mean_dice=best["mean_dice"],
            last_checkpoint=self.out / LAST,
            best_checkpoint=self.out / BEST if best["epoch"] is not None else None,
            history=tuple(self.history),
        )

    def _log_setup(self, log: _RunLog, state: dict[str, Any] | None) -> None:
        cfg, info = self.cfg, self.info
        from napari_medcl.spec import SpecError

        try:  # fail now, not at the first checkpoint, if the model cannot describe itself
            self._spec()
        except SpecError as error:
            raise RunError(f"the trained model's ModelSpec would be invalid: {error}") from None
        n_params = sum(p.numel() for p in self.model.parameters())
        if state is not None:
            log(f"resumed from {self.out / LAST} after epoch {self.start_epoch}")
        if self.rng_note:
            log(self.rng_note)
        if self.sync_note:
            log(self.sync_note)
        log(
            f"device {self.device}, {self.amp_text}, compile {'on' if cfg.train.compile else 'off'}, "
            f"global batch {cfg.train.batch_size} ({self.local_batch} per process), "
            f"patch {list(self.patch_size)}"
        )
        log(
            f"dataset {getattr(info, 'name', cfg.data.root)!r}: {len(self.train_cases)} training / "
            f"{len(self.val_cases)} validation cases, {info.in_channels} channel(s), classes "
            f"{', '.join(self.class_names)}"
        )
        if getattr(info, "nonzero_is_foreground", False):
            log(
                "every case is labelled background exactly where its image is zero: inference will label "
                "every non-zero voxel with a foreground class"
            )
        log(f"model {_method(cfg)}: {n_params / 1e6:.2f} M parameters; output {self.out}")

    def _loader(self, epoch: int) -> torch.utils.data.DataLoader:
        t = self.cfg.train
        n = t.iterations_per_epoch * t.batch_size
        dataset = self.PatchDataset(
            self.train_cases,
            self.patch_size,
            spatial_dims=self.cfg.model.spatial_dims,
            samples_per_epoch=n,
            foreground_fraction=self.cfg.data.foreground_fraction,
            augmentation=self.cfg.data.augmentation,
            seed=t.seed,
        )
        dataset.set_epoch(epoch)
        # Strided shards of the epoch's indices (DistributedSampler without shuffling: the dataset's
        # samples are already random per (seed, epoch, index)).
        sampler = torch.utils.data.distributed.DistributedSampler(
            dataset, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=False, drop_last=True
        )
        loader_rng = torch.Generator().manual_seed(_rank_seed(t.seed, 11, epoch, self.dist.rank))
        workers = self.cfg.data.num_workers
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.local_batch,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            generator=loader_rng,
            persistent_workers=False,
        )

    def _epoch(self, epoch: int, log: _RunLog) -> dict[str, Any]:
        from tqdm import tqdm

        t = self.cfg.train
        started = time.perf_counter()
        self.step.train()
        sums: dict[str, Tensor] = {}
        iterations = t.iterations_per_epoch
        total_steps = t.epochs * iterations
        bar = tqdm(
            total=iterations,
            desc=f"epoch {epoch + 1}/{t.epochs}",
            disable=not (self.dist.is_main and sys.stdout.isatty()),
            file=sys.stdout,
            leave=False,
            dynamic_ncols=True,
        )
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for i, batch in enumerate(self._loader(epoch)):
            image = batch["image"].to(self.device, non_blocking=True)
            label = batch["label"].to(self.device, non_blocking=True)
            progress = (epoch * iterations + i) / max(1, total_steps)
            with self.autocast():
                loss, terms = self.step(image, label, self.generator, progress)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if t.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(params, t.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            for key, value in terms.items():
                value = value.detach().to(torch.float64)
                sums[key] = sums[key] + value if key in sums else value
            bar.update(1)
            if bar.disable is False and i % 10 == 0:
                bar.set_postfix(loss=f"{float(terms['loss']):.4f}")
        bar.close()
        keys = ["loss", "ce", "dice", *(k for k in ("pdcr", "ccdc") if k in sums)]
        stacked = _all_reduce(torch.stack([sums[k] for k in keys]), self.dist)
        means = (stacked / (iterations * self.dist.world_size)).tolist()
        train_terms = dict(zip(keys, means))
        if not all(math.isfinite(v) for v in means):
            raise TrainingError(
                f"epoch {epoch + 1}: the training loss is not finite ({train_terms}); the last good checkpoint "
                f"is {self.out / LAST}. Lower train.lr, set train.amp_dtype to bf16, or lower loss weights"
            )
        val = None
        last_epoch = epoch + 1 == t.epochs
        if (epoch + 1) % max(1, t.val_every) == 0 or last_epoch:
            val = self._validate()
        record = {
            "epoch": epoch + 1,
            "train": train_terms,
            "val": val,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - started, 3),
        }
        self.history.append(record)
        improved = val is not None and (
            self.best["mean_dice"] is None or val["mean_dice"] > self.best["mean_dice"]
        )
        if improved:
            self.best = {"epoch": epoch + 1, "mean_dice": val["mean_dice"]}
        self._save(epoch + 1, improved)
        if self.dist.is_main:
            self._write_metrics()
            log(_epoch_line(record, t.epochs))
        return record

    # ---- validation -------------------------------------------------------------------------------------

    def _validate(self) -> dict[str, Any]:
        from training.metrics import evaluate_case

        cases = list(self.val_cases)
        if self.cfg.train.val_max_cases is not None:
            cases = cases[: self.cfg.train.val_max_cases]
        names = self.class_names
        k = len(names) - 1
        totals = torch.zeros(k + 1, dtype=torch.float64)  # per-class Dice sums, then the case count
        for case in cases[self.dist.rank :: self.dist.world_size]:
            labels = predict_case(
                self.model,
                np.asarray(case.image, dtype=np.float32),
                spatial_dims=self.cfg.model.spatial_dims,
                patch_size=self.patch_size,
                divisor=self.model.divisor,
                num_classes=len(names),
                overlap=self.cfg.train.val_overlap,
                batch_size=self.cfg.train.val_batch_size,
                device=self.device,
                autocast=self.autocast,
            )
            scores = evaluate_case(labels, np.asarray(case.label), names, compute_hd95=False)
            totals[:k] += torch.tensor([scores.dice[n] for n in names[1:]], dtype=torch.float64)
            totals[k] += 1
        if self.dist.world_size > 1:
            device = self.device if self.device.type == "cuda" else torch.device("cpu")
            totals = _all_reduce(totals.to(device), self.dist).cpu()
        count = max(1.0, float(totals[k]))
        dice = {n: float(totals[i]) / count for i, n in enumerate(names[1:])}
        return {"dice": dice, "mean_dice": float(np.mean(list(dice.values()))), "cases": int(totals[k])}

    # ---- writing ----------------------------------------------------------------------------------------

    def _save(self, epoch: int, improved: bool) -> None:
        rng = capture_rng_state(self.generator)
        if self.dist.world_size > 1:
            gathered: list[Any] = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, rng)
            per_rank = [_to_cpu(r) for r in gathered]
        else:
            per_rank = [rng]
        if not self.dist.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "config_version": CONFIG_VERSION,
            "config": config_to_dict(self.cfg),
            "epoch": epoch,
            "model": self.model.state_dict(),
            "losses": self.losses.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": per_rank,
            "sampler": {"seed": self.cfg.train.seed, "epoch": epoch},
            "spec": self._spec(),
            "history": list(self.history),
            "best": dict(self.best),
        }
        save_checkpoint(state, self.out / LAST)
        if improved:
            save_checkpoint(state, self.out / BEST)

    def _spec(self) -> dict[str, Any]:
        import napari_medcl
        from napari_medcl.spec import ModelSpec, default_classes

        cfg, info = self.cfg, self.info
        d = cfg.model.spatial_dims
        spacing = getattr(info, "spacing", None)
        if spacing is not None:
            spacing = [float(s) for s in list(spacing)[-d:]]
        name = cfg.name or f"{getattr(info, 'name', 'dataset')}-{cfg.model.name}-{d}d"
        spec = ModelSpec(
            name=name,
            spatial_dims=d,
            in_channels=info.in_channels,
            classes=default_classes(self.class_names),
            patch_size=tuple(self.patch_size),
            divisor=tuple(int(v) for v in self.model.divisor),
            spacing=spacing,
            normalization=dict(getattr(info, "normalization", None) or {"kind": "zscore"}),
            uncertainty_maps=tuple(self.model.uncertainty_names),
            nonzero_is_foreground=bool(getattr(info, "nonzero_is_foreground", False)),
            training={
                "method": _method(cfg),
                "uafr": cfg.model.uafr.enabled,
                "pdcr": config_to_dict(cfg.loss.pdcr) if cfg.loss.pdcr.enabled else None,
                "ccdc": config_to_dict(cfg.loss.ccdc) if cfg.loss.ccdc.enabled else None,
                "dataset": getattr(info, "name", str(cfg.data.root)),
                "metrics": {
                    "val_mean_dice": self.best["mean_dice"],
                    "best_epoch": self.best["epoch"],
                    "epochs": len(self.history),
                },
                "code_version": napari_medcl.__version__,
            },
        )
        return spec.to_dict()

    def _write_metrics(self) -> None:
        from napari_medcl.atomic import atomic_path, write_text_atomic

        lines = "".join(json.dumps(r, allow_nan=True) + "\n" for r in self.history)
        write_text_atomic(self.out / "metrics.jsonl", lines)
        figure = _curves(self.history, self.class_names[1:])
        with atomic_path(self.out / "curves.png") as tmp:
            figure.savefig(tmp, format="png", dpi=100)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def _method(cfg: TrainConfig) -> str:
    parts = [f"{cfg.model.name}{cfg.model.spatial_dims}d"]
    if cfg.model.uafr.enabled:
        parts.append("uafr")
    if cfg.loss.pdcr.enabled:
        parts.append(f"{cfg.loss.pdcr.mode}-pdcr")
    if cfg.loss.ccdc.enabled:
        parts.append("ccdc")
    return "+".join(parts)


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    train = record["train"]
    extra = ", ".join(f"{k} {v:.4f}" for k, v in train.items() if k != "loss")
    line = f"epoch {record['epoch']}/{epochs}: loss {train['loss']:.4f} ({extra})"
    if record["val"] is not None:
        val = record["val"]
        per_class = ", ".join(f"{k} {v:.4f}" for k, v in val["dice"].items())
        line += f"; val mean Dice {val['mean_dice']:.4f} ({per_class})"
    return line + f"; lr {record['lr']:.3g}; {record['seconds']:.1f} s"


def _curves(history: Sequence[dict[str, Any]], class_names: Sequence[str]) -> Any:
    """A matplotlib Figure (Agg canvas, no pyplot state): loss terms and validation Dice per epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    epochs = [r["epoch"] for r in history]
    for key in history[-1]["train"] if history else ():
        left.plot(epochs, [r["train"].get(key, math.nan) for r in history], marker=".", label=key)
    left.set_xlabel("epoch")
    left.set_title("training loss terms")
    left.legend(fontsize="small")
    val = [(r["epoch"], r["val"]) for r in history if r["val"] is not None]
    if val:
        xs = [e for e, _ in val]
        right.plot(xs, [v["mean_dice"] for _, v in val], marker="o", color="black", label="mean")
        for name in class_names:
            right.plot(xs, [v["dice"].get(name, math.nan) for _, v in val], marker=".", label=name)
        right.legend(fontsize="small")
    right.set_ylim(0, 1)
    right.set_xlabel("epoch")
    right.set_title("validation Dice")
    return figure
