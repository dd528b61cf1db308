"""The recipe of a bundled model's calibrated error map, fitted out of fold.

    PYTHONPATH=$PWD .venv/bin/python scripts/error_map_recipe.py --model brain-tissue-3d \\
        --recipe training/configs/default-brain-tissue-3d.yaml -o /tmp/brain-tissue-3d-calibrated.onnx

The bundled models train on blocks 0-3 of ``mni152-tissue`` and are scored on block 4 (fold 0), so the
error map must be learned without block 4 and from predictions of blocks the predicting network did not
train on. Steps (each skipped when its output exists):

1. ``data/mni152-oof``: blocks 0-3 only (links to the dataset's files).
2. One fold model per ``--held-out`` block: the model's own recipe trained on the other three blocks, with
   that block as validation (``medcl-train RECIPE --set data.root=... --set data.val_cases=[BLOCK]``; about an
   hour each on one CPU thread; ``--train`` runs them, else the script stops and prints the commands), then
   ``medcl-export`` of the last checkpoint (the epoch the bundled model was taken at, not the best on the
   held-out block, which would flatter the fold model on the very block used to fit).
3. Two shifted copies of each held-out block, so the map also learns what a scanner change does to the
   errors: the accuracy benchmark's bias field and noise (``benchmarks/accuracy.py perturb``) and the
   uncertainty benchmark's strong gamma (``perturb_strong``), with seeds 2000 + block (block 4's copies in
   the benchmarks use seeds 1000 + fold).
4. ``medcl-calibrate MODEL DATA --fold 0 -o OUT --error-case FOLD_MODEL DATASET BLOCK`` for every fold model
   and copy: the training-data profile as before, and the error map with its out-of-fold figures.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.benchmark_modules import benchmark_module  # noqa: E402  (the benchmarks' perturbations)


def finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` trained all the epochs its config.yaml asks for."""
    import yaml

    metrics, config = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not (metrics.is_file() and config.is_file() and (run_dir / "checkpoint_last.pt").is_file()):
        return False
    lines = metrics.read_text(encoding="utf-8").strip().splitlines()
    epochs = yaml.safe_load(config.read_text(encoding="utf-8"))["train"]["epochs"]
    return bool(lines) and json.loads(lines[-1])["epoch"] >= epochs


def oof_dataset(source: Path, target: Path, blocks: list[str]) -> Path:
    """``target`` in the MSD layout with only ``blocks`` of ``source`` (links, not copies)."""
    if (target / "dataset.json").is_file():
        return target
    for sub in ("imagesTr", "labelsTr"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    for block in blocks:
        for sub, name in (("imagesTr", f"{block}_0000.nii.gz"), ("labelsTr", f"{block}.nii.gz")):
            link = target / sub / name
            if not link.exists():
                link.symlink_to((source / sub / name).resolve())
    meta = json.loads((source / "dataset.json").read_text(encoding="utf-8"))
    meta["numTraining"] = len(blocks)
    meta["blocks"] = [b for b in meta.get("blocks", []) if b.get("case") in blocks]
    meta["description"] = f"{meta.get('description', '')} (blocks {', '.join(blocks)} only: fold models)"
    (target / "dataset.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return target


def shifted_dataset(source: Path, target: Path, blocks: list[str], kind: str) -> Path:
    """``target`` with a shifted copy (``kind``: moderate or strong) of each of ``blocks`` of ``source``."""
    from napari_medcl.io import read_image, write_image

    if (target / "dataset.json").is_file():
        return target
    for sub in ("imagesTr", "labelsTr"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    with benchmark_module("accuracy") as accuracy, benchmark_module("uncertainty") as uncertainty:
        for block in blocks:
            seed = 2000 + int(block.rsplit("block", 1)[1])
            image = read_image(source / "imagesTr" / f"{block}_0000.nii.gz")
            if kind == "moderate":
                shifted = accuracy.perturb(image, seed=seed)
            else:
                shifted = uncertainty.perturb_strong(image, seed=seed)
            write_image(shifted, target / "imagesTr" / f"{block}_0000.nii.gz")
            shutil.copyfile(source / "labelsTr" / f"{block}.nii.gz", target / "labelsTr" / f"{block}.nii.gz")
    meta = json.loads((source / "dataset.json").read_text(encoding="utf-8"))
    meta["numTraining"] = len(blocks)
    meta.pop("blocks", None)
    meta["description"] = f"{kind} intensity shift of {', '.join(blocks)} (scripts/error_map_recipe.py)"
    (target / "dataset.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return target


def run(command: list[str]) -> None:
    print("$ " + shlex.join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="brain-tissue-3d", help="the model to calibrate (name or .onnx)")
    parser.add_argument("--recipe", default="training/configs/default-brain-tissue-3d.yaml")
    parser.add_argument("--data", type=Path, default=Path("data/mni152-tissue"))
    parser.add_argument("--held-out", nargs="+", default=["mni152_block1", "mni152_block3"])
    parser.add_argument("--work", type=Path, default=Path("runs/oof"), help="fold runs and shifted copies")
    parser.add_argument("--train", action="store_true", help="train missing fold models (hours)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)

    bin_dir = Path(sys.executable).parent
    blocks = [f"mni152_block{i}" for i in range(4)]
    oof = oof_dataset(args.data, args.data.parent / "mni152-oof", blocks)
    tag = Path(args.recipe).stem
    fold_models = {}
    for block in args.held_out:
        run_dir = args.work / f"{tag}-{block}"
        onnx_path = run_dir / "model-last.onnx"
        checkpoint = run_dir / "checkpoint_last.pt"
        train = [str(bin_dir / "medcl-train"), args.recipe, "--set", f"data.root={oof}",
                 "--set", f"data.val_cases=[{block}]", "--set", f"output.dir={run_dir}"]  # fmt: skip
        if not onnx_path.is_file() and not finished(run_dir):
            if not args.train:
                print(
                    f"fold model for {block} missing; train it with (OMP_NUM_THREADS=1):\n  {shlex.join(train)}"
                )
                return 2
            run(train)
        if not onnx_path.is_file():
            run([str(bin_dir / "medcl-export"), str(checkpoint), "-o", str(onnx_path), "--verify"])
        fold_models[block] = onnx_path
    copies = {
        "clean": args.data,
        "moderate": shifted_dataset(args.data, args.work / "shift-moderate", args.held_out, "moderate"),
        "strong": shifted_dataset(args.data, args.work / "shift-strong", args.held_out, "strong"),
    }
    calibrate = [
        str(bin_dir / "medcl-calibrate"),
        args.model,
        str(args.data),
        "--fold",
        "0",
        "-o",
        str(args.output),
    ]
    for block, model in fold_models.items():
        for dataset in copies.values():
            calibrate += ["--error-case", str(model), str(dataset), block]
    run(calibrate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
