"""Error detection: does each uncertainty map find the model's mistakes?

    PYTHONPATH=$PWD .venv/bin/python benchmarks/uncertainty.py [--model brain-tissue-3d] \\
        [--lesion-dir DIR] [--markdown docs/uncertainty.md] [--plots docs/uncertainty]

Cases (labelled tissue, 1 mm): the held-out block of the mni152-tissue dataset (fold 0, as the bundled models
were trained: ``mni152_block4``), its perturbed copy (``benchmarks/accuracy.py perturb``, seed 1000 + fold, as
the accuracy benchmark makes it) and a strong perturbation (``perturb_strong``: a gamma of 1.5 on the brain's
intensities, then the same bias field and noise draws at twice their size). With ``--lesion-dir``, the
pyradiomics brain cases (``brain1_image.nrrd`` + ``brain1_label.nrrd``, ...), whose labels are lesions, not
tissue: for them only the share of the image labelled tissue and whether each map is higher in the lesion.

Candidate maps, all from what ``napari_medcl.predict`` returns: every UAFR block's map (``uafr:<name>``),
the normalised ``entropy``, ``top_class_error`` (1 - p(label)), ``error_likelihood`` (the calibrated error
map, for a model that carries one: ``medcl-calibrate --error-case``, fitted on fold models' predictions of
other blocks, never on the blocks scored here), ``intensity_consensus`` (``ErrorModel.consensus`` applied to the
plain prediction whatever the model file carries: the network's odds of error times those of a local intensity
model of the scan, ``napari_medcl.intensity_model``), the top-two ``margin`` 1 - (p1 - p2) from the
probabilities, and two mirroring maps. The mirrors are the product's test-time augmentation taken apart: a
session wrapper (``MirroredSession``) flips every window before the model and the outputs back after it, for
every non-empty set of spatial axes (7 for a 3D model, 3 for a 2D one), so the windows are the plain run's and
the mean over the plain pass and the mirrors is ``predict(..., tta=True)``. ``mirror_disagreement``: the share
of mirrored predictions whose label differs from the plain label; ``mirror_error``: 1 - the mean over all
passes (plain included) of the probability of the plain label.

Scored inside the union of the true and the predicted brain (label > 0 in either): that is where a label can
be wrong in a way that matters, and it keeps out the empty background, whose voxels are all right and all at
zero uncertainty, which would flatter every map. Per map: voxel AUROC and AUPRC of "this label is wrong", the
share of all errors in the 5/10/20% most uncertain voxels, the ECE of the maps that are probabilities of error,
and a simulated reviewer who reads axial slices (axis 0) in a map's order (see ``reviewer_curve``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import itertools
import json
import math
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS = ("brain-tissue-3d", "brain-tissue-2d")
CALIBRATED = "error_likelihood"  # Prediction.error_likelihood: the calibrated map, fitted out of fold
CONSENSUS = "intensity_consensus"  # ErrorModel.consensus on the plain prediction, for every model
# maps that claim to be P(label wrong)
PROBABILITY_MAPS = ("top_class_error", "mirror_error", CONSENSUS, CALIBRATED)
TOP_FRACTIONS = (0.05, 0.10, 0.20)
ECE_BINS = 15
STRONG_GAMMA = 1.5
STRONG_FACTOR = 2.0
REVIEW_THRESHOLD = 0.5


# --------------------------------------------------------------------------------------------- metrics


def auroc(scores: np.ndarray, errors: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (higher = more likely wrong) for the bool ``errors``; ties count
    one half (the Mann-Whitney statistic). NaN when every voxel is right or every voxel is wrong."""
    from sklearn.metrics import roc_auc_score

    scores, errors = _flat(scores, errors)
    if errors.all() or not errors.any():
        return math.nan
    return float(roc_auc_score(errors, scores))


