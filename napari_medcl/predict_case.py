"""One case of ``medcl-predict``: segment it and write it under its lock, or say why not.

Shared by the command's own loop (``cli``) and its worker processes (``jobs``), so that both run a case the
same way and report it with the same lines.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_medcl import __version__
from napari_medcl.crash_log import internal_error_message
from napari_medcl.errors import MedclError

PROG = "medcl-predict"


@dataclass(frozen=True)
class CaseResult:
    """How one case ended: ``status`` is ``done``, ``finished`` (already complete: skipped), ``busy`` (another
    process holds its lock: skipped) or ``failed``; ``out`` is its line for stdout (empty: none), ``err`` its
    lines for stderr."""

    status: str
    out: str = ""
    err: tuple[str, ...] = ()


def wanted_from(args: argparse.Namespace, model: Any) -> Any:
    """What this run writes for a case (``cohort.Wanted``), to recognise a case already complete."""
    from napari_medcl.cohort import Wanted

    return Wanted(
        model_sha256=getattr(model, "sha256", None),
        version=__version__,
        overlap=args.overlap,
        tta=args.tta,
        probabilities=args.save_probabilities,
        report_csv=args.report_csv,
        dicom_seg=args.dicom_seg,
    )


def process_case(
    path: Path, case: str, model: Any, args: argparse.Namespace, wanted: Any, *, bar: bool = True
) -> CaseResult:
    """Segment and write one case under its lock, unless another process holds it or OUTDIR already holds
    it complete (``cohort.finished``; not with ``--overwrite``). Errors end the case, never the run;
    KeyboardInterrupt propagates. ``bar``: a progress bar on a terminal (off in worker processes)."""
    from napari_medcl.cohort import CaseBusy, case_lock, finished

    try:
        with case_lock(args.output, case):
            if not args.overwrite and finished(args.output, case, path, wanted):
                return CaseResult("finished", out=f"{case}: already complete in {args.output}; skipped")
            return CaseResult("done", out=_one_case(path, case, model, args, bar=bar))
    except CaseBusy as busy:
        return CaseResult(
            "busy",
            err=(f"{PROG}: {case}: being written by another {PROG} process (lock {busy.args[0]}); skipped",),
        )
    except MedclError as error:
        return CaseResult("failed", err=(f"error: {_message(path, error)}",))
    except MemoryError:
        return CaseResult("failed", err=(f"error: {path}: not enough memory for this image",))
    except Exception as error:  # a bug: the other cases still run
        return CaseResult("failed", err=(f"{PROG}: {path}: {internal_error_message(PROG, error)}",))


def _message(path: Path, error: Exception) -> str:
    """One line naming the input: its path, then the problem (without naming the input twice)."""
    named = getattr(error, "path", None)
    if named is not None and Path(named) == path and getattr(error, "problem", None):
        return f"{path}: {error.problem}"
    return f"{path}: {error}"


def _one_case(path: Path, case: str, model: Any, args: argparse.Namespace, *, bar: bool = True) -> str:
    """Segment and write one case; its line for stdout."""
    from napari_medcl.case_writer import write_prediction
    from napari_medcl.progress_bar import predict_with_bar

    prediction = predict_with_bar(
        path,
        model,
        desc=case,
        quiet=args.quiet or not bar,
        overlap=args.overlap,
        tta=args.tta,
        batch_size=args.batch_size,
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
    p = prediction.provenance
    verdict = "not assessed" if prediction.verdict is None else prediction.verdict.text
    return (
        f"{case}: {p.execution_provider}, {p.tiling.windows} windows, {p.timings['total']:.2f} s "
        f"(network {p.timings['ort_seconds']:.2f} s) -> {written.labels}; verdict: {verdict}"
    )
