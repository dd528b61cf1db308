"""What a user tells the model about one case: points, scribbles and boxes, each for one class.

Pure data and numpy: the interactive session (``napari_medcl.interactive``) turns prompts into a local
re-segmentation, the widget turns napari Points / Labels / Shapes layers into prompts, and a case's prompts are
saved beside its labels as JSON (``save_prompts`` / ``load_prompts``) so the case can be reopened and continued.
All coordinates are voxel indices (z, y, x) on the image's grid; a 2D image is a depth-1 volume, so its
prompts have z = 0.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl.atomic import split_suffix, write_text_atomic
from napari_medcl.errors import InputError, UsageError

KINDS = ("point", "scribble", "box")
PROMPTS_FORMAT = "napari-medcl prompts 1"


@dataclass(frozen=True, eq=False)
class Prompt:
    """One interaction.

    ``kind``: "point" (one voxel), "scribble" (several voxels painted in one stroke) or "box" (the class lies
    inside ``voxels[0]`` .. ``voxels[1]``, both corners inclusive). ``label``: the class it speaks of (> 0 for a
    box). ``positive``: the voxels are that class (True) or are not (False; a box is always positive).
    ``voxels`` (N, 3) int64 (z, y, x) indices.
    """

    kind: str
    label: int
    voxels: np.ndarray
    positive: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"prompt kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        voxels = np.asarray(self.voxels)
        if voxels.ndim == 1:
            voxels = voxels[None]
        if voxels.ndim != 2 or voxels.shape[1] != 3 or len(voxels) == 0:
            raise UsageError(
                f"a {self.kind} prompt needs (N, 3) voxel indices (z, y, x), got shape {voxels.shape}"
            )
        if not np.all(np.isfinite(voxels)):
            raise UsageError(f"a {self.kind} prompt has non-finite coordinates")
        object.__setattr__(self, "voxels", np.rint(voxels).astype(np.int64))
        if int(self.label) < 0:
            raise UsageError(f"a prompt's class must be 0 or more, got {self.label}")
        object.__setattr__(self, "label", int(self.label))
        if self.kind == "point" and len(self.voxels) != 1:
            raise UsageError(f"a point prompt has one voxel, got {len(self.voxels)}")
        if self.kind == "box":
            if len(self.voxels) != 2:
                raise UsageError(f"a box prompt has two corners, got {len(self.voxels)}")
            if not self.positive:
                raise UsageError("a box prompt says where a class is; it cannot be negative")
            if self.label == 0:
                raise UsageError("a box prompt needs a foreground class (1 or more), not the background")
            object.__setattr__(self, "voxels", np.stack([self.voxels.min(axis=0), self.voxels.max(axis=0)]))
        object.__setattr__(self, "positive", bool(self.positive))

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """The smallest box (low, high inclusive) holding the prompt's voxels."""
        return self.voxels.min(axis=0), self.voxels.max(axis=0)

    def check_inside(self, shape: Sequence[int]) -> None:
        """Raise UsageError naming the prompt when a voxel lies outside a grid of ``shape`` (Z, Y, X)."""
        low, high = self.bounds()
        if np.any(low < 0) or np.any(high >= np.asarray(shape)):
            raise UsageError(
                f"a {self.kind} prompt at voxels {low.tolist()}..{high.tolist()} lies outside the image "
                f"(shape {tuple(int(s) for s in shape)})"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "label": self.label,
            "positive": self.positive,
            "voxels": self.voxels.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prompt:
        return cls(
            kind=str(data["kind"]),
            label=int(data["label"]),
            voxels=np.asarray(data["voxels"], dtype=np.float64),
            positive=bool(data.get("positive", True)),
        )


def point(z: float, y: float, x: float, label: int, *, positive: bool = True) -> Prompt:
    """A click at voxel (z, y, x)."""
    return Prompt("point", label, np.array([[z, y, x]]), positive)


def scribble(voxels: Any, label: int, *, positive: bool = True) -> Prompt:
    """A stroke through the voxels (N, 3)."""
    return Prompt("scribble", label, np.asarray(voxels), positive)


def box(low: Sequence[float], high: Sequence[float], label: int) -> Prompt:
    """The class ``label`` lies inside the box from ``low`` to ``high`` (voxel indices, both inclusive)."""
    return Prompt("box", label, np.array([low, high]))


def prompts_path(labels_path: str | Path) -> Path:
    """Where a case's prompts are saved beside its labels file: ``case.nii.gz`` -> ``case.prompts.json``."""
    path = Path(labels_path)
    name, _ = split_suffix(path.name)
    return path.with_name(f"{name}.prompts.json")


def save_prompts(
    path: str | Path, prompts: Sequence[Prompt], *, shape: Sequence[int], model: str | None = None
) -> Path:
    """Write ``prompts`` as JSON (atomically) with the grid ``shape`` (Z, Y, X) they refer to."""
    payload = {
        "format": PROMPTS_FORMAT,
        "shape": [int(s) for s in shape],
        "model": model,
        "prompts": [p.to_dict() for p in prompts],
    }
    return write_text_atomic(Path(path), json.dumps(payload, indent=1) + "\n")


def load_prompts(path: str | Path, *, shape: Sequence[int] | None = None) -> list[Prompt]:
    """The prompts saved at ``path`` (a prompts file, or the labels file they sit beside: ``prompts_path``);
    with ``shape``, checked to refer to a grid of that shape.

    Raises InputError naming the file when it is not a prompts file or belongs to another grid."""
    path = Path(path)
    if not path.name.endswith(".prompts.json"):
        path = prompts_path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "no such prompts file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(path, f"cannot read prompts: {error}") from None
    if not isinstance(data, dict) or data.get("format") != PROMPTS_FORMAT:
        raise InputError(path, f"not a prompts file (expected format {PROMPTS_FORMAT!r})")
    saved = tuple(int(s) for s in data.get("shape", ()))
    if shape is not None and saved != tuple(int(s) for s in shape):
        raise InputError(path, f"the prompts refer to an image of shape {saved}, not {tuple(shape)}")
    try:
        return [Prompt.from_dict(item) for item in data.get("prompts", [])]
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(path, f"a prompt cannot be read: {error}") from None
