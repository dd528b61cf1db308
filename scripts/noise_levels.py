"""The voxel-scale noise the verdict's noise check measures, on the scans docs/uncertainty.md lists.

    PYTHONPATH=$PWD .venv/bin/python scripts/noise_levels.py [--model brain-tissue-3d] \
        [--data data/mni152-tissue] [--pyradiomics DIR]

For each scan: ``case_statistics(volume, spec.normalization)["noise"]`` (``napari_medcl.training_profile``), in
percent of the intensity range, and the verdict's noise severity against the model's training-data profile.
Scans: the four training blocks of fold 0 and the held-out block 4 of mni152-tissue, the training blocks with
the error-map recipe's moderate and strong shifts (``benchmarks/accuracy.py perturb`` and
``benchmarks/uncertainty.py perturb_strong``, seeds 2000 + block, as ``scripts/error_map_recipe.py`` builds
them), the held-out block's perturbed and strong copies of the uncertainty benchmark (seed 1000), the bundled
2 mm sample, and with ``--pyradiomics`` the ``*image*.nrrd`` files of that folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from benchmarks.accuracy import perturb
    from benchmarks.uncertainty import perturb_strong
    from napari_medcl import load_model
    from napari_medcl._sample_data import SAMPLE_FILE
    from napari_medcl.io import read_image
    from napari_medcl.training_profile import case_statistics
    from napari_medcl.verdict import assess

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="brain-tissue-3d", help="bundled model name or .onnx path")
    parser.add_argument("--data", type=Path, default=ROOT / "data/mni152-tissue")
    parser.add_argument("--pyradiomics", type=Path, help="folder with pyradiomics' *image*.nrrd test images")
    args = parser.parse_args(argv)

    spec = load_model(args.model, device="cpu").spec
    trained = (spec.training_profile or {}).get("noise_fraction")
    print(f"model {spec.name}; training profile's noise: {trained}")

    def block(b: int):
        return read_image(args.data / "imagesTr" / f"mni152_block{b}_0000.nii.gz")

    cases = [(f"training block {b}", block(b)) for b in range(4)]
    cases.append(("held-out block 4", block(4)))
    cases += [(f"training block {b}, moderate shift", perturb(block(b), seed=2000 + b)) for b in range(4)]
    cases += [
        (f"training block {b}, strong shift", perturb_strong(block(b), seed=2000 + b)) for b in range(4)
    ]
    cases.append(("held-out block 4, perturbed (seed 1000)", perturb(block(4), seed=1000)))
    cases.append(("held-out block 4, strong (seed 1000)", perturb_strong(block(4), seed=1000)))
    cases.append(("bundled sample, 2 mm", read_image(SAMPLE_FILE)))
    if args.pyradiomics:
        cases += [
            (f"pyradiomics {f.stem}", read_image(f)) for f in sorted(args.pyradiomics.glob("*image*.nrrd"))
        ]
    print("| scan | noise, % of the intensity range | noise severity | verdict |")
    print("|---|---|---|---|")
    for name, volume in cases:
        noise = case_statistics(volume, spec.normalization)["noise"]
        verdict = assess(volume, spec)
        severity = verdict.details.get("severity", {}).get("noise")
        shown = ", ".join("-" if n is None else f"{100 * n:.2f}" for n in noise)
        print(f"| {name} | {shown} | {'-' if severity is None else f'{severity:.2f}'} | {verdict.level} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
