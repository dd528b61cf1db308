"""Interactive correction with a simulated user: Dice after 0..N clicks, per clicker and engine.

    PYTHONPATH=$PWD python benchmarks/interactive.py [--model brain-tissue-3d] [--clicks 20]
        [--engines local network] [--markdown docs/benchmarks.md] [--plots docs/interactive]
        [--training-blocks 1 2] [--window-mm W] [--lesions data/pyradiomics-lesions --work W]

Cases: the held-out block of the mni152-tissue dataset at 1 mm (fold 0, as the bundled models were trained:
``mni152_block4``) and its perturbed copy (the accuracy benchmark's bias field, contrast and noise, seed 1000 +
fold), through ``napari_medcl.interactive`` exactly as the widget and the API use it. ``--training-blocks``
takes training blocks instead, each perturbed with its own seed (2000 + block), to choose a setting (such as
the guided clicker's ``--window-mm``) without looking at the held-out block. ``--lesions`` takes the three MRI
cases of ``pyradiomics-lesions`` instead (``medcl-data build pyradiomics-lesions --modality MRI``), each with a
2D model trained without it (leave-one-case-out, the lesion table's CE + Dice recipe of
``benchmarks/accuracy.py``, seed 0; trained and exported once under ``--work``): a model that finds little of the
lesion, as a tiny training set gives, and a user who clicks it in. For the oracle clicker the report also gives
``click_ceiling``: the most its first click could fix by a threshold rule chosen knowing the truth; and once per
case ``local_ceiling``: the most any engine could gain if every click set right every wrong voxel within a radius.

Clickers, each giving one positive click per interaction with the true class at the clicked voxel:
- ``oracle``: the voxel deepest inside the largest connected error component (3D, faces touching);
- ``guided``: the product's proposal (``CaseSession.next_region``: the untouched window, about 23 mm wide for the
  default refiner, with the most expected mistakes), and inside that window the deepest voxel of its largest
  error component, as a user who goes where the product points and clicks the mistake they see there; a
  proposal with no mistake in it is a click at its centre, wasted;
- ``random``: a uniformly drawn voxel of the true foreground (seeded): on the tissue blocks a brain voxel, most
  of which are already right; on a lesion case a voxel of the lesion.
Engines: ``local`` (engine (a), ``napari_medcl.refinement.LocalRefiner``), ``network`` (engine (b),
``napari_medcl.network_refiner.NetworkRefiner``: only for a model with prompt channels, skipped for the others)
and ``re-run``: running the model again without prompts, which changes nothing (the baseline every
interactive tool is measured against).
Mean Dice is over the foreground classes; seconds per interaction is ``add_prompt``'s own time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
MARKERS = ("<!-- interactive:start -->", "<!-- interactive:end -->")
LESION_MARKERS = ("<!-- interactive-lesions:start -->", "<!-- interactive-lesions:end -->")
CLICKERS = ("oracle", "guided", "random")
ENGINES = ("local", "network")


def training_block_cases(root: Path, blocks: Sequence[int]) -> list[tuple[str, object, np.ndarray]]:
    """(name, image Volume, true labels) for training blocks of mni152-tissue, each perturbed as the accuracy
    benchmark perturbs the held-out block but with its own seed (2000 + block): a new scanner on cases the
    model trained on, where a setting can be chosen without looking at the held-out block."""
    from uncertainty import _accuracy_module

    from napari_medcl.io import read_image
    from training.data.layouts import discover

    by_id = {case.case_id: case for case in discover("msd", root).cases}
    cases = []
    for block in blocks:
        case = by_id[f"mni152_block{block}"]
        image, truth = read_image(case.images[0]), read_image(case.label).array
        perturbed = _accuracy_module().perturb(image, seed=2000 + block)
        cases.append(
            (f"mni152_block{block} perturbed (training block, seed {2000 + block})", perturbed, truth)
        )
    return cases


def lesion_cases(source: Path, work: Path) -> list[tuple[str, object, np.ndarray, Path]]:
    """(name, image Volume, true labels, model) for each MRI case of ``pyradiomics-lesions``, the model an ONNX
    file of a 2D network trained on the other two cases (the lesion table's folds and CE + Dice recipe of
    ``benchmarks/accuracy.py``, seed 0), trained and exported into ``work`` once (later runs reuse it)."""
    import accuracy

    from napari_medcl.io import read_image

    task = accuracy.TASKS["lesions"]
    cases = []
    for fold in range(task.num_folds):
        root, test = accuracy.fold_dataset(source, work, 2, fold, "full", task)
        model = work / f"lesion-2d-without-{test}.onnx"
        if not model.is_file():
            from export.onnx import to_onnx
            from training.config import load_config
            from training.run import train

            overrides = [
                f"data.root={root}",
                f"data.val_cases=[{test}]",
                f"data.cache_dir={work / 'cache'}",
                "train.seed=0",
                f"output.dir={work / 'runs' / f'lesions-fold{fold}'}",
                *accuracy.ARMS["CE+Dice"],
            ]
            result = train(load_config(accuracy.HERE / "configs" / task.config, overrides))
            to_onnx(result.last_checkpoint, model, name=model.stem)
        image = read_image(root / "imagesTr" / f"{test}_0000.nii.gz")
        truth = read_image(root / "labelsTr" / f"{test}.nii.gz").array
        cases.append((test, image, truth, model))
    return cases


def local_ceiling(
    labels: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    num_classes: int,
    radius_mm: float,
    clicks: Sequence[int] = (1, 5, 10, 20),
) -> dict:
    """What an engine that changes nothing farther than ``radius_mm`` from a click could gain at best.

    ``gains``: mean Dice gained after k clicks (k in ``clicks``) if each click set right every wrong voxel
    within ``radius_mm`` of it, the clicks placed greedily where the most wrong voxels are left (an estimate:
    greedy covering holds at least 1 - 1/e of the best covering's wrong voxels). ``fullest``: the most wrong
    voxels one such ball holds on the automatic result, so k clicks set right at most k times as many of its
    ``wrong`` voxels, whatever the engine. ``labels``, ``truth`` (Z, Y, X); ``spacing`` (z, y, x) mm."""
    from scipy import signal

    reach = [int(radius_mm // s) for s in spacing]
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in reach)]
    ball = sum((g * s) ** 2 for g, s in zip(grid, spacing)) <= radius_mm**2
    fixed = labels.copy()
    start = mean_dice(labels, truth, num_classes)
    gains, fullest = {}, 0
    for k in range(1, max(clicks) + 1):
        wrong = (fixed != truth).astype(np.float32)
        if wrong.any():
            count = signal.fftconvolve(wrong, ball.astype(np.float32), mode="same")
            at = np.unravel_index(int(count.argmax()), count.shape)
            fullest = fullest or int(round(float(count[at])))
            box = tuple(slice(max(0, a - r), min(n, a + r + 1)) for a, r, n in zip(at, reach, labels.shape))
            inside = ball[tuple(slice(b.start - a + r, b.stop - a + r) for a, r, b in zip(at, reach, box))]
            fixed[box][inside] = truth[box][inside]
        if k in clicks:
            gains[k] = mean_dice(fixed, truth, num_classes) - start
    return {"gains": gains, "fullest": fullest, "wrong": int(np.count_nonzero(labels != truth))}


def mean_dice(labels: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    scores = []
    for c in range(1, num_classes):
        both = np.count_nonzero((labels == c) & (truth == c))
        total = np.count_nonzero(labels == c) + np.count_nonzero(truth == c)
        scores.append(1.0 if total == 0 else 2.0 * both / total)
    return float(np.mean(scores))


def deepest_error(labels: np.ndarray, truth: np.ndarray, within: tuple[slice, ...] | None = None):
    """The voxel deepest inside the largest connected error component (of the box ``within``), or None."""
    from scipy import ndimage

    box = within or tuple(slice(0, n) for n in labels.shape)
    errors = labels[box] != truth[box]
    if not errors.any():
        return None
    components, _ = ndimage.label(errors)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    largest = np.pad(components == sizes.argmax(), 1)
    depth = ndimage.distance_transform_edt(largest)[1:-1, 1:-1, 1:-1]
    local = np.unravel_index(int(depth.argmax()), depth.shape)
    return tuple(int(i + s.start) for i, s in zip(local, box))


def error_shape(labels: np.ndarray, truth: np.ndarray) -> dict:
    """How the automatic result's mistakes lie: their count, the share on a true class boundary (a voxel
    whose 3x3x3 neighbourhood holds two true classes) and the share at least 2 voxels inside their component."""
    from scipy import ndimage

    errors = labels != truth
    boundary = ndimage.maximum_filter(truth, 3) != ndimage.minimum_filter(truth, 3)
    depth = ndimage.distance_transform_edt(np.pad(errors, 1))[1:-1, 1:-1, 1:-1]
    count = int(errors.sum())
    return {
        "errors": count,
        "on_boundary": float(boundary[errors].mean()) if count else 0.0,
        "deep": float((depth >= 2)[errors].mean()) if count else 0.0,
    }


def click_ceiling(
    labels: np.ndarray,
    truth: np.ndarray,
    probabilities: np.ndarray,
    image: np.ndarray,
    spacing: Sequence[float],
    radii: Sequence[float] = (4.0, 8.0, 16.0, 32.0),
) -> dict:
    """The most the oracle's first click could fix by a threshold rule, the threshold chosen knowing the truth.

    The click lands on a voxel labelled ``v`` whose true class is ``c``. A rule of this family relabels ``c``
    every voxel labelled ``v`` within ``radius`` mm of the click whose score is at least a threshold; the
    scores: the model's log-odds of ``c`` against ``v``, and the intensity (channel 0, Gaussian of 1 mm) signed
    so that ``c``-like is higher (by the two labels' medians around the click). For each radius the best
    threshold's net count of fixed voxels (fixed minus broken; 0 when no threshold gains) is returned, with
    the voxels it relabels. ``labels``, ``truth`` (Z, Y, X); ``probabilities`` (K, Z, Y, X); ``image``
    (C, Z, Y, X)."""
    from scipy import ndimage

    at = deepest_error(labels, truth)
    if at is None:
        return {"click": None, "rows": []}
    c, v = int(truth[at]), int(labels[at])
    reach = [int(np.ceil(max(radii) / s)) for s in spacing]
    box = tuple(slice(max(0, a - r), a + r + 1) for a, r in zip(at, reach))
    local = [a - b.start for a, b in zip(at, box)]
    grid = np.indices(labels[box].shape, dtype=np.float32)
    distance = np.sqrt(sum(((g - a) * s) ** 2 for g, a, s in zip(grid, local, spacing)))
    lab, tru = labels[box], truth[box]
    logp = np.log(np.clip(probabilities[(slice(None), *box)], 1e-12, 1.0))
    smooth = ndimage.gaussian_filter(image[0][box].astype(np.float32), [1.0 / s for s in spacing])
    towards = np.sign(np.median(smooth[lab == c]) - np.median(smooth[lab == v])) if (lab == c).any() else 1.0
    scores = {"model log-odds": logp[c] - logp[v], "intensity": towards * smooth}
    gain = np.where(tru == c, 1, np.where(tru == v, -1, 0))
    rows = []
    for signal, score in scores.items():
        for radius in radii:
            candidates = (lab == v) & (distance <= radius)
            order = np.argsort(-score[candidates], kind="stable")
            net = np.cumsum(gain[candidates][order])
            best = int(net.argmax()) if net.size else -1
            fixed = int(net[best]) if net.size and net[best] > 0 else 0
            rows.append(
                {
                    "signal": signal,
                    "radius_mm": float(radius),
                    "net": fixed,
                    "flipped": best + 1 if fixed else 0,
                }
            )
    return {"click": [int(a) for a in at], "from": v, "to": c, "rows": rows}


def click_for(
    clicker: str, session, truth: np.ndarray, rng: np.random.Generator, window_mm: float | None = None
):
    """(z, y, x) of the next click on the 3D grid, or None when the clicker has nowhere to click."""
    labels = np.asarray(session._labels)
    if clicker == "oracle":
        return deepest_error(labels, truth)
    if clicker == "guided":
        region = session.next_region(window_mm=window_mm)
        if region is None:
            return None
        at = deepest_error(labels, truth, region.box)
        if at is None:  # nothing wrong where the product pointed: the user clicks its centre, to no effect
            at = tuple(int(round(c)) for c in region.center)
        return at
    brain = np.argwhere(truth > 0)
    return tuple(int(v) for v in brain[rng.integers(len(brain))])


def run_case(
    image, truth_image, model, clicker: str, clicks: int, seed: int, engine: str = "local",
    window_mm: float | None = None, network_options: dict | None = None, local_ceilings: bool = False,
) -> dict:  # fmt: skip
    """One simulated user's clicks on one case. ``local_ceilings``: also measure ``local_ceiling`` of the
    automatic result (it depends on the case alone, so one run per case asks for it)."""
    from napari_medcl.interactive import open_session
    from napari_medcl.prompts import point

    session = open_session(image, model, engine=engine, network_options=network_options)
    start = time.perf_counter()
    session.predict()
    predict_seconds = time.perf_counter() - start
    truth = truth_image.array if truth_image.array.ndim == 3 else truth_image.array[None]
    num_classes = session._probabilities.shape[0]
    rng = np.random.default_rng(seed)
    dice = [mean_dice(session._labels, truth, num_classes)]
    errors = [int(np.count_nonzero(session._labels != truth))]
    shape = error_shape(np.asarray(session._labels), truth)
    local = (
        {
            radius: local_ceiling(np.asarray(session._labels), truth, session.spacing, num_classes, radius)
            for radius in (session.refiner.release_mm, 2 * session.refiner.release_mm)
        }
        if local_ceilings
        else None
    )
    ceiling = (
        click_ceiling(
            np.asarray(session._labels),
            truth,
            session._probabilities,
            session._whole_image(),
            session.spacing,
        )
        if clicker == "oracle"
        else None
    )
    seconds = []
    for _ in range(clicks):
        at = click_for(clicker, session, truth, rng, window_mm)
        if at is None:
            dice.append(dice[-1])
            errors.append(errors[-1])
            continue
        update = session.add_prompt(point(*at, label=int(truth[at])))
        seconds.append(update.seconds)
        dice.append(mean_dice(session._labels, truth, num_classes))
        errors.append(int(np.count_nonzero(session._labels != truth)))
    result = {"dice": dice, "errors": errors, "seconds": seconds, "predict_seconds": predict_seconds}
    extra = {"ceiling": ceiling} if ceiling is not None else {}
    return {**result, "error_shape": shape, **extra, **({"local_ceiling": local} if local else {})}


def clicks_to(dice: Sequence[float], target: float) -> int | None:
    return next((k for k, d in enumerate(dice) if d >= target), None)


def report(results: dict, header: str, clicks: int) -> str:
    lines = [header, ""]
    marks = [k for k in (0, 1, 5, 10, 20) if k <= clicks]
    lines.append(
        "| model | case | engine | clicker | "
        + " | ".join(f"Dice @{k}" for k in marks)
        + " | gain @5 | gain @10 | gain @20 | clicks to 0.90 | s / click (mean, max) |"
    )
    lines.append("|---" * (len(marks) + 10) + "|")
    for model, cases in results.items():
        for case, by_engine in cases.items():
            for (engine, clicker), r in _runs(by_engine):
                d = r["dice"]
                gains = [f"{d[k] - d[0]:+.4f}" if k <= clicks else "–" for k in (5, 10, 20)]
                reach = clicks_to(d, 0.90)
                secs = r["seconds"]
                timing = f"{np.mean(secs):.3f}, {np.max(secs):.3f}" if secs else "–"
                lines.append(
                    f"| {model} | {case} | {engine} | {clicker} | "
                    + " | ".join(f"{d[k]:.4f}" for k in marks)
                    + f" | {' | '.join(gains)} | {reach if reach is not None else f'> {clicks}'} | {timing} |"
                )
    lines.append("")
    lines.append(
        "Re-running the model without prompts leaves every Dice at its `@0` value (it is deterministic)."
    )
    lines += ["", "Where the automatic result's mistakes lie (what one click can reach):", ""]
    for model, cases in results.items():
        for case, by_engine in cases.items():
            shape = next(r for _, r in _runs(by_engine))["error_shape"]
            lines.append(
                f"- {model}, {case}: {shape['errors']:,} wrong voxels, {shape['on_boundary']:.0%} on a true "
                f"class boundary, {shape['deep']:.0%} two or more voxels inside their error region."
            )
    lines += [
        "",
        "What the oracle's first click could fix at best, by relabelling the clicked voxel's wrong label within a "
        "radius wherever a score passes a threshold chosen knowing the truth (net voxels: fixed minus broken; "
        "`click_ceiling`), against what the engine's first click fixed:",
        "",
    ]
    for model, cases in results.items():
        for case, by_engine in cases.items():
            for engine, by_clicker in by_engine.items():
                oracle = by_clicker.get("oracle")
                if not oracle or not oracle.get("ceiling", {}).get("rows") or len(oracle["errors"]) < 2:
                    continue
                ceiling = oracle["ceiling"]
                best = {}
                for row in ceiling["rows"]:
                    best.setdefault(row["signal"], []).append(f"{row['net']:,} ({row['radius_mm']:g} mm)")
                lines.append(
                    f"- {model}, {case}, engine {engine}: the click turns label {ceiling['from']} into "
                    f"{ceiling['to']}; the engine fixed {oracle['errors'][0] - oracle['errors'][1]:,} voxels net; "
                    + "; ".join(f"best threshold on {signal}: {', '.join(v)}" for signal, v in best.items())
                    + "."
                )
    lines += [
        "",
        "What any engine that changes nothing farther than R from a click could gain at best (`local_ceiling`): "
        "mean Dice at 1 / 5 / 10 / 20 clicks if each click set right every wrong voxel within R of it, the clicks "
        "placed greedily where the most wrong voxels are left; and the most wrong voxels one such ball holds, so "
        "that k clicks set right at most k times as many, whatever the engine:",
        "",
    ]
    for model, cases in results.items():
        for case, by_engine in cases.items():
            measured = next((r for _, r in _runs(by_engine) if r.get("local_ceiling")), None)
            if measured is None:
                continue
            rows = [
                f"R = {float(radius):g} mm: "
                + " / ".join(f"{g:+.4f}" for g in c["gains"].values())
                + f" (the fullest ball holds {c['fullest']:,} of the {c['wrong']:,} wrong voxels)"
                for radius, c in measured["local_ceiling"].items()
            ]
            lines.append(f"- {model}, {case}: " + "; ".join(rows) + ".")
    lines += ["", "Guided against oracle:", ""]
    for model, cases in results.items():
        for case, by_engine in cases.items():
            for engine, by_clicker in by_engine.items():
                if {"oracle", "guided"} <= set(by_clicker) and clicks >= 10:
                    oracle = by_clicker["oracle"]["dice"]
                    guided = by_clicker["guided"]["dice"]
                    gain = oracle[10] - oracle[0]
                    share = f"{(guided[10] - guided[0]) / gain:.0%}" if gain > 0 else "– (no oracle gain)"
                    fixed = {
                        c: by_clicker[c]["errors"][0] - by_clicker[c]["errors"][10]
                        for c in ("guided", "oracle")
                    }
                    lines.append(
                        f"- {model}, {case}, engine {engine}: the guided clicker reaches {share} of the "
                        f"oracle's gain at 10 clicks; wrong voxels set right, net: guided {fixed['guided']:,}, "
                        f"oracle {fixed['oracle']:,}."
                    )
    return "\n".join(lines) + "\n"


def _runs(by_engine: dict):
    """((engine, clicker), run) for every run of one case, engines in order."""
    return [((e, c), r) for e, by_clicker in by_engine.items() for c, r in by_clicker.items()]


def plot(results: dict, folder: Path, together: str | None = None) -> list[Path]:
    """One PNG of Dice against clicks per model (``{model}-clicks.png``, a panel per case), or with
    ``together`` one PNG of every model's cases (``{together}-clicks.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    figures = {model: {case: (model, r) for case, r in cases.items()} for model, cases in results.items()}
    if together:
        figures = {together: {case: v for panels in figures.values() for case, v in panels.items()}}
    written = []
    for name, panels in figures.items():
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
        for ax, (case, (model, by_engine)) in zip(axes[0], panels.items()):
            runs = _runs(by_engine)
            for (engine, clicker), r in runs:
                style = "-" if engine == "network" else ":"
                ax.plot(
                    range(len(r["dice"])),
                    r["dice"],
                    style,
                    marker="o",
                    markersize=3,
                    label=f"{clicker} ({engine})",
                )
            ax.axhline(runs[0][1]["dice"][0], color="grey", ls="--", label="re-run")
            ax.set_title(f"{model}: {case}")
            ax.set_xlabel("clicks")
            ax.set_ylabel("mean foreground Dice")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        path = folder / f"{name}-clicks.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", nargs="+", default=["brain-tissue-3d"], help="bundled names or .onnx paths"
    )
    parser.add_argument("--data", default="data/mni152-tissue", help="the mni152-tissue dataset")
    parser.add_argument("--fold", type=int, default=0, help="the fold the models held out (default 0)")
    parser.add_argument("--clicks", type=int, default=20, help="interactions per run (default 20)")
    parser.add_argument("--clickers", nargs="+", default=list(CLICKERS), choices=CLICKERS)
    parser.add_argument(
        "--engines", nargs="+", default=["local"], choices=ENGINES,
        help="engines to compare (network: models with prompt channels only)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="the random clicker's seed")
    parser.add_argument(
        "--window-mm", type=float,
        help="the guided clicker's proposal window (default: the product's, the size of a prompt's box)",
    )  # fmt: skip
    parser.add_argument("--markdown", help="write the report between its markers in this markdown file")
    parser.add_argument("--plots", help="write one PNG of Dice against clicks per model to this folder")
    parser.add_argument("--json", help="write every curve to this JSON file")
    parser.add_argument(
        "--training-blocks", type=int, nargs="+", metavar="B",
        help="instead of the held-out block, these training blocks, perturbed (seed 2000 + B): to choose a "
        "setting without looking at the held-out block",
    )  # fmt: skip
    parser.add_argument(
        "--lesions", metavar="DATA",
        help="instead of the tissue blocks, the MRI cases of this pyradiomics-lesions dataset, each with a model "
        "trained without it (trained once into --work; --model does not apply)",
    )  # fmt: skip
    parser.add_argument(
        "--work", default="/tmp/medcl-interactive",
        help="where --lesions keeps its fold datasets and models (default /tmp/medcl-interactive)",
    )  # fmt: skip
    parser.add_argument(
        "--network-keep", choices=["box", "connected", "caused"],
        help="what of engine (b)'s answer is written (NetworkRefiner's keep; default: the product's)",
    )  # fmt: skip
    parser.add_argument(
        "--network-margin-mm", type=float,
        help="how far around a click engine (b)'s answer is written (NetworkRefiner's margin_mm)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.lesions and args.training_blocks:
        parser.error("--lesions and --training-blocks choose the cases: give one of them")
    network_options = {
        key: value
        for key, value in (("keep", args.network_keep), ("margin_mm", args.network_margin_mm))
        if value is not None
    }

    from uncertainty import tissue_cases, write_between_markers

    from napari_medcl.onnx_session import load_model

    if args.lesions:
        lesions = lesion_cases(Path(args.lesions), Path(args.work))
        jobs = [(str(path), [(case, image, truth)]) for case, image, truth, path in lesions]
    else:
        if args.training_blocks:
            cases = training_block_cases(Path(args.data), args.training_blocks)
        else:
            cases = tissue_cases(Path(args.data), args.fold)[:2]  # clean and perturbed
        jobs = [(model_name, cases) for model_name in args.model]
    results: dict = {}
    for model_name, cases in jobs:
        model = load_model(model_name, device="cpu", backend="onnxruntime")
        name = model.spec.name
        results[name] = {}
        engines = [e for e in args.engines if e != "network" or model.spec.prompts is not None]
        for case, image, truth in cases:
            truth_volume = image.with_array(truth)
            results[name][case] = {engine: {} for engine in engines}
            for i, (engine, clicker) in enumerate((e, c) for e in engines for c in args.clickers):
                r = run_case(
                    image, truth_volume, model, clicker, args.clicks, args.seed, engine, args.window_mm,
                    network_options, local_ceilings=i == 0,
                )  # fmt: skip
                results[name][case][engine][clicker] = r
                d = r["dice"]
                print(
                    f"{name} {case} {engine} {clicker}: Dice {d[0]:.4f} -> {d[min(5, args.clicks)]:.4f} (5) -> "
                    f"{d[-1]:.4f} ({args.clicks}); {np.mean(r['seconds']) if r['seconds'] else 0:.3f} s/click",
                    flush=True,
                )
    command = "PYTHONPATH=$PWD python benchmarks/interactive.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    header = (
        f"Measured {datetime.date.today().isoformat()} on {platform.machine()} "
        f"({len(__import__('os').sched_getaffinity(0))} CPU cores, shared), ONNX Runtime CPU, with\n\n"
        f"```bash\n{command.strip()}\n```"
    )
    text = report(results, header, args.clicks)
    sys.stdout.write(text)
    if args.markdown:
        write_between_markers(Path(args.markdown), text, LESION_MARKERS if args.lesions else MARKERS)
    if args.plots:
        for path in plot(results, Path(args.plots), together="lesions" if args.lesions else None):
            print(f"wrote {path}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
