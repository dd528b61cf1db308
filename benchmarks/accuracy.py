"""Accuracy benchmark: CE + Dice against + UAFR, + PDCR, + PDCR + UAFR, + CCDC, + CCDC + UAFR on MNI152 tissue,
and a tiny binary lesion table on the pyradiomics MRI cases.

    .venv/bin/medcl-data build mni152-tissue -o data/mni152-tissue
    .venv/bin/python benchmarks/accuracy.py run --dims 2            # every fold, seed, regime and arm
    .venv/bin/python benchmarks/accuracy.py run --dims 2 --shard 0/2 & \\
        .venv/bin/python benchmarks/accuracy.py run --dims 2 --shard 1/2   # two processes share the runs
    .venv/bin/python benchmarks/accuracy.py report --dims 2         # the Markdown tables of docs/benchmarks.md
    .venv/bin/medcl-data build pyradiomics-lesions -o data/pyradiomics-lesions
    .venv/bin/python benchmarks/accuracy.py run --task lesions      # leave-one-case-out, 2D
    .venv/bin/python benchmarks/accuracy.py report --task lesions
    .venv/bin/python benchmarks/accuracy.py run --task tissue-scanners   # the harder task (below)
    .venv/bin/python benchmarks/accuracy.py scanners -o scanners.png     # what its blocks look like

Protocol. The dataset's five contiguous axial blocks (6 mm apart, so no test slice lies within 5 mm of a
training slice) are the folds, numbered as training numbers them: each fold trains on four blocks and tests on
the fifth. The benchmark runs on a 2 mm grid (block means of the 1 mm template, majority labels), a CPU budget.
Regimes: ``full`` (every training slice, 52) and ``limited`` (about 10%: in 2D the central axial slice of each
training block, 4 slices; in 3D the central 5 slices of the training block with the most brain). Every arm gets the same budget
(iterations, batch, patch, augmentation: ``benchmarks/configs/accuracy-{2,3}d.yaml``) and the same seeds. The
last checkpoint is tested (no model selection on the test block) through the product's own sliding-window path,
on the clean block and on a perturbed copy (smooth multiplicative bias field and Gaussian noise inside the
brain, seeded per fold). Results go to one JSON line per run, so a stopped benchmark picks up where it was.

The harder task (``--task tissue-scanners``) keeps the blocks, folds, regimes and budget of the tissue task but
images every block as its own simulated scanner would (``vary_acquisition``: gamma, blur along z and
in-plane, bias field, noise, seeded per block so a block looks the same in every fold), so each run trains on
some acquisitions and is tested on another; the limited regime sees one slice of each training scanner in 2D
and one scanner only in 3D.

The lesion task (``--task lesions``, 2D only) runs the same arms on the three MRI cases of the pyradiomics
sdist (two brain scans and one breast scan, one lesion each), leave-one-case-out, at their own in-plane
spacing, in the full regime only (budget in ``benchmarks/configs/accuracy-lesions.yaml``). Three cases are far
too few to train a lesion model: the table says what the methods do in that extreme, nothing more.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ARMS: dict[str, tuple[str, ...]] = {
    "CE+Dice": (),
    "+UAFR": ("model.uafr.enabled=true",),
    "+PDCR": ("loss.pdcr.enabled=true",),
    "+PDCR+UAFR": ("loss.pdcr.enabled=true", "model.uafr.enabled=true"),
    "+CCDC": ("loss.ccdc.enabled=true",),
    "+CCDC+UAFR": ("loss.ccdc.enabled=true", "model.uafr.enabled=true"),
}
DEFAULT_ARMS = tuple(ARMS)
# PDCR strength sweep (issue 21; run with --arms): "+PDCR" above is Eq. 9, mean x 0.01 (the 3D code's strength);
# these add the 2D code's sum x 0.1 (encoder weight; its cross-layer weight 0.01 has no cross pair here), one
# strength between (mean x 1), and the authors' shifted form at both ends. At initialisation on the 2D budget
# the PDCR / CE + Dice gradient-norm ratios are about 0.017, 1.7 and 1.2e4 (sum over B N^2 = 131k pairs).
# Names are folder names too.
ARMS.update(
    {
        "+PDCR-mean1": ("loss.pdcr.enabled=true", "loss.pdcr.weight=1.0"),
        "+PDCR-sum0.1": ("loss.pdcr.enabled=true", "loss.pdcr.reduction=sum", "loss.pdcr.weight=0.1"),
        "+PDCR-authors-mean0.01": ("loss.pdcr.enabled=true", "loss.pdcr.form=authors"),
        "+PDCR-authors-sum0.1": (
            "loss.pdcr.enabled=true",
            "loss.pdcr.form=authors",
            "loss.pdcr.reduction=sum",
            "loss.pdcr.weight=0.1",
        ),
    }
)
REGIMES = ("limited", "full")


@dataclasses.dataclass(frozen=True)
class Task:
    """One benchmark dataset: its classes (background excluded), folds, regimes and grid."""

    name: str
    classes: tuple[str, ...]
    data: str  # default dataset folder
    builder: str  # the ``medcl-data build`` name that writes it
    num_folds: int
    regimes: tuple[str, ...]
    dims: tuple[int, ...]
    factor: int  # the grid is this many times coarser than the dataset's (block means)
    config: str = "accuracy-{dims}d.yaml"  # the base config in benchmarks/configs
    title: str = "{dims}D"  # the report's table titles
    scanners: bool = False  # every case imaged by its own simulated scanner (vary_acquisition)

    def results_name(self, dims: int) -> str:
        """The results file's name: results-3d.jsonl for the tissue task, else with the task's name (and the
        dims for a task that has both)."""
        if self.name == "tissue":
            return f"results-{dims}d.jsonl"
        return f"results-{self.name}.jsonl" if len(self.dims) == 1 else f"results-{self.name}-{dims}d.jsonl"


TASKS = {
    # The tissue benchmark runs on a 2 mm grid (block means of the 1 mm template): a CPU budget.
    "tissue": Task(
        "tissue", ("CSF", "GM", "WM"), "data/mni152-tissue", "mni152-tissue", 5, REGIMES, (2, 3), 2
    ),
    # Five folds of three cases would leave folds empty: one fold per case, leave-one-case-out.
    "lesions": Task(
        "lesions",
        ("lesion",),
        "data/pyradiomics-lesions",
        "pyradiomics-lesions",
        3,
        ("full",),
        (2,),
        1,
        config="accuracy-lesions.yaml",
        title="Lesions, {dims}D, leave-one-case-out",
    ),
    # The harder task: the same blocks and folds, but each block as another scanner would have imaged it
    # (contrast, resolution, bias field and noise of its own), so training and test cases differ in
    # acquisition as a real cohort's do; in 3D the limited regime learns from one scanner only.
    "tissue-scanners": Task(
        "tissue-scanners",
        ("CSF", "GM", "WM"),
        "data/mni152-tissue",
        "mni152-tissue",
        5,
        REGIMES,
        (2, 3),
        2,
        title="{dims}D, one simulated scanner per block",
        scanners=True,
    ),
}
LIMITED_SLICES = {2: 1, 3: 5}
PERTURB_NOISE = 0.04  # noise sd as a share of the brain's 99.5th percentile
PERTURB_BIAS = 0.3  # bias field: exp of a random quadratic with coefficients up to this
# Simulated scanners (task tissue-scanners): gamma of the [0, 1]-scaled brain, Gaussian blur along z and
# in-plane (voxels of the 2 mm grid: thick slices, a softer reconstruction), bias-field coefficients up to
# SCANNER_BIAS, noise sd as a share of the brain's 99.5th percentile. Block k is scanner SCANNER_SEED + k in
# every fold.
SCANNER_GAMMA = (0.6, 1.6)
SCANNER_BLUR_Z = (0.0, 1.2)
SCANNER_BLUR_XY = (0.0, 0.6)
SCANNER_BIAS = 0.4
SCANNER_NOISE = (0.01, 0.05)
SCANNER_SEED = 3000


# ------------------------------------------------------------------------------------------- datasets


def _read(path: Path):
    from napari_medcl.io import read_image

    return read_image(path)


def _write(volume, path: Path) -> None:
    from napari_medcl.io import write_image

    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(volume, path)


def _cases(root: Path) -> list[str]:
    return sorted(p.name[: -len("_0000.nii.gz")] for p in (root / "imagesTr").glob("*_0000.nii.gz"))


def downsample(volume, factor: int, *, labels: bool):
    """``volume`` on a grid ``factor`` times coarser: block means for an image, the block's majority for labels
    (a scan acquired at that spacing). Trailing voxels that do not fill a block are dropped."""
    a = np.asarray(volume.array)
    shape = tuple(n // factor for n in a.shape)
    a = a[tuple(slice(0, n * factor) for n in shape)]
    blocks = [x for n in shape for x in (n, factor)]
    block_axes = tuple(range(1, 2 * len(shape), 2))
    if labels:
        counts = np.stack([(a == k).reshape(blocks).sum(block_axes) for k in range(int(a.max()) + 1)])
        out = counts.argmax(0).astype(a.dtype)
    else:
        out = a.reshape(blocks).mean(block_axes, dtype=np.float64).astype(np.float32)
    spacing = np.asarray(volume.spacing)
    origin = np.asarray(volume.origin) + volume.direction @ (spacing * (factor - 1) / 2)
    return dataclasses.replace(volume, array=out, spacing=tuple(spacing * factor), origin=tuple(origin))


def _slab(volume, start: int, stop: int):
    return volume.crop((slice(start, stop), slice(None), slice(None)))


def perturb(volume, seed: int):
    """A copy of ``volume`` (skull-stripped, background 0) with a smooth bias field and noise inside the brain."""
    rng = np.random.default_rng(seed)
    a = np.asarray(volume.array, dtype=np.float32)
    brain = a > 0
    axes = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in a.shape], indexing="ij")
    terms = [*axes, *(x * y for i, x in enumerate(axes) for y in axes[i:])]
    log_field = sum(c * t for c, t in zip(rng.uniform(-PERTURB_BIAS, PERTURB_BIAS, len(terms)), terms))
    scale = float(np.percentile(a[brain], 99.5))
    out = a * np.exp(log_field).astype(np.float32)
    out += rng.normal(0.0, PERTURB_NOISE * scale, a.shape).astype(np.float32)
    out[~brain] = 0  # still skull-stripped (a scan with a non-zero background: the whole image is "brain")
    out[brain] = np.maximum(out[brain], 1e-3 * scale)  # noise must not carve holes in the brain mask
    return volume.with_array(out)


def vary_acquisition(volume, seed: int):
    """``volume`` (skull-stripped, background 0) as scanner ``seed`` would show it: its own gamma, resolution
    (blur along z and in-plane), bias field and noise inside the brain; the brain mask is kept. Returns the new
    volume and the scanner's settings (for the record)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    a = np.asarray(volume.array, dtype=np.float32)
    brain = a > 0
    scale = float(np.percentile(a[brain], 99.5))
    settings = {
        "gamma": float(np.exp(rng.uniform(*np.log(SCANNER_GAMMA)))),
        "blur_z": float(rng.uniform(*SCANNER_BLUR_Z)),
        "blur_xy": float(rng.uniform(*SCANNER_BLUR_XY)),
        "noise": float(rng.uniform(*SCANNER_NOISE)),
    }
    out = np.clip(a / scale, 0.0, None) ** settings["gamma"]
    out = ndimage.gaussian_filter(out, (settings["blur_z"], settings["blur_xy"], settings["blur_xy"]))
    axes = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in a.shape], indexing="ij")
    terms = [*axes, *(x * y for i, x in enumerate(axes) for y in axes[i:])]
    log_field = sum(c * t for c, t in zip(rng.uniform(-SCANNER_BIAS, SCANNER_BIAS, len(terms)), terms))
    out = out * np.exp(log_field) + rng.normal(0.0, settings["noise"], a.shape)
    out = (out * scale).astype(np.float32)
    out[~brain] = 0
    out[brain] = np.maximum(out[brain], 1e-3 * scale)  # noise must not carve holes in the brain mask
    return volume.with_array(out), settings


