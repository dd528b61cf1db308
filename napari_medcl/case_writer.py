"""Write a Prediction as a case: its images under the case's names, then its provenance sidecar, all or nothing.

A case ``<case>`` in folder ``outdir`` is ``<case>_labels<ext>``, ``<case>_uncertainty<ext>`` (when the model
has UAFR maps), ``<case>_entropy<ext>``, ``<case>_top_class_error<ext>`` (1 - the probability of each voxel's
label; when the Prediction has it), ``<case>_error_likelihood<ext>`` (the calibrated probability that each
voxel's label is wrong; for a model that carries a calibrated error map), one
``<case>_probabilities_<k><ext>`` per class when the Prediction holds probabilities (one file per class works
in every output format, PNG/TIFF included; the sidecar maps files to class names), with ``report_csv=True``
``<case>_report.csv`` (``case_report.CaseReport.to_csv``), for a DICOM series when asked ``<case>_seg.dcm`` (a
DICOM Segmentation of the labels that references the series, ``io.dicom_seg``), and last ``<case>.json``, so a
sidecar marks a complete case. The sidecar holds the provenance (``Provenance.to_dict()``) and, under
``"report"``, the case report (``case_report.prediction_report``: size of each class, expected wrong volume,
verdict). Extensions follow the input's format (``io.output_extension``); a Prediction made from an array with
no file is written as NIfTI.

Every file is first written whole under a temporary name beside its final one and read back; only when all of
them are there are they renamed onto their final names, the sidecar last. A failure while writing (a full disk
included) therefore leaves the folder as it was, an earlier complete output of the same case included; the
renames need no space.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from napari_medcl.case_report import CaseReport, prediction_report
from napari_medcl.errors import InputError, OutputError, OutputFormatError
from napari_medcl.provenance import OutputNames, Provenance
from napari_medcl.volume import Prediction, Volume


@dataclass(frozen=True)
class WrittenCase:
    """The files ``write_prediction`` wrote, and the provenance and report its sidecar holds."""

    labels: Path
    entropy: Path
    sidecar: Path
    provenance: Provenance
    uncertainty: Path | None = None
    top_class_error: Path | None = None
    error_likelihood: Path | None = None
    probabilities: dict[str, Path] = field(default_factory=dict)  # class name -> file
    report: CaseReport | None = None
    report_csv: Path | None = None
    dicom_seg: Path | None = None


def write_prediction(
    prediction: Prediction,
    outdir: str | Path,
    case: str | None = None,
    *,
    source: str | Path | None = None,
    report_csv: bool = False,
    verdict: Any = None,
    dicom_seg: Sequence[Any] | None = None,
    series_uid: str | None = None,
) -> WrittenCase:
    """Write ``prediction`` into ``outdir`` as case ``case``, all or nothing (see the module docstring).

    ``source``: the image file or DICOM folder the prediction was made from; by default the path its
    provenance names. The sidecar records it with its SHA-256, and its extension chooses between ``.nii`` and
    ``.nii.gz``. ``case`` defaults to the source's case name (``scan.nii.gz`` -> ``scan``). ``report_csv``:
    also write ``<case>_report.csv``. ``verdict``: the training-data check's verdict for the report (see
    ``case_report.case_report``); None: the prediction's own (``Prediction.verdict``, set by
    ``predict_iter``), not assessed when it has none.

    ``dicom_seg``: the model's classes (``ModelSpec.classes``) to also write the labels as ``<case>_seg.dcm``, a
    DICOM Segmentation referencing the source DICOM series (``series_uid`` picks it in a folder of several);
    built before anything is written, so its ``UsageError`` or ``InputError`` leaves the folder as it was.

    Raises ``OutputError`` when a file cannot be written (the earlier files of the case are left unchanged),
    ``OutputFormatError`` when the input's format cannot hold an output, ``InputError`` when the source
    cannot be read to hash it, and ValueError for a Prediction without provenance or with no case name.
    """
    from napari_medcl.io import case_name

    start = time.perf_counter()
    provenance = prediction.provenance
    if provenance is None:
        raise ValueError("a Prediction without provenance cannot be written as a case; use write_image")
    if source is None and provenance.input.path is not None:
        source = provenance.input.path
    source = None if source is None else Path(source)
    if case is None:
        if source is None:
            raise ValueError("name the case: the prediction was made from an array, not a file")
        case = case_name(source)
    outdir = Path(outdir)
    make_output_folder(outdir)

    label_ext, map_ext = _extensions(prediction.labels, source)
    labels = outdir / f"{case}_labels{label_ext}"
    uncertainty = None if prediction.uafr_uncertainty is None else outdir / f"{case}_uncertainty{map_ext}"
    entropy = outdir / f"{case}_entropy{map_ext}"
    images: list[tuple[Path, Volume]] = [(labels, prediction.labels)]
    if uncertainty is not None:
        images.append((uncertainty, prediction.uafr_uncertainty))
    images.append((entropy, prediction.entropy))
    top_error = None
    if prediction.top_class_error is not None:
        top_error = outdir / f"{case}_top_class_error{map_ext}"
        images.append((top_error, prediction.top_class_error))
    likelihood = None
    if prediction.error_likelihood is not None:
        likelihood = outdir / f"{case}_error_likelihood{map_ext}"
        images.append((likelihood, prediction.error_likelihood))
    probabilities: dict[str, Path] = {}
    if prediction.probabilities is not None:
        planes = prediction.probabilities
        for k, name in enumerate(provenance.model.classes):
            probabilities[name] = outdir / f"{case}_probabilities_{k}{map_ext}"
            images.append((probabilities[name], planes.with_array(planes.array[k])))
    csv_path = outdir / f"{case}_report.csv" if report_csv else None
    sidecar = outdir / f"{case}.json"
    seg_path = None if dicom_seg is None else outdir / f"{case}_seg.dcm"
    seg_dataset = None if dicom_seg is None else _dicom_seg(prediction, source, dicom_seg, series_uid)

    from napari_medcl.atomic import atomic_path, write_text_atomic

    with ExitStack() as staged:
        # Entered first, so renamed last (the stack unwinds in reverse): a sidecar marks a complete case.
        sidecar_temp = staged.enter_context(atomic_path(sidecar))
        for final, volume in images:
            _write_checked(volume, staged.enter_context(atomic_path(final)), final)
        if seg_path is not None:
            _save_checked(seg_dataset, staged.enter_context(atomic_path(seg_path)), seg_path)
        recorded = replace(
            provenance,
            input=replace(
                provenance.input,
                path=None if source is None else str(source),
                sha256=None if source is None else _input_sha256(source),
            ),
            outputs=OutputNames(
                labels=labels.name,
                uncertainty=None if uncertainty is None else uncertainty.name,
                entropy=entropy.name,
                probabilities={name: path.name for name, path in probabilities.items()} or None,
                report_csv=None if csv_path is None else csv_path.name,
                dicom_seg=None if seg_path is None else seg_path.name,
                top_class_error=None if top_error is None else top_error.name,
                error_likelihood=None if likelihood is None else likelihood.name,
            ),
            timings={**provenance.timings, "write": round(time.perf_counter() - start, 4)},
        )
        report = prediction_report(replace(prediction, provenance=recorded), case=case, verdict=verdict)
        if csv_path is not None:
            csv_temp = staged.enter_context(atomic_path(csv_path))
            with _naming(csv_path, csv_temp):
                report.to_csv(csv_temp)
        with _naming(sidecar, sidecar_temp):
            document = {**recorded.to_dict(), "report": report.to_dict()}
            write_text_atomic(sidecar_temp, json.dumps(document, indent=2) + "\n")
        # An old sidecar would vouch for a mix of old and new files if the process died between the renames.
        try:
            sidecar.unlink(missing_ok=True)
        except OSError as error:
            raise OutputError(sidecar, f"cannot remove the earlier sidecar ({error.strerror})") from None
    return WrittenCase(
        labels=labels,
        entropy=entropy,
        sidecar=sidecar,
        provenance=recorded,
        uncertainty=uncertainty,
        top_class_error=top_error,
        error_likelihood=likelihood,
        probabilities=probabilities,
        report=report,
        report_csv=csv_path,
        dicom_seg=seg_path,
    )


def make_output_folder(outdir: Path) -> None:
    """Create ``outdir`` (and its parents) if needed; OutputError when that is impossible."""
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(outdir, f"cannot create the output folder ({error.strerror})") from None


def _extensions(labels: Volume, source: Path | None) -> tuple[str, str]:
    """The extensions of the labels and of the float maps, from the input's format and file name."""
    from napari_medcl.atomic import split_suffix
    from napari_medcl.io import output_extension

    if labels.format is None or source is None:
        # An image from memory has no format of its own to keep; NIfTI holds any geometry exactly.
        volume_format, source_extension = labels.format or "nifti", ".nii.gz"
    else:
        volume_format = labels.format
        source_extension = "" if source.is_dir() else split_suffix(source.name)[1]
    return (
        output_extension(volume_format, source_extension, kind="labels"),
        output_extension(volume_format, source_extension, kind="map"),
    )


