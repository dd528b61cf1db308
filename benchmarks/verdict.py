"""How well the per-case verdict separates training-like scans from scans a model should not be trusted on.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/verdict.py [--model brain-tissue-3d] [--root data/mni152-tissue]
        [--pyradiomics DIR]

In-distribution cases: the held-out block of fold 0 of mni152-tissue (the block the bundled models never saw)
clean and in three perturbed copies (bias field and noise, ``benchmarks/accuracy.py perturb``), and the bundled
sample (the MNI152 T1 at 2 mm) clean and perturbed. Out-of-distribution cases, built offline from the same
images: a head with a non-zero border (a smooth scalp/skull shell and background noise around the brain, as in
a scan that was not skull-stripped), background noise only, inverted contrast, 6.5 mm slices (the sample
resampled along z), axes permuted without updating the direction, a non-medical image (skimage.data pictures
stacked into a volume), pure noise, a constant and an empty image; and, with ``--pyradiomics DIR`` (a folder
holding ``brain1_image.nrrd``, ``brain2_image.nrrd``, ``breast1_image.nrrd``,
``prostate_phantom_subvolume.nrrd`` from github.com/AIM-Harvard/pyradiomics ``data/``), those real scans
(brain MR with skull, 6.5 mm slices; breast MR; a prostate phantom).

Prints one row per case (level, score, reasons) and the AUROC of ``score`` for out-of-distribution vs
in-distribution cases (ties count one half). Needs scikit-image (the data extra) for the non-medical image.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.accuracy import perturb
from napari_medcl.io import read_image
from napari_medcl.onnx_session import load_model
from napari_medcl.prediction import predict
from napari_medcl.preprocess import resample_linear, resampled_shape
from napari_medcl.verdict import assess
from napari_medcl.volume import Volume
from training.data.layouts import discover
from training.data.preprocessing import split_cases

SAMPLE = Path(__file__).parents[1] / "napari_medcl" / "data" / "mni152_t1_2mm.nii.gz"
PYRADIOMICS = ("brain1_image", "brain2_image", "breast1_image", "prostate_phantom_subvolume")


def held_out_block(root: Path) -> Volume:
    """The block fold 0 holds out (split seed 12345, as medcl-train and medcl-calibrate --fold 0)."""
    _, held = split_cases(
        list(discover("msd", root).cases), fold=0, num_folds=5, val_fraction=None, split_seed=12345
    )
    return read_image(held[0].images[0])


def with_head(volume: Volume, seed: int) -> Volume:
    """The brain inside a smooth scalp/skull shell, with magnitude noise in the air around it."""
    rng = np.random.default_rng(seed)
    a = np.asarray(volume.array, dtype=np.float32)
    brain = a > 0
    scale = float(np.percentile(a[brain], 99.5))
    axes = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in a.shape], indexing="ij")
    r = np.sqrt(sum((x / 0.98) ** 2 for x in axes))  # an ellipsoid touching the image's faces
    out = np.abs(rng.normal(0.0, 0.03 * scale, a.shape)).astype(np.float32)  # air: Rayleigh-like noise
    shell = (r < 1.0) & ~brain
    out[shell] += (0.45 * scale * (1.0 + 0.3 * np.cos(9 * r[shell]))).astype(np.float32)  # scalp, skull
    out[brain] = a[brain]
    return volume.with_array(out)


def with_noise_background(volume: Volume, seed: int) -> Volume:
    """Only low noise (2% of the brain's range) where the scan was zero."""
    rng = np.random.default_rng(seed)
    a = np.asarray(volume.array, dtype=np.float32)
    scale = float(np.percentile(a[a > 0], 99.5))
    out = np.where(a > 0, a, np.abs(rng.normal(0.0, 0.02 * scale, a.shape))).astype(np.float32)
    return volume.with_array(out)


def inverted(volume: Volume) -> Volume:
    a = np.asarray(volume.array, dtype=np.float32)
    brain = a > 0
    out = np.zeros_like(a)
    out[brain] = float(a[brain].max()) + 1.0 - a[brain]
    return volume.with_array(out)


def thick_slices(volume: Volume, thickness: float) -> Volume:
    """``volume`` resampled linearly along z to slices ``thickness`` mm apart (in-plane unchanged)."""
    spacing = (thickness, *volume.spacing[1:])
    shape = resampled_shape(volume.spatial_shape, volume.spacing, spacing)
    scales = tuple(t / s for s, t in zip(volume.spacing, spacing))
    array = resample_linear(np.asarray(volume.array, np.float32)[None], shape, scales)[0]
    return Volume(array, spacing, volume.origin, volume.direction)


def permuted(volume: Volume, axes: tuple[int, int, int]) -> Volume:
    """The array's axes permuted, the geometry left as it was (a header that lies about orientation)."""
    array = np.ascontiguousarray(np.transpose(volume.array, axes))
    spacing = tuple(volume.spacing[i] for i in axes)
    return Volume(array, spacing, volume.origin, volume.direction)


def non_medical(shape_like: Volume) -> Volume:
    """skimage.data pictures (camera, moon, page, coins...) stacked into a volume, 1 mm pixels."""
    from skimage import data, transform

    pictures = [data.camera(), data.moon(), data.page(), data.coins(), data.text(), data.grass()]
    size = (256, 256)
    slices = [transform.resize(p.astype(np.float32), size, preserve_range=True) for p in pictures]
    array = np.stack([slices[i % len(slices)] for i in range(30)]).astype(np.float32)
    return Volume(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))