def fold_dataset(
    source: Path, work: Path, dims: int, fold: int, regime: str, task: Task = TASKS["tissue"]
) -> tuple[Path, str]:
    """The MSD folder for one fold and regime (written once) and the id of its test case (block)."""
    from training.data.layouts import discover
    from training.data.preprocessing import split_cases

    blocks = _cases(source)
    # The same folds as training's (split seed 12345): tissue fold 0 holds out the block the default models
    # are validated on.
    _, held_out = split_cases(
        list(discover("msd", source).cases),
        fold=fold,
        num_folds=task.num_folds,
        val_fraction=None,
        split_seed=12345,
    )
    if len(held_out) != 1:
        raise ValueError(f"{source}: fold {fold} holds out {len(held_out)} cases, expected one")
    test = held_out[0].case_id
    prefix = "" if task.name == "tissue" else f"{task.name}-"
    root = work / "data" / f"{prefix}{dims}d-fold{fold}-{regime}"
    if (root / "dataset.json").is_file():
        return root, test
    meta = json.loads((source / "dataset.json").read_text())

    def on_grid(volume, labels: bool):
        return volume if task.factor == 1 else downsample(volume, task.factor, labels=labels)

    cases = {
        b: (
            on_grid(_read(source / "imagesTr" / f"{b}_0000.nii.gz"), False),
            on_grid(_read(source / "labelsTr" / f"{b}.nii.gz"), True),
        )
        for b in blocks
    }
    scanners = {}
    if task.scanners:
        for k, b in enumerate(blocks):
            varied, scanners[b] = vary_acquisition(cases[b][0], seed=SCANNER_SEED + k)
            cases[b] = (varied, cases[b][1])
    train_blocks = [b for b in blocks if b != test]
    if regime == "limited" and dims == 3:
        train_blocks = [max(train_blocks, key=lambda b: int((cases[b][1].array > 0).sum()))]
    for block in [*train_blocks, test]:
        image, label = cases[block]
        if regime == "limited" and block != test:
            n = LIMITED_SLICES[dims]
            start = (image.array.shape[0] - n) // 2
            image, label = _slab(image, start, start + n), _slab(label, start, start + n)
        _write(image, root / "imagesTr" / f"{block}_0000.nii.gz")
        _write(label, root / "labelsTr" / f"{block}.nii.gz")
    _write(perturb(cases[test][0], seed=1000 + fold), root / "perturbed" / f"{test}_0000.nii.gz")
    keep = ("name", "description", "channel_names", "labels", "file_ending")
    meta = {k: meta[k] for k in keep if k in meta} | {"numTraining": len(train_blocks) + 1}
    if scanners:
        meta["scanners"] = {b: scanners[b] for b in [*train_blocks, test]}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root, test


