"""Image-level self-supervised pre-training (paper A, Table V e: SimCLR, BYOL, SimSiam), then supervised fine-tuning.

Paper A compares PDCR with three image-level contrastive methods that first pre-train the network on the training
images without labels and are then fine-tuned with labels. This module is that first stage::

    python -m training.pretrain CONFIG.yaml --method simclr --epochs 50 -o runs/isic-simclr [--set key=value ...]

It builds the network ``CONFIG`` describes (the same ``model`` section the fine-tuning run uses), draws patches
from the training split of ``data`` (labels unused), makes two views of each patch (:func:`two_views`), and trains
the encoder through a head on its deepest encoder tap, globally pooled (:class:`SSLHead`). It writes

    network.pt   the whole network's state dict (encoder trained, decoder as initialised)
    encoder.pt   DeepLabV3+ only: the ResNet encoder's state dict; fine-tune with
                 ``--set model.encoder_weights=runs/isic-simclr/encoder.pt`` (the same config otherwise)

Losses (pure functions, z/p (B, D) float -> scalar): SimCLR's NT-Xent over the 2B views of a batch; BYOL's
2 - 2 cos(p, z') against a momentum (EMA) copy of the network and projector; SimSiam's -cos(p, stopgrad(z)). The
BYOL and SimSiam losses are symmetrised over the two views. Randomness comes from a seeded generator
(``train.seed``); optimisation is AdamW with ``train.lr`` and ``train.weight_decay``, constant rate.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["METHODS", "SSLHead", "byol_loss", "main", "nt_xent_loss", "pretrain", "simsiam_loss", "two_views"]

METHODS = ("simclr", "byol", "simsiam")


def _check_pair(a: Tensor, b: Tensor, what: str) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"{what} needs two (B, D) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """SimCLR's NT-Xent: z1, z2 (B, D) projections of two views of the same B images -> scalar float32.

    The 2B vectors are L2-normalised; for vector i the positive is the other view of its image and the other
    2B - 2 vectors are negatives: l_i = -log(exp(c(i, pos) / tau) / sum_{k != i} exp(c(i, k) / tau)); mean over i.
    """
    _check_pair(z1, z2, "nt_xent_loss")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)  # (2B, D)
    logits = z @ z.t() / temperature  # (2B, 2B)
    logits = logits.masked_fill(torch.eye(2 * batch, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(z.device)
    return F.cross_entropy(logits, positives)


def byol_loss(p: Tensor, z_target: Tensor) -> Tensor:
    """BYOL: p (B, D) online prediction, z_target (B, D) target projection (no gradient) -> mean of
    2 - 2 cos(p, z_target), in [0, 4]."""
    _check_pair(p, z_target, "byol_loss")
    return (2.0 - 2.0 * F.cosine_similarity(p.float(), z_target.detach().float(), dim=-1)).mean()


def simsiam_loss(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam: p (B, D) prediction of one view, z (B, D) projection of the other -> mean of -cos(p, stopgrad(z)),
    in [-1, 1]."""
    _check_pair(p, z, "simsiam_loss")
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


