"""``medcl-export CHECKPOINT -o model.onnx``: argument parsing and messages only; the work is in export.onnx.

User mistakes (a missing or foreign checkpoint, bad colours, an output folder that cannot be written, a
failed verification) print one line on stderr and exit 1; argparse usage errors exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

PROG = "medcl-export"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Export a napari-medcl training checkpoint to one self-describing ONNX file: outputs "
            "'probabilities' and the UAFR maps 'uafr_uncertainty', dynamic batch and image size, BatchNorm "
            "folded, the ModelSpec (classes, colours, spacing, normalisation, patch size, training "
            "provenance) stored under the metadata key 'medcl.spec'. Run it with medcl-predict --model FILE."
        ),
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint_best.pt or checkpoint_last.pt of a run")
    parser.add_argument(
        "-o", "--output", required=True, type=Path, metavar="MODEL.onnx", help="file to write"
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, at least 17 (default: 17)")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="before writing, check the file with onnx.checker and compare ONNX Runtime with torch on other "
        "input shapes (max |diff| <= 1e-4, same argmax); print model size, op counts and CPU timings",
    )
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="write an fp16 variant for the CUDA provider: fp16 weights and activations, float32 inputs, "
        "outputs, softmax, norms and entropy (verified against fp32 torch to 5e-2 and 99%% argmax agreement)",
    )
    parser.add_argument("--name", help="model name stored in the spec (default: the one training recorded)")
    parser.add_argument(
        "--class-colors",
        nargs="+",
        metavar="#RRGGBB",
        help="one colour per class, background first (default: the fixed palette)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from napari_medcl.errors import MedclError

    if args.opset < 17:
        print(f"{PROG}: error: --opset must be at least 17, got {args.opset}", file=sys.stderr)
        return 1
    from export.onnx import to_onnx

    try:
        report = to_onnx(
            args.checkpoint,
            args.output,
            opset=args.opset,
            verify=args.verify,
            fp16=args.fp16,
            name=args.name,
            class_colors=args.class_colors,
        )
    except MedclError as error:
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as error:
        from napari_medcl.crash_log import internal_error_message

        print(f"{PROG}: {internal_error_message(PROG, error)}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def _one_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