# ----------------------------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class RunKey:
    dims: int
    regime: str
    fold: int
    seed: int
    arm: str
    task: str = "tissue"
    series: str = ""  # "" for the six-arm runs; a series (e.g. "pdcr-sweep") has its own names and tables

    def name(self) -> str:
        arm = self.arm.replace("+", "plus-").strip("-").lower()
        prefix = "" if self.task == "tissue" else f"{self.task}/"
        series = f"{self.series}/" if self.series else ""
        return f"{series}{prefix}{self.dims}d/{self.regime}/fold{self.fold}/{arm}/seed{self.seed}"


def plan(
    dims: int,
    folds: Sequence[int],
    seeds: Sequence[int],
    regimes: Sequence[str],
    arms: Sequence[str],
    task: str = "tissue",
    series: str = "",
):
    """Runs in the order that fills every table cell evenly: fold and seed outermost, arms innermost."""
    return [
        RunKey(dims, regime, fold, seed, arm, task, series)
        for fold in folds
        for seed in seeds
        for regime in regimes
        for arm in arms
    ]


def _results_path(work: Path, dims: int, task: str = "tissue") -> Path:
    return work / TASKS[task].results_name(dims)


def committed_results_path(dims: int, task: str = "tissue") -> Path:
    """The results kept in the repository (what docs/benchmarks.md's tables are printed from)."""
    return HERE / "results" / TASKS[task].results_name(dims).replace("results-", "accuracy-", 1)


