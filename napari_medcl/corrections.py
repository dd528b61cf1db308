"""A corrections dataset: corrected segmentations, kept in the layout ``medcl-train`` reads, with a record of
who made the labels and what the user changed. Pure numpy + ``napari_medcl.io`` (no torch, no napari).

``add_correction(folder, image, labels, model=..., changed=... or model_labels=...)`` writes one case::

    folder/dataset.json                       MSD / nnU-Net v2: labels, channel_names, file_ending, numTraining,
                                              training [{"image", "label"}]; rewritten atomically
    folder/imagesTr/<case>_0000.nii.gz        the image, one file per channel, with its geometry
    folder/labelsTr/<case>.nii.gz             the corrected labels (uint8; uint16 above 255 classes)
    folder/corrections/<case>.json            the case's record (see below)
    folder/corrections/<case>_changed.nii.gz  the voxels the user changed, 1, else 0 (compressed NIfTI, uint8)

so that ``medcl-train`` with ``data: {root: folder, layout: msd}`` (and ``--init-from`` the model that made
the labels) fine-tunes on it. The record says which model produced the labels (name, SHA-256, from the
prediction's provenance), when the case was added, how many voxels the user changed, their volume, their
bounding box, and, when the model's labels are given, how many voxels each class gained and lost.

Adding a case again (same ``case_id``) replaces it: its files are rewritten, dataset.json keeps one entry
for it, and the new record says what it replaced (``replaces``: the previous record's time and counts).

Writes are atomic per file (``napari_medcl.atomic``) and ordered so that a case is listed only when it is
complete: every new file is first written in full under a temporary name in its folder (where a full disk or
an encoding failure happens, leaving the old case untouched), then the files are renamed into place, the
record last but one and dataset.json last. Concurrent adders (the widget and a script) take turns on a lock
file, ``folder/.corrections.lock``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl.errors import MedclError, OutputError
from napari_medcl.volume import Volume

__all__ = ["RECORD_FORMAT", "AddedCase", "CorrectionError", "add_correction", "read_record"]

RECORD_FORMAT = "napari-medcl-correction"
RECORD_VERSION = 1
FILE_ENDING = ".nii.gz"
RECORDS_DIR = "corrections"
LOCK_NAME = ".corrections.lock"
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


class CorrectionError(MedclError, ValueError):
    """A correction cannot be added (labels not on the image's grid, classes or channels unlike the
    dataset's, no way to tell what changed); one line naming the problem."""


@dataclass(frozen=True)
class AddedCase:
    """What ``add_correction`` wrote: the case id, its files, the record (as written) and whether it
    replaced an earlier version of the same case."""

    case_id: str
    images: tuple[Path, ...]
    label: Path
    changed_mask: Path
    record_path: Path
    record: dict[str, Any]
    replaced: bool


def add_correction(
    dataset_dir: str | Path,
    image: Volume,
    labels: Volume | np.ndarray,
    *,
    model: Any = None,
    changed: np.ndarray | None = None,
    model_labels: Volume | np.ndarray | None = None,
    case_id: str | None = None,
    class_names: Sequence[str] | None = None,
    channel_names: Sequence[str] | None = None,
    now: datetime | None = None,
) -> AddedCase:
    """Add (or replace) one corrected case in the corrections dataset at ``dataset_dir`` (created if needed).

    image: the scan (``Volume``, channels first when ``channel_axis``). labels: the corrected labels on the
    image's grid (a ``Volume`` with the same geometry, or an array of its spatial shape), non-negative
    integers. model: who made the labels before the user corrected them: a ``Provenance``, its ``to_dict()``
    (``{"model": {"name", "sha256", "classes", ...}}``) or a ``{"name", "sha256"}`` mapping; None: unknown.
    changed: (*S) bool, the voxels the user changed; or model_labels: the model's labels on the same grid, to
    diff against (one of the two is needed). case_id: default the image file's name (``scan`` for
    ``scan.nii.gz``); characters other than letters, digits, ``._-`` become ``_``. class_names: index order,
    background first; default the model's classes, then the dataset's. channel_names: default ``image``
    (``image0``, ``image1``... for several channels), or the dataset's; name a CT channel ``CT`` (nnU-Net's
    convention), since training chooses each channel's normalisation by its name.

    Raises CorrectionError for a user mistake (nothing written) and OutputError when a file cannot be written
    (the previous version of the case, if any, is left intact up to the renames)."""
    folder = Path(dataset_dir).expanduser()
    now = now or datetime.now(timezone.utc)
    label_array = _label_array(image, labels, "labels")
    changed_mask, diff_labels = _changed_mask(image, label_array, changed, model_labels)
    model_facts = _model_facts(model)
    case = _case_id(case_id, image)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for sub in ("imagesTr", "labelsTr", RECORDS_DIR):
            (folder / sub).mkdir(exist_ok=True)
    except OSError as error:
        raise OutputError(
            folder, f"cannot create the corrections dataset ({error.strerror or error})"
        ) from None
    with _dataset_lock(folder):
        meta = _read_dataset_json(folder)
        names = _class_names(meta, class_names, model_facts, label_array)
        channels = _channel_names(meta, channel_names, image)
        previous = read_record(folder, case) if (folder / RECORDS_DIR / f"{case}.json").is_file() else None
        record = _record(
            case, image, label_array, changed_mask, diff_labels, names, model_facts, previous, now
        )
        images = [folder / "imagesTr" / f"{case}_{c:04d}{FILE_ENDING}" for c in range(image.num_channels)]
        label_path = folder / "labelsTr" / f"{case}{FILE_ENDING}"
        mask_path = folder / RECORDS_DIR / f"{case}_changed{FILE_ENDING}"
        record_path = folder / RECORDS_DIR / f"{case}.json"
        # Stale images of a case that once had more channels would be read as extra channels.
        stale = sorted(
            p
            for p in (folder / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{FILE_ENDING}")
            if p not in images
        )
        grid = _grid(image)
        outputs: list[tuple[Volume, Path]] = [
            (grid.with_array(_channel(image, c)), path) for c, path in enumerate(images)
        ]
        outputs.append((grid.with_array(_label_dtype(label_array, len(names))), label_path))
        outputs.append((grid.with_array(changed_mask.astype(np.uint8)), mask_path))
        record["files"] = {
            "images": [p.relative_to(folder).as_posix() for p in images],
            "label": label_path.relative_to(folder).as_posix(),
            "changed_mask": mask_path.relative_to(folder).as_posix(),
        }
        staged = _stage(outputs)
        try:
            for temp, final in staged:
                os.replace(temp, final)
        except OSError as error:
            raise OutputError(final, f"cannot put the case in place ({error.strerror or error})") from None
        finally:
            for temp, _ in staged:
                with suppress(OSError):
                    temp.unlink(missing_ok=True)
        for path in stale:
            with suppress(OSError):
                path.unlink()
        from napari_medcl.atomic import write_text_atomic

        write_text_atomic(record_path, json.dumps(record, indent=2) + "\n")
        write_text_atomic(
            folder / "dataset.json", json.dumps(_dataset_json(folder, meta, names, channels), indent=2) + "\n"
        )
    return AddedCase(
        case_id=case,
        images=tuple(images),
        label=label_path,
        changed_mask=mask_path,
        record_path=record_path,
        record=record,
        replaced=previous is not None,
    )


def read_record(dataset_dir: str | Path, case_id: str) -> dict[str, Any]:
    """The record of ``case_id`` in the corrections dataset; CorrectionError when missing or not ours."""
    path = Path(dataset_dir) / RECORDS_DIR / f"{case_id}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorrectionError(f"{path}: no readable correction record ({error})") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise CorrectionError(f"{path}: not a napari-medcl correction record")
    return record


# ---------------------------------------------------------------------------------------------- inputs


def _label_array(image: Volume, labels: Volume | np.ndarray, what: str) -> np.ndarray:
    """``labels`` as an integer array on ``image``'s grid; CorrectionError otherwise."""
    if isinstance(labels, Volume):
        if labels.channel_axis:
            raise CorrectionError(f"{what} must be one label map, not {labels.num_channels} channels")
        if not labels.same_geometry(_grid(image)):
            raise CorrectionError(
                f"{what} are not on the image's grid (shape {labels.spatial_shape} vs {image.spatial_shape}, "
                "or another spacing, origin or direction); save them from the image they were drawn on"
            )
        array = np.asarray(labels.array)
    else:
        array = np.asarray(labels)
        if array.shape != image.spatial_shape:
            raise CorrectionError(f"{what} have shape {array.shape}, the image {image.spatial_shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise CorrectionError(f"{what} must hold integer class ids, got {array.dtype}")
    if array.size and int(array.min()) < 0:
        raise CorrectionError(f"{what} hold a negative value ({int(array.min())}); class ids start at 0")
    return array


def _changed_mask(
    image: Volume, labels: np.ndarray, changed: np.ndarray | None, model_labels: Volume | np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(the voxels the user changed (*S) bool, the model's labels or None): ``changed`` as given, else where
    the corrected labels differ from the model's."""
    if changed is None and model_labels is None:
        raise CorrectionError(
            "say what the user changed: pass changed= (a mask of the edited voxels) or model_labels= "
            "(the model's labels, to compare with)"
        )
    diff_labels = None if model_labels is None else _label_array(image, model_labels, "model_labels")
    if changed is None:
        return labels != diff_labels, diff_labels
    mask = np.asarray(changed)
    if mask.shape != image.spatial_shape:
        raise CorrectionError(f"changed has shape {mask.shape}, the image {image.spatial_shape}")
    return mask.astype(bool), diff_labels


def _model_facts(model: Any) -> dict[str, Any]:
    """{"name", "sha256", "classes"?...} from a Provenance, its dict, or a plain mapping; {} when None."""
    if model is None:
        return {}
    if hasattr(model, "to_dict"):
        model = model.to_dict()
    if not isinstance(model, Mapping):
        raise CorrectionError(
            f"model must be a Provenance or a mapping with name and sha256, got {type(model).__name__}"
        )
    facts = dict(model.get("model") or model)
    if "version" in model and "model" in model:
        facts["tool_version"] = model["version"]
    return {k: v for k, v in facts.items() if isinstance(v, (str, int, float, list, dict, type(None)))}


def _case_id(case_id: str | None, image: Volume) -> str:
    if case_id is None:
        if image.source is None:
            raise CorrectionError("the image has no file name to name the case after: pass case_id=")
        from napari_medcl.io import case_name

        case_id = case_name(image.source)
    safe = _SAFE_ID.sub("_", str(case_id)).strip("._")
    if not safe:
        raise CorrectionError(f"case_id {case_id!r} has no letters or digits")
    return safe


def _class_names(
    meta: Mapping[str, Any] | None,
    given: Sequence[str] | None,
    model_facts: Mapping[str, Any],
    labels: np.ndarray,
) -> list[str]:
    """The dataset's class names: what the dataset already has, and what this case brings must agree."""
    from_model = None
    classes = model_facts.get("classes")
    if classes:  # names in index order (Provenance), or {"index", "name"} entries (a ModelSpec dict)
        if all(isinstance(c, Mapping) for c in classes):
            classes = [c["name"] for c in sorted(classes, key=lambda c: int(c["index"]))]
        from_model = [str(c) for c in classes]
    existing = None
    if meta is not None:
        labels_map = meta.get("labels") or {}
        existing = [name for name, _ in sorted(labels_map.items(), key=lambda kv: int(kv[1]))]
    wanted = list(given) if given is not None else from_model
    if existing is not None and wanted is not None and wanted != existing:
        raise CorrectionError(
            f"the classes of this case ({', '.join(wanted)}) differ from the corrections dataset's "
            f"({', '.join(existing)}); use another folder for another model's classes"
        )
    names = existing or wanted
    if names is None:
        raise CorrectionError("name the classes: pass class_names= or a model record with its classes")
    if len(names) < 2:
        raise CorrectionError(f"a dataset needs background and at least one class, got {names}")
    top = int(labels.max()) if labels.size else 0
    if top >= len(names):
        raise CorrectionError(
            f"the labels hold class {top}, but there are only {len(names)} classes ({', '.join(names)})"
        )
    return names


def _channel_names(meta: Mapping[str, Any] | None, given: Sequence[str] | None, image: Volume) -> list[str]:
    n = image.num_channels
    default = ["image"] if n == 1 else [f"image{c}" for c in range(n)]
    names = list(given) if given is not None else None
    if meta is not None:
        stored = meta.get("channel_names") or {}
        existing = [stored[k] for k in sorted(stored, key=int)]
        if len(existing) != n:
            raise CorrectionError(
                f"this image has {n} channel(s), the corrections dataset {len(existing)} ({', '.join(existing)})"
            )
        if names is not None and names != existing:
            raise CorrectionError(f"channel names {names} differ from the dataset's {existing}")
        return existing
    if names is not None and len(names) != n:
        raise CorrectionError(f"{len(names)} channel name(s) for an image with {n} channel(s)")
    return names or default


# ---------------------------------------------------------------------------------------------- record


def _record(
    case: str,
    image: Volume,
    labels: np.ndarray,
    changed: np.ndarray,
    model_labels: np.ndarray | None,
    names: list[str],
    model_facts: Mapping[str, Any],
    previous: Mapping[str, Any] | None,
    now: datetime,
) -> dict[str, Any]:
    voxel_mm = float(np.prod(image.spacing))
    three_d = image.spatial_dims == 3
    amount_key, scale = ("volume_ml", voxel_mm / 1000.0) if three_d else ("area_cm2", voxel_mm / 100.0)
    count = int(changed.sum())
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "case_id": case,
        "added_at": now.isoformat(timespec="seconds"),
        "model": dict(model_facts) or None,
        "image_source": None if image.source is None else str(image.source),
        "geometry": image.geometry_dict(),
        "classes": names,
        "label_voxels": {
            names[k]: int(v) for k, v in enumerate(np.bincount(labels.ravel(), minlength=len(names)))
        },
        "changed": {
            "voxels": count,
            amount_key: count * scale,
            "fraction_of_image": count / max(1, changed.size),
            "bounding_box": bounding_box(changed),
            "by_class": None if model_labels is None else _by_class(labels, model_labels, changed, names),
            "compared_with": "the model's labels"
            if model_labels is not None
            else "the mask of edited voxels given",
        },
        "replaces": None,
    }
    if previous is not None:
        record["replaces"] = {
            "added_at": previous.get("added_at"),
            "model": previous.get("model"),
            "changed_voxels": (previous.get("changed") or {}).get("voxels"),
            "times_replaced_before": int((previous.get("replaces") or {}).get("times_replaced_before", -1))
            + 1,
        }
    return record


def bounding_box(mask: np.ndarray) -> list[list[int]] | None:
    """[[start, stop], ...] per axis (array order, stop exclusive) of the true voxels; None when none."""
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append([int(hits[0]), int(hits[-1]) + 1])
    return box


def _by_class(
    labels: np.ndarray, model_labels: np.ndarray, changed: np.ndarray, names: list[str]
) -> dict[str, Any]:
    """Per class: voxels the user gave it (gained) and took from it (lost), among the changed voxels."""
    k = max(len(names), int(model_labels.max()) + 1 if model_labels.size else 0)
    gained = np.bincount(labels[changed].ravel(), minlength=k)
    lost = np.bincount(model_labels[changed].ravel(), minlength=k)
    return {
        (names[i] if i < len(names) else f"label {i}"): {"gained": int(gained[i]), "lost": int(lost[i])}
        for i in range(k)
        if gained[i] or lost[i]
    }


# ---------------------------------------------------------------------------------------------- files


def _grid(image: Volume) -> Volume:
    """The image's geometry around a placeholder spatial array (for ``with_array``)."""
    return Volume(
        np.zeros(image.spatial_shape, dtype=np.uint8),
        image.spacing,
        image.origin,
        image.direction,
        source=image.source,
    )


def _channel(image: Volume, c: int) -> np.ndarray:
    return np.asarray(image.array[c] if image.channel_axis else image.array)


def _label_dtype(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return labels.astype(np.uint8 if num_classes <= 256 else np.uint16, copy=False)


def _stage(outputs: list[tuple[Volume, Path]]) -> list[tuple[Path, Path]]:
    """Write every volume completely under a hidden temporary name beside its final path; (temp, final)
    pairs. On failure the temporaries written so far are removed and the error raised."""
    from napari_medcl.atomic import split_suffix
    from napari_medcl.io import write_image

    staged: list[tuple[Path, Path]] = []
    try:
        for volume, final in outputs:
            stem, suffix = split_suffix(final.name)
            temp = final.with_name(f".{stem}.{secrets.token_hex(4)}{suffix}")  # atomic.py's temporary form
            staged.append((temp, final))
            write_image(volume, temp)
    except BaseException:
        for temp, _ in staged:
            with suppress(OSError):
                temp.unlink(missing_ok=True)
        raise
    return staged


def _read_dataset_json(folder: Path) -> dict[str, Any] | None:
    path = folder / "dataset.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorrectionError(f"{path}: unreadable ({error}); fix or remove it") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), dict):
        raise CorrectionError(
            f"{path}: not a dataset.json with 'labels'; use an empty folder for corrections"
        )
    labels = meta["labels"]
    if not all(isinstance(v, int) for v in labels.values()):
        raise CorrectionError(f"{path}: labels must map names to integers (nnU-Net v2 form)")
    return meta


def _dataset_json(
    folder: Path, meta: Mapping[str, Any] | None, names: list[str], channels: list[str]
) -> dict[str, Any]:
    """dataset.json listing every complete case in the folder (a case is complete once its record exists)."""
    records = sorted(p for p in (folder / RECORDS_DIR).glob("*.json") if not p.name.startswith("."))
    training = []
    for path in records:
        case = path.stem
        label = f"./labelsTr/{case}{FILE_ENDING}"
        if (folder / label).is_file():
            training.append({"image": f"./imagesTr/{case}{FILE_ENDING}", "label": label})
    out = dict(meta or {})
    out.update(
        {
            "name": (meta or {}).get("name") or folder.name,
            "description": (meta or {}).get("description")
            or "corrected segmentations added with napari_medcl.corrections.add_correction",
            "labels": {name: i for i, name in enumerate(names)},
            "channel_names": {str(c): name for c, name in enumerate(channels)},
            "file_ending": FILE_ENDING,
            "numTraining": len(training),
            "training": training,
        }
    )
    return out


@contextmanager
def _dataset_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/.corrections.lock`` (blocking) while one case is added."""
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise OutputError(
            path, f"cannot create the dataset's lock file ({error.strerror or error})"
        ) from None
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock; the file stays, empty, for the next adder
