"""What a run trains, built from its config: network, losses, optimizer, LR schedule and patch size.

:func:`build_training` assembles them in a fixed order after seeding python, numpy and torch with
``train.seed``, so that a run (and a resumed run) starts from the same weights every time.
"""

from __future__ import annotations

import dataclasses
import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from training.config import TrainConfig, config_notices
from training.errors import RunError
from training.loop import TrainStep
from training.runtime import Runtime, rank_seed
from training.start_weights import train_only

__all__ = [
    "TrainingParts",
    "build_losses",
    "build_model",
    "build_training",
    "lr_factor",
    "resolve_patch_size",
]

DEFAULT_PROJECTION_DIM = 256
AUTO_PATCH_CAP = {2: 256, 3: 128}


@dataclass(frozen=True, eq=False)
class TrainingParts:
    """Everything a run updates, built once.

    ``model`` is the bare network (its state dict has no wrapper prefixes); ``step`` the TrainStep the loop
    calls (compiled network inside, DDP outside when distributed); ``losses`` the loss modules with
    parameters (PDCR's cross-layer projections), checkpointed beside the model; ``generator`` the only
    source of PDCR's and CCDC's randomness; ``sync_note`` says why SyncBatchNorm was not used, if asked; ``notes`` are lines for the run log (PDCR's
    form, strength and label windows; settings that have no effect, also warned with ``warnings.warn``).
    """

    model: nn.Module
    patch_size: tuple[int, ...]
    step: nn.Module
    losses: nn.ModuleDict
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    sync_note: str | None
    notes: tuple[str, ...] = ()


def build_training(cfg: TrainConfig, info: Any, runtime: Runtime) -> TrainingParts:
    """The seeded network, losses, optimizer and schedule for the dataset ``info`` (training.data's
    DatasetInfo), placed and wrapped as ``runtime`` says."""
    t = cfg.train
    dist, device = runtime.dist, runtime.device
    random.seed(t.seed)
    np.random.seed(t.seed % (1 << 32))
    torch.manual_seed(t.seed)
    num_classes = len(info.class_names)
    model = build_model(cfg, info.in_channels, num_classes)
    patch_size = resolve_patch_size(cfg, getattr(info, "median_shape", None), model.divisor)
    seg, pdcr, ccdc = build_losses(cfg, model, num_classes)
    model = model.to(device)
    network: nn.Module = torch.compile(model) if t.compile else model
    step: nn.Module = TrainStep(network, seg, pdcr, ccdc).to(device)
    sync_note = None
    if t.sync_batchnorm and dist.world_size > 1:
        if device.type == "cuda":
            # converts in place below the top module, so ``model`` is converted too
            step = nn.SyncBatchNorm.convert_sync_batchnorm(step)
        else:
            sync_note = "train.sync_batchnorm ignored: SyncBatchNorm needs CUDA"
    losses = nn.ModuleDict({k: v for k, v in (("pdcr", step.pdcr),) if v is not None})
    frozen_note = None
    if cfg.init.train_only and cfg.init.from_checkpoint is not None:
        try:
            frozen_note = train_only(model, cfg.init.train_only)
        except ValueError as error:
            raise RunError(str(error)) from None
    optimizer = _build_optimizer(cfg, [p for p in step.parameters() if p.requires_grad])
    scheduler = _build_scheduler(cfg, optimizer)
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # A projection head without CCDC gets no gradient; DDP must then look for unused parameters.
        unused = getattr(model, "projection", None) is not None and step.ccdc is None
        step = DistributedDataParallel(step, device_ids=ids, find_unused_parameters=unused)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(rank_seed(t.seed, 7, dist.rank))
    notices = config_notices(cfg)
    if dist.is_main:
        for notice in notices:
            warnings.warn(notice, UserWarning, stacklevel=2)
    notes = [f"notice: {n}" for n in notices] + ([frozen_note] if frozen_note else [])
    if pdcr is not None:
        notes += pdcr_notes(pdcr, patch_size)
    return TrainingParts(
        model=model,
        patch_size=patch_size,
        step=step,
        losses=losses,
        optimizer=optimizer,
        scheduler=scheduler,
        generator=generator,
        sync_note=sync_note,
        notes=tuple(notes),
    )


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
            # defaults passed as None so a registered model without these options still builds
            uafr_block=None if m.uafr.block == "uafr" else m.uafr.block,
            uafr_use_f=None if m.uafr.use_f else False,
        )
    if m.prompts.enabled:
        # prompt channels after the image's (training.prompt_training); the network still takes one tensor
        from training.prompt_training import prompt_encoding

        in_channels += prompt_encoding(m.prompts, num_classes).num_channels
    try:
        return create_model(
            m.name, spatial_dims=m.spatial_dims, in_channels=in_channels, num_classes=num_classes, **kwargs
        )
    except (TypeError, ValueError) as error:
        raise RunError(f"model: {error}") from None
    except FileNotFoundError as error:  # model.encoder_weights names a file that is not there
        raise RunError(str(error)) from None