def load_results(work: Path, dims: int, task: str = "tissue", path: Path | None = None) -> list[dict]:
    path = path or _results_path(work, dims, task)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def _done(work: Path, dims: int, task: str, path: Path | None = None) -> set[str]:
    return {r["run"] for r in load_results(work, dims, task, path)}


def grad_ratios(metrics: Path) -> list[float]:
    """``train.pdcr_grad_ratio`` of every epoch in a run's metrics.jsonl (none without PDCR)."""
    if not metrics.is_file():
        return []
    out = []
    for line in metrics.read_text().splitlines():
        if line.strip():
            value = (json.loads(line).get("train") or {}).get("pdcr_grad_ratio")
            if value is not None:
                out.append(float(value))
    return out


def score(model_path: Path, image_path: Path, label, classes: Sequence[str]) -> dict:
    from napari_medcl.prediction import predict
    from training.metrics import evaluate_case
    from training.torch_session import load_checkpoint_session

    loaded, _ = load_checkpoint_session(model_path, "cpu")
    volume = _read(image_path)
    labels = predict(volume, loaded).labels.array
    metrics = evaluate_case(labels, label.array, ("background", *classes), spacing=volume.spacing)
    return {"dice": metrics.dice, "hd95": metrics.hd95}


def val_curve(metrics: Path) -> list[list[float]]:
    """[[iteration, validation mean Dice], ...] from a run's metrics.jsonl, for the epochs that validated."""
    if not metrics.is_file():
        return []
    curve = []
    for line in metrics.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        val = record.get("val") or {}
        if "mean_dice" in val:
            curve.append([int(record["epoch"]), round(float(val["mean_dice"]), 4)])
    return curve