def auprc(scores: np.ndarray, errors: np.ndarray) -> float:
    """Average precision (sklearn's step-wise area under the precision-recall curve); a map that carries no
    information scores the error rate. NaN when there is no error."""
    from sklearn.metrics import average_precision_score

    scores, errors = _flat(scores, errors)
    if not errors.any():
        return math.nan
    return float(average_precision_score(errors, scores))


def top_share(scores: np.ndarray, errors: np.ndarray, fraction: float) -> float:
    """Share of all errors among the ``fraction`` (0-1] most uncertain voxels (round(fraction * n) voxels).

    Voxels tied at the cut-off value are taken in proportion (the expected share under a random order of the
    tie), so a constant map scores ``fraction``, whatever the order of the voxels. NaN without errors."""
    scores, errors = _flat(scores, errors)
    total = int(errors.sum())
    if total == 0:
        return math.nan
    k = int(round(fraction * scores.size))
    if k <= 0:
        return 0.0
    if k >= scores.size:
        return 1.0
    cut = np.partition(scores, scores.size - k)[scores.size - k]  # the k-th largest value
    above, tied = scores > cut, scores == cut
    found = errors[above].sum() + errors[tied].sum() * (k - above.sum()) / tied.sum()
    return float(found / total)


@dataclass(frozen=True)
class Calibration:
    """Reliability of a map read as P(label wrong): per bin (equal width on [0, 1]) the voxel count, the mean
    predicted probability and the observed error rate (NaN for an empty bin), and the ECE: the count-weighted
    mean of |predicted - observed| over the bins."""

    ece: float
    counts: np.ndarray
    predicted: np.ndarray
    observed: np.ndarray


