"""Export a trained checkpoint with verification and bundle it in ``napari_medcl/models/`` with its manifest entry.

    .venv/bin/python scripts/bundle_model.py runs/brain-tissue-2d/checkpoint_last.pt \
        --name brain-tissue-2d --recipe training/configs/default-brain-tissue-2d.yaml [--default]

The manifest records the file, its SHA-256 (loading checks it before parsing the model), a summary of the spec, the
training command, the device, the wall time and the validation Dice of the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parents[1] / "napari_medcl" / "models"
MAX_BYTES = 10 * 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    import torch

    from export import to_onnx
    from napari_medcl.atomic import write_text_atomic
    from napari_medcl.io import sha256_file
    from training.checkpoint import load_checkpoint

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--recipe", required=True, help="the training config the checkpoint was trained with")
    parser.add_argument("--default", action="store_true", help="make this the default bundled model")
    parser.add_argument(
        "--trained-on",
        help="the machine the checkpoint trained on (default: this one, as torch sees it now)",
    )
    parser.add_argument(
        "--held-out",
        help="one line on the model's held-out quality and how it was measured (stored in the manifest)",
    )
    args = parser.parse_args(argv)

    state = load_checkpoint(args.checkpoint)
    history = state["history"]
    target = MODELS_DIR / f"{args.name}.onnx"
    report = to_onnx(args.checkpoint, target, verify=True, name=args.name)
    print(report.summary())
    size = target.stat().st_size
    if size > MAX_BYTES:
        target.unlink()
        print(
            f"error: {target.name} is {size / 1e6:.1f} MB, over the 10 MB budget for bundled models",
            file=sys.stderr,
        )
        return 1
    epoch = int(state["epoch"])
    own = next((r["val"] for r in history if r.get("epoch") == epoch and r.get("val")), None)
    # The checkpoint's own validation, not the run's best epoch: they differ when bundling checkpoint_last.
    validation = {"epoch": epoch, "mean_dice": own["mean_dice"], "dice": own["dice"]} if own else None
    entry = {
        "name": args.name,
        "file": target.name,
        "sha256": sha256_file(target),
        "bytes": size,
        "summary": report.spec.summary(),
        "training_command": f"medcl-train {args.recipe}",
        "device": args.trained_on
        or f"{'cuda' if torch.cuda.is_available() else 'cpu'} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)",
        "epochs_to_this_checkpoint": len(history),
        "wall_seconds": round(sum(record["seconds"] for record in history), 1),
        "checkpoint_epoch": epoch,
        "validation": validation,
    }
    if args.held_out:
        entry["held_out"] = args.held_out
    manifest_path = MODELS_DIR / "manifest.json"
    manifest = (
        json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.exists() else {"models": []}
    )
    manifest["models"] = [m for m in manifest["models"] if m["name"] != args.name] + [entry]
    if args.default or "default" not in manifest:
        manifest["default"] = args.name
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
    print(f"bundled {target} ({size / 1e6:.2f} MB); manifest {manifest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
