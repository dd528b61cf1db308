"""Step-time cost of the contrastive losses: CE+Dice alone vs + PDCR vs + CCDC vs all, 2D and 3D U-Nets.

One training step = forward, losses, backward (no optimizer update: it costs the same in every row, and
leaving it out makes the ratios conservative). The four configurations of one case are timed round-robin
(one step of each in turn, repeated), so load from other processes on a shared machine hits them alike; the
table reports the median per configuration and its ratio to the CE+Dice baseline. On CPU it also gives the
ratio of median process CPU time, which competing processes disturb far less than wall-clock time.

"+ CCDC" includes the projection head the loss needs (the baseline network has none), so its ratio is the
whole price of using CCDC. It feeds the loss the model output's ``projection`` (as the training engine does):
the head runs densely without gradient for the keys and with gradient at the sampled query pixels only.
``--dense-row`` adds the same loss fed the dense ``embedding`` (the head's full forward and backward), and
``--head-row`` that dense head with no loss at all. A second table times each loss alone (forward + backward
on fixed network outputs) to show where the extra time goes; ``--profile`` adds a torch.profiler breakdown of
the CCDC loss.

    .venv/bin/python benchmarks/losses.py                # CUDA when available, else CPU
    .venv/bin/python benchmarks/losses.py --device cpu --steps 5 --dims 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.config import CCDCConfig, PDCRConfig
from training.losses.ccdc import CCDCLoss
from training.losses.pdcr import PDCRLoss
from training.losses.segmentation import DeepSupervisionLoss, ce_dice_loss
from training.models import create_model
from training.models.output import ProjectionInput

CONFIGS = ("CE+Dice", "+ PDCR", "+ CCDC", "all", "+ CCDC, head at stride 2", "all, head at stride 2")
HEAD_ONLY = "dense head, no CCDC"
DENSE = "+ CCDC, dense embedding"
# nnU-Net widths (base 32, capped at 512 in 2D / 320 in 3D) on a GPU; on CPU halved (2D) or quartered (3D) so a
# whole run stays within minutes on two cores. The spatial sizes and batch sizes are the in both cases.
FEATURES = {
    ("cuda", 2): (32, 64, 128, 256, 512, 512, 512),
    ("cuda", 3): (32, 64, 128, 256, 320, 320),
    ("cpu", 2): (16, 32, 64, 128, 256, 256),
    ("cpu", 3): (8, 16, 32, 64, 128),
}


@dataclass(frozen=True)
class Case:
    dims: int
    batch: int
    size: int
    features: tuple[int, ...]

    @property
    def label(self) -> str:
        shape = "x".join([str(self.size)] * self.dims)
        return f"{self.dims}D U-Net, {self.batch} x {shape}"


def synthetic_batch(case: Case, num_classes: int, device: torch.device, seed: int = 0):
    """Image (B, 1, *S) and blobby labels (B, *S): argmax of upsampled low-resolution noise."""
    g = torch.Generator().manual_seed(seed)
    spatial = (case.size,) * case.dims
    coarse = torch.randn(case.batch, num_classes, *[max(2, case.size // 16)] * case.dims, generator=g)
    mode = "bilinear" if case.dims == 2 else "trilinear"
    labels = F.interpolate(coarse, size=spatial, mode=mode, align_corners=False).argmax(1)
    image = labels.float().unsqueeze(1) + 0.5 * torch.randn(case.batch, 1, *spatial, generator=g)
    return image.to(device), labels.to(device)


def pdcr_for(model, dims: int, num_classes: int, device: torch.device) -> PDCRLoss:
    """The paper's best setting: single-layer H-PDCR on encoder 2-4 (N = 128/64/32) + cross-layer 2<->3."""
    config = PDCRConfig(
        layers={"encoder2": 128, "encoder3": 64, "encoder4": 32},
        cross_pairs=(("encoder2", "encoder3"),),
        cross_samples=64,
        mode="h",
        weight=0.01,
    )
    return PDCRLoss(model.tap_info, config, num_classes=num_classes, spatial_dims=dims).to(device)