def calibration(probabilities: np.ndarray, errors: np.ndarray, bins: int = ECE_BINS) -> Calibration:
    """Bins [0, 1/b), [1/b, 2/b), ..., [(b-1)/b, 1] (1 falls in the last bin); values outside [0, 1] are
    clipped."""
    p, errors = _flat(probabilities, errors)
    p = np.clip(p.astype(np.float64), 0.0, 1.0)
    index = np.minimum((p * bins).astype(np.int64), bins - 1)
    counts = np.bincount(index, minlength=bins)
    sum_p = np.bincount(index, weights=p, minlength=bins)
    sum_e = np.bincount(index, weights=errors.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = np.where(counts > 0, sum_p / counts, np.nan)
        observed = np.where(counts > 0, sum_e / counts, np.nan)
    ece = float(np.abs(sum_p - sum_e).sum() / max(p.size, 1))  # sum_b n_b/N |mean p_b - rate_b|
    return Calibration(ece, counts, predicted, observed)


def reviewer_curve(errors_per_slice: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """Errors found after reading k = 0..n slices, float (n + 1,).

    ``order``: the slices read first, in that order (distinct indices; it may list only some of them, as
    ``rank_slices`` does). The slices not listed are read afterwards in a random order, counted at their
    expected value: the rest of the errors found in equal parts per slice."""
    errors = np.asarray(errors_per_slice, dtype=np.float64)
    order = [int(i) for i in order]
    if len(set(order)) != len(order) or any(not 0 <= i < errors.size for i in order):
        raise ValueError(f"order must list distinct slices of 0..{errors.size - 1}, got {order}")
    found = np.concatenate([[0.0], np.cumsum(errors[order])])
    rest = errors.size - len(order)
    if rest:
        left = errors.sum() - found[-1]
        found = np.concatenate([found, found[-1] + left * np.arange(1, rest + 1) / rest])
    return found


def curve_auc(found: np.ndarray) -> float:
    """Area under found(k) / total errors against k / n (trapezoids): 0.5 for the random order, at most 1.
    NaN without errors."""
    found = np.asarray(found, dtype=np.float64)
    total, n = found[-1], found.size - 1
    if total <= 0 or n <= 0:
        return math.nan
    return float(((found[1:] + found[:-1]) / 2).sum() / (n * total))


def normalised_auc(found: np.ndarray, oracle: np.ndarray) -> float:
    """(AUC - AUC random) / (AUC oracle - AUC random): 0 for the expected random order, 1 for the oracle
    (slices sorted by their true error count), negative when worse than random. NaN when the oracle is no
    better than random (all errors spread evenly)."""
    auc, best = curve_auc(found), curve_auc(oracle)
    if not best > 0.5:
        return math.nan
    return (auc - 0.5) / (best - 0.5)


def top_slices_ratio(found: np.ndarray, fraction: float = 0.10) -> float:
    """Errors found in the first ceil(fraction * n) slices over what a random ``fraction`` of the slices holds
    in expectation (that many slices x the mean errors per slice): 1 = random."""
    found = np.asarray(found, dtype=np.float64)
    n, total = found.size - 1, found[-1]
    if total <= 0:
        return math.nan
    k = max(1, math.ceil(fraction * n - 1e-9))
    return float(found[k] / (total * k / n))


def oracle_order(errors_per_slice: np.ndarray) -> np.ndarray:
    return np.argsort(-np.asarray(errors_per_slice, dtype=np.float64), kind="stable")


def _flat(scores: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, errors = np.asarray(scores).ravel(), np.asarray(errors).ravel().astype(bool)
    if scores.shape != errors.shape:
        raise ValueError(f"scores {scores.shape} and errors {errors.shape} differ in size")
    return scores, errors


# ----------------------------------------------------------------------------------------- mirroring


class MirroredSession:
    """An inference session that runs ``session`` on each window mirrored along ``axes`` (spatial axes of the
    window, 0 = the first) and mirrors the outputs back: one pass of the product's test-time augmentation."""

    def __init__(self, session, axes: tuple[int, ...]):
        self._session, self._flip = session, tuple(2 + a for a in axes)  # (N, C, *S): spatial from 2

    spec = property(lambda self: self._session.spec)
    provider = property(lambda self: self._session.provider)
    path = property(lambda self: self._session.path)
    sha256 = property(lambda self: self._session.sha256)

    def run(self, batch: np.ndarray, *, with_features: bool = False) -> tuple[np.ndarray, ...]:
        outputs = self._session.run(
            np.ascontiguousarray(np.flip(batch, self._flip)),
            **({"with_features": True} if with_features else {}),
        )
        probs, maps = outputs[:2]
        probs = np.ascontiguousarray(np.flip(probs, self._flip))
        mirrored = (probs, None if maps is None else np.ascontiguousarray(np.flip(maps, self._flip)))
        return mirrored + tuple(outputs[2:])  # window features are pooled: no mirroring back


def mirror_axes(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every non-empty set of the model's spatial axes, as ``prediction._run`` mirrors them."""
    axes = range(spatial_dims)
    return [c for r in range(1, spatial_dims + 1) for c in itertools.combinations(axes, r)]


# ----------------------------------------------------------------------------------------------- cases


def _accuracy_module():
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", HERE / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    if spec.name not in sys.modules:
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
        spec.loader.exec_module(module)
    return sys.modules[spec.name]


def perturb_strong(volume, seed: int, *, gamma: float = STRONG_GAMMA, factor: float = STRONG_FACTOR):
    """The accuracy benchmark's perturbation made harder: the brain's intensities x go to s * (x / s)^gamma
    (s: their 99.5th percentile; gamma > 1 darkens grey matter and CSF against white matter), then
    ``accuracy.perturb`` with the same seed and ``factor`` times its bias-field coefficient range and noise sd
    (the same random draws, scaled)."""
    accuracy = _accuracy_module()
    a = np.asarray(volume.array, dtype=np.float32)
    brain = a > 0
    scale = float(np.percentile(a[brain], 99.5))
    out = a.copy()
    out[brain] = scale * np.power(a[brain] / scale, gamma)
    with _scaled(accuracy, factor):
        return accuracy.perturb(volume.with_array(out), seed=seed)


@contextlib.contextmanager
def _scaled(accuracy, factor: float) -> Iterator[None]:
    bias, noise = accuracy.PERTURB_BIAS, accuracy.PERTURB_NOISE
    accuracy.PERTURB_BIAS, accuracy.PERTURB_NOISE = bias * factor, noise * factor
    try:
        yield
    finally:
        accuracy.PERTURB_BIAS, accuracy.PERTURB_NOISE = bias, noise


def tissue_cases(root: Path, fold: int = 0) -> list[tuple[str, object, np.ndarray]]:
    """(name, image Volume, true labels) for the held-out block of ``fold``: clean, perturbed, strong."""
    from napari_medcl.io import read_image
    from training.data.layouts import discover
    from training.data.preprocessing import split_cases

    layout = discover("msd", root)
    _, held_out = split_cases(list(layout.cases), fold=fold, num_folds=5, val_fraction=None, split_seed=12345)
    (case,) = held_out
    image, truth = read_image(case.images[0]), read_image(case.label).array
    perturbed = _accuracy_module().perturb(image, seed=1000 + fold)
    strong = perturb_strong(image, seed=1000 + fold)
    return [
        (f"{case.case_id} clean", image, truth),
        (f"{case.case_id} perturbed", perturbed, truth),
        (f"{case.case_id} strong", strong, truth),
    ]


# ------------------------------------------------------------------------------------------------ maps


@dataclass
class CaseResult:
    """The plain prediction and every candidate map of one case, plus the mask where it is scored."""

    prediction: object
    maps: dict[str, np.ndarray]
    seconds: float


def candidate_maps(image, session, *, mirrors: bool = True) -> CaseResult:
    """Every candidate map (see the module docstring) of ``image`` under ``session``."""
    import warnings

    from napari_medcl import predict

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the lesion cases are not skull-stripped; said in the report
        plain = predict(image, session, return_probabilities=True)
    labels = plain.labels.array
    probs = plain.probabilities.array  # (K, *S)
    maps = {"constant (baseline)": np.ones(labels.shape, dtype=np.float32)}  # no information: ties everywhere
    maps |= {f"uafr:{name}": m.array for name, m in plain.uncertainty_maps.items()}
    maps["entropy"] = plain.entropy.array
    maps["top_class_error"] = plain.top_class_error.array
    if plain.error_likelihood is not None:  # the model carries a calibrated error map (medcl-calibrate)
        maps[CALIBRATED] = plain.error_likelihood.array
    maps[CONSENSUS] = _consensus(image, plain, session.spec)
    top2 = np.sort(probs, axis=0)[-2:]  # (2, *S): p2, p1
    maps["margin"] = 1.0 - (top2[1] - top2[0])
    if mirrors:
        prob_of_label = np.take_along_axis(probs, labels[None].astype(np.int64), 0)[0].astype(np.float64)
        differ = np.zeros(labels.shape, dtype=np.float64)
        flips = mirror_axes(session.spec.spatial_dims)
        for axes in flips:
            mirrored = predict(image, MirroredSession(session, axes), return_probabilities=True)
            differ += mirrored.labels.array != labels
            prob_of_label += np.take_along_axis(
                mirrored.probabilities.array, labels[None].astype(np.int64), 0
            )[0]
        maps["mirror_disagreement"] = (differ / len(flips)).astype(np.float32)
        maps["mirror_error"] = (1.0 - prob_of_label / (len(flips) + 1)).astype(np.float32)
    return CaseResult(plain, maps, time.perf_counter() - started)


def _consensus(image, prediction, spec) -> np.ndarray:
    """The intensity consensus map of ``prediction`` of ``image``: what ``predict`` adds for a model file that
    carries it (``with_error_likelihood``, on the same eligible voxels)."""
    import dataclasses

    from napari_medcl.error_model import ErrorModel, eligible_voxels
    from napari_medcl.prediction import normalises_over_mask, with_error_likelihood

    carrying = dataclasses.replace(spec, error_model=ErrorModel.consensus().to_dict())
    eligible = eligible_voxels(image, normalises_over_mask(spec))
    return with_error_likelihood(prediction, carrying, eligible, image=image).error_likelihood.array


def verdict_text(verdict: dict | None) -> str:
    """``ok (0.69)``; ``-`` for a case without a verdict."""
    if not verdict:
        return "-"
    score = verdict.get("score")
    return verdict["level"] + ("" if score is None else f" ({score:.2f})")


def score_case(result: CaseResult, truth: np.ndarray) -> dict:
    """Every metric of every map on one labelled tissue case."""
    from napari_medcl.review import rank_slices

    labels = result.prediction.labels.array
    region = (truth > 0) | (labels > 0)
    wrong = (labels != truth) & region
    errors_per_slice = wrong.sum(axis=(1, 2))
    oracle = reviewer_curve(errors_per_slice, oracle_order(errors_per_slice))
    verdict = result.prediction.verdict
    out = {
        # the scan's verdict: a model whose error map weighs its intensity model by it maps by this level
        "verdict": None if verdict is None else {"level": verdict.level, "score": verdict.score},
        "region_voxels": int(region.sum()),
        "errors": int(wrong.sum()),
        "error_rate": float(wrong.sum() / region.sum()),
        "brain_edge_errors": int((((labels > 0) != (truth > 0)) & region).sum()),  # tissue vs background
        "dice": {
            str(k): float(
                2 * ((labels == k) & (truth == k)).sum() / ((labels == k).sum() + (truth == k).sum())
            )
            for k in (1, 2, 3)
        },
        "slices": int(labels.shape[0]),
        "oracle": {"nauc": 1.0, "top10_ratio": top_slices_ratio(oracle), "curve": oracle.tolist()},
        "maps": {},
        "reliability": {},
        "reviewer": {},
    }
    e = wrong[region]
    for name, m in result.maps.items():
        s = m[region].astype(np.float64)
        slice_sums = np.where(region, m, 0).sum(axis=(1, 2), dtype=np.float64)
        curve = reviewer_curve(errors_per_slice, np.argsort(-slice_sums, kind="stable"))
        row = {
            "auroc": auroc(s, e),
            "auprc": auprc(s, e),
            **{f"top{round(f * 100)}": top_share(s, e, f) for f in TOP_FRACTIONS},
            "review_nauc": normalised_auc(curve, oracle),
            "review_top10": top_slices_ratio(curve),
        }
        if name in PROBABILITY_MAPS:
            cal = calibration(s, e)
            row["ece"] = cal.ece
            out["reliability"][name] = {
                "counts": cal.counts.tolist(),
                "predicted": _nan_list(cal.predicted),
                "observed": _nan_list(cal.observed),
            }
        out["maps"][name] = row
        out["reviewer"][f"sum {name}"] = curve.tolist()
    uafr = result.prediction.uafr_uncertainty.array
    for mode in ("mean_in_foreground", "volume_above"):
        ranked = rank_slices(uafr, labels, 0, mode=mode, threshold=REVIEW_THRESHOLD)
        curve = reviewer_curve(errors_per_slice, [r.index for r in ranked])
        out["reviewer"][f"panel {mode}"] = curve.tolist()
        out[f"panel {mode}"] = {
            "ranked_slices": len(ranked),
            "nauc": normalised_auc(curve, oracle),
            "top10_ratio": top_slices_ratio(curve),
        }
    return out


def score_lesion_case(result: CaseResult, lesion: np.ndarray) -> dict:
    """What makes sense for a case labelled with a lesion, not tissue: the share of the image (and of the
    lesion) the model labels as tissue, and per map the mean inside the lesion, the mean over the other
    voxels labelled tissue, and the AUROC of "lesion" among the voxels labelled tissue."""
    labels = result.prediction.labels.array
    tissue, lesion = labels > 0, lesion > 0
    out = {
        "tissue_share": float(tissue.mean()),
        "lesion_labelled_tissue": float((tissue & lesion).sum() / max(lesion.sum(), 1)),
        "lesion_voxels": int(lesion.sum()),
        "maps": {},
    }
    inside = lesion[tissue]
    for name, m in result.maps.items():
        s = m[tissue]
        out["maps"][name] = {
            "mean_lesion": float(s[inside].mean()) if inside.any() else math.nan,
            "mean_other": float(s[~inside].mean()),
            "auroc_lesion": auroc(s, inside),
        }
    return out


def _nan_list(a: np.ndarray) -> list:
    return [None if not np.isfinite(x) else float(x) for x in a]


# ------------------------------------------------------------------------------------------------ plots


def plot_reliability(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    fig, axes = plt.subplots(
        len(PROBABILITY_MAPS),
        len(models),
        figsize=(4.2 * len(models), 3.8 * len(PROBABILITY_MAPS)),
        squeeze=False,
    )
    for j, model in enumerate(models):
        for i, name in enumerate(PROBABILITY_MAPS):
            ax = axes[i, j]
            ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect")
            for case, scored in results[model]["tissue"].items():
                rel = scored["reliability"].get(name)
                if rel is None:
                    continue
                pred = np.array([np.nan if v is None else v for v in rel["predicted"]])
                obs = np.array([np.nan if v is None else v for v in rel["observed"]])
                counts = np.array(rel["counts"])
                keep = counts >= 20
                ece = scored["maps"][name]["ece"]
                ax.plot(pred[keep], obs[keep], marker="o", ms=3, label=f"{case.split()[-1]} (ECE {ece:.3f})")
            ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=f"{name} (mean in bin)", ylabel="observed error rate")
            ax.set_title(f"{model}: {name}", fontsize=9)
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Reliability, 15 equal-width bins (bins with >= 20 voxels)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


REVIEW_LINES = (
    "sum constant (baseline)",
    "panel mean_in_foreground",
    "panel volume_above",
    "sum entropy",
    "sum top_class_error",
    "sum margin",
    "sum mirror_error",
    f"sum {CONSENSUS}",
    f"sum {CALIBRATED}",
)


def plot_reviewer(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    cases = list(next(iter(results.values()))["tissue"])
    fig, axes = plt.subplots(
        len(models), len(cases), figsize=(4.2 * len(cases), 3.6 * len(models)), squeeze=False
    )
    for i, model in enumerate(models):
        for j, case in enumerate(cases):
            scored = results[model]["tissue"][case]
            ax = axes[i, j]
            total = scored["errors"]
            n = scored["slices"]
            x = np.arange(n + 1) / n
            ax.plot(x, np.array(scored["oracle"]["curve"]) / total, color="black", lw=2, label="oracle")
            ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="random (expected)")
            for line in REVIEW_LINES:
                curve = scored["reviewer"].get(line)
                if curve is not None:
                    ls = "-" if line.startswith("panel") else ":"
                    label = line.replace("panel ", "panel: ").replace("sum constant (baseline)", "brain area")
                    ax.plot(x, np.array(curve) / total, ls=ls, lw=1.4, label=label)
            ax.set(
                xlim=(0, 1),
                ylim=(0, 1.01),
                xlabel="share of axial slices read",
                ylabel="share of errors found",
            )
            ax.set_title(f"{model}, {case} ({total} errors)", fontsize=9)
            if i == 0 and j == 0:
                ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- report


def _f(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def report(results: dict, header: str) -> str:
    lines = [header]
    for model, res in results.items():
        tissue = res["tissue"]
        cases = list(tissue)
        lines.append(f"\n### {model} (SHA-256 `{res['sha256']}`)\n")
        lines.append(
            "| case | verdict (score) | voxels scored | errors | of which tissue vs background | error rate "
            "| Dice CSF / GM / WM | seconds (plain + mirrors) |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for case in cases:
            s = tissue[case]
            dice = " / ".join(f"{s['dice'][k]:.3f}" for k in ("1", "2", "3"))
            lines.append(
                f"| {case} | {verdict_text(s.get('verdict'))} | {s['region_voxels']} | {s['errors']} | "
                f"{s['brain_edge_errors']} | {s['error_rate']:.4f} | {dice} | {s['seconds']:.0f} |"
            )
        lines.append(
            "\nHeadline (AUROC on each case; the rest on the clean block; random: AUROC 0.5, top-10% share "
            "0.10, reviewer nAUC 0; oracle: reviewer nAUC 1):\n"
        )
        short = [c.split()[-1] for c in cases]
        lines.append(
            "| map | "
            + " | ".join(f"AUROC {c}" for c in short)
            + " | AUPRC clean | top-5% | top-10% | top-20% | ECE | reviewer nAUC | top-10% slices / random |"
        )
        lines.append("|---" * (len(cases) + 8) + "|")
        clean = tissue[cases[0]]
        for name in clean["maps"]:
            row = clean["maps"][name]
            aurocs = [_f(tissue[c]["maps"][name]["auroc"]) for c in cases]
            lines.append(
                f"| `{name}` | "
                + " | ".join(aurocs)
                + f" | {_f(row['auprc'])} | {_f(row['top5'])} | {_f(row['top10'])} | {_f(row['top20'])} | "
                f"{_f(row.get('ece', math.nan))} | {_f(row['review_nauc'], 2)} | {_f(row['review_top10'], 2)} |"
            )
        lines.append(f"\nError rate (AUPRC of a map without information): {clean['error_rate']:.4f}.\n")
        lines.append(
            "Review panel orders on the UAFR map nearest the output (`Prediction.uafr_uncertainty`, the map the viewer showed by default until it showed the error likelihood), per case:\n"
        )
        lines.append("| case | order | slices ranked | reviewer nAUC | top-10% slices / random |")
        lines.append("|---|---|---|---|---|")
        for case in cases:
            s = tissue[case]
            lines.append(
                f"| {case} | oracle (true error count) | {s['slices']} | 1.00 | {_f(s['oracle']['top10_ratio'], 2)} |"
            )
            for mode in ("mean_in_foreground", "volume_above"):
                p = s[f"panel {mode}"]
                thr = f" > {REVIEW_THRESHOLD}" if mode == "volume_above" else ""
                lines.append(
                    f"| {case} | panel `{mode}`{thr} | {p['ranked_slices']} of {s['slices']} | "
                    f"{_f(p['nauc'], 2)} | {_f(p['top10_ratio'], 2)} |"
                )
        for case in cases[1:]:
            lines.append(f"\nAll metrics, {case}:\n")
            lines.append(
                "| map | AUROC | AUPRC | top-5% | top-10% | top-20% | ECE | reviewer nAUC | top-10% slices / random |"
            )
            lines.append("|---" * 9 + "|")
            for name, row in tissue[case]["maps"].items():
                lines.append(
                    f"| `{name}` | {_f(row['auroc'])} | {_f(row['auprc'])} | {_f(row['top5'])} | "
                    f"{_f(row['top10'])} | {_f(row['top20'])} | {_f(row.get('ece', math.nan))} | "
                    f"{_f(row['review_nauc'], 2)} | {_f(row['review_top10'], 2)} |"
                )
            lines.append(f"\nError rate: {tissue[case]['error_rate']:.4f}.")
        for case, s in res.get("lesion", {}).items():
            lines.append(
                f"\nLesion case {case} (not skull-stripped; labels are a lesion): labelled tissue "
                f"{s['tissue_share']:.1%} of the image, {s['lesion_labelled_tissue']:.1%} of the "
                f"{s['lesion_voxels']} lesion voxels.\n"
            )
            lines.append(
                "| map | mean in lesion | mean, other tissue-labelled voxels | AUROC lesion vs rest |"
            )
            lines.append("|---|---|---|---|")
            for name, row in s["maps"].items():
                lines.append(
                    f"| `{name}` | {_f(row['mean_lesion'])} | {_f(row['mean_other'])} | {_f(row['auroc_lesion'])} |"
                )
    return "\n".join(lines) + "\n"


MARKERS = ("<!-- uncertainty-benchmark results: start -->", "<!-- uncertainty-benchmark results: end -->")


def write_between_markers(path: Path, text: str, markers: tuple[str, str] = MARKERS) -> None:
    """Put ``text`` between the two ``markers`` lines of ``path`` (the prose around them stays), or write a new
    file with the markers when there is none."""
    start, end = markers
    block = f"{start}\n{text}{end}"
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = old + ("\n" if old else "") + block + "\n"
    path.write_text(new, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", nargs="+", default=list(MODELS), help="bundled names or .onnx paths")
    parser.add_argument("--data", default="data/mni152-tissue", help="the mni152-tissue dataset")
    parser.add_argument("--fold", type=int, default=0, help="the fold the models held out (default 0)")
    parser.add_argument("--lesion-dir", help="a folder with pyradiomics' brain1/brain2 _image/_label.nrrd")
    parser.add_argument("--no-mirrors", action="store_true", help="skip the mirroring maps (faster)")
    parser.add_argument("--json", help="write every figure (curves included) to this JSON file")
    parser.add_argument("--markdown", help="write the report to this markdown file")
    parser.add_argument("--plots", help="write reliability.png and reviewer.png to this folder")
    args = parser.parse_args(argv)

    from napari_medcl.io import read_image
    from napari_medcl.onnx_session import load_model

    cases = tissue_cases(Path(args.data), args.fold)
    lesion_cases = []
    if args.lesion_dir:
        for image_path in sorted(Path(args.lesion_dir).glob("brain*_image.nrrd")):
            label_path = image_path.with_name(image_path.name.replace("_image", "_label"))
            lesion_cases.append(
                (image_path.stem.replace("_image", ""), read_image(image_path), read_image(label_path))
            )
    results = {}
    for model in args.model:
        session = load_model(model, device="cpu")
        name = session.spec.name
        results[name] = {"sha256": session.sha256, "tissue": {}, "lesion": {}}
        for case, image, truth in cases:
            result = candidate_maps(image, session, mirrors=not args.no_mirrors)
            scored = score_case(result, truth) | {"seconds": result.seconds}
            results[name]["tissue"][case] = scored
            row = scored["maps"]
            print(
                f"{name} {case}: {scored['errors']} errors ({scored['error_rate']:.4f}), "
                + ", ".join(
                    f"{m} {row[m]['auroc']:.3f}"
                    for m in ("uafr:decoder1", "entropy", "top_class_error", CONSENSUS, CALIBRATED)
                    if m in row
                )
                + f" [{result.seconds:.0f} s]",
                flush=True,
            )
        for case, image, lesion in lesion_cases:
            result = candidate_maps(image, session, mirrors=False)
            results[name]["lesion"][case] = score_lesion_case(result, lesion.array) | {
                "seconds": result.seconds
            }
            print(
                f"{name} {case}: labelled tissue {results[name]['lesion'][case]['tissue_share']:.1%}",
                flush=True,
            )

    command = f"PYTHONPATH=$PWD {sys.executable} benchmarks/uncertainty.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    header = (
        f"Measured {datetime.date.today().isoformat()} on {platform.machine()} ({_cpus()} CPU cores, shared), "
        f"ONNX Runtime CPU, with\n\n```bash\n{command.strip()}\n```\n"
    )
    text = report(results, header)
    sys.stdout.write(text)
    if args.markdown:
        write_between_markers(Path(args.markdown), text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=_json_default), encoding="utf-8")
    if args.plots:
        folder = Path(args.plots)
        folder.mkdir(parents=True, exist_ok=True)
        plot_reliability(results, folder / "reliability.png")
        plot_reviewer(results, folder / "reviewer.png")
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x).__name__)


if __name__ == "__main__":
    sys.exit(main())
