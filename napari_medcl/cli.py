"""medcl-predict: segment image files or DICOM folders with an ONNX model, writing results beside a sidecar.

Arguments, the output folder's lock and the messages only: the work is
``napari_medcl.prediction.predict_iter``, and ``napari_medcl.case_writer.write_prediction`` writes each case
(``<case>_labels``, ``<case>_uncertainty``, ``<case>_entropy``, ``<case>_top_class_error``, for a model with a
calibrated error map ``<case>_error_likelihood``, with
``--save-probabilities`` ``<case>_probabilities_<k>``, with ``--report-csv`` ``<case>_report.csv``, with
``--dicom-seg`` ``<case>_seg.dcm``, and last ``<case>.json`` with the case report under ``"report"``), all or
nothing. Exit status: 0 all cases done, 1 some failed, 2 usage error, 130 interrupted.

Each case is written under its own lock, ``OUTDIR/.medcl-predict-locks/<case>.lock`` (``flock``, released by
the OS even when the process is killed; ``napari_medcl.cohort``), so several runs (array-job parts, ``--jobs``
workers) can write into one folder at once and never write the same case; a case another process is writing
is skipped with a message. A case already complete in OUTDIR from the same input, model and settings is
skipped unless ``--overwrite``. A run removes the temporary files killed runs left there, except those of
cases another process holds.

Heavy modules are imported after argument parsing, so ``medcl-predict --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from napari_medcl import __version__
from napari_medcl.arg_types import real_number, whole_number
from napari_medcl.crash_log import internal_error_message
from napari_medcl.errors import InputError, MedclError, OutputError
from napari_medcl.predict_case import PROG, process_case, wanted_from


def build_parser() -> argparse.ArgumentParser:
    from napari_medcl.io import MAX_BYTES, MAX_VOXELS  # numpy only: --help stays fast
    from napari_medcl.io.formats import FORMATS

    parser = argparse.ArgumentParser(
        prog=PROG,
        description=f"Segment medical images ({', '.join(fmt.title for fmt in FORMATS)}) with an ONNX "
        "model; write labels, UAFR uncertainty and predictive entropy with the input's geometry, plus a "
        "<case>.json provenance sidecar. Each case also gets a verdict on whether the scan looks like the "
        "model's training data (ok, caution, out-of-distribution with reasons, or unknown for a model file "
        "without a training-data profile); it is printed per case and kept in the sidecar, and never stops a "
        "case.",
        epilog=f"Outputs per case, in the input's format ({_other_outputs(FORMATS)}): "
        "<case>_labels, <case>_uncertainty (the UAFR map of the block nearest the output, when the model has "
        "UAFR maps), <case>_entropy, <case>_top_class_error (1 - the probability of each voxel's label, "
        "uncalibrated), <case>_error_likelihood (for a model that carries a calibrated error map, fitted by "
        "medcl-calibrate --error-case: the probability that each voxel's label is wrong), "
        "with --save-probabilities <case>_probabilities_<k> (one file per class k), with --report-csv "
        '<case>_report.csv, and <case>.json written last; its "report" holds the size of each class (mL, or '
        "cm2 for 2D images) and the expected wrong volume (from the error likelihood when the model has one, "
        "else from the uncalibrated 1 - probability of the label); with --dicom-seg <case>_seg.dcm (DICOM "
        "series inputs only). A failed case writes nothing. Inputs with the same case name (scan.nii and "
        "scan.nii.gz, or a DICOM folder 'scan') would overwrite each other's outputs: the later ones are refused before anything "
        "runs, the others are segmented. A case whose outputs are already complete in OUTDIR, made from the same "
        "input (SHA-256), model (SHA-256), napari-medcl version, overlap and --tta, with at least the optional "
        "outputs asked for, is skipped (--overwrite redoes it). Several runs may write into one OUTDIR at once "
        "(parts of an array job, --jobs workers): each case is written under its own lock "
        "(OUTDIR/.medcl-predict-locks/<case>.lock), and a case another process is writing is skipped with a "
        "message and left to it. "
        "Exit status: 0 every case done, already complete or being written by another process; 1 some case "
        "failed; 2 usage error; 130 interrupted. "
        "SLURM array example: #SBATCH --array=0-9, then medcl-predict data/*.nii.gz -o results "
        "--num-parts 10 --part-id $SLURM_ARRAY_TASK_ID.",
    )
    parser.add_argument(
        "inputs", nargs="+", type=Path, metavar="IN", help="image files or DICOM series folders"
    )
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR", help="output folder")
    parser.add_argument(
        "--model", default=None, help="bundled model name or .onnx path (default: bundled default)"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto")
    parser.add_argument(
        "--backend",
        choices=("auto", "onnxruntime", "openvino"),
        default="auto",
        help="inference engine; auto: OpenVINO when installed and running on the CPU, else ONNX Runtime "
        "(default: auto)",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="bf16: OpenVINO on a CPU with bfloat16 only (about 3x faster; labels agreed with fp32 on 99.98%% "
        "of the held-out voxels); auto: bf16 where it can run, else fp32 (default: auto)",
    )
    parser.add_argument(
        "--overlap",
        type=real_number(0.0, 1.0),
        default=0.5,
        help="fraction of window overlap in [0, 1) (default: 0.5)",
    )
    parser.add_argument(
        "--batch-size",
        type=whole_number(1),
        default=None,
        metavar="N",
        help="windows per model call (default: on CUDA as many as make up 8 windows of 24x80x80 voxels, at "
        "most 32; on a CPU 1)",
    )
    parser.add_argument("--tta", action="store_true", help="average over mirrored copies (2^d times slower)")
    parser.add_argument(
        "--save-probabilities", action="store_true", help="also write one probability map per class"
    )
    parser.add_argument(
        "--report-csv",
        action="store_true",
        help="also write <case>_report.csv: one row per class with its voxels, volume (mL; area in cm2 for 2D) "
        "and expected wrong volume (from the error likelihood when the model carries an error map, else "
        "from 1 - probability of the label, uncalibrated; always computed), plus the model and verdict",
    )
    parser.add_argument(
        "--dicom-seg",
        action="store_true",
        help="also write the labels as <case>_seg.dcm, a DICOM Segmentation (one segment per class) that "
        "references the source series; every input must be a DICOM series folder",
    )
    parser.add_argument(
        "--series", metavar="UID", help="SeriesInstanceUID to read from a multi-series folder"
    )
    parser.add_argument(
        "--max-voxels",
        type=whole_number(1, none=True),
        default=MAX_VOXELS,
        metavar="N",
        help="refuse an image whose header declares more than N values (voxels x channels), or that "
        f"resampled to the model spacing would hold more; 'none': no limit (default: {MAX_VOXELS})",
    )
    parser.add_argument(
        "--max-bytes",
        type=whole_number(1, none=True),
        default=MAX_BYTES,
        metavar="N",
        help="refuse an image whose voxel data takes more than N bytes (in the file, or as float32 once "
        f"resampled to the model spacing); 'none': no limit (default: {MAX_BYTES})",
    )
    parser.add_argument(
        "--num-parts",
        type=whole_number(1),
        default=None,
        metavar="N",
        help="split the inputs into N parts and segment only part --part-id (for array jobs on several "
        "machines writing into one OUTDIR): the cases are sorted by name and case i goes to part i mod N, "
        "so every case is in exactly one part whatever the order of the inputs",
    )
    parser.add_argument(
        "--part-id",
        type=whole_number(0),
        default=None,
        metavar="I",
        help="the part this run segments, 0 <= I < N (with --num-parts)",
    )
    parser.add_argument(
        "--jobs",
        type=whole_number(1),
        default=1,
        metavar="K",
        help="segment K cases at once in K worker processes, each with the model loaded once and its own "
        "share of the CPUs (so ONNX Runtime starts no more threads than there are cores); per-case lines "
        "come in the order cases finish (default: 1, in this process)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="segment a case even when OUTDIR already holds it complete from the same input, model and "
        "settings (by default such a case is skipped)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-case lines")
    return parser


def _check_parts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--num-parts and --part-id go together, with 0 <= I < N; anything else is a usage error (exit 2)."""
    if (args.num_parts is None) != (args.part_id is None):
        parser.error("--num-parts and --part-id go together: give both or neither")
    if args.num_parts is not None and args.part_id >= args.num_parts:
        parser.error(
            f"--part-id must be in [0, {args.num_parts}) for --num-parts {args.num_parts}, got {args.part_id}"
        )