def two_views(image: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two random views of each image: image (B, C, *S) -> two (B, C, *S).

    Per view and image: a random crop of 50-100 % of each axis resized back to S (SimCLR's random resized crop),
    a flip on each axis with probability 0.5, an intensity gain in [0.8, 1.2] and shift in [-0.2, 0.2] times the
    image's standard deviation, and Gaussian noise of 5 % of it. Dimension-agnostic (2D and 3D).
    """
    return _view(image, generator), _view(image, generator)


def _view(image: Tensor, generator: torch.Generator) -> Tensor:
    spatial = tuple(image.shape[2:])
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    out = []
    for x in image:  # (C, *S)
        u = torch.rand(len(spatial) * 2 + 3, generator=generator).tolist()
        box = []
        for a, size in enumerate(spatial):
            length = max(1, round(size * (0.5 + 0.5 * u[2 * a])))
            start = int(u[2 * a + 1] * (size - length + 1))
            box.append(slice(start, start + length))
        crop = x[(slice(None), *box)].unsqueeze(0).float()
        x = F.interpolate(crop, size=spatial, mode=mode, align_corners=False)[0]
        flips = [a + 1 for a in range(len(spatial)) if torch.rand(1, generator=generator).item() < 0.5]
        if flips:
            x = x.flip(flips)
        std = x.std().clamp(min=1e-6)
        gain, shift = 0.8 + 0.4 * u[-3], (u[-2] - 0.5) * 0.4 * std
        noise = torch.randn(x.shape, generator=generator) * 0.05 * std
        out.append(x * gain + shift + noise.to(x.device))
    return torch.stack(out).to(image.dtype)


def _mlp(channels: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out)
    )


class SSLHead(nn.Module):
    """Global average pool of one tap -> projector MLP (C -> hidden -> out), and a predictor MLP
    (out -> hidden -> out) for BYOL and SimSiam. ``forward(tap (B, C, *S_l))`` -> (z (B, out), p (B, out) or None)."""

    def __init__(self, channels: int, method: str, hidden: int = 512, out: int = 128):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        self.projector = _mlp(channels, hidden, out)
        self.predictor = None if method == "simclr" else _mlp(out, hidden, out)

    def forward(self, tap: Tensor) -> tuple[Tensor, Tensor | None]:
        z = self.projector(tap.mean(dim=tuple(range(2, tap.ndim))))  # (B, C) -> (B, out)
        return z, None if self.predictor is None else self.predictor(z)


def deepest_encoder_tap(tap_info: dict) -> str:
    """The encoder tap with the largest stride (the last of equals): the representation the head reads."""
    names = [n for n in tap_info if n.startswith("encoder")]
    if not names:
        raise ValueError(f"the model has no encoder taps (taps: {sorted(tap_info)})")
    return max(names, key=lambda n: (math.prod(tap_info[n].stride), list(tap_info).index(n)))


class _Pretrainer(nn.Module):
    """The network and the head (and, for BYOL, their momentum copies); ``forward(v1, v2)`` -> loss."""

    def __init__(self, model: nn.Module, method: str, tap: str, temperature: float, momentum: float):
        super().__init__()
        self.model, self.method, self.tap, self.temperature = model, method, tap, temperature
        self.head = SSLHead(model.tap_info[tap].channels, method)
        self.momentum = momentum
        self.target = None
        if method == "byol":
            self.target = nn.ModuleDict({"model": copy.deepcopy(model), "head": copy.deepcopy(self.head)})
            self.target.requires_grad_(False)

    def _embed(self, model: nn.Module, head: nn.Module, view: Tensor) -> tuple[Tensor, Tensor | None]:
        return head(model(view).taps[self.tap])

    def forward(self, v1: Tensor, v2: Tensor) -> Tensor:
        (z1, p1), (z2, p2) = (self._embed(self.model, self.head, v) for v in (v1, v2))
        if self.method == "simclr":
            return nt_xent_loss(z1, z2, self.temperature)
        if self.method == "simsiam":
            return 0.5 * (simsiam_loss(p1, z2) + simsiam_loss(p2, z1))
        with torch.no_grad():
            t1, _ = self._embed(self.target["model"], self.target["head"], v1)
            t2, _ = self._embed(self.target["model"], self.target["head"], v2)
        return byol_loss(p1, t2) + byol_loss(p2, t1)

    @torch.no_grad()
    def update_target(self) -> None:
        """BYOL's exponential moving average of the online weights (buffers copied)."""
        if self.target is None:
            return
        for online, target in ((self.model, self.target["model"]), (self.head, self.target["head"])):
            for p_online, p_target in zip(online.parameters(), target.parameters()):
                p_target.mul_(self.momentum).add_(p_online.detach(), alpha=1.0 - self.momentum)
            for b_online, b_target in zip(online.buffers(), target.buffers()):
                b_target.copy_(b_online)


def pretrain(
    cfg,
    *,
    method: str,
    epochs: int,
    out: str | Path,
    iterations: int | None = None,
    temperature: float = 0.5,
    momentum: float = 0.99,
) -> dict[str, float]:
    """Pre-train ``cfg``'s network on its training split without labels; write network.pt (and encoder.pt for
    DeepLabV3+) into ``out``. ``iterations`` per epoch defaults to ``cfg.train.iterations_per_epoch``.
    Returns {"first_loss", "last_loss"} (mean loss of the first and last epoch)."""
    import dataclasses

    from training.building import build_model, resolve_patch_size
    from training.data import PatchDataset, prepare_dataset

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    t = cfg.train
    torch.manual_seed(t.seed)
    device = torch.device("cuda" if t.device != "cpu" and torch.cuda.is_available() else "cpu")
    info, train_cases, _ = prepare_dataset(cfg.data, spatial_dims=cfg.model.spatial_dims, seed=t.seed)
    model = build_model(cfg, info.in_channels, len(info.class_names))
    patch_size = resolve_patch_size(cfg, getattr(info, "median_shape", None), model.divisor)
    trainer = _Pretrainer(model, method, deepest_encoder_tap(model.tap_info), temperature, momentum).to(
        device
    )
    params = [p for p in trainer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    generator = torch.Generator().manual_seed(t.seed)
    iterations = iterations or t.iterations_per_epoch
    no_augmentation = dataclasses.replace(
        cfg.data.augmentation, enabled=False
    )  # the views are the augmentation
    losses = []
    trainer.train()
    for epoch in range(epochs):
        dataset = PatchDataset(
            train_cases,
            patch_size,
            spatial_dims=cfg.model.spatial_dims,
            samples_per_epoch=iterations * t.batch_size,
            foreground_fraction=cfg.data.foreground_fraction,
            augmentation=no_augmentation,
            seed=t.seed,
        )
        dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=t.batch_size, num_workers=cfg.data.num_workers, drop_last=True
        )
        total = 0.0
        for batch in loader:
            v1, v2 = (v.to(device) for v in two_views(batch["image"], generator))
            loss = trainer(v1, v2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            trainer.update_target()
            total += float(loss.detach())
        losses.append(total / iterations)
        print(f"pretrain {method} epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}", flush=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    torch.save(state, out / "network.pt")
    encoder = getattr(model, "encoder", None)
    if encoder is not None and not isinstance(encoder, nn.ModuleList):  # DeepLabV3+'s ResNet encoder
        torch.save({k: v.cpu() for k, v in encoder.state_dict().items()}, out / "encoder.pt")
    return {"first_loss": losses[0], "last_loss": losses[-1]}


def main(argv: Sequence[str] | None = None) -> int:
    from training.config import ConfigError, load_config

    parser = argparse.ArgumentParser(
        prog="python -m training.pretrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="training config YAML (its data, model and train sections are used)")
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument(
        "--iterations", type=int, default=None, help="per epoch (default: train.iterations_per_epoch)"
    )
    parser.add_argument("--temperature", type=float, default=0.5, help="SimCLR's tau")
    parser.add_argument("--momentum", type=float, default=0.99, help="BYOL's target EMA")
    parser.add_argument("-o", "--out", required=True, help="output folder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        pretrain(
            cfg,
            method=args.method,
            epochs=args.epochs,
            out=args.out,
            iterations=args.iterations,
            temperature=args.temperature,
            momentum=args.momentum,
        )
    except (ConfigError, ValueError) as error:
        print(f"pretrain: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
