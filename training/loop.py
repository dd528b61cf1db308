"""One epoch of training: the patch loader of the epoch, the optimizer steps, and the mean loss terms.

Why a resumed run matches an uninterrupted one: the patch dataset draws every sample from (seed, epoch,
index), so an epoch's data do not depend on what ran before, and PDCR and CCDC draw only from the run's
``torch.Generator`` (checkpointed with every other random state, see training/checkpoint.py).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import TrainConfig
from training.errors import TrainingError
from training.runtime import Runtime, all_reduce, rank_seed

if TYPE_CHECKING:
    from training.building import TrainingParts
    from training.start_weights import WeightAnchor

__all__ = ["TrainStep", "train_epoch"]


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


def train_epoch(
    epoch: int,
    cfg: TrainConfig,
    runtime: Runtime,
    parts: TrainingParts,
    train_cases: Sequence[Any],
    *,
    last_checkpoint: Path,
    log: Callable[[str], None] | None = None,
    replay: tuple[Sequence[Any], float] | None = None,
    anchor: WeightAnchor | None = None,
) -> dict[str, float]:
    """Train ``parts`` for epoch ``epoch`` (0-based) on ``train_cases``;
    the mean of each loss term over the epoch's steps and all processes. A loss that is not finite is a
    TrainingError pointing at ``last_checkpoint``. A step whose gradient norm is not finite is skipped and
    logged (fp16's GradScaler skips such steps itself); more than half of an epoch's steps skipped is a
    TrainingError. ``replay`` (cases, fraction): that share of every batch is drawn from those cases instead
    (training.replay, the forgetting guard of fine-tuning). ``anchor``: the L2-SP term
    (training.start_weights) joins every step's loss, reported as ``anchor``.

    With PDCR on, the epoch's first batch also gives ``pdcr_grad_ratio`` (training.diagnostics: PDCR's gradient
    norm over the segmentation loss's on the shared parameters, measured before that step on this process's
    batch, without changing the step), returned with the terms and passed to ``log``."""
    from tqdm import tqdm

    t = cfg.train
    dist = runtime.dist
    parts.step.train()
    sums: dict[str, Tensor] = {}
    iterations = t.iterations_per_epoch
    total_steps = t.epochs * iterations
    bar = tqdm(
        total=iterations,
        desc=f"epoch {epoch + 1}/{t.epochs}",
        disable=not (dist.is_main and sys.stdout.isatty()),
        file=sys.stdout,
        leave=False,
        dynamic_ncols=True,
    )
    optimizer, scaler = parts.optimizer, runtime.scaler
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_ratio = math.nan
    skipped: list[int] = []
    prompting = _prompting(cfg, parts.model)
    with warnings.catch_warnings():
        # the schedule counts iterations, skipped or not; torch warns when a run's first step was skipped
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        for i, batch in enumerate(_epoch_loader(epoch, cfg, runtime, parts.patch_size, train_cases, replay)):
            image = batch["image"].to(runtime.device, non_blocking=True)
            label = batch["label"].to(runtime.device, non_blocking=True)
            progress = (epoch * iterations + i) / max(1, total_steps)
            if prompting is not None:
                image = torch.cat([image, prompting(image, label, parts.generator)], dim=1)
            if i == 0 and "pdcr" in parts.losses:
                grad_ratio = _pdcr_grad_ratio(parts, runtime, image, label)
                if log is not None:
                    log(
                        f"epoch {epoch + 1}: PDCR / segmentation gradient-norm ratio {grad_ratio:.3g} on the shared "
                        "parameters (first batch)"
                    )
            with runtime.autocast():
                loss, terms = parts.step(image, label, parts.generator, progress)
            if anchor is not None:
                # float32, outside autocast: a sum over a million squared differences
                penalty = anchor.penalty()
                loss = loss + penalty
                terms = {**terms, "loss": loss.detach(), "anchor": penalty.detach()}
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            # the norm of the gradients DDP has already averaged, so every process takes the same decision
            grad_norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            if scaler.is_enabled() or torch.isfinite(grad_norm):
                if t.grad_clip > 0:
                    nn.utils.clip_grads_with_norm_(params, t.grad_clip, grad_norm)
                scaler.step(optimizer)  # fp16's scaler skips a step with an inf gradient itself
            else:
                skipped.append(i + 1)
                _report_skipped_step(epoch, i, grad_norm, parts, log)
            scaler.update()
            parts.scheduler.step()
            for key, value in terms.items():
                value = value.detach().to(torch.float64)
                sums[key] = sums[key] + value if key in sums else value
            bar.update(1)
            if bar.disable is False and i % 10 == 0:
                bar.set_postfix(loss=f"{float(terms['loss']):.4f}")
    bar.close()
    if len(skipped) * 2 > iterations:
        raise TrainingError(
            f"epoch {epoch + 1}: {len(skipped)} of {iterations} steps had a gradient that is not finite (steps "
            f"{skipped[:10]}{' ...' if len(skipped) > 10 else ''}) and were skipped; the last good checkpoint is "
            f"{last_checkpoint}. Lower train.lr or the loss weights, or train in fp32 (train.amp_cpu / train.amp false)"
        )
    keys = ["loss", "ce", "dice", *(k for k in ("pdcr", "ccdc", "anchor") if k in sums)]
    stacked = all_reduce(torch.stack([sums[k] for k in keys]), dist)
    means = (stacked / (iterations * dist.world_size)).tolist()
    train_terms = dict(zip(keys, means))
    if "pdcr" in parts.losses:
        train_terms["pdcr_grad_ratio"] = grad_ratio
    if not all(math.isfinite(v) for v in means):
        raise TrainingError(
            f"epoch {epoch + 1}: the training loss is not finite ({train_terms}); the last good checkpoint "
            f"is {last_checkpoint}. Lower train.lr, set train.amp_dtype to bf16, or lower loss weights"
        )
    return train_terms


def _report_skipped_step(
    epoch: int, index: int, grad_norm: Tensor, parts: TrainingParts, log: Callable[[str], None] | None
) -> None:
    """Log a step skipped for a gradient whose norm is not finite, naming the parameters with a NaN or infinite
    gradient, or, when every value is finite but the sum of squares overflows, the largest ones. Seen with bf16
    CPU autocast (docs/performance.md, "Training on CPU: bf16"): now and then one 3D convolution's weight
    gradient comes back with NaN or huge values while the loss is finite; taking that step would turn every
    weight into NaN."""
    if log is None:
        return
    grads = [(name, p.grad) for name, p in parts.step.named_parameters() if p.grad is not None]
    named = [name for name, g in grads if not torch.isfinite(g).all()]
    if not named:
        norms = sorted(((float(g.double().norm()), name) for name, g in grads), reverse=True)
        named = [f"{name} {norm:.3g}" for norm, name in norms[:3]]
    shown = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
    log(
        f"epoch {epoch + 1}, step {index + 1}: the gradient norm is {float(grad_norm)} ({shown}); "
        "the step is skipped"
    )


def _prompting(cfg: TrainConfig, model: nn.Module) -> Callable[..., Tensor] | None:
    """``(image, label, generator) -> prompt channels`` for a network with ``model.prompts`` (simulated
    interactions, training.prompt_training); None without."""
    if not cfg.model.prompts.enabled:
        return None
    from training.prompt_training import prompt_encoding, simulate_prompts

    encoding = prompt_encoding(cfg.model.prompts, int(model.num_classes))
    d = cfg.model.spatial_dims
    target = cfg.data.target_spacing
    # the patch's spacing in mm when the config fixes it; a "median" or native grid counts as 1 mm a voxel
    spacing = tuple(target)[-d:] if isinstance(target, tuple) else (1.0,) * d

    def prompting(image: Tensor, label: Tensor, generator: torch.Generator) -> Tensor:
        return simulate_prompts(model, image, label, encoding, cfg.model.prompts, spacing, generator)

    return prompting


def _pdcr_grad_ratio(parts: TrainingParts, runtime: Runtime, image: Tensor, label: Tensor) -> float:
    from training.diagnostics import pdcr_gradient_ratio

    step = getattr(parts.step, "module", parts.step)  # under DDP, the TrainStep inside
    return pdcr_gradient_ratio(
        parts.model,
        step.seg_loss,
        parts.losses["pdcr"],
        image,
        label,
        generator=parts.generator,
        autocast=runtime.autocast,
    )


def _epoch_loader(
    epoch: int,
    cfg: TrainConfig,
    runtime: Runtime,
    patch_size: Sequence[int],
    train_cases: Sequence[Any],
    replay: tuple[Sequence[Any], float] | None = None,
) -> torch.utils.data.DataLoader:
    from training.data import PatchDataset

    t, dist = cfg.train, runtime.dist

    def patches(cases: Sequence[Any], seed: int) -> PatchDataset:
        return PatchDataset(
            cases,
            patch_size,
            spatial_dims=cfg.model.spatial_dims,
            samples_per_epoch=t.iterations_per_epoch * t.batch_size,
            foreground_fraction=cfg.data.foreground_fraction,
            augmentation=cfg.data.augmentation,
            seed=seed,
        )

    dataset = patches(train_cases, t.seed)
    if replay is not None:
        from training.replay import REPLAY_SEED_OFFSET, ReplayMix

        dataset = ReplayMix(dataset, patches(replay[0], t.seed + REPLAY_SEED_OFFSET), replay[1])
    dataset.set_epoch(epoch)
    # Strided shards of the epoch's indices (DistributedSampler without shuffling: the dataset's
    # samples are already random per (seed, epoch, index)).
    sampler = torch.utils.data.distributed.DistributedSampler(
        dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=False, drop_last=True
    )
    loader_rng = torch.Generator().manual_seed(rank_seed(t.seed, 11, epoch, dist.rank))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=runtime.local_batch,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=runtime.device.type == "cuda",
        drop_last=True,
        generator=loader_rng,
        persistent_workers=False,
    )