def _other_outputs(formats: Any) -> str:
    """The formats whose outputs are written in another format, as help text."""
    out = []
    for fmt in formats:
        labels, maps = fmt.outputs
        if not labels or (labels == maps and fmt.written_extensions[:1] == (labels,)):
            continue  # written in the input's own format
        out.append(
            f"{fmt.title} -> {labels}" if labels == maps else f"{fmt.title} -> {labels} labels, {maps} maps"
        )
    return "; ".join(out)


def main(argv: list[str] | None = None) -> int:
    import warnings

    from napari_medcl.errors import InputWarning

    parser = build_parser()
    args = parser.parse_args(argv)
    _check_parts(parser, args)
    if args.dicom_seg:
        not_dicom = [path for path in args.inputs if not path.is_dir()]
        if not_dicom:  # before the model is loaded or any case runs
            print(
                f"{PROG}: error: --dicom-seg writes a DICOM Segmentation for DICOM series folders only; "
                f"{', '.join(str(p) for p in not_dicom)} {'is not one' if len(not_dicom) == 1 else 'are not'}",
                file=sys.stderr,
            )
            return 2

    def one_line(message: Any, category: type, *_: Any, **__: Any) -> None:
        print(f"warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            # What the user should know about an input is one line, not a Python source location.
            warnings.simplefilter("always", InputWarning)
            warnings.showwarning = one_line
            return _run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except MedclError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        print(f"{PROG}: {internal_error_message(PROG, error)}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from napari_medcl.case_writer import make_output_folder
    from napari_medcl.cohort import make_lock_folder, remove_lock_folder
    from napari_medcl.onnx_session import open_session

    try:
        model = open_session(args.model, device=args.device, backend=args.backend, precision=args.precision)
    except MedclError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        make_output_folder(args.output)
        make_lock_folder(args.output)  # the first write: a read-only folder stops the run here
    except OutputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    held = {"model": model}
    del model  # _run_cases may drop the parent's session before starting --jobs workers
    try:
        return _run_cases(args, held)
    finally:
        remove_lock_folder(args.output)


def _run_cases(args: argparse.Namespace, held: dict[str, Any]) -> int:
    from napari_medcl.cohort import sweep_case_temps

    model = held.pop("model")
    spec = model.spec
    print(
        f"{PROG} {__version__}: model {spec.name} (sha256 {model.sha256[:12]}) on {model.provider}\n"
        f"{'; '.join(spec.error_map_summary().splitlines())}\n"
        f"note: {spec.intended_use}",
        file=sys.stderr,
    )
    swept = sweep_case_temps(args.output)
    if swept:
        print(
            f"{PROG}: removed {len(swept)} temporary file(s) left by a killed run in {args.output}: "
            + ", ".join(p.name for p in swept),
            file=sys.stderr,
        )
    inputs, refused = _distinct_cases(args.inputs)
    if args.num_parts is not None:
        inputs, refused = _this_part(inputs, refused, args.num_parts, args.part_id)
    for error in refused:
        print(f"error: {error}", file=sys.stderr)
    counts = dict.fromkeys(("done", "finished", "busy", "failed"), 0)
    counts["failed"] = len(refused)
    if args.jobs > 1 and len(inputs) > 1:
        from napari_medcl.jobs import Pool, cpu_shares, run_jobs

        pool = Pool(args, model.sha256, cpu_shares(args.jobs))
        del model  # each worker loads its own; this one's memory (GPU memory included) is not needed
        results = run_jobs(inputs, pool, args.jobs)
    else:
        wanted = wanted_from(args, model)
        results = ((path, case, process_case(path, case, model, args, wanted)) for path, case in inputs)
    for _, _, result in results:
        counts[result.status] += 1
        for line in result.err:
            print(line, file=sys.stderr)
        if result.out and not args.quiet:
            print(result.out, flush=True)
    if not args.quiet and (len(inputs) > 1 or args.num_parts is not None):
        part = "" if args.num_parts is None else f"part {args.part_id} of {args.num_parts}: "
        print(
            f"{PROG}: {part}{len(inputs)} case(s): {counts['done']} segmented, {counts['finished']} already "
            f"complete, {counts['busy']} being written by another process, {counts['failed']} failed"
        )
    return 1 if counts["failed"] else 0


def _this_part(
    inputs: list[tuple[Path, str]], refused: list[InputError], num_parts: int, part_id: int
) -> tuple[list[tuple[Path, str]], list[InputError]]:
    """The cases of part ``part_id``, and the refused duplicates of those cases only (each duplicate is
    reported by the one part that segments the case it collides with)."""
    from napari_medcl.cohort import part_of, select_part
    from napari_medcl.io import case_name

    ordered = sorted(case for _, case in inputs)
    owner = {case: part_of(i, num_parts) for i, case in enumerate(ordered)}
    mine = [error for error in refused if owner.get(case_name(error.path)) == part_id]
    return select_part(inputs, num_parts, part_id), mine


def _distinct_cases(paths: list[Path]) -> tuple[list[tuple[Path, str]], list[InputError]]:
    """(input, case name) for each input whose case name is new, and an InputError for each later input
    that would overwrite the outputs of an earlier one (``scan.nii`` then ``scan.nii.gz``)."""
    from napari_medcl.io import case_name

    first: dict[str, Path] = {}
    kept, refused = [], []
    for path in paths:
        case = case_name(path)
        if case in first:
            refused.append(
                InputError(
                    path,
                    f"its outputs would overwrite those of {first[case]} (same case name {case!r}); "
                    "rename one of them or run it into another output folder",
                )
            )
        else:
            first[case] = path
            kept.append((path, case))
    return kept, refused


if __name__ == "__main__":
    sys.exit(main())