def cases(root: Path, pyradiomics: Path | None) -> list[tuple[str, bool, Volume]]:
    """(name, out-of-distribution?, volume) for every case of the benchmark."""
    block = held_out_block(root)
    sample = read_image(SAMPLE)
    sample = sample.with_array(np.asarray(sample.array, dtype=np.float32))
    rng = np.random.default_rng(0)
    out = [
        ("held-out block (clean)", False, block),
        *((f"held-out block perturbed (seed {s})", False, perturb(block, s)) for s in (0, 1, 2)),
        ("bundled sample, 2 mm (clean)", False, sample),
        ("bundled sample perturbed (seed 0)", False, perturb(sample, 0)),
        ("sample in a head (scalp, skull, air noise)", True, with_head(sample, 0)),
        ("held-out block in a head", True, with_head(block, 1)),
        ("sample, noise where it was zero", True, with_noise_background(sample, 0)),
        ("sample, inverted contrast", True, inverted(sample)),
        ("held-out block, inverted contrast", True, inverted(block)),
        ("sample, 6.5 mm slices", True, thick_slices(sample, 6.5)),
        ("sample, axes permuted (y, x, z)", True, permuted(sample, (1, 2, 0))),
        ("held-out block, axes permuted (x, z, y)", True, permuted(block, (2, 0, 1))),
        ("non-medical (skimage pictures)", True, non_medical(sample)),
        (
            "pure noise",
            True,
            sample.with_array(rng.uniform(0, 100, sample.spatial_shape).astype(np.float32)),
        ),
        ("constant image", True, sample.with_array(np.full(sample.spatial_shape, 80.0, np.float32))),
        ("empty image", True, sample.with_array(np.zeros(sample.spatial_shape, np.float32))),
    ]
    if pyradiomics is not None:
        for name in PYRADIOMICS:
            path = pyradiomics / f"{name}.nrrd"
            if path.is_file():
                out.append((f"pyradiomics {name}", True, read_image(path)))
            else:
                print(f"note: {path} not found; case left out")
    return out


def auroc(positive: list[float], negative: list[float]) -> float:
    """P(score of a positive > score of a negative), ties one half (Mann-Whitney U / n+ n-)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="brain-tissue-3d", help="bundled model name or .onnx path")
    parser.add_argument("--root", type=Path, default=Path("data/mni152-tissue"))
    parser.add_argument("--pyradiomics", type=Path, help="folder with pyradiomics' data/*.nrrd test images")
    parser.add_argument(
        "--save-features",
        type=Path,
        metavar="DIR",
        help="write each case's window features (a model with them) to DIR/NN.npz with its name and class",
    )
    args = parser.parse_args()
    session = load_model(args.model, device="cpu")
    spec = session.spec
    stats = spec.feature_stats
    # A model with window features is judged as a prediction judges it: the image checks and, after the
    # windows have run, the network's features (napari_medcl.feature_distance).
    with_features = stats is not None and stats.measured
    if spec.training_profile is None:
        raise SystemExit(f"{args.model}: the model carries no training-data profile; run medcl-calibrate")
    rows = []
    print(f"model {spec.name}; profile: {spec.training_profile.get('source')}\n")
    if with_features:
        print(f"{stats.summary()}; each case predicted (the ms column is the whole prediction)\n")
    print("| case | expected | verdict | score | image checks' score | feature distance | ms | reasons |")
    print("|---|---|---|---|---|---|---|---|")
    for name, ood, volume in cases(args.root, args.pyradiomics):
        start = time.perf_counter()
        image_only = assess(volume, spec)
        verdict = image_only
        if with_features:
            prediction = predict(volume, session)
            verdict = prediction.verdict
            if args.save_features is not None:
                args.save_features.mkdir(parents=True, exist_ok=True)
                np.savez(
                    args.save_features / f"{len(rows):02d}.npz",
                    features=prediction.window_features,
                    name=name,
                    ood=ood,
                )
        ms = 1000 * (time.perf_counter() - start)
        rows.append((ood, verdict, image_only))
        reasons = "; ".join(verdict.reasons) or "-"
        distance = verdict.details.get("features", {}).get("distance")
        print(
            f"| {name} | {'OOD' if ood else 'in'} | {verdict.level} | {verdict.score:.2f} | "
            f"{image_only.score:.2f} | {'-' if distance is None else f'{distance:.2f}'} | {ms:.0f} | "
            f"{reasons} |",
            flush=True,
        )
    positive = [v.score for ood, v, _ in rows if ood]
    negative = [v.score for ood, v, _ in rows if not ood]
    flagged_in = [v.level for ood, v, _ in rows if not ood and v.level == "out-of-distribution"]
    missed = sum(v.level == "ok" for ood, v, _ in rows if ood)
    print(
        f"\nAUROC of the score, {len(positive)} out-of-distribution vs {len(negative)} in-distribution "
        f"cases: {auroc(positive, negative):.3f}"
    )
    if with_features:
        image_positive = [i.score for ood, _, i in rows if ood]
        image_negative = [i.score for ood, _, i in rows if not ood]
        print(f"AUROC of the image checks' score alone: {auroc(image_positive, image_negative):.3f}")
        distances = [(ood, v.details.get("features", {}).get("distance")) for ood, v, _ in rows]
        if all(d is not None for _, d in distances):
            print(
                "AUROC of the feature distance alone: "
                f"{auroc([d for o, d in distances if o], [d for o, d in distances if not o]):.3f}"
            )
    print(f"in-distribution cases called out-of-distribution: {len(flagged_in)}")
    print(f"out-of-distribution cases called ok: {missed}")


if __name__ == "__main__":
    main()
