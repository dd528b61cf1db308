"""medcl-rank: which case to correct next. Arguments, the progress bar and messages only; the ranking is
``napari_medcl.ranking.rank_cases`` and the CSV ``napari_medcl.ranking.write_ranking`` (written atomically).

Exit status: 0 every case ranked; 1 some case could not be read or segmented (it is in the CSV, last, with
the reason), or the CSV could not be written; 2 usage or model error; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from napari_medcl.errors import MedclError, ModelError, UsageError
from napari_medcl.ranking import CSV_COLUMNS

PROG = "medcl-rank"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Rank unlabelled scans by which one to correct next: out-of-distribution scans first "
        "(the verdict on whether a scan looks like the model's training data), then caution, then the rest; "
        "within each, the larger expected share of wrong foreground voxels first (the error "
        "likelihood when the model carries an error map, else the model's own 1 - p(label), uncalibrated). Writes one "
        "CSV row per case with the reason; a file that cannot be read is listed last with the problem.",
        epilog=f"CSV columns: {', '.join(CSV_COLUMNS)}. Exit status: 0 every case ranked; 1 some case could "
        "not be read or segmented (it is in the CSV) or the CSV could not be written; 2 usage or model "
        "error; 130 interrupted.",
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="CASE", help="image files or DICOM folders")
    parser.add_argument(
        "-o", "--output", required=True, type=Path, metavar="CSV", help="ranking file to write"
    )
    parser.add_argument(
        "--model", default=None, help="bundled model name or .onnx path (default: bundled default)"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto")
    parser.add_argument(
        "--backend", choices=("auto", "onnxruntime", "openvino"), default="auto", help="default: auto"
    )
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="default: auto")
    parser.add_argument("--overlap", type=float, default=0.5, help="window overlap in [0, 1) (default 0.5)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    from napari_medcl.crash_log import internal_error_message
    from napari_medcl.ranking import rank_cases, write_ranking

    failed: list[str] = []
    # disable=None: the bar is drawn on a terminal only, so logs get the plain lines alone.
    bar = tqdm(
        total=len(args.inputs), desc=PROG, unit="case", file=sys.stderr, disable=True if args.quiet else None
    )

    def on_case(case: str, problem: str | None) -> None:
        bar.update(1)
        if problem is not None:
            failed.append(case)
            bar.write(f"{PROG}: {problem}", file=sys.stderr)

    try:
        with bar:
            ranks = rank_cases(
                args.inputs,
                args.model,
                device=args.device,
                backend=args.backend,
                precision=args.precision,
                overlap=args.overlap,
                on_case=on_case,
            )
        write_ranking(ranks, args.output)
    except (UsageError, ModelError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except MedclError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception as error:
        print(f"{PROG}: {internal_error_message(PROG, error)}", file=sys.stderr)
        return 1
    top = next((r for r in ranks if r.status == "ranked"), None)
    if top is not None:
        print(f"most informative: {top.case} ({top.reason})")
    print(f"ranked {len(ranks) - len(failed)} case(s), {len(failed)} failed; wrote {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
