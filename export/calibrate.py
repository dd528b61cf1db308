"""``medcl-calibrate MODEL.onnx DATASET -o OUT.onnx``: add a training-data profile to an existing model file.

Torch-free. The dataset's training cases are read as their files hold them and measured under the model's
own normalisation (``training.data.profile.dataset_profile``); the profile goes into a copy of the model's
spec (``ModelSpec.training_profile``), stored as before under the ONNX metadata key ``medcl.spec``. Nothing
else in the file changes: the graph and its weights are serialised byte for byte as they were, which
``calibrate`` checks before writing (``--features`` adds the window-features output, ``export.feature_output``:
two nodes and an output appended, and the check is then that nothing else changed). The output is checked by the product's own loader and written
atomically (an existing file at ``-o`` is replaced whole or left as it was).

Which cases: ``--cases`` names them; ``--fold K`` takes the training part of fold K of the same k-fold split
``medcl-train`` uses (``--num-folds``, ``--split-seed``); otherwise every labelled case of the dataset.

``--error-case FOLD_MODEL DATASET CASE`` (repeatable) also fits the model's calibrated error map
(``export.error_fit``): each fold model, the same network trained without that case, predicts it, and a
logistic model of P(label wrong) is fitted on those out-of-fold predictions and stored in the spec
(``ModelSpec.error_model``) with the figures measured on them. Never name a case the figures will later be
reported on.

``--error-map consensus`` stores the intensity consensus instead (``ErrorModel.consensus``: the network's odds
that a label is wrong times those of a local intensity model of the scan, nothing fitted); any ``--error-case``
then only measures it, and the model that predicts a case may be the calibrated model itself. Without
``--error-case`` it is stored without figures. ``--intensity-weight W`` raises the intensity model's odds to
the power W (default 1): below 1 it trusts the scan's intensities less, which helps where a scanner shift makes
them agree with the network's mistakes; choose W on training cases (``scripts/consensus_sigma.py --weights``).
``--verdict-weight LEVEL=W`` (repeatable) gives scans of that verdict level their own weight (0 leaves the
intensity model out), e.g. the full weight on scans judged ``ok`` and a small one under ``caution``, where a
shift is likely (``scripts/consensus_sigma.py --by-verdict``).

Without DATASET the model's own training-data profile is kept and only the error map is written: how a
fine-tuned model's carried consensus is measured on the corrected cases it did not train on
(``medcl-calibrate FT.onnx -o FT.onnx --error-map consensus --error-case FT.onnx CORRECTIONS CASE``). The
figures a carried consensus keeps of the model it started from (``start_model``) stay with the new ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import sys
from collections.abc import Mapping, Sequence
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
    features_added: bool = False

    def summary(self) -> str:
        from napari_medcl.training_profile import profile_summary

        lines = [
            f"wrote {self.path} ({self.model_bytes} bytes): {self.spec.name} with the "
            f"{profile_summary(self.spec.training_profile)}" + ("" if self.cases else " (kept as it was)"),
        ]
        if self.cases:
            lines.append(f"cases: {', '.join(self.cases)}")
        error_model = self.spec.error_map_model
        if error_model is not None:
            lines.append(error_model.summary())
            signals = error_model.figures.get("signals", {})
            lines += [f"  AUROC of {name} alone: {value:.3f}" for name, value in signals.items()]
            for key in ("auroc_other_folds", "ece_other_folds", "ece_network_alone"):
                if key in error_model.figures:
                    lines.append(f"  {key.replace('_', ' ')}: {error_model.figures[key]:.3f}")
        stats = self.spec.feature_stats
        if stats is not None:
            lines.append(stats.summary())
        if self.features_added:
            lines.append(
                f"graph: the window-features output added, every other node and weight unchanged "
                f"(graph sha256 {self.graph_sha256})"
            )
        else:
            lines.append(f"graph and weights unchanged (graph sha256 {self.graph_sha256})")
        return "\n".join(lines)


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


def without_dataset_problem(
    cases: Sequence[str] | None, fold: int | None, features: bool, error_cases: Sequence[Any], error_map: str
) -> str | None:
    """Why a calibration without a dataset cannot run as asked (one line), or None when it can."""
    if cases or fold is not None or features:
        return "--cases, --fold and --features profile a dataset: name the DATASET"
    if not error_cases and error_map != "consensus":
        return "nothing to write: name the DATASET to profile, or give --error-case or --error-map"
    return None


def intensity_weight_problem(
    intensity_weight: float, error_map: str, verdict_weights: Mapping[str, float] | None = None
) -> str | None:
    """Why ``intensity_weight`` and ``verdict_weights`` cannot be used as asked (one line), or None when they
    can."""
    from napari_medcl.error_model import verdict_weights_problem

    if not (math.isfinite(intensity_weight) and intensity_weight > 0):
        return f"--intensity-weight must be a positive number, got {intensity_weight:g}"
    if intensity_weight != 1.0 and error_map != "consensus":
        return "--intensity-weight applies to --error-map consensus only"
    if verdict_weights:
        if error_map != "consensus":
            return "--verdict-weight applies to --error-map consensus only"
        if problem := verdict_weights_problem(verdict_weights):
            return f"--verdict-weight: {problem}"
    return None


def parse_verdict_weight(text: str) -> tuple[str, float]:
    """``LEVEL=W`` from the command line (argparse type)."""
    level, sep, weight = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return level.strip(), float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LEVEL=W, e.g. caution=0.125, got {text!r}") from None


def calibrate(
    model: str | Path,
    dataset: str | Path | None,
    output: str | Path,
    *,
    layout: str = "msd",
    cases: Sequence[str] | None = None,
    fold: int | None = None,
    num_folds: int = 5,
    split_seed: int = 12345,
    max_cases: int | None = None,
    error_cases: Sequence[Any] = (),
    error_voxels: int | None = None,
    error_map: str = "fit",
    intensity_weight: float = 1.0,
    verdict_weights: Mapping[str, float] | None = None,
    features: bool = False,
    progress: Any = None,
) -> CalibrationResult:
    """Write ``output``: ``model`` (an .onnx file or a bundled model name) with the training-data profile of
    the chosen cases of ``dataset`` in its spec, and with ``error_cases`` (``export.error_fit.ErrorCase``) its
    calibrated error map fitted on them (``error_voxels`` sampled per case; ``progress`` receives a line per
    step); with ``error_map="consensus"`` the intensity consensus map (its intensity model's log-odds times
    ``intensity_weight``, or ``verdict_weights[level]`` on a scan of that verdict level), measured on
    ``error_cases`` if any.
    With ``features`` the graph gains the window-features output (``export.feature_output``; a graph
    that has it keeps it) and the spec their statistics on the chosen cases, which the verdict's ``features``
    check compares each scan with. Raises ModelError (unusable model), DatasetError (unusable
    dataset, or the cases' channels differ from each other), OutputError (cannot write). ``dataset`` None keeps
    the model's own profile and writes the error map only (``cases``, ``fold`` and ``features`` need a
    dataset)."""
    import onnx

    from napari_medcl.atomic import atomic_path
    from napari_medcl.errors import ModelError
    from napari_medcl.onnx_session import _read_bounded, _resolve, check_model_bytes
    from napari_medcl.spec import METADATA_KEY
    from training.data.layouts import DatasetError, discover
    from training.data.profile import MAX_PROFILE_CASES, dataset_profile

    if error_map not in ("fit", "consensus"):
        raise ValueError(f"error_map must be 'fit' or 'consensus', got {error_map!r}")
    if problem := intensity_weight_problem(intensity_weight, error_map, verdict_weights):
        raise ValueError(problem)
    path, _ = _resolve(model, None)
    data = _read_bounded(path, 2 * 1024**3)
    spec = check_model_bytes(data, path)
    if dataset is None:
        problem = without_dataset_problem(cases, fold, features, error_cases, error_map)
        if problem:
            raise ValueError(problem)
        found, chosen, new_spec = None, [], spec
    else:
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
            [(found, chosen)],
            spec.normalization,
            max_cases=MAX_PROFILE_CASES if max_cases is None else max_cases,
            source=f"{found.name}: {how}: {', '.join(c.case_id for c in chosen)}",
        )
        new_spec = dataclasses.replace(spec, training_profile=profile)
    if error_cases or error_map == "consensus":
        from export.error_fit import (
            DEFAULT_VOXELS_PER_CASE,
            collect_samples,
            consensus_signals,
            fit_error_model,
            measure_consensus,
        )
        from napari_medcl.error_model import ErrorModel

        if error_cases:
            names, samples = collect_samples(
                spec,
                list(error_cases),
                layout=layout,
                voxels_per_case=DEFAULT_VOXELS_PER_CASE if error_voxels is None else error_voxels,
                progress=progress or (lambda _: None),
                # the consensus's own two features, then each UAFR map, whose figures the summary shows
                names=consensus_signals(spec) if error_map == "consensus" else None,
            )
            if error_map == "consensus":
                error_model = measure_consensus(
                    names, samples, list(error_cases), intensity_weight, verdict_weights
                )
            else:
                error_model = fit_error_model(names, samples, list(error_cases))
        else:
            error_model = ErrorModel.consensus(
                intensity_weight=intensity_weight, verdict_weights=verdict_weights
            )
        before = spec.error_map_model
        start = before.figures.get("start_model") if before is not None and before.is_consensus else None
        if error_model.is_consensus and start is not None:  # still the map it started from: say so
            error_model = error_model.with_figures({**error_model.figures, "start_model": start})
        new_spec = dataclasses.replace(new_spec, error_model=error_model.to_dict())

    proto = onnx.load_model_from_string(data)
    original_graph = onnx.GraphProto()
    original_graph.CopyFrom(proto.graph)
    entries = [entry for entry in proto.metadata_props if entry.key == METADATA_KEY]
    features_added = False
    if features:
        from export.feature_output import add_feature_output, measure_features
        from napari_medcl.feature_distance import FeatureStats

        if spec.features is None:
            try:
                tensor, channels = add_feature_output(proto)
            except ValueError as error:
                raise ModelError(path, f"cannot add window features: {error}") from None
            features_added = True
            unmeasured = dataclasses.replace(spec, features=FeatureStats(tensor, channels).to_dict())
            entries[0].value = unmeasured.to_json()
            exposed = proto.SerializeToString()
        else:
            exposed = data
        stats = measure_features(exposed, chosen, found, progress or (lambda _: None))
        new_spec = dataclasses.replace(new_spec, features=stats.to_dict())
    entries[0].value = new_spec.to_json()  # check_model_bytes found it; other metadata entries are kept
    out = proto.SerializeToString()
    again = onnx.load_model_from_string(out)
    graph_after = again.graph.SerializeToString()
    if features_added:
        from export.feature_output import check_only_features_added

        unchanged = check_only_features_added(original_graph, again.graph)
    else:
        unchanged = graph_after == original_graph.SerializeToString()
    if not unchanged:
        raise ModelError(path, "calibrating would change the graph's own nodes; nothing was written")
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
        features_added=features_added,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Calibrate an exported model against its training data, without torch: measure the dataset's "
            "training cases under the model's own normalisation (intensity percentiles of the foreground, "
            "whether the images are zero outside the object, spacing, slice thickness, field of view, "
            "foreground fraction, voxel-scale noise) and write a copy of MODEL.onnx whose spec carries this "
            "training-data profile. medcl-predict, the Python API and the napari plugin then give every case "
            "a verdict: ok, caution or out-of-distribution with its reasons (without a profile: unknown). The graph "
            "and weights are copied byte for byte (with --features, two nodes and an output are added, every "
            "other node unchanged). "
            "With --error-case it also fits the calibrated error map (the probability that each voxel's label is "
            "wrong) on fold models' predictions of cases they did not train on, and stores it with its measured "
            "figures; predictions of the written model then carry it as the 'error likelihood'. With "
            "--error-map consensus the error likelihood is instead the intensity consensus (the network's odds "
            "of error times a local intensity model's, nothing fitted), measured on the --error-case cases."
        ),
    )
    parser.add_argument("model", help="the .onnx model file (or a bundled model name)")
    parser.add_argument(
        "dataset",
        type=Path,
        nargs="?",
        help="the dataset folder the model was trained on, whose training cases are profiled; without it the "
        "model's own profile is kept and only the error map is written (--error-case or --error-map)",
    )
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
    parser.add_argument(
        "--error-case",
        nargs=3,
        action="append",
        default=[],
        metavar=("FOLD_MODEL", "DATASET", "CASE"),
        help="fit the calibrated error map on this case of DATASET predicted by FOLD_MODEL, the same network "
        "trained without it (repeatable; never a case you will report figures on)",
    )
    parser.add_argument(
        "--error-map",
        choices=("fit", "consensus"),
        default="fit",
        help="fit: a logistic error map fitted on the --error-case cases (default); consensus: the network's "
        "odds of error times a local intensity model's, nothing fitted, its figures measured on the "
        "--error-case cases (which the calibrated model itself may predict)",
    )
    parser.add_argument(
        "--intensity-weight",
        type=float,
        default=1.0,
        metavar="W",
        help="with --error-map consensus: raise the intensity model's odds to the power W (default 1; below 1 "
        "trusts the scan's intensities less; choose W on training cases, never on cases you report on)",
    )
    parser.add_argument(
        "--verdict-weight",
        type=parse_verdict_weight,
        action="append",
        default=[],
        metavar="LEVEL=W",
        help="with --error-map consensus: on a scan whose verdict is LEVEL (ok, caution or "
        "out-of-distribution), weigh the intensity model by W instead (0 leaves it out); repeatable, e.g. "
        "--verdict-weight caution=0.125 --verdict-weight out-of-distribution=0",
    )
    parser.add_argument(
        "--features",
        action="store_true",
        help="also measure the network's own window features (its bottleneck, averaged over each window) on "
        "the profiled cases: the graph gains a 'features' output and the verdict a check of how unlike the "
        "training windows a scan's windows look (catches anatomy the image statistics miss, e.g. permuted axes)",
    )
    parser.add_argument(
        "--error-voxels",
        type=int,
        metavar="N",
        help="voxels sampled per error case for the fit (default: 200000)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.error_voxels is not None and args.error_voxels < 100:
        parser.error(f"--error-voxels must be at least 100, got {args.error_voxels}")
    verdict_weights = dict(args.verdict_weight)
    if len(verdict_weights) != len(args.verdict_weight):
        parser.error("--verdict-weight names a level twice")
    if problem := intensity_weight_problem(args.intensity_weight, args.error_map, verdict_weights):
        parser.error(problem)
    if args.dataset is None and (
        problem := without_dataset_problem(
            args.cases, args.fold, args.features, args.error_case, args.error_map
        )
    ):
        parser.error(problem)
    from export.error_fit import parse_error_case
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
            error_cases=[parse_error_case(values) for values in args.error_case],
            error_voxels=args.error_voxels,
            error_map=args.error_map,
            intensity_weight=args.intensity_weight,
            verdict_weights=verdict_weights,
            features=args.features,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
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
