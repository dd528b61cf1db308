"""medcl-predict: segment image files or DICOM folders with an ONNX model, writing results beside a sidecar.

Arguments and files only; the work is ``napari_medcl.prediction.predict_iter``. Per case it writes
``<case>_labels<ext>``, ``<case>_uncertainty<ext>`` (mean UAFR map, when the model has UAFR maps),
``<case>_entropy<ext>``, with ``--save-probabilities`` one ``<case>_probabilities_<k><ext>`` per class
(one file per class works in every output format, PNG/TIFF included; the sidecar maps files to class names),
and last ``<case>.json``, so a sidecar marks a complete case. Every file is written atomically; a case that
fails leaves no file. Exit status: 0 all cases done, 1 some failed, 2 usage error, 130 interrupted.

Heavy modules are imported after argument parsing, so ``medcl-predict --help`` is instant.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from napari_medcl import __version__
from napari_medcl.errors import InputError, MedclError

PROG = "medcl-predict"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Segment medical images (NIfTI, NRRD, MHA, DICOM folders, PNG/JPEG/TIFF) with an ONNX "
        "model; write labels, UAFR uncertainty and predictive entropy with the input's geometry, plus a "
        "<case>.json provenance sidecar.",
        epilog="Outputs per case, in the input's format (DICOM -> .nii.gz; PNG/JPEG -> .png labels, .tif maps): "
        "<case>_labels, <case>_uncertainty (mean UAFR map, when the model has UAFR maps), <case>_entropy, "
        "with --save-probabilities <case>_probabilities_<k> (one file per class k), and <case>.json written "
        "last. A failed case writes nothing. Exit status: 0 all done, 1 some case failed, 2 usage error, "
        "130 interrupted.",
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
        "--overlap", type=_overlap, default=0.5, help="fraction of window overlap in [0, 1) (default: 0.5)"
    )
    parser.add_argument("--tta", action="store_true", help="average over mirrored copies (2^d times slower)")
    parser.add_argument(
        "--save-probabilities", action="store_true", help="also write one probability map per class"
    )
    parser.add_argument(
        "--series", metavar="UID", help="SeriesInstanceUID to read from a multi-series folder"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-case lines")
    return parser


def _overlap(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from napari_medcl.engine import default_model_name, load_model

    try:
        model = load_model(args.model or default_model_name(), device=args.device)
    except MedclError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        args.output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"error: {args.output}: cannot create the output folder ({error.strerror})", file=sys.stderr)
        return 1
    spec = model.spec
    print(
        f"{PROG} {__version__}: model {spec.name} (sha256 {model.sha256[:12]}) on {model.provider}\n"
        f"note: {spec.intended_use}",
        file=sys.stderr,
    )
    failed = 0
    cases: dict[str, Path] = {}
    for path in args.inputs:
        try:
            _one_case(path, model, args, cases)
        except MedclError as error:
            failed += 1
            print(f"error: {_message(path, error)}", file=sys.stderr)
        except MemoryError:
            failed += 1
            print(f"error: {path}: not enough memory for this image", file=sys.stderr)
    return 1 if failed else 0


def _message(path: Path, error: Exception) -> str:
    """One line naming the input: its path, then the problem (without naming the input twice)."""
    named = getattr(error, "path", None)
    if named is not None and Path(named) == path and getattr(error, "problem", None):
        return f"{path}: {error.problem}"
    return f"{path}: {error}"


def _one_case(path: Path, model: Any, args: argparse.Namespace, cases: dict[str, Path]) -> None:
    from tqdm import tqdm

    from napari_medcl.io import case_name
    from napari_medcl.prediction import Progress, predict_iter

    case = case_name(path)
    if case in cases:
        raise InputError(
            path, f"its outputs would overwrite those of {cases[case]} (same case name {case!r})"
        )
    cases[case] = path
    prediction = None
    # disable=None: tqdm draws only on a terminal, so logs and pipes get the per-case line alone.
    with tqdm(
        desc=case, unit="window", file=sys.stderr, disable=True if args.quiet else None, leave=False
    ) as bar:
        for item in predict_iter(
            path,
            model,
            overlap=args.overlap,
            tta=args.tta,
            return_probabilities=args.save_probabilities,
            series=args.series,
        ):
            if not isinstance(item, Progress):
                prediction = item
            elif item.stage == "infer":
                bar.total = item.total
                bar.update(item.done - bar.n)
    written = _write_case(path, case, prediction, args.output)
    if not args.quiet:
        p = prediction.provenance
        t = p["timings"]
        print(
            f"{case}: {p['execution_provider']}, {p['tiling']['windows']} windows, {t['total']:.2f} s "
            f"(ORT {t['ort_seconds']:.2f} s) -> {written}"
        )


def _write_case(path: Path, case: str, prediction: Any, outdir: Path) -> Path:
    """Write a case's images, then its sidecar; on any failure remove what this case wrote and re-raise."""
    from napari_medcl.atomic import split_suffix, write_text_atomic
    from napari_medcl.io import output_extension, write_image

    start = time.perf_counter()
    labels = prediction.labels
    source_extension = "" if path.is_dir() else split_suffix(path.name)[1]
    label_ext = output_extension(labels.format, source_extension, kind="labels")
    map_ext = output_extension(labels.format, source_extension, kind="map")
    images = [("labels", f"{case}_labels{label_ext}", labels)]
    if prediction.uafr_uncertainty is not None:
        images.append(("uncertainty", f"{case}_uncertainty{map_ext}", prediction.uafr_uncertainty))
    images.append(("entropy", f"{case}_entropy{map_ext}", prediction.entropy))
    classes = prediction.provenance["model"]["classes"]
    if prediction.probabilities is not None:
        probs = prediction.probabilities
        for k, name in enumerate(classes):
            plane = probs.with_array(probs.array[k])
            images.append((("probabilities", name), f"{case}_probabilities_{k}{map_ext}", plane))
    sidecar = outdir / f"{case}.json"
    # An old sidecar would vouch for a mix of old and new files if this case fails half-way.
    sidecar.unlink(missing_ok=True)
    written: list[Path] = []
    try:
        for _, name, volume in images:
            written.append(write_image(volume, outdir / name))
        provenance = dict(prediction.provenance)
        provenance["input"] = {**provenance["input"], "path": str(path), "sha256": _input_sha256(path)}
        outputs: dict[str, Any] = {}
        for key, name, _ in images:
            if isinstance(key, tuple):  # ("probabilities", class name)
                outputs.setdefault(key[0], {})[key[1]] = name
            else:
                outputs[key] = name
        provenance["outputs"] = outputs
        provenance["timings"] = {**provenance["timings"], "write": round(time.perf_counter() - start, 4)}
        write_text_atomic(sidecar, _to_json(provenance))
    except BaseException:
        for file in written:
            file.unlink(missing_ok=True)
        raise
    return written[0]


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


def _to_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    sys.exit(main())