def run_one(key: RunKey, source: Path, work: Path, budget: Sequence[str] = ()) -> dict:
    """Train and test one run. ``budget``: overrides of the base config's training length (``--epochs``,
    ``--val-every``) that every arm of a series shares; they are kept in the record."""
    from training.config import load_config
    from training.run import train

    task = TASKS[key.task]
    root, test = fold_dataset(source, work, key.dims, key.fold, key.regime, task)
    out = work / "runs" / key.name()
    overrides = [
        f"data.root={root}",
        f"data.val_cases=[{test}]",
        f"data.cache_dir={work / 'cache'}",
        f"train.seed={key.seed}",
        f"output.dir={out}",
        *budget,
        *ARMS[key.arm],
    ]
    cfg = load_config(HERE / "configs" / task.config.format(dims=key.dims), overrides)
    started = time.perf_counter()
    # A run stopped before its result was written left its checkpoint: continue it (exact resume).
    result = train(cfg, resume=(out / "checkpoint_last.pt").is_file())
    seconds = time.perf_counter() - started
    label = _read(root / "labelsTr" / f"{test}.nii.gz")
    clean = score(result.last_checkpoint, root / "imagesTr" / f"{test}_0000.nii.gz", label, task.classes)
    noisy = score(result.last_checkpoint, root / "perturbed" / f"{test}_0000.nii.gz", label, task.classes)
    for checkpoint in out.glob("checkpoint_*.pt"):
        checkpoint.unlink()  # kept out of the way: the figures are in the results file
    record = dataclasses.asdict(key)
    if not key.series:
        del record["series"]  # six-arm records keep their old form
    return {
        "run": key.name(),
        **record,
        "overrides": list(ARMS[key.arm]),
        **({"budget": list(budget)} if budget else {}),
        "pdcr_grad_ratio": grad_ratios(out / "metrics.jsonl"),
        # Validation on the test block every --val-every epochs: the learning curve, never a model choice.
        **({"val_curve": curve} if (curve := val_curve(out / "metrics.jsonl")) else {}),
        "test_block": test,
        "train_seconds": round(seconds, 1),
        "iterations": cfg.train.epochs * cfg.train.iterations_per_epoch,
        "clean": clean,
        "perturbed": noisy,
    }


RESULTS_PATHSPEC = ":(top,exclude)benchmarks/results"


def _revision() -> str | None:
    """The checkout's commit (with ``+dirty`` for local changes), recorded with every result. The results files
    under benchmarks/results/ do not count: a run appends to them, and the runs after it ran the same code."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)", RESULTS_PATHSPEC],
            cwd=HERE,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def command_run(args: argparse.Namespace) -> int:
    import torch

    task = TASKS[args.task]
    torch.set_num_threads(args.threads)
    work, source = Path(args.work), Path(args.data or task.data)
    if not (source / "dataset.json").is_file():
        print(
            f"{source}: no dataset; build it with `medcl-data build {task.builder} -o {source}`",
            file=sys.stderr,
        )
        return 1
    folds = range(task.num_folds) if args.folds is None else args.folds
    regimes = task.regimes if args.regimes is None else args.regimes
    keys = plan(args.dims, folds, args.seeds, regimes, args.arms, task.name, args.series)
    index, count = (int(x) for x in args.shard.split("/"))
    keys = keys[index::count]
    results = Path(args.results) if args.results else _results_path(work, args.dims, task.name)
    done = _done(work, args.dims, task.name, results)
    todo = [k for k in keys if k.name() not in done]
    print(f"{len(keys)} run(s) in this shard, {len(keys) - len(todo)} done already", flush=True)
    revision = _revision()  # the code this process loaded, whatever is committed while it runs
    budget = [f"train.epochs={args.epochs}"] if args.epochs else []
    budget += [f"train.val_every={args.val_every}"] if args.val_every else []
    for i, key in enumerate(todo, 1):
        record = run_one(key, source, work, budget) | {"revision": revision, "threads": args.threads}
        line = json.dumps(record, sort_keys=True) + "\n"
        results.parent.mkdir(parents=True, exist_ok=True)
        with open(results, "a", encoding="utf-8") as f:
            f.write(line)  # one short O_APPEND write per run: shards never interleave inside a line
        clean = _mean_dice(record, "clean", task.classes)
        print(
            f"[{i}/{len(todo)}] {key.name()}: mean Dice {clean:.4f}, {record['train_seconds']:.0f} s",
            flush=True,
        )
    return 0


# --------------------------------------------------------------------------------------------- report


def _mean_dice(record: dict, column: str, classes: Sequence[str]) -> float:
    return float(np.mean([record[column]["dice"][c] for c in classes]))


def _pm(values: Sequence[float], digits: int = 3) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "n/a"
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.{digits}f} ± {sd:.{digits}f}"


SERIES_TITLES = {
    "pdcr-sweep": "PDCR strength sweep",
    "3d-converged": "960 iterations (CE + Dice converged)",
    "scan3d-converged": "960 iterations",
    "conv-check": "1,440 iterations (convergence check)",
}


def _median_ratio(runs: Sequence[dict]) -> str:
    """The median PDCR / segmentation gradient-norm ratio over every epoch of ``runs`` (— without PDCR)."""
    values = [v for r in runs for v in r.get("pdcr_grad_ratio") or () if math.isfinite(v)]
    return f"{float(np.median(values)):.3g}" if values else "—"


def report(records: Sequence[dict], dims: int, task: Task = TASKS["tissue"]) -> str:
    """Markdown tables: per series (the six-arm runs first, then e.g. the PDCR sweep) and regime, one row per
    arm (mean ± sd over seeds of the fold-averaged scores); Δ is paired with the same series' CE + Dice."""
    series = sorted({r.get("series", "") for r in records}, key=lambda x: (x != "", x))
    return "".join(
        _report_series([r for r in records if r.get("series", "") == x], dims, task, x) for x in series
    )