def build_steps(case: Case, args, device: torch.device) -> tuple[dict[str, Callable[[], None]], tuple]:
    """One closure per configuration (forward + losses + backward), and the parts the loss-only timing needs."""
    k = args.classes
    common = {
        "spatial_dims": case.dims,
        "in_channels": 1,
        "num_classes": k,
        "features": case.features,
        "deep_supervision": True,
        "uafr": args.uafr,
    }
    torch.manual_seed(0)
    plain = create_model("unet", **common).to(device)
    torch.manual_seed(0)
    with_head = create_model("unet", projection_dim=args.projection_dim, **common).to(device)
    torch.manual_seed(0)
    # The projection head on decoder2 (stride 2, as ReCo's reduced-stride embeddings): model.projection_level=2.
    head_stride2 = create_model("unet", projection_dim=args.projection_dim, projection_level=2, **common).to(
        device
    )
    pdcr_plain = pdcr_for(plain, case.dims, k, device)
    pdcr_head = pdcr_for(with_head, case.dims, k, device)
    pdcr_stride2 = pdcr_for(head_stride2, case.dims, k, device)
    ccdc = CCDCLoss(CCDCConfig(weight=1.0))
    seg = DeepSupervisionLoss(ce_dice_loss)
    image, labels = synthetic_batch(case, k, device)
    amp = args.amp and device.type == "cuda"
    generator = torch.Generator(device=device).manual_seed(0)

    def step(
        model, pdcr: PDCRLoss | None, use_ccdc: bool, head_only: bool = False, dense: bool = False
    ) -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            out = model(image)
            loss = seg([out.logits, *out.deep_supervision], labels).loss
            if pdcr is not None:
                loss = loss + pdcr(out.taps, labels, generator=generator).loss
            if use_ccdc:
                probs, target = out.logits.float().softmax(1), labels
                embedding = out.embedding if dense else out.projection
                size = tuple(embedding.shape[2:])
                if size != tuple(labels.shape[1:]):  # as the training engine: probs linear, labels nearest
                    mode = "bilinear" if case.dims == 2 else "trilinear"
                    probs = F.interpolate(probs, size=size, mode=mode, align_corners=False)
                    target = F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")[
                        :, 0
                    ].long()
                loss = loss + ccdc(embedding, probs, target, generator=generator)
            if head_only:
                # The projection head's dense forward and backward without the loss's own work.
                loss = loss + 0.0 * out.embedding.float().mean()
        loss.backward()

    steps = {
        "CE+Dice": lambda: step(plain, None, False),
        "+ PDCR": lambda: step(plain, pdcr_plain, False),
        "+ CCDC": lambda: step(with_head, None, True),
        "all": lambda: step(with_head, pdcr_head, True),
        "+ CCDC, head at stride 2": lambda: step(head_stride2, None, True),
        "all, head at stride 2": lambda: step(head_stride2, pdcr_stride2, True),
    }
    if args.dense_row:
        steps[DENSE] = lambda: step(with_head, None, True, dense=True)
    if args.head_row:
        steps[HEAD_ONLY] = lambda: step(with_head, None, False, head_only=True)
    return steps, (with_head, pdcr_head, ccdc, image, labels, generator)


def timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU milliseconds of one call (CPU time: all threads of this process)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - wall) * 1000.0, (time.process_time() - cpu) * 1000.0


def loss_only_times(parts, args, device: torch.device) -> dict[str, float]:
    """Median ms of each loss alone (forward + backward into detached copies of the network outputs)."""
    model, pdcr, ccdc, image, labels, generator = parts
    with torch.no_grad():
        out = model(image)
    logits = [t.detach().requires_grad_(True) for t in (out.logits, *out.deep_supervision)]
    taps = {name: t.detach().requires_grad_(True) for name, t in out.taps.items()}
    # The head's input as a leaf: "CCDC" below includes the head's own work (its dense no-grad pass for the
    # keys, its evaluation and backward at the query pixels), as in a training step.
    projection = ProjectionInput(out.projection.features.detach().requires_grad_(True), model.projection)
    probs = out.logits.float().softmax(1)
    seg = DeepSupervisionLoss(ce_dice_loss)
    runs = {
        "CE+Dice (deep sup.)": lambda: seg(logits, labels).loss.backward(),
        "PDCR": lambda: pdcr(taps, labels, generator=generator).loss.backward(),
        "CCDC (with its head)": lambda: ccdc(projection, probs, labels, generator=generator).backward(),
    }
    times = {}
    for name, fn in runs.items():
        fn()  # warm-up
        times[name] = statistics.median(timed(fn, device)[0] for _ in range(max(3, args.steps)))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            runs["CCDC (with its head)"]()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=12))
    return times