def _lists(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_lists(v) for v in value]
    return value


def _default_pdcr_layers(model: nn.Module) -> dict[str, int]:
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


def pdcr_tap_info(model: nn.Module, rf_includes_uafr: bool) -> dict[str, Any]:
    """The model's taps with the receptive fields RF-PDCR uses: with or without the attention blocks' own
    convolutions (``loss.pdcr.rf_includes_uafr``; the authors' 3D code leaves UAFR out: 23 / 47 voxels)."""
    if rf_includes_uafr:
        return model.tap_info
    return getattr(model, "tap_info_without_uafr", model.tap_info)


def pdcr_notes(pdcr: Any, patch_size: Sequence[int]) -> list[str]:
    """Lines for the run log: the PDCR form and strength, and each tap's label windows (RF values in RF mode)."""
    lines = [
        f"PDCR form {pdcr.form} (Eq. 9{' as printed' if pdcr.form == 'paper' else ' shifted, as in the authors’ code'}), "
        f"reduction {pdcr.reduction}, weight {pdcr.weight:g}, cross weight {pdcr.cross_weight:g}, "
        f"tau {pdcr.temperature:g}, affinity {pdcr.affinity}, series {pdcr.series}"
    ]
    for name, windows in pdcr.windows(tuple(patch_size)).items():
        info = pdcr.tap_info[name]
        sizes = ", ".join("x".join(map(str, w)) for w in windows)
        lines.append(
            f"PDCR tap {name}: mode {pdcr.modes[name]}, stride {list(info.stride)}, receptive field "
            f"{list(info.receptive_field)}, windows {sizes}"
        )
    return lines


def build_losses(cfg: TrainConfig, model: nn.Module, num_classes: int) -> tuple[nn.Module, Any, Any]:
    """(segmentation loss, PDCRLoss or None, CCDCLoss or None) as ``cfg.loss`` says, for ``model``'s taps.

    The segmentation loss takes ``[logits, *deep_supervision]`` (nnU-Net weights over the heads); a bad
    PDCR/CCDC setting (unknown tap name, no projection head) is a RunError naming the key.
    """
    from training.losses.segmentation import DeepSupervisionLoss, ce_dice_loss

    def seg_base(logits: torch.Tensor, labels: torch.Tensor):
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

        if p.layers is None:
            p = dataclasses.replace(p, layers=_default_pdcr_layers(model))
        try:
            pdcr = PDCRLoss(
                pdcr_tap_info(model, p.rf_includes_uafr),
                p,
                num_classes=num_classes,
                spatial_dims=cfg.model.spatial_dims,
            )
        except ValueError as error:
            raise RunError(f"loss.pdcr: {error}") from None
    if cfg.loss.ccdc.enabled:
        from training.losses.ccdc import CCDCLoss

        if getattr(model, "embedding_channels", None) is None:
            raise RunError("loss.ccdc needs a projection head: set model.projection_dim")
        try:
            ccdc = CCDCLoss(cfg.loss.ccdc)
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


def _build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule: :func:`lr_factor` of the optimizer steps done."""
    t = cfg.train
    total = t.epochs * t.iterations_per_epoch
    floor = t.min_lr / t.lr if t.lr > 0 else 0.0
    warmup = t.warmup_epochs * t.iterations_per_epoch

    def factor(step_index: int) -> float:
        return lr_factor(
            step_index, total=total, warmup=warmup, kind=t.scheduler, exponent=t.poly_exponent, floor=floor
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
