"""Command lines: ``medcl-train`` and ``medcl-evaluate``. Argument parsing and files only; the work is in
``training.run`` (training), ``napari_medcl.predict`` (inference) and ``training.metrics`` (scores).

User mistakes (a bad config key, a dataset problem, a missing or foreign file) print the error on stderr
without a traceback and exit with 2 (usage and config) or 1 (data, files, training failures).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from napari_medcl.errors import MedclError, UsageError

__all__ = ["evaluate_main", "train_main"]

EXIT_USAGE = 2
EXIT_FAILURE = 1


# ---------------------------------------------------------------------------------------------- train


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medcl-train",
        description=(
            "Train a segmentation network (U-Net or DeepLabV3+, with UAFR, PDCR and CCDC) from a YAML config "
            "that lists only what differs from the defaults. Under `torchrun --nproc_per_node N --no-python "
            "medcl-train CONFIG` it trains with DDP."
        ),
    )
    parser.add_argument("config", type=Path, help="YAML config (presets: training/configs/*.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, value parsed as YAML (repeatable), e.g. --set train.patch_size=[64,64,32]",
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint_last.pt")
    parser.add_argument(
        "--init-from",
        metavar="CHECKPOINT_OR_NAME",
        help="start from a trained model's weights and fine-tune: a checkpoint (checkpoint_best.pt), a weights "
        "file, or a bundled model's name (brain-tissue-3d); same as --set init.from_checkpoint=...; recorded "
        "in the run's config.yaml. Add --set init.reinit_heads=true for a dataset with other classes",
    )
    parser.add_argument("--check", action="store_true", help="only check the dataset and print a summary")
    return parser


def _dist_from_env(environ: dict[str, str]) -> Any:
    """Rank, world size and local rank as torchrun sets them (all absent: a single process)."""
    from training.run import DistInfo

    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent")
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def train_main(argv: Sequence[str] | None = None) -> int:
    """``medcl-train CONFIG.yaml [--set key=value ...] [--init-from CHECKPOINT_OR_NAME] [--resume] [--check]``;
    returns the exit code."""
    args = _train_parser().parse_args(argv)
    from training.config import ConfigError, load_config
    from training.data import check_dataset
    from training.run import train

    prefix = "medcl-train"
    try:
        dist = _dist_from_env(dict(os.environ))
        if dist.world_size > 1:
            prefix = f"medcl-train [rank {dist.rank}]"
        overrides = list(args.overrides)
        if args.init_from is not None:
            # Quoted as a YAML string, so that a name like "2024" or "yes" stays a name.
            overrides.append(f"init.from_checkpoint={json.dumps(args.init_from)}")
        cfg = load_config(args.config, overrides)
        if args.check:
            for line in check_dataset(cfg.data):
                print(line)
            print("dataset OK")
            return 0
        result = train(cfg, resume=args.resume, dist=dist)
    except (ConfigError, UsageError) as error:
        return _fail(prefix, error, EXIT_USAGE)
    except MedclError as error:
        return _fail(prefix, error, EXIT_FAILURE)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted; resume with --resume", file=sys.stderr)
        return 130
    except Exception as error:
        return _internal(prefix, "medcl-train", error)
    if dist.is_main:
        best = (
            f"best mean validation Dice {result.best_mean_dice:.4f} at epoch {result.best_epoch}"
            if result.best_epoch is not None
            else "no validation"
        )
        print(f"done: {result.epochs} epochs, {best}; checkpoints in {result.output_dir}")
    return 0


def _fail(prefix: str, error: BaseException, code: int) -> int:
    print(f"{prefix}: error: {error}", file=sys.stderr)
    return code


def _internal(prefix: str, program: str, error: BaseException) -> int:
    from napari_medcl.crash_log import internal_error_message

    print(f"{prefix}: {internal_error_message(program, error)}", file=sys.stderr)
    return EXIT_FAILURE


# ---------------------------------------------------------------------------------------------- evaluate


def _evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medcl-evaluate",
        description=(
            "Score a model on a labelled dataset: Dice, Jaccard, pixel accuracy and HD95 (mm) per case and "
            "class, on each case's own voxel grid. ONNX models run through napari_medcl.predict (as "
            "medcl-predict does); checkpoints run the torch model through the same preprocessing and tiling."
        ),
    )
    parser.add_argument("model", type=Path, help="a .onnx model or a training checkpoint (.pt)")
    parser.add_argument("dataset", type=Path, help="dataset root folder")
    parser.add_argument(
        "--layout",
        choices=("msd", "folder2d", "acdc"),
        help="dataset layout (default: the checkpoint's, else msd)",
    )
    parser.add_argument(
        "--split",
        choices=("val", "all"),
        default="val",
        help="val: the validation cases of the training split (checkpoint: its fold; ONNX: --fold of the "
        "default 5-fold split); all: every case (default: val)",
    )
    parser.add_argument(
        "--fold", type=int, default=None, help="fold for --split val (default: the checkpoint's, else 0)"
    )
    parser.add_argument("-o", "--output", type=Path, help="write the per-case table as CSV here")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=2, help="windows per forward pass (default 2)")
    parser.add_argument("--no-hd95", action="store_true", help="skip HD95 (faster on large volumes)")
    return parser


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``medcl-evaluate CHECKPOINT_OR_ONNX DATASET_ROOT [--layout L] [--split val|all] [-o metrics.csv]``."""
    args = _evaluate_parser().parse_args(argv)
    try:
        return _evaluate(args)
    except UsageError as error:  # a bad option value (e.g. --overlap 1.5, --device cuda without a GPU)
        return _fail("medcl-evaluate", error, EXIT_USAGE)
    except MedclError as error:
        return _fail("medcl-evaluate", error, EXIT_FAILURE)
    except KeyboardInterrupt:
        print("medcl-evaluate: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        return _internal("medcl-evaluate", "medcl-evaluate", error)


def _is_onnx(path: Path) -> bool:
    return path.suffix.lower() == ".onnx"


def _evaluate(args: argparse.Namespace) -> int:
    from napari_medcl.errors import ModelError
    from napari_medcl.onnx_session import load_model
    from napari_medcl.prediction import predict
    from training.data import DataConfig, DatasetError
    from training.data.check import read_case
    from training.data.layouts import discover
    from training.data.preprocessing import split_cases
    from training.metrics import evaluate_case, format_table, summarize, write_csv

    if not args.model.is_file():
        raise ModelError(args.model, "no such model file")
    is_onnx = _is_onnx(args.model)
    if is_onnx:
        # a model is scored in fp32, whatever the CPU: its Dice must not depend on bf16 support
        loaded, data_cfg = load_model(args.model, device=args.device, precision="fp32"), DataConfig()
    else:
        from training.torch_session import load_checkpoint_session

        loaded, cfg = load_checkpoint_session(args.model, args.device)
        data_cfg = cfg.data
    if args.fold is not None:
        data_cfg = dataclasses.replace(data_cfg, fold=args.fold, val_fraction=None)
    layout = discover(args.layout or ("msd" if is_onnx else data_cfg.layout), args.dataset)
    if layout.problems:
        raise DatasetError(layout.problems, root=layout.root)
    cases = list(layout.cases)
    if args.split == "val":
        _, cases = split_cases(
            cases,
            fold=data_cfg.fold,
            num_folds=data_cfg.num_folds,
            val_fraction=data_cfg.val_fraction,
            split_seed=data_cfg.split_seed,
            val_cases=data_cfg.val_cases,
        )
    if not cases:
        raise DatasetError([f"no cases to evaluate (split {args.split})"], root=layout.root)
    spec = loaded.spec
    print(f"model {spec.name} ({loaded.provider}); {len(cases)} case(s) of {layout.root} ({args.split})")
    scores = []
    for case in cases:
        volume, label, problems = read_case(case, layout)
        if problems:
            raise DatasetError(problems, root=layout.root)
        prediction = predict(volume, loaded, overlap=args.overlap, batch_size=args.batch_size)
        scores.append(
            evaluate_case(
                prediction.labels.array,
                label,
                spec.class_names,
                spacing=volume.spacing,
                case=case.case_id,
                compute_hd95=not args.no_hd95,
            )
        )
        print(f"  {case.case_id}: mean Dice {scores[-1].mean_dice:.4f}", flush=True)
    print(format_table(scores))
    summary = summarize(scores)
    print(f"mean Dice {summary['dice']['mean']:.4f}, mean Jaccard {summary['jaccard']['mean']:.4f}", end="")
    if not args.no_hd95:
        print(f", mean HD95 {summary['hd95']['mean']:.2f} mm", end="")
    print(f", accuracy {summary['accuracy']['mean']:.4f}")
    if args.output is not None:
        write_csv(scores, args.output)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