def run_case(case: Case, args, device: torch.device):
    """Median wall ms and median CPU ms per configuration, and the loss-alone wall ms."""
    steps, parts = build_steps(case, args, device)
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, fn in steps.items():
            samples[name].append(timed(fn, device))
    wall = {name: statistics.median(w for w, _ in v) for name, v in samples.items()}
    cpu = {name: statistics.median(c for _, c in v) for name, v in samples.items()}
    return wall, cpu, loss_only_times(parts, args, device)


def _load() -> str:
    """The machine's load average, to flag timings taken while other processes competed for the CPU."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (median)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per configuration")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--projection-dim", type=int, default=64)
    parser.add_argument("--features-2d", type=int, nargs="+", default=None)
    parser.add_argument("--features-3d", type=int, nargs="+", default=None)
    parser.add_argument("--batch-2d", type=int, default=8)
    parser.add_argument("--size-2d", type=int, default=256)
    parser.add_argument("--batch-3d", type=int, default=2)
    parser.add_argument("--size-3d", type=int, default=96)
    parser.add_argument(
        "--uafr", action="store_true", help="UAFR blocks in every network (default: plain U-Net)"
    )
    parser.add_argument(
        "--no-amp", dest="amp", action="store_false", help="fp32 on CUDA (default: fp16 autocast)"
    )
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of the CCDC loss")
    parser.add_argument(
        "--head-row",
        action="store_true",
        help="also time the network with the CCDC projection head run densely (forward + backward), no loss",
    )
    parser.add_argument(
        "--dense-row",
        action="store_true",
        help="also time CCDC fed the dense embedding (the head's full forward and backward)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda given but torch sees no CUDA device")
        device = torch.device(args.device)
    args.steps = args.steps or (10 if device.type == "cuda" else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    precision = "fp16 autocast" if device.type == "cuda" and args.amp else "fp32"
    print(f"device: {name}; torch {torch.__version__}; {precision}; K = {args.classes} classes; ")
    print(
        f"CCDC: tau 0.5, 256 queries x 256 negatives per class, region 2^d queries, projection dim "
        f"{args.projection_dim}; PDCR: H-PDCR on encoder2-4 (N 128/64/32) + cross 2<->3, weight 0.01; "
        f"deep supervision on; UAFR {'on' if args.uafr else 'off'}; median of {args.steps} steps after "
        f"{args.warmup} warm-up"
    )
    print(f"load average (1, 5, 15 min) at the start: {_load()}")
    rows, loss_rows = [], []
    for dims in args.dims:
        explicit = args.features_2d if dims == 2 else args.features_3d
        case = Case(
            dims=dims,
            batch=args.batch_2d if dims == 2 else args.batch_3d,
            size=args.size_2d if dims == 2 else args.size_3d,
            features=tuple(explicit) if explicit else FEATURES[(device.type, dims)],
        )
        step_ms, cpu_ms, loss_ms = run_case(case, args, device)
        base = step_ms["CE+Dice"]
        extra = ((DENSE,) if args.dense_row else ()) + ((HEAD_ONLY,) if args.head_row else ())
        for config in CONFIGS + extra:
            cpu_ratio = cpu_ms[config] / cpu_ms["CE+Dice"]
            rows.append(
                (case.label, str(case.features), config, step_ms[config], step_ms[config] / base, cpu_ratio)
            )
        for loss_name, ms in loss_ms.items():
            loss_rows.append((case.label, loss_name, ms, ms / base))

    cpu_column = device.type == "cpu"
    print(f"\nload average (1, 5, 15 min) at the end: {_load()}")
    print(
        "\n| case | features | losses | ms/step | ratio to CE+Dice |"
        + (" CPU-time ratio |" if cpu_column else "")
    )
    print("|---|---|---|---:|---:|" + ("---:|" if cpu_column else ""))
    for label, features, config, ms, ratio, cpu_ratio in rows:
        extra = f" {cpu_ratio:.3f} |" if cpu_column else ""
        print(f"| {label} | {features} | {config} | {ms:.0f} | {ratio:.3f} |{extra}")
    print("\n| case | loss alone (fwd + bwd) | ms | share of a CE+Dice step |")
    print("|---|---|---:|---:|")
    for label, loss_name, ms, share in loss_rows:
        print(f"| {label} | {loss_name} | {ms:.1f} | {share:.3f} |")


if __name__ == "__main__":
    main()
