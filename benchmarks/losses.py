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

``--precision fp32,bf16`` times every configuration in each precision (autocast; fp16 is CUDA only), all in the
same round-robin, and adds a table of each precision against the first: the step-time ratio (wall and CPU
time), the loss of one step on the same batch and weights (a numeric-agreement check; CCDC's and PDCR's
samples come from the same seed, but CCDC picks pixels by the network's confidence, so its draws may differ)
and, on Linux, the peak RSS increase of a step. ``--recipes`` times the networks, patch sizes and batch sizes
of the bundled default recipes (``training/configs/default-brain-tissue-{2d,3d}.yaml``) instead of the
issue's synthetic cases.

    .venv/bin/python benchmarks/losses.py                # CUDA when available, else CPU
    .venv/bin/python benchmarks/losses.py --device cpu --steps 5 --dims 2
    .venv/bin/python benchmarks/losses.py --device cpu --recipes --precision fp32,bf16 --configs CE+Dice
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from training.building import build_model
from training.config import CCDCConfig, ModelConfig, PDCRConfig, TrainConfig, UAFRConfig, load_config
from training.losses.ccdc import CCDCLoss
from training.losses.pdcr import PDCRLoss
from training.losses.segmentation import DeepSupervisionLoss, ce_dice_loss
from training.models.output import ProjectionInput
from training.runtime import cpu_bf16_support

CONFIGS = ("CE+Dice", "+ PDCR", "+ CCDC", "all", "+ CCDC, head at stride 2", "all, head at stride 2")
HEAD_ONLY = "dense head, no CCDC"
DENSE = "+ CCDC, dense embedding"
# nnU-Net widths (base 32, capped at 512 in 2D / 320 in 3D) on a GPU; on CPU halved (2D) or quartered (3D) so a
# whole run stays within minutes on two cores. The spatial sizes and batch sizes are the issue's in both cases.
FEATURES = {
    ("cuda", 2): (32, 64, 128, 256, 512, 512, 512),
    ("cuda", 3): (32, 64, 128, 256, 320, 320),
    ("cpu", 2): (16, 32, 64, 128, 256, 256),
    ("cpu", 3): (8, 16, 32, 64, 128),
}
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
RECIPES = {
    d: Path(__file__).resolve().parents[1] / "training" / "configs" / f"default-brain-tissue-{d}d.yaml"
    for d in (2, 3)
}


@dataclass(frozen=True)
class Case:
    """One network and batch: ``model`` is built by ``training.building.build_model`` as a run would."""

    batch: int
    shape: tuple[int, ...]
    model: ModelConfig
    recipe: str | None = None

    @property
    def dims(self) -> int:
        return len(self.shape)

    @property
    def features(self) -> tuple[int, ...]:
        return tuple(self.model.features or ())

    @property
    def label(self) -> str:
        shape = "x".join(str(n) for n in self.shape)
        uafr = "+UAFR" if self.model.uafr.enabled else ""
        prefix = f"{self.recipe}: " if self.recipe else ""
        return f"{prefix}{self.dims}D U-Net{uafr}, {self.batch} x {shape}"


def issue_case(dims: int, batch: int, size: int, features: tuple[int, ...], uafr: bool) -> Case:
    """The issue's synthetic case: a cubic (square) patch, deep supervision on."""
    model = ModelConfig(
        spatial_dims=dims, features=tuple(features), deep_supervision=True, uafr=UAFRConfig(enabled=uafr)
    )
    return Case(batch=batch, shape=(size,) * dims, model=model)


def recipe_case(dims: int) -> Case:
    """The network, patch and batch of the bundled default recipe ``default-brain-tissue-<dims>d``."""
    cfg = load_config(RECIPES[dims])
    return Case(
        batch=cfg.train.batch_size,
        shape=tuple(cfg.train.patch_size),
        model=cfg.model,
        recipe=RECIPES[dims].stem,
    )


def synthetic_batch(case: Case, num_classes: int, device: torch.device, seed: int = 0):
    """Image (B, 1, *S) and blobby labels (B, *S): argmax of upsampled low-resolution noise."""
    g = torch.Generator().manual_seed(seed)
    spatial = case.shape
    coarse = torch.randn(case.batch, num_classes, *[max(2, n // 16) for n in spatial], generator=g)
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


Step = Callable[[], torch.Tensor]


def build_steps(case: Case, args, device: torch.device) -> tuple[dict[tuple[str, str], Step], tuple]:
    """One closure per (configuration, precision) (forward + losses + backward, returning the detached loss),
    and the parts the loss-only timing needs."""
    k = args.classes

    def network(**head) -> torch.nn.Module:
        torch.manual_seed(0)
        model_config = dataclasses.replace(case.model, **head)
        return build_model(TrainConfig(model=model_config), 1, k).to(device)

    plain = network()
    with_head = network(projection_dim=args.projection_dim)
    # The projection head on decoder2 (stride 2, as ReCo's reduced-stride embeddings): model.projection_level=2.
    head_stride2 = network(projection_dim=args.projection_dim, projection_level=2)
    pdcr_plain = pdcr_for(plain, case.dims, k, device)
    pdcr_head = pdcr_for(with_head, case.dims, k, device)
    pdcr_stride2 = pdcr_for(head_stride2, case.dims, k, device)
    ccdc = CCDCLoss(CCDCConfig(weight=1.0))
    seg = DeepSupervisionLoss(ce_dice_loss)
    image, labels = synthetic_batch(case, k, device)
    generator = torch.Generator(device=device).manual_seed(0)

    def step(
        precision: str,
        model,
        pdcr: PDCRLoss | None,
        use_ccdc: bool,
        head_only: bool = False,
        dense: bool = False,
    ) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        dtype = AUTOCAST[precision]
        autocast = contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
        with autocast:
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
        return loss.detach()

    configurations = {
        "CE+Dice": (plain, None, False),
        "+ PDCR": (plain, pdcr_plain, False),
        "+ CCDC": (with_head, None, True),
        "all": (with_head, pdcr_head, True),
        "+ CCDC, head at stride 2": (head_stride2, None, True),
        "all, head at stride 2": (head_stride2, pdcr_stride2, True),
        DENSE: (with_head, None, True, False, True),
        HEAD_ONLY: (with_head, None, False, True),
    }
    steps = {
        (config, precision): (lambda p=precision, a=configurations[config]: step(p, *a))
        for config in args.configs
        for precision in args.precision
    }
    return steps, (with_head, pdcr_head, ccdc, image, labels, generator)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
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


class PeakRSSIncrease:
    """The peak resident memory of a with-block above the RSS at its start, in bytes: the kernel's VmHWM,
    reset through /proc/self/clear_refs (Linux). ``value`` stays None where that cannot be done.

    The heap the previous step freed is first handed back to the kernel (glibc's ``malloc_trim``), else a
    step that follows a larger one in the round-robin would reuse its pages and show no increase at all."""

    value: int | None = None

    def __enter__(self) -> PeakRSSIncrease:
        _trim_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._start = _status_kib("VmRSS")
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc) -> None:
        if self._start is not None:
            self.value = (_status_kib("VmHWM") - self._start) * 1024


def _trim_heap() -> None:
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


@dataclass
class CaseResult:
    """Per (configuration, precision): median wall and CPU ms of a step, the largest peak RSS increase of a
    timed step (bytes; None where not measured), the loss of one step from the same seed; and the loss-alone
    wall ms."""

    wall: dict[tuple[str, str], float]
    cpu: dict[tuple[str, str], float]
    rss: dict[tuple[str, str], int | None]
    loss: dict[tuple[str, str], float]
    loss_only: dict[str, float]


def run_case(case: Case, args, device: torch.device) -> CaseResult:
    """Every (configuration, precision) of ``case`` timed round-robin, then one step of each from one seed."""
    steps, parts = build_steps(case, args, device)
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in steps}
    rss: dict[tuple[str, str], int | None] = dict.fromkeys(steps)
    for _ in range(args.steps):
        for key, fn in steps.items():
            with PeakRSSIncrease() if device.type == "cpu" else contextlib.nullcontext() as peak:
                samples[key].append(timed(fn, device))
            if peak is not None and peak.value is not None:
                rss[key] = max(rss[key] or 0, peak.value)
    wall = {key: statistics.median(w for w, _ in v) for key, v in samples.items()}
    cpu = {key: statistics.median(c for _, c in v) for key, v in samples.items()}
    generator = parts[-1]
    loss = {}
    for key, fn in steps.items():  # same weights (no optimizer step), same batch, same sampling seed
        generator.manual_seed(0)
        loss[key] = float(fn())
    return CaseResult(wall, cpu, rss, loss, loss_only_times(parts, args, device))


def _load() -> str:
    """The machine's load average, to flag timings taken while other processes competed for the CPU."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's processor string."""
    import platform

    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def _precisions(text: str | None, device: torch.device, amp: bool, parser) -> tuple[str, ...]:
    if text is None:
        return ("fp16",) if device.type == "cuda" and amp else ("fp32",)
    precisions = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in precisions if p not in AUTOCAST]
    if not precisions or unknown:
        parser.error(f"--precision takes a comma-separated list of {', '.join(AUTOCAST)}, got {text!r}")
    if device.type == "cpu" and "fp16" in precisions:
        parser.error("--precision fp16 is CUDA only (torch's CPU autocast is bf16); use fp32,bf16 on the CPU")
    return precisions


def _configurations(text: str | None, args, parser) -> tuple[str, ...]:
    extra = ((DENSE,) if args.dense_row else ()) + ((HEAD_ONLY,) if args.head_row else ())
    if text is None:
        return CONFIGS + extra
    configs = tuple(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))
    unknown = [c for c in configs if c not in (*CONFIGS, DENSE, HEAD_ONLY)]
    if not configs or unknown:
        parser.error(f"--configs takes a comma-separated list of {'; '.join((*CONFIGS, DENSE, HEAD_ONLY))}")
    return configs + tuple(c for c in extra if c not in configs)


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
    parser.add_argument(
        "--precision",
        default=None,
        help="comma-separated precisions, each timed in the same round-robin and compared with the first: "
        "fp32, bf16 (autocast), fp16 (autocast, CUDA only); default fp16 on CUDA (fp32 with --no-amp), fp32 "
        "on CPU. Example: --precision fp32,bf16",
    )
    parser.add_argument(
        "--recipes",
        action="store_true",
        help="time the networks, patches and batch sizes of the bundled default recipes "
        "(training/configs/default-brain-tissue-{2d,3d}.yaml) instead of the issue's cases",
    )
    parser.add_argument(
        "--configs",
        default=None,
        help=f"comma-separated subset of the configurations ({'; '.join(CONFIGS)}); default all",
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
    args.precision = _precisions(args.precision, device, args.amp, parser)
    args.configs = _configurations(args.configs, args, parser)

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        native, evidence = cpu_bf16_support()
        bf16 = {True: "native bf16", False: "no native bf16", None: "bf16 support unknown"}[native]
        name = f"CPU {_cpu_name()}, {torch.get_num_threads()} threads, {bf16}: {evidence}"
    print(
        f"device: {name}; torch {torch.__version__}; precision {', '.join(args.precision)}; "
        f"K = {args.classes} classes"
    )
    print(
        f"CCDC: tau 0.5, 256 queries x 256 negatives per class, region 2^d queries, projection dim "
        f"{args.projection_dim}; PDCR: H-PDCR on encoder2-4 (N 128/64/32) + cross 2<->3, weight 0.01; "
        f"deep supervision on; UAFR {'as in the recipes' if args.recipes else 'on' if args.uafr else 'off'}; "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )
    print(f"load average (1, 5, 15 min) at the start: {_load()}")
    rows, loss_rows, precision_rows = [], [], []
    reference = args.precision[0]
    for dims in args.dims:
        if args.recipes:
            case = recipe_case(dims)
        else:
            explicit = args.features_2d if dims == 2 else args.features_3d
            case = issue_case(
                dims,
                batch=args.batch_2d if dims == 2 else args.batch_3d,
                size=args.size_2d if dims == 2 else args.size_3d,
                features=tuple(explicit) if explicit else FEATURES[(device.type, dims)],
                uafr=args.uafr,
            )
        result = run_case(case, args, device)
        base_config = "CE+Dice" if "CE+Dice" in args.configs else args.configs[0]
        for precision in args.precision:
            base = (base_config, precision)
            for config in args.configs:
                key = (config, precision)
                ms = result.wall[key]
                rows.append(
                    (case.label, str(case.features), config, precision, ms, ms / result.wall[base],
                     result.cpu[key] / result.cpu[base])
                )  # fmt: skip
        for config in args.configs:
            ref = (config, reference)
            for precision in args.precision[1:]:
                key = (config, precision)
                rss = [result.rss[ref], result.rss[key]]
                precision_rows.append(
                    (case.label, config, precision, result.wall[ref], result.wall[key],
                     result.wall[key] / result.wall[ref], result.cpu[key] / result.cpu[ref],
                     result.loss[ref], result.loss[key], rss)
                )  # fmt: skip
        base_ms = result.wall[(base_config, reference)]
        for loss_name, ms in result.loss_only.items():
            loss_rows.append((case.label, loss_name, ms, ms / base_ms))

    cpu_column = device.type == "cpu"
    print(f"\nload average (1, 5, 15 min) at the end: {_load()}")
    print(
        f"\n| case | features | losses | precision | ms/step | ratio to {base_config} |"
        + (" CPU-time ratio |" if cpu_column else "")
    )
    print("|---|---|---|---|---:|---:|" + ("---:|" if cpu_column else ""))
    for label, features, config, precision, ms, ratio, cpu_ratio in rows:
        extra = f" {cpu_ratio:.3f} |" if cpu_column else ""
        print(f"| {label} | {features} | {config} | {precision} | {ms:.0f} | {ratio:.3f} |{extra}")
    if precision_rows:
        cpu = " CPU-time ratio | peak RSS increase of a step, MiB |" if cpu_column else ""
        print(
            f"\n| case | losses | precision | {reference} ms | ms | ratio to {reference} |{cpu} "
            f"loss {reference} | loss | loss difference |"
        )
        print("|---|---|---|---:|---:|---:|" + ("---:|---:|" if cpu_column else "") + "---:|---:|---:|")
        for label, config, precision, ref_ms, ms, ratio, cpu_ratio, ref_loss, loss, rss in precision_rows:
            mib = " / ".join("n/a" if r is None else f"{r / 2**20:.0f}" for r in rss)
            cpu = f" {cpu_ratio:.3f} | {mib} ({reference} / {precision}) |" if cpu_column else ""
            print(
                f"| {label} | {config} | {precision} | {ref_ms:.0f} | {ms:.0f} | {ratio:.3f} |{cpu} "
                f"{ref_loss:.5f} | {loss:.5f} | {loss - ref_loss:+.2e} |"
            )
    print(f"\n| case | loss alone (fwd + bwd, fp32) | ms | share of a {base_config} {reference} step |")
    print("|---|---|---:|---:|")
    for label, loss_name, ms, share in loss_rows:
        print(f"| {label} | {loss_name} | {ms:.1f} | {share:.3f} |")


if __name__ == "__main__":
    main()