def _write_checked(volume: Volume, temp: Path, final: Path) -> None:
    """Write ``volume`` to ``temp`` (``write_image`` reads it back whole); an error names ``final``."""
    from napari_medcl import io

    try:
        with _naming(final, temp):
            io.write_image(volume, temp)
    except OutputFormatError:
        raise
    except OutputError as error:
        raise OutputError(final, f"{error.problem}; the earlier files of this case are unchanged") from None


def _dicom_seg(
    prediction: Prediction, source: Path | None, classes: Sequence[Any], series_uid: str | None
) -> Any:
    """The DICOM SEG of the prediction's labels, referencing the DICOM series ``source`` (not yet written)."""
    from napari_medcl.errors import UsageError
    from napari_medcl.io.dicom_seg import dicom_seg_dataset

    labels = prediction.labels
    if source is None or labels.format != "dicom" or not source.is_dir():
        raise UsageError(
            f"{source or 'the image'}: a DICOM SEG can be written only for an input read from a DICOM series"
        )
    model = prediction.provenance.model
    return dicom_seg_dataset(
        labels,
        source,
        classes,
        series_uid=series_uid,
        algorithm_name=model.name,
        algorithm_version=f"sha256:{model.sha256}"[:64],
    )


def _save_checked(dataset: Any, temp: Path, final: Path) -> None:
    """Save a pydicom dataset to ``temp`` and read it back whole; an error names ``final``."""
    import pydicom

    try:
        dataset.save_as(temp)
        again = pydicom.dcmread(temp)
        if again.SOPInstanceUID != dataset.SOPInstanceUID or len(again.PixelData) != len(dataset.PixelData):
            raise OSError(f"{final.name} reads back differently (a failing disk?)")
    except OSError as error:
        raise OutputError(
            final, f"cannot write ({error.strerror or error}); the earlier files of this case are unchanged"
        ) from None


@contextmanager
def _naming(final: Path, temp: Path) -> Iterator[None]:
    """Errors about the temporary file ``temp`` name ``final``, the file the user will look for."""
    try:
        yield
    except OutputError as error:
        if error.path != temp:
            raise
        raise type(error)(final, error.problem.replace(temp.name, final.name)) from None


def _input_sha256(path: Path) -> str:
    """SHA-256 of an input file; for a DICOM folder, of the ``"<sha256>  <name>"`` lines of its files, sorted."""
    from napari_medcl.io import sha256_file

    try:
        if not path.is_dir():
            return sha256_file(path)
        lines = [f"{sha256_file(f)}  {f.name}\n" for f in sorted(path.iterdir()) if f.is_file()]
    except OSError as error:
        raise InputError(path, f"cannot be read to hash it ({error.strerror})") from None
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()
