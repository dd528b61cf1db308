"""How wide the intensity consensus's neighbourhood should be, chosen on training blocks only.

    PYTHONPATH=$PWD .venv/bin/python scripts/consensus_sigma.py [--model brain-tissue-3d] [--sigmas 2 4 8 12] \
        [--weights 1]

The bundled model predicts its four training blocks of mni152-tissue (fold 0: blocks 0-3; block 4, on which
docs/uncertainty.md reports, is never read) clean and with the moderate and strong intensity shifts of
``scripts/error_map_recipe.py`` (seeds 2000 + block), and each case is scored: AUROC of "label is wrong" over
the non-zero voxels, for 1 - p(label) and for the consensus (``ErrorModel.consensus``) at each neighbourhood
width ``sigma_mm`` of ``napari_medcl.intensity_model`` and each weight of the intensity model's log-odds
(1: the consensus as shipped; 0: the network alone). Prints one row per case, the mean over the twelve and the
AUROC of the twelve pooled (the figure ``medcl-calibrate`` reports).

``--by-verdict``: also the verdict each case gets (``Prediction.verdict``, from the model's training-data
profile), and every choice of one weight per verdict level among ``--weights`` (what ``medcl-calibrate
--verdict-weight`` stores), ranked by the pooled AUROC of the twelve, at the first ``--sigmas`` width.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.benchmark_modules import benchmark_module  # noqa: E402  (the benchmarks' perturbations)


def consensus_at(
    sigma_mm: float, weight: float, image: np.ndarray, labels, top_error, eligible, spacing
) -> np.ndarray:
    from napari_medcl.intensity_model import label_probability

    right = np.clip(label_probability(image, labels, spacing, eligible, sigma_mm=sigma_mm), 1e-4, 1 - 1e-4)
    network = np.clip(top_error, 1e-4, 1 - 1e-4)
    odds = network / (1 - network) * ((1 - right) / right) ** weight
    return odds / (1 + odds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="brain-tissue-3d")
    parser.add_argument("--data", type=Path, default=ROOT / "data/mni152-tissue")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[2.0, 4.0, 8.0, 12.0])
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0], help="of the intensity log-odds")
    parser.add_argument("--by-verdict", action="store_true", help="choose one weight per verdict level")
    parser.add_argument("--top", type=int, default=10, help="with --by-verdict: choices printed (default 10)")
    args = parser.parse_args(argv)
    from sklearn.metrics import roc_auc_score

    from napari_medcl import predict
    from napari_medcl.io import read_image
    from napari_medcl.onnx_session import load_model

    session = load_model(args.model, device="cpu")
    settings = [(s, w) for s in args.sigmas for w in args.weights]
    columns = ["1 - p(label)", *(f"{s:g} mm x {w:g}" for s, w in settings)]
    print(f"{'case':22s} " + " ".join(f"{c:>16s}" for c in columns))
    rows, pooled_wrong, pooled_scores, levels = [], [], [], []
    with benchmark_module("accuracy") as accuracy, benchmark_module("uncertainty") as uncertainty:
        for block in range(4):
            clean = read_image(args.data / "imagesTr" / f"mni152_block{block}_0000.nii.gz")
            truth = read_image(args.data / "labelsTr" / f"mni152_block{block}.nii.gz").array
            seed = 2000 + block
            copies = {
                "clean": clean,
                "moderate": accuracy.perturb(clean, seed=seed),
                "strong": uncertainty.perturb_strong(clean, seed=seed),
            }
            for kind, image in copies.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    prediction = predict(image, session)
                labels, top = prediction.labels.array, prediction.top_class_error.array
                eligible = image.array != 0
                wrong = (labels != truth)[eligible]
                scores = [top] + [
                    consensus_at(s, w, image.array[None], labels, top, eligible, image.spacing)
                    for s, w in settings
                ]
                row = [roc_auc_score(wrong, score[eligible]) for score in scores]
                rows.append(row)
                pooled_wrong.append(wrong)
                pooled_scores.append([score[eligible] for score in scores])
                levels.append(prediction.verdict.level)
                name = f"block{block} {kind}" + (f" ({levels[-1]})" if args.by_verdict else "")
                print(f"{name:22s} " + " ".join(f"{v:16.3f}" for v in row), flush=True)
    mean = np.mean(rows, axis=0)
    print(f"{'mean of ' + str(len(rows)):22s} " + " ".join(f"{v:16.3f}" for v in mean))
    wrong = np.concatenate(pooled_wrong)
    pooled = [roc_auc_score(wrong, np.concatenate(column)) for column in zip(*pooled_scores, strict=True)]
    print(f"{'pooled ' + str(len(rows)):22s} " + " ".join(f"{v:16.3f}" for v in pooled))
    if args.by_verdict:
        by_verdict(args, levels, pooled_wrong, [case[1 : 1 + len(args.weights)] for case in pooled_scores])
    return 0


def by_verdict(args, levels: list[str], wrong: list[np.ndarray], scores: list[list[np.ndarray]]) -> None:
    """Every choice of one of ``args.weights`` per verdict level seen, ranked by the pooled AUROC (and the
    mean of the per-case AUROCs); ``scores[case][i]``: the consensus at the first sigma and weight i."""
    from sklearn.metrics import roc_auc_score

    from napari_medcl.verdict import LEVELS

    seen = sorted(set(levels), key=LEVELS.index)
    truth = np.concatenate(wrong)
    ranked = []
    for choice in itertools.product(range(len(args.weights)), repeat=len(seen)):
        pick = dict(zip(seen, choice))
        chosen = [scores[c][pick[level]] for c, level in enumerate(levels)]
        per_case = np.mean([roc_auc_score(w, s) for w, s in zip(wrong, chosen)])
        ranked.append((roc_auc_score(truth, np.concatenate(chosen)), per_case, pick))
    ranked.sort(key=lambda r: -r[0])
    print(
        f"\none weight per verdict level at {args.sigmas[0]:g} mm (cases: "
        + ", ".join(f"{level} {levels.count(level)}" for level in seen)
        + "), best first by the pooled AUROC:"
    )
    for pooled, mean, pick in ranked[: args.top]:
        weights = ", ".join(f"{level} {args.weights[i]:g}" for level, i in pick.items())
        print(f"  pooled {pooled:.4f}  mean {mean:.4f}  {weights}")


if __name__ == "__main__":
    sys.exit(main())
