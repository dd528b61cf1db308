"""medcl-predict: segment image files or DICOM folders with an ONNX model, writing results beside a sidecar.

Arguments, the output folder's lock and the messages only: the work is
``napari_medcl.prediction.predict_iter``, and ``napari_medcl.case_writer.write_prediction`` writes each case
(``<case>_labels``, ``<case>_uncertainty``, ``<case>_entropy``, ``<case>_top_class_error``, with
``--save-probabilities`` ``<case>_probabilities_<k>``, with ``--report-csv`` ``<case>_report.csv``, with
``--dicom-seg`` ``<case>_seg.dcm``, and last ``<case>.json`` with the case report under ``"report"``), all or
nothing. Exit status: 0 all cases done, 1 some failed, 2 usage error, 130 interrupted.

A run holds ``OUTDIR/.medcl-predict.lock`` (``flock``, released by the OS even when the process is killed), so
two runs never write into one folder at once; it removes the temporary files a killed run left there.

Heavy modules are imported after argument parsing, so ``medcl-predict --help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from napari_medcl import __version__
from napari_medcl.crash_log import internal_error_message
from napari_medcl.errors import InputError, MedclError, OutputError

PROG = "medcl-predict"
LOCK_NAME = ".medcl-predict.lock"


class _FolderBusy(Exception):
    """Another process holds the output folder's lock."""


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
        "UAFR maps), <case>_entropy, <case>_top_class_error (1 - the probability of each voxel's label), "
        "with --save-probabilities <case>_probabilities_<k> (one file per class k), with --report-csv "
        '<case>_report.csv, and <case>.json written last; its "report" holds the size of each class (mL, or '
        "cm2 for 2D images) and the expected wrong volume; with --dicom-seg <case>_seg.dcm (DICOM series "
        "inputs only). A failed case writes nothing. Inputs with the same case name (scan.nii and scan.nii.gz, or a "
        "DICOM folder 'scan') would overwrite each other's outputs: the later ones are refused before anything "
        "runs, the others are segmented. One run at a time per OUTDIR (a second one exits 1 at once). "
        "Exit status: 0 all done, 1 some case failed, 2 usage error, 130 interrupted.",
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
        "--overlap", type=_overlap, default=0.5, help="fraction of window overlap in [0, 1) (default: 0.5)"
    )
    parser.add_argument("--tta", action="store_true", help="average over mirrored copies (2^d times slower)")
    parser.add_argument(
        "--save-probabilities", action="store_true", help="also write one probability map per class"
    )
    parser.add_argument(
        "--report-csv",
        action="store_true",
        help="also write <case>_report.csv: one row per class with its voxels, volume (mL; area in cm2 for 2D) "
        "and expected wrong volume (from 1 - probability of the label, uncalibrated; always computed), plus the "
        "model and verdict",
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
        type=_limit,
        default=MAX_VOXELS,
        metavar="N",
        help="refuse an image whose header declares more than N values (voxels x channels), or that "
        f"resampled to the model spacing would hold more; 'none': no limit (default: {MAX_VOXELS})",
    )
    parser.add_argument(
        "--max-bytes",
        type=_limit,
        default=MAX_BYTES,
        metavar="N",
        help="refuse an image whose voxel data takes more than N bytes (in the file, or as float32 once "
        f"resampled to the model spacing); 'none': no limit (default: {MAX_BYTES})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-case lines")
    return parser


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


