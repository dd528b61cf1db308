"""``medcl-calibrate MODEL.onnx DATASET -o OUT.onnx``: add a training-data profile to an existing model file.

Torch-free. The dataset's training cases are read as their files hold them and measured under the model's
own normalisation (``training.data.profile.dataset_profile``); the profile goes into a copy of the model's
spec (``ModelSpec.training_profile``), stored as before under the ONNX metadata key ``medcl.spec``. Nothing
else in the file changes: the graph and its weights are serialised byte for byte as they were, which
``calibrate`` checks before writing. The output is checked by the product's own loader and written
atomically (an existing file at ``-o`` is replaced whole or left as it was).

Which cases: ``--cases`` names them; ``--fold K`` takes the training part of fold K of the same k-fold split
``medcl-train`` uses (``--num-folds``, ``--split-seed``); otherwise every labelled case of the dataset.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CalibrationResult", "calibrate", "main"]

PROG = "medcl-calibrate"


@dataclass(frozen=True)
class CalibrationResult:
    """What ``calibrate`` wrote: the output file, its spec, the cases profiled, and the SHA-256 of the
    serialised graph (the same in the input and the output)."""

    path: Path
    spec: Any
    cases: tuple[str, ...]
    graph_sha256: str
    model_bytes: int

    def summary(self) -> str:
        from napari_medcl.training_profile import profile_summary

        return (
            f"wrote {self.path} ({self.model_bytes} bytes): {self.spec.name} with the "
            f"{profile_summary(self.spec.training_profile)}\n"
            f"cases: {', '.join(self.cases)}\n"
            f"graph and weights unchanged (graph sha256 {self.graph_sha256})"
        )


def select_cases(
    layout: Any,
    *,
    cases: Sequence[str] | None = None,
    fold: int | None = None,
    num_folds: int = 5,
    split_seed: int = 12345,
) -> list[Any]:
    """The CaseFiles to profile (see the module docstring). DatasetError for unknown case ids."""
    from training.data.layouts import DatasetError
    from training.data.preprocessing import split_cases

    labelled = [case for case in layout.cases if case.label is not None]
    if cases:
        by_id = {case.case_id: case for case in layout.cases}
        missing = [c for c in cases if c not in by_id]
        if missing:
            raise DatasetError(
                [f"the dataset holds no case {', '.join(missing)}; it has {', '.join(sorted(by_id))}"],
                root=layout.root,
            )
        return [by_id[c] for c in cases]
    if fold is not None:
        train, _ = split_cases(
            labelled, fold=fold, num_folds=num_folds, val_fraction=None, split_seed=split_seed
        )
        return train
    return labelled


def calibrate(
    model: str | Path,
    dataset: str | Path,
    output: str | Path,
    *,
    layout: str = "msd",
    cases: Sequence[str] | None = None,
    fold: int | None = None,
    num_folds: int = 5,
    split_seed: int = 12345,
    max_cases: int | None = None,
) -> CalibrationResult:
    """Write ``output``: ``model`` (an .onnx file or a bundled model name) with the training-data profile of
    the chosen cases of ``dataset`` in its spec. Raises ModelError (unusable model), DatasetError (unusable
    dataset, or the cases' channels differ from each other), OutputError (cannot write)."""
    import onnx

    from napari_medcl.atomic import atomic_path
    from napari_medcl.errors import ModelError
    from napari_medcl.onnx_session import _read_bounded, _resolve, check_model_bytes
    from napari_medcl.spec import METADATA_KEY
    from training.data.layouts import DatasetError, discover
    from training.data.profile import MAX_PROFILE_CASES, dataset_profile

    path, _ = _resolve(model, None)
    data = _read_bounded(path, 2 * 1024**3)
    spec = check_model_bytes(data, path)
    found = discover(layout, dataset)
    if found.problems:
        raise DatasetError(list(found.problems), root=found.root)
    chosen = select_cases(found, cases=cases, fold=fold, num_folds=num_folds, split_seed=split_seed)
    if cases:
        how = "cases named on the command line"
    elif fold is not None:
        how = f"training part of fold {fold} of {num_folds} (split seed {split_seed})"
    else:
        how = "every labelled case"
    profile = dataset_profile(
        found,
        chosen,
        spec.normalization,
        max_cases=MAX_PROFILE_CASES if max_cases is None else max_cases,
        source=f"{found.name}: {how}: {', '.join(c.case_id for c in chosen)}",
    )
    new_spec = dataclasses.replace(spec, training_profile=profile)

    proto = onnx.load_model_from_string(data)
    graph_before = proto.graph.SerializeToString()
    entries = [entry for entry in proto.metadata_props if entry.key == METADATA_KEY]
    entries[0].value = new_spec.to_json()  # check_model_bytes found it; other metadata entries are kept
    out = proto.SerializeToString()
    again = onnx.load_model_from_string(out)
    graph_after = again.graph.SerializeToString()
    if graph_after != graph_before:
        raise ModelError(path, "adding the profile would change the graph; nothing was written")
    output = Path(output)
    check_model_bytes(out, output)  # the product's own loader accepts the result
    with atomic_path(output) as temp:
        temp.write_bytes(out)
    return CalibrationResult(
        path=output,
        spec=new_spec,
        cases=tuple(c.case_id for c in chosen),
        graph_sha256=hashlib.sha256(graph_after).hexdigest(),
        model_bytes=len(out),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Calibrate an exported model against its training data, without torch: measure the dataset's "
            "training cases under the model's own normalisation (intensity percentiles of the foreground, "
            "whether the images are zero outside the object, spacing, slice thickness, field of view, "
            "foreground fraction) and write a copy of MODEL.onnx whose spec carries this training-data "
            "profile. medcl-predict, the Python API and the napari plugin then give every case a verdict: "
            "ok, caution or out-of-distribution with its reasons (without a profile: unknown). The graph "
            "and weights are copied byte for byte. This command is also where a calibrated error map (a "
            "measured error probability per voxel) will be fitted and stored; it is not computed yet."
        ),
    )
    parser.add_argument("model", help="the .onnx model file (or a bundled model name)")
    parser.add_argument("dataset", type=Path, help="the dataset folder the model was trained on")
    parser.add_argument(
        "-o", "--output", required=True, type=Path, metavar="OUT.onnx", help="file to write (may be MODEL)"
    )
    parser.add_argument(
        "--layout", choices=("msd", "folder2d", "acdc"), default="msd", help="dataset layout (default: msd)"
    )
    parser.add_argument("--cases", nargs="+", metavar="ID", help="the training case ids to profile")
    parser.add_argument(
        "--fold",
        type=int,
        help="profile the training part of this fold of medcl-train's k-fold split (default: all cases)",
    )
    parser.add_argument("--num-folds", type=int, default=5, help="folds of the split (default: 5)")
    parser.add_argument("--split-seed", type=int, default=12345, help="seed of the split (default: 12345)")
    parser.add_argument(
        "--max-cases", type=int, help="read at most N cases, evenly spread (default: 64)", metavar="N"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from napari_medcl.errors import MedclError

    try:
        result = calibrate(
            args.model,
            args.dataset,
            args.output,
            layout=args.layout,
            cases=args.cases,
            fold=args.fold,
            num_folds=args.num_folds,
            split_seed=args.split_seed,
            max_cases=args.max_cases,
        )
    except MedclError as error:  # a DatasetError lists every problem, one per line
        print(f"{PROG}: error: {str(error).strip() or type(error).__name__}", file=sys.stderr)
        return 1
    except ValueError as error:  # profile_cases: cases that cannot be profiled together
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as error:
        from napari_medcl.crash_log import internal_error_message

        print(f"{PROG}: {internal_error_message(PROG, error)}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