def _report_series(records: Sequence[dict], dims: int, task: Task, series: str) -> str:
    from scipy.stats import wilcoxon

    classes = task.classes
    title = task.title.format(dims=dims)
    if series:
        title += f", {SERIES_TITLES.get(series, series)}"
    # The gradient-ratio column appears where runs logged it (the six-arm runs predate the diagnostic).
    with_ratio = any(r.get("pdcr_grad_ratio") for r in records)
    lines = []
    for regime in task.regimes:
        rows = [r for r in records if r["regime"] == regime and r["dims"] == dims]
        arms = sorted({r["arm"] for r in rows})
        seeds = sorted({r["seed"] for r in rows})
        # A fold enters the table once every arm has every seed on it: a stopped run must not tilt the means.
        have = {(r["arm"], r["fold"], r["seed"]) for r in rows}
        started = sorted({r["fold"] for r in rows})
        folds = [f for f in started if all((a, f, s) in have for a in arms for s in seeds)]
        rows = [r for r in rows if r["fold"] in folds]
        if not rows:
            continue
        by_arm = {arm: [r for r in rows if r["arm"] == arm] for arm in ARMS}
        base = {(r["fold"], r["seed"]): r for r in by_arm["CE+Dice"]}
        left_out = [f for f in started if f not in folds]
        note = f"; fold(s) {', '.join(map(str, left_out))} incomplete, left out" if left_out else ""
        if len(seeds) == 1:
            note += "; one seed: ± is the sd over folds"
        lines.append(
            f"\n#### {title}, {regime} labels (folds {', '.join(map(str, folds))}; "
            f"seeds {', '.join(map(str, seeds))}{note})\n"
        )
        header = (
            "| arm | runs | "
            + " | ".join(f"Dice {c}" for c in classes)
            + " | mean Dice | Δ mean vs CE+Dice (p) | HD95 mean (mm) "
            "| mean Dice, perturbed | Δ perturbed (p) | train s/run |"
            + (" PDCR/seg grad ratio (median) |" if with_ratio else "")
        )
        lines += [header, "|---" * (8 + len(classes) + with_ratio) + "|"]
        for arm, runs in by_arm.items():
            if not runs:
                continue

            def per_seed(fn, runs=runs, seeds=seeds) -> list[float]:
                """fn averaged over the folds of each seed: one value per seed (with one seed: per fold)."""
                if len(seeds) == 1:
                    return [float(fn(r)) for r in runs]
                groups = [[fn(r) for r in runs if r["seed"] == s] for s in seeds]
                return [float(np.mean(g)) for g in groups if g]

            cells = [_pm(per_seed(lambda r, c=c: r["clean"]["dice"][c])) for c in classes]
            cells.append(_pm(per_seed(lambda r: _mean_dice(r, "clean", classes))))
            deltas = []
            for column in ("clean", "perturbed"):
                pairs = [
                    (
                        _mean_dice(r, column, classes),
                        _mean_dice(base[(r["fold"], r["seed"])], column, classes),
                    )
                    for r in runs
                    if (r["fold"], r["seed"]) in base
                ]
                if arm == "CE+Dice" or not pairs:
                    deltas.append("—")
                    continue
                diff = np.array([a - b for a, b in pairs])
                p = wilcoxon(diff).pvalue if len(diff) >= 2 and np.any(diff != 0) else math.nan
                shown = "n/a" if math.isnan(p) else f"{p:.2g}"
                deltas.append(f"{diff.mean():+.4f} (p={shown}, n={len(diff)})")
            hd = per_seed(lambda r: float(np.mean([r["clean"]["hd95"][c] for c in classes])))
            perturbed = _pm(per_seed(lambda r: _mean_dice(r, "perturbed", classes)))
            seconds = np.mean([r["train_seconds"] for r in runs])
            lines.append(
                f"| {arm} | {len(runs)} | "
                + " | ".join(cells)
                + f" | {deltas[0]} | {_pm(hd, 2)} | {perturbed} | {deltas[1]} | {seconds:.0f} |"
                + (f" {_median_ratio(runs)} |" if with_ratio else "")
            )
    return "\n".join(lines) + "\n" if lines else ""