def _limit(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number or 'none': {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _overlap(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    import warnings

    from napari_medcl.errors import InputWarning

    args = build_parser().parse_args(argv)
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
    from napari_medcl.atomic import sweep_stale_temps
    from napari_medcl.case_writer import make_output_folder
    from napari_medcl.onnx_session import open_session

    try:
        model = open_session(args.model, device=args.device, backend=args.backend, precision=args.precision)
    except MedclError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        make_output_folder(args.output)
    except OutputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        with _output_lock(args.output):
            return _run_locked(args, model, sweep_stale_temps(args.output))
    except _FolderBusy:
        print(
            f"{PROG}: error: {args.output} is in use by another {PROG} run "
            f"(lock file {args.output / LOCK_NAME})",
            file=sys.stderr,
        )
        return 1
    except OutputError as error:  # the lock file cannot be created: nothing else could be written either
        print(f"error: {error}", file=sys.stderr)
        return 1


def _run_locked(args: argparse.Namespace, model: Any, swept: list[Path]) -> int:
    spec = model.spec
    print(
        f"{PROG} {__version__}: model {spec.name} (sha256 {model.sha256[:12]}) on {model.provider}\n"
        f"note: {spec.intended_use}",
        file=sys.stderr,
    )
    if swept:
        print(
            f"{PROG}: removed {len(swept)} temporary file(s) left by a killed run in {args.output}: "
            + ", ".join(p.name for p in swept),
            file=sys.stderr,
        )
    inputs, refused = _distinct_cases(args.inputs)
    for error in refused:
        print(f"error: {error}", file=sys.stderr)
    failed = len(refused)
    for path, case in inputs:
        try:
            _one_case(path, case, model, args)
        except MedclError as error:
            failed += 1
            print(f"error: {_message(path, error)}", file=sys.stderr)
        except MemoryError:
            failed += 1
            print(f"error: {path}: not enough memory for this image", file=sys.stderr)
        except Exception as error:  # a bug: the other cases still run
            failed += 1
            print(f"{PROG}: {path}: {internal_error_message(PROG, error)}", file=sys.stderr)
    return 1 if failed else 0


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


@contextmanager
def _output_lock(folder: Path) -> Iterator[Path]:
    """Hold ``folder/LOCK_NAME`` exclusively while the body runs; raise _FolderBusy if another process does.

    The OS drops the lock when the process ends however it ends, so a killed run never blocks the next one.
    The file is removed at the end while still locked; a process that opened it just before then finds it
    gone after locking, and locks the new file instead. Windows: a byte lock with ``msvcrt.locking`` (also
    dropped when the process ends); the file is removed after unlocking, which a run starting in between
    can make fail, leaving the file (harmless)."""
    path = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutputError(folder, f"cannot write in the output folder ({error.strerror})") from None
        try:
            _lock(fd)
        except OSError as error:
            os.close(fd)
            # flock says EWOULDBLOCK; msvcrt says EACCES or EDEADLOCK after its retries.
            if isinstance(error, BlockingIOError) or os.name == "nt":
                raise _FolderBusy(path) from None
            raise OutputError(path, f"cannot lock the output folder ({error.strerror})") from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield path
    finally:
        if os.name == "nt":  # Windows cannot remove an open file
            os.close(fd)
            _remove(path)
        else:
            _remove(path)
            os.close(fd)


def _lock(fd: int) -> None:
    if os.name == "nt":
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _remove(path: Path) -> None:
    with suppress(OSError):  # best effort: a lock file left behind blocks nobody
        path.unlink(missing_ok=True)


def _message(path: Path, error: Exception) -> str:
    """One line naming the input: its path, then the problem (without naming the input twice)."""
    named = getattr(error, "path", None)
    if named is not None and Path(named) == path and getattr(error, "problem", None):
        return f"{path}: {error.problem}"
    return f"{path}: {error}"


def _one_case(path: Path, case: str, model: Any, args: argparse.Namespace) -> None:
    from napari_medcl.case_writer import write_prediction
    from napari_medcl.progress_bar import predict_with_bar

    prediction = predict_with_bar(
        path,
        model,
        desc=case,
        quiet=args.quiet,
        overlap=args.overlap,
        tta=args.tta,
        return_probabilities=args.save_probabilities,
        series=args.series,
        max_voxels=args.max_voxels,
        max_bytes=args.max_bytes,
    )
    written = write_prediction(
        prediction,
        args.output,
        case,
        source=path,
        report_csv=args.report_csv,
        dicom_seg=model.spec.classes if args.dicom_seg else None,
        series_uid=args.series,
    )
    if not args.quiet:
        p = prediction.provenance
        verdict = "not assessed" if prediction.verdict is None else prediction.verdict.text
        print(
            f"{case}: {p.execution_provider}, {p.tiling.windows} windows, {p.timings['total']:.2f} s "
            f"(ORT {p.timings['ort_seconds']:.2f} s) -> {written.labels}; verdict: {verdict}"
        )


if __name__ == "__main__":
    sys.exit(main())
