"""The forgetting guard of fine-tuning (``init.replay``): a replay of the original training data in every
batch, and Dice on the original validation cases before and after.

A model fine-tuned on a few corrected cases can lose what it knew (TotalSegmentator users report a model
fine-tuned on 200 corrected cases that came out worse than the original). Two remedies, both here:

- every batch draws ``init.replay_fraction`` of its patches from the training cases of the original dataset
  (:class:`ReplayMix`), so the network keeps seeing the data it was trained on;
- the original validation cases (the split the model was trained with, as its stored config says) are
  scored with the starting weights and at every validation of the run, and ``summary.json`` says what the
  fine-tuned model kept or lost (:func:`write_summary`).

Where the original data are: ``init.replay`` names the dataset folder, or ``auto`` finds it when the run
starts from a bundled model (by name) whose recipe's ``data.root`` (``data/mni152-tissue``, where
``medcl-data build mni152-tissue -o data/mni152-tissue`` puts it) exists under the working folder or under
the source checkout that holds ``training/``. Otherwise replay is off and the run's log says why.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.errors import RunError

__all__ = [
    "REPLAY_SEED_OFFSET",
    "Replay",
    "ReplayMix",
    "find_replay_root",
    "is_replay_index",
    "prepare_replay",
]

# The replay patches are drawn with their own seed, so that they never repeat the primary dataset's draws.
REPLAY_SEED_OFFSET = 7919
SUMMARY = "summary.json"
# The split keys of the original training run, taken from its stored config for the replay dataset.
_SPLIT_KEYS = ("fold", "num_folds", "val_fraction", "split_seed", "val_cases")


@dataclass(frozen=True, eq=False)
class Replay:
    """The original dataset as a run replays it: its folder, the share of each batch, its prepared training
    cases, and its validation cases (training.validation's ValidationCase)."""

    root: Path
    fraction: float
    train_cases: list[Any]
    val_cases: list[Any]


def find_replay_root(
    setting: str | None,
    from_checkpoint: str | None,
    recipe_root: str | None,
    *,
    cwd: Path | None = None,
    checkout: Path | None = None,
) -> tuple[Path | None, str]:
    """(the replay dataset folder or None, one line saying which and why) for ``init.replay`` = ``setting``.

    ``recipe_root``: the ``data.root`` of the config the starting weights were trained with (None when the
    weights carry no config). RunError when ``setting`` names a folder that holds no dataset."""
    if setting is None or str(setting).lower() in ("off", "none", "false"):
        return None, "replay: off (init.replay is null)"
    if setting != "auto":
        root = Path(setting).expanduser()
        if not (root / "dataset.json").is_file():
            raise RunError(
                f"init.replay {setting}: no dataset there (no dataset.json); build it or set it to null"
            )
        return root, f"replay: {root} (init.replay)"
    if from_checkpoint is None:
        return None, "replay: off (the run does not start from a trained model)"
    if _is_file_source(from_checkpoint):
        return None, (
            f"replay: off (auto replays only for bundled models; {from_checkpoint} is a file: "
            "set init.replay to its training dataset)"
        )
    if not recipe_root:
        return None, f"replay: off ({from_checkpoint} records no training dataset)"
    recipe = Path(recipe_root).expanduser()
    cwd = Path.cwd() if cwd is None else cwd
    checkout = Path(__file__).resolve().parents[1] if checkout is None else checkout
    candidates = [recipe] if recipe.is_absolute() else [cwd / recipe, checkout / recipe]
    for root in candidates:
        if (root / "dataset.json").is_file():
            return root, f"replay: {root} (the training data of {from_checkpoint}, found by init.replay auto)"
    return None, (
        f"replay: off ({from_checkpoint}'s training data is not at {recipe_root}; build it with "
        f"medcl-data build {recipe.name} -o {recipe_root}, or set init.replay to its folder)"
    )


def _is_file_source(source: str) -> bool:
    path = Path(source).expanduser()
    return path.suffix in (".pt", ".pth") or "/" in source or path.exists()


def prepare_replay(
    cfg: Any, root: Path, original: Mapping[str, Any] | None, *, seed: int, class_names: Sequence[str]
) -> Replay:
    """Prepare the replay dataset at ``root`` as ``cfg.data`` prepares the corrections (spacing,
    normalisation, cropping), split as the original run split it (``original``: its resolved config dict;
    None: the default split). RunError when its classes differ from the run's."""
    from training.data import prepare_dataset
    from training.validation import read_validation_cases

    split = {k: (original or {}).get("data", {}).get(k, getattr(type(cfg.data)(), k)) for k in _SPLIT_KEYS}
    if split["val_cases"] is not None:
        split["val_cases"] = tuple(split["val_cases"])
    data_cfg = dataclasses.replace(cfg.data, root=str(root), fraction=1.0, cache_dir=None, **split)
    info, train, val = prepare_dataset(data_cfg, spatial_dims=cfg.model.spatial_dims, seed=seed)
    if list(info.class_names) != list(class_names):
        raise RunError(
            f"init.replay {root}: its classes ({', '.join(info.class_names)}) differ from the run's "
            f"({', '.join(class_names)}); replay a dataset of the same classes, or set init.replay to null"
        )
    val_cases = read_validation_cases(data_cfg, [case.case_id for case in val])
    return Replay(root=root, fraction=cfg.init.replay_fraction, train_cases=train, val_cases=val_cases)


def is_replay_index(index: int, fraction: float) -> bool:
    """Whether sample ``index`` comes from the replay data: spread evenly, so any run of n consecutive
    indices holds floor or ceil of n * fraction replay samples (exactly fraction * batch in a batch when
    that is a whole number)."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


class ReplayMix(torch.utils.data.Dataset):
    """The primary patches with ``fraction`` of them replaced by patches of the replay dataset (both
    PatchDatasets of the same length). Each item gains ``replay``: a bool tensor, true for replay samples."""

    def __init__(self, primary: Any, replay: Any, fraction: float):
        if len(replay) < len(primary):
            raise ValueError(
                f"the replay dataset has {len(replay)} samples per epoch, fewer than {len(primary)}"
            )
        self.primary, self.replay, self.fraction = primary, replay, float(fraction)

    def __len__(self) -> int:
        return len(self.primary)

    def set_epoch(self, epoch: int) -> None:
        self.primary.set_epoch(epoch)
        self.replay.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from_replay = is_replay_index(index, self.fraction)
        item = dict((self.replay if from_replay else self.primary)[index])
        item["replay"] = torch.tensor(from_replay)
        return item


def summary_from(
    before: Mapping[str, Any] | None, history: Sequence[Mapping[str, Any]], best_epoch: int | None
) -> dict[str, Any]:
    """What ``summary.json`` holds: for the held-out corrected cases ("held_out") and the original
    validation cases ("original"), mean Dice with the starting weights ("before") and for the model the
    run hands on ("after": checkpoint_best.pt's epoch, else the last validated epoch)."""
    before = dict(before or {})
    chosen = None
    if best_epoch is not None:
        chosen = next((r for r in history if r["epoch"] == best_epoch), None)
    if chosen is None:
        scored = [r for r in history if r.get("val") is not None or r.get("original_val") is not None]
        chosen = scored[-1] if scored else None
    out: dict[str, Any] = {
        "checkpoint": "checkpoint_best.pt" if best_epoch is not None else "checkpoint_last.pt",
        "epoch": None if chosen is None else chosen["epoch"],
        "replay": before.get("replay"),
    }
    for key, record_key in (("held_out", "val"), ("original", "original_val")):
        start = before.get(key)
        after = None if chosen is None else chosen.get(record_key)
        if start is None and after is None:
            out[key] = None
            continue
        out[key] = {
            "cases": (start or after or {}).get("case_ids"),
            "before": None if start is None else start["mean_dice"],
            "after": None if after is None else after["mean_dice"],
            "before_dice": None if start is None else start["dice"],
            "after_dice": None if after is None else after["dice"],
        }
    return out


def write_summary(out: Path, summary: Mapping[str, Any]) -> Path:
    import json

    from napari_medcl.atomic import write_text_atomic

    return write_text_atomic(out / SUMMARY, json.dumps(summary, indent=2) + "\n")


def summary_line(summary: Mapping[str, Any]) -> str:
    """One line for the log: what fine-tuning changed on each set of cases."""
    parts = []
    for key, what in (("held_out", "held-out corrected cases"), ("original", "original validation cases")):
        item = summary.get(key)
        if item and item.get("before") is not None and item.get("after") is not None:
            parts.append(f"{what}: mean Dice {item['before']:.4f} -> {item['after']:.4f}")
    return "summary: " + ("; ".join(parts) if parts else "no cases to compare before and after")