def command_report(args: argparse.Namespace) -> int:
    if args.results:
        path = Path(args.results)
    elif args.work:
        path = _results_path(Path(args.work), args.dims, args.task)
    else:
        path = committed_results_path(args.dims, args.task)
    records = load_results(Path(), args.dims, args.task, path)
    if not records:
        print(f"no {args.task} results for {args.dims}D in {path}", file=sys.stderr)
        return 1
    sys.stdout.write(report(records, args.dims, TASKS[args.task]))
    return 0


def command_curves(args: argparse.Namespace) -> int:
    """Plot each arm's validation curves (mean Dice on the test block against iterations, one line per fold)
    per regime, and print CE + Dice's fold mean at each validated epoch and its change over the last third."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(args.results) if args.results else committed_results_path(args.dims, args.task)
    records = [
        r
        for r in load_results(Path(), args.dims, args.task, path)
        if r.get("series", "") == args.series and r.get("val_curve")
    ]
    if not records:
        print(f"no runs of series {args.series!r} with validation curves in {path}", file=sys.stderr)
        return 1
    regimes = [g for g in REGIMES if any(r["regime"] == g for r in records)]
    arms = [a for a in ARMS if any(r["arm"] == a for r in records)]
    figure, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 4.2), squeeze=False)
    colours = dict(zip(arms, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, regime in zip(axes[0], regimes):
        for arm in arms:
            runs = [r for r in records if r["regime"] == regime and r["arm"] == arm]
            for i, run in enumerate(sorted(runs, key=lambda r: r["fold"])):
                per_epoch = run["iterations"] / max(e for e, _ in run["val_curve"])
                x = [e * per_epoch for e, _ in run["val_curve"]]
                y = [d for _, d in run["val_curve"]]
                ax.plot(x, y, color=colours[arm], alpha=0.7, lw=1.2, label=arm if i == 0 else None)
        ax.set_title(f"{args.dims}D, {regime} labels: validation on the test block")
        ax.set_xlabel("iteration")
        ax.set_ylabel("mean Dice (CSF, GM, WM)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        base = [r for r in records if r["regime"] == regime and r["arm"] == "CE+Dice"]
        if base:
            epochs = sorted({e for r in base for e, _ in r["val_curve"]})
            means = [float(np.mean([d for r in base for e2, d in r["val_curve"] if e2 == e])) for e in epochs]
            third = epochs[-1] - epochs[-1] // 3
            late = [m for e, m in zip(epochs, means) if e >= third]
            print(
                f"{regime}: CE+Dice mean over {len(base)} fold(s) at epochs {epochs}: "
                f"{', '.join(f'{m:.3f}' for m in means)}; over the last third (epochs {third}-{epochs[-1]}) "
                f"it moves {late[-1] - late[0]:+.3f} (range {max(late) - min(late):.3f})"
            )
    _save_figure(figure, Path(args.output))
    return 0


def command_scanners(args: argparse.Namespace) -> int:
    """Draw each block's middle axial slice on the benchmark's grid as the template has it (top row) and as its
    simulated scanner images it (bottom row, with the scanner's settings): what ``--task tissue-scanners``
    trains and tests on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task, source = TASKS["tissue-scanners"], Path(args.data or TASKS["tissue-scanners"].data)
    if not (source / "dataset.json").is_file():
        print(
            f"{source}: no dataset; build it with `medcl-data build {task.builder} -o {source}`",
            file=sys.stderr,
        )
        return 1
    blocks = _cases(source)
    figure, axes = plt.subplots(2, len(blocks), figsize=(2.6 * len(blocks), 5.8), squeeze=False)
    for k, block in enumerate(blocks):
        plain = downsample(_read(source / "imagesTr" / f"{block}_0000.nii.gz"), task.factor, labels=False)
        scanned, settings = vary_acquisition(plain, SCANNER_SEED + k)
        for row, volume in enumerate((plain, scanned)):
            a = np.asarray(volume.array)
            ax = axes[row][k]
            ax.imshow(a[a.shape[0] // 2], cmap="gray", vmin=0, vmax=float(np.percentile(a[a > 0], 99.5)))
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][k].set_title(f"{block}\ntemplate", fontsize=9)
        axes[1][k].set_title(
            f"scanner {SCANNER_SEED + k}: gamma {settings['gamma']:.2f}\n"
            f"blur z {settings['blur_z']:.2f}, xy {settings['blur_xy']:.2f}, noise {settings['noise']:.2f}",
            fontsize=8,
        )
    _save_figure(figure, Path(args.output))
    return 0


def _save_figure(figure, out: Path) -> None:
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    curves = sub.add_parser("curves", help="plot a series' validation curves (runs made with --val-every)")
    curves.add_argument("--task", choices=list(TASKS), default="tissue")
    curves.add_argument("--dims", type=int, choices=(2, 3), default=3)
    curves.add_argument("--results", help="the results file (default: the committed one)")
    curves.add_argument("--series", default="", help="the series to plot")
    curves.add_argument("-o", "--output", required=True, help="the PNG to write")
    scanners = sub.add_parser("scanners", help="draw every block as the tissue-scanners task images it")
    scanners.add_argument("--data", help="the mni152-tissue dataset (default: data/mni152-tissue)")
    scanners.add_argument("-o", "--output", required=True, help="the PNG to write")
    for name in ("run", "report"):
        p = sub.add_parser(name)
        p.add_argument("--task", choices=list(TASKS), default="tissue")
        p.add_argument("--dims", type=int, choices=(2, 3), default=2)
        p.add_argument(
            "--work",
            default="runs/accuracy" if name == "run" else None,
            help="where datasets, runs and results go (report: read WORK/results-*.jsonl)",
        )
        p.add_argument(
            "--results",
            help="the results file (run: default WORK/results-2d.jsonl and so on; "
            "report: default benchmarks/results/accuracy-2d.jsonl and so on, unless --work is given)",
        )
        if name == "run":
            p.add_argument(
                "--series",
                default="",
                help="a name for runs that form their own tables (e.g. pdcr-sweep): run names and folders "
                "start with it, and report pairs its arms with its own CE+Dice",
            )
            p.add_argument("--data", help="the task's dataset (default: data/<builder name>)")
            p.add_argument("--folds", type=int, nargs="+", help="default: every fold of the task")
            p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
            p.add_argument(
                "--regimes", nargs="+", choices=REGIMES, help="default: the task's (lesions: full only)"
            )
            p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(DEFAULT_ARMS))
            p.add_argument(
                "--epochs",
                type=int,
                help="train this many epochs of the base config's iterations instead of its own "
                "(a longer budget; give the series its own --series name)",
            )
            p.add_argument(
                "--val-every",
                type=int,
                help="validate on the test block every N epochs, for the learning curve in the run's "
                "metrics.jsonl (the last checkpoint is still what is tested)",
            )
            p.add_argument("--shard", default="0/1", help="I/N: run every N-th run starting at I")
            p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = parser.parse_args(argv)
    if args.command == "curves":
        return command_curves(args)
    if args.command == "scanners":
        return command_scanners(args)
    task = TASKS[args.task]
    if args.dims not in task.dims:
        parser.error(f"--task {task.name} runs in {' or '.join(f'{d}D' for d in task.dims)} only")
    if args.command == "run" and args.regimes and set(args.regimes) - set(task.regimes):
        parser.error(f"--task {task.name} has the regime(s) {', '.join(task.regimes)} only")
    return command_run(args) if args.command == "run" else command_report(args)


if __name__ == "__main__":
    sys.exit(main())
