"""Find the cases of a dataset on disk, in the layouts users bring, without reading any image.

Each layout turns a folder into a :class:`Layout`: the class and channel names it declares and one
:class:`CaseFiles` per case (its image file(s), its label file, its subject). Problems with the listing
itself (a label without an image, two files for one case, a malformed ``dataset.json``) are collected, not
raised, so that :func:`training.data.check.scan_dataset` can report every problem of a dataset at once.

- ``msd``: ``imagesTr/<case>_0000.<ext>`` (+ ``_0001``... one file per channel, nnU-Net v2) or
  ``imagesTr/<case>.<ext>`` (original Medical Segmentation Decathlon), ``labelsTr/<case>.<ext>`` and
  ``dataset.json`` with ``labels`` (``{"background": 0, "GM": 1}`` or ``{"0": "background", "1": "GM"}``)
  and ``channel_names`` (nnU-Net v2) or ``modality`` (MSD).
- ``folder2d``: ``images/<stem>.<png|jpg|tif|...>`` and ``masks/<stem>_segmentation.<ext>`` or
  ``masks/<stem>.<ext>`` (ISIC); masks are 0/255 (binary) or class ids; an optional ``dataset.json`` names
  the classes.
- ``acdc``: ``patientXXX/patientXXX_frameYY.nii.gz`` with ``patientXXX_frameYY_gt.nii.gz`` (under the root
  or its ``training/`` folder); classes background, RV, MYO, LV.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_medcl.atomic import split_suffix
from napari_medcl.errors import MedclError

__all__ = ["CaseFiles", "DatasetError", "Layout", "discover"]

# The formats napari_medcl.io reads, by extension (lower case, compound extensions whole).
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".tif", ".tiff", ".png")
PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
ACDC_CLASSES = ("background", "RV", "MYO", "LV")
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_SEGMENTATION_SUFFIX = re.compile(r"_segmentation$", re.IGNORECASE)
_ACDC_FRAME = re.compile(r"^(?P<patient>patient\d+)_frame(?P<frame>\d+)(?P<gt>_gt)?$")


class DatasetError(MedclError, ValueError):
    """The dataset cannot be used for training. ``problems`` holds every problem found, one line each,
    each naming its case or file; the message is a summary line followed by those lines."""

    def __init__(self, problems: Sequence[str], *, root: str | Path | None = None):
        self.problems = list(problems)
        self.root = None if root is None else Path(root)
        where = f"{self.root}: " if self.root is not None else ""
        count = len(self.problems)
        header = f"{where}{count} problem{'s' if count != 1 else ''} in the dataset"
        super().__init__(header + "".join(f"\n  - {p}" for p in self.problems))


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case: ``images`` one per channel (or one multi-channel file), ``label`` or None when
    missing. ``subject`` groups cases that must stay in one fold (ACDC: the frames of one patient)."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None
    subject: str


@dataclass(frozen=True)
class Layout:
    """What a dataset folder declares. ``class_names`` None: taken from the masks (folder2d class ids);
    ``channel_names`` None: taken from the images (folder2d: gray or RGB). ``binary_255``: a mask holding
    only 0 and 255 means background/foreground. ``pixel_grid``: the images are pictures whose spacing and
    origin (ITK reads a JPEG's DPI as spacing) mean nothing, so every case is a unit-spacing pixel grid.
    ``problems``: what is wrong with the listing itself."""

    kind: str
    root: Path
    name: str
    class_names: tuple[str, ...] | None
    channel_names: tuple[str, ...] | None
    cases: tuple[CaseFiles, ...]
    problems: tuple[str, ...]
    binary_255: bool = False
    pixel_grid: bool = False
    subjects_from: str | None = None


SUBJECT_FILES = ("subjects.json", "subjects.csv")


def discover(kind: str, root: str | Path) -> Layout:
    """List the cases under ``root`` for layout ``kind``; raise DatasetError only when there is no folder.

    Subjects (cases that must stay on one side of every split, e.g. the MR sequences of one patient): each
    case is its own subject unless the layout knows better (ACDC: the patient folder), and a mapping
    overrides both: ``dataset.json`` (msd) with a ``"subjects": {case_id: subject}`` object or ``"subject"``
    keys in its ``"training"`` entries, or a ``subjects.json`` ({case_id: subject}) or ``subjects.csv``
    (``case_id,subject`` lines, an optional header) file in ``root``, for any layout. Cases the mapping does
    not name keep their own subject; ids it names that are not cases are listed as problems.
    ``Layout.subjects_from`` names the mapping used (None: none).
    """
    if not str(root):
        raise DatasetError(["data.root is empty: set it to the dataset folder"])
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError([f"{root}: no such folder"])
    finders = {"msd": _discover_msd, "folder2d": _discover_folder2d, "acdc": _discover_acdc}
    if kind not in finders:
        raise DatasetError([f"unknown layout {kind!r}; use one of {', '.join(finders)}"], root=root)
    return _apply_subjects(finders[kind](root))


def _apply_subjects(layout: Layout) -> Layout:
    problems: list[str] = []
    mapping, source = _subject_mapping(layout, problems)
    if mapping is None:
        return dataclasses.replace(layout, problems=layout.problems + tuple(problems))
    known = {case.case_id for case in layout.cases}
    unknown = sorted(set(mapping) - known)
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        problems.append(f"{source}: names {len(unknown)} case(s) that are not in the dataset: {shown}")
    cases = tuple(
        dataclasses.replace(case, subject=mapping.get(case.case_id, case.subject)) for case in layout.cases
    )
    return dataclasses.replace(
        layout, cases=cases, problems=layout.problems + tuple(problems), subjects_from=source
    )


def _subject_mapping(layout: Layout, problems: list[str]) -> tuple[dict[str, str] | None, str | None]:
    """case id -> subject from the first source found (see discover), or (None, None)."""
    root = layout.root
    meta_path = root / "dataset.json"
    if layout.kind == "msd" and meta_path.is_file():
        data = _read_json(meta_path, [])  # its problems are already reported by the layout
        if isinstance(data, dict) and ("subjects" in data or _training_subjects(data)):
            where = f"{meta_path}"
            raw = data.get("subjects")
            mapping = _check_mapping(raw, where, problems) if raw is not None else {}
            mapping.update(_training_subjects(data))
            return mapping, where
    json_path, csv_path = (root / name for name in SUBJECT_FILES)
    if json_path.is_file():
        data = _read_json(json_path, problems)
        return (_check_mapping(data, str(json_path), problems) if data is not None else {}), str(json_path)
    if csv_path.is_file():
        return _read_subject_csv(csv_path, problems), str(csv_path)
    return None, None


def _training_subjects(data: dict[str, Any]) -> dict[str, str]:
    """{case id: subject} from MSD-style ``training`` entries that carry a ``subject`` key."""
    out: dict[str, str] = {}
    entries = data.get("training")
    if not isinstance(entries, list):
        return out
    for entry in entries:
        if not isinstance(entry, dict) or "subject" not in entry:
            continue
        path = entry.get("label") or entry.get("image")
        if isinstance(path, str):
            stem, _ = split_suffix(Path(path).name)
            out[stem] = str(entry["subject"])
    return out


def _check_mapping(data: Any, where: str, problems: list[str]) -> dict[str, str]:
    if not isinstance(data, dict) or not all(isinstance(v, (str, int)) for v in data.values()):
        problems.append(
            f'{where}: subjects must map case ids to subject names, e.g. {{"case_001": "patient01"}}'
        )
        return {}
    return {str(k): str(v) for k, v in data.items()}


def _read_subject_csv(path: Path, problems: list[str]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = [f.strip() for f in line.split(",")]
        if not line.strip() or (number == 1 and fields[:2] == ["case_id", "subject"]):
            continue
        if len(fields) != 2 or not all(fields):
            problems.append(f"{path}: line {number} must be 'case_id,subject', got {line!r}")
            continue
        mapping[fields[0]] = fields[1]
    return mapping


# ------------------------------------------------------------------------------------------------ helpers


def _files(folder: Path, extensions: Sequence[str]) -> list[tuple[str, Path]]:
    """(stem, path) of the visible files in ``folder`` with one of ``extensions`` (macOS ``._`` files and other
    hidden files are skipped), sorted by name."""
    out = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        stem, extension = split_suffix(path.name)
        if extension.lower() in extensions:
            out.append((stem, path))
    return out


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        problems.append(f"{path}: cannot read ({error})")
        return None
    except json.JSONDecodeError as error:
        problems.append(f"{path}: not valid JSON (line {error.lineno}: {error.msg})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: must hold a JSON object, got {type(data).__name__}")
        return None
    return data


def parse_labels(labels: Any, where: str, problems: list[str]) -> tuple[str, ...] | None:
    """Class names by index from ``labels`` in nnU-Net v2 form ``{"background": 0, "GM": 1}`` or MSD form
    ``{"0": "background", "1": "GM"}``. Indices must be 0..K-1 with K >= 2."""
    if not isinstance(labels, dict) or not labels:
        problems.append(f"{where}: 'labels' must be a non-empty mapping, got {labels!r}")
        return None
    by_index: dict[int, str] = {}
    if all(isinstance(v, str) for v in labels.values()):
        for key, name in labels.items():
            if not str(key).strip().lstrip("-").isdigit():
                problems.append(
                    f"{where}: label key {key!r} is not an integer (MSD form is {{'0': 'background'}})"
                )
                return None
            by_index[int(key)] = name
    else:
        for name, value in labels.items():
            if isinstance(value, (list, tuple)):
                problems.append(
                    f"{where}: label {name!r} is a region {value}; region-based labels are not supported"
                )
                return None
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{where}: label {name!r} must map to an integer, got {value!r}")
                return None
            if value in by_index:
                problems.append(f"{where}: labels {by_index[value]!r} and {name!r} share the value {value}")
                return None
            by_index[value] = name
    indices = sorted(by_index)
    if indices != list(range(len(indices))) or len(indices) < 2:
        problems.append(
            f"{where}: label values must be 0..K-1 with K >= 2 (0 = background), got {indices}; "
            "renumber the labels"
        )
        return None
    return tuple(str(by_index[i]) for i in indices)


def _parse_channels(data: dict[str, Any], where: str, problems: list[str]) -> tuple[str, ...] | None:
    channels = data.get("channel_names", data.get("modality"))
    if channels is None:
        problems.append(
            f"{where}: needs 'channel_names' (nnU-Net v2) or 'modality' (MSD), e.g. {{'0': 'CT'}}"
        )
        return None
    if not isinstance(channels, dict) or not channels:
        problems.append(f"{where}: 'channel_names' must be a mapping like {{'0': 'CT'}}, got {channels!r}")
        return None
    try:
        by_index = {int(k): str(v) for k, v in channels.items()}
    except (TypeError, ValueError):
        problems.append(f"{where}: channel keys must be integers '0', '1', ..., got {list(channels)}")
        return None
    if sorted(by_index) != list(range(len(by_index))):
        problems.append(f"{where}: channel keys must be 0..C-1, got {sorted(by_index)}")
        return None
    return tuple(by_index[i] for i in range(len(by_index)))


# ------------------------------------------------------------------------------------------------ msd


def _discover_msd(root: Path) -> Layout:
    problems: list[str] = []
    meta_path = root / "dataset.json"
    data: dict[str, Any] | None = None
    if meta_path.is_file():
        data = _read_json(meta_path, problems)
    else:
        problems.append(
            f"{meta_path}: not found (the msd layout needs dataset.json with labels and channel_names)"
        )
    class_names = channel_names = None
    if data is not None:
        if "labels" in data:
            class_names = parse_labels(data["labels"], str(meta_path), problems)
        else:
            problems.append(f"{meta_path}: has no 'labels'")
        channel_names = _parse_channels(data, str(meta_path), problems)
    extensions = VOLUME_EXTENSIONS
    if data is not None and isinstance(data.get("file_ending"), str):
        extensions = (data["file_ending"].lower(),)
    name = str(data.get("name") or root.name) if data is not None else root.name

    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            problems.append(f"{folder}: folder not found")
    if not images_dir.is_dir() or not labels_dir.is_dir():
        return Layout("msd", root, name, class_names, channel_names, (), tuple(problems))

    # case id -> channel index (None: one file holding every channel) -> files
    channels: dict[str, dict[int | None, list[Path]]] = defaultdict(lambda: defaultdict(list))
    for stem, path in _files(images_dir, extensions):
        match = _CHANNEL_SUFFIX.match(stem)
        if match:
            channels[match["case"]][int(match["channel"])].append(path)
        else:
            channels[stem][None].append(path)
    labels: dict[str, list[Path]] = defaultdict(list)
    for stem, path in _files(labels_dir, extensions):
        labels[stem].append(path)

    cases = []
    for case_id in sorted(channels):
        files = channels[case_id]
        bad = False
        for index, paths in sorted(files.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
            if len(paths) > 1:
                what = "image" if index is None else f"channel {index}"
                problems.append(
                    f"case {case_id}: duplicate case id, {what} has {len(paths)} files: "
                    + ", ".join(p.name for p in paths)
                )
                bad = True
        if None in files and len(files) > 1:
            problems.append(
                f"case {case_id}: has both {files[None][0].name} and per-channel files "
                f"{case_id}_0000...; keep one naming"
            )
            bad = True
        indices = sorted(i for i in files if i is not None)
        if indices and indices != list(range(len(indices))):
            missing = sorted(set(range(max(indices) + 1)) - set(indices))
            problems.append(
                f"case {case_id}: channel file(s) {', '.join(f'_{i:04d}' for i in missing)} missing "
                f"(found {', '.join(f'_{i:04d}' for i in indices)})"
            )
            bad = True
        elif indices and channel_names is not None and len(indices) != len(channel_names):
            problems.append(
                f"case {case_id}: has {len(indices)} channel file(s), dataset.json lists "
                f"{len(channel_names)} channel(s) {list(channel_names)}"
            )
            bad = True
        label_paths = labels.get(case_id, [])
        if len(label_paths) > 1:
            problems.append(
                f"case {case_id}: duplicate case id, {len(label_paths)} label files: "
                + ", ".join(p.name for p in label_paths)
            )
            bad = True
        if not label_paths:
            problems.append(
                f"case {case_id}: missing label (no {labels_dir.name}/{case_id}<ext> for its image)"
            )
            bad = True
        if bad:
            continue
        images = tuple(files[None]) if None in files else tuple(files[i][0] for i in indices)
        cases.append(CaseFiles(case_id, images, label_paths[0], case_id))
    for case_id in sorted(set(labels) - set(channels)):
        problems.append(
            f"case {case_id}: label {labels[case_id][0].name} has no image in {images_dir.name}/ "
            f"(expected {case_id}_0000<ext>)"
        )
    return Layout("msd", root, name, class_names, channel_names, tuple(cases), tuple(problems))


# ------------------------------------------------------------------------------------------------ folder2d


def _discover_folder2d(root: Path) -> Layout:
    problems: list[str] = []
    class_names = channel_names = None
    meta_path = root / "dataset.json"
    if meta_path.is_file():
        data = _read_json(meta_path, problems)
        if data is not None and "labels" in data:
            class_names = parse_labels(data["labels"], str(meta_path), problems)
        if data is not None and ("channel_names" in data or "modality" in data):
            channel_names = _parse_channels(data, str(meta_path), problems)
    images_dir, masks_dir = root / "images", root / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            problems.append(f"{folder}: folder not found (folder2d expects images/ and masks/)")
    cases = (
        _folder2d_cases(images_dir, masks_dir, problems) if images_dir.is_dir() and masks_dir.is_dir() else []
    )
    return Layout(
        "folder2d",
        root,
        root.name,
        class_names,
        channel_names,
        tuple(cases),
        tuple(problems),
        binary_255=True,
        pixel_grid=True,
    )


def _folder2d_cases(images_dir: Path, masks_dir: Path, problems: list[str]) -> list[CaseFiles]:
    """Cases pairing ``images/<id>.<ext>`` with ``masks/<id>[_segmentation].<ext>``; problems appended."""
    images: dict[str, list[Path]] = defaultdict(list)
    for stem, path in _files(images_dir, PICTURE_EXTENSIONS):
        images[stem].append(path)
    masks: dict[str, list[Path]] = defaultdict(list)
    for stem, path in _files(masks_dir, PICTURE_EXTENSIONS):
        masks[_SEGMENTATION_SUFFIX.sub("", stem)].append(path)

    cases = []
    for case_id in sorted(images):
        bad = False
        if len(images[case_id]) > 1:
            problems.append(
                f"case {case_id}: duplicate case id, images " + ", ".join(p.name for p in images[case_id])
            )
            bad = True
        found = masks.get(case_id, [])
        if len(found) > 1:
            problems.append(f"case {case_id}: duplicate case id, masks " + ", ".join(p.name for p in found))
            bad = True
        if not found:
            problems.append(
                f"case {case_id}: missing label (no masks/{case_id}_segmentation.<ext> or masks/{case_id}.<ext>)"
            )
            bad = True
        if not bad:
            cases.append(CaseFiles(case_id, (images[case_id][0],), found[0], case_id))
    for case_id in sorted(set(masks) - set(images)):
        problems.append(f"case {case_id}: mask {masks[case_id][0].name} has no image in images/")
    return cases


# ------------------------------------------------------------------------------------------------ acdc


def _discover_acdc(root: Path) -> Layout:
    problems: list[str] = []
    base = root
    if (
        not any(p.is_dir() and p.name.startswith("patient") for p in root.iterdir())
        and (root / "training").is_dir()
    ):
        base = root / "training"
    patients = sorted(p for p in base.iterdir() if p.is_dir() and p.name.startswith("patient"))
    if not patients:
        problems.append(
            f"{base}: no patientXXX folders (the acdc layout is patientXXX/patientXXX_frameYY.nii.gz)"
        )
    cases = []
    for folder in patients:
        frames: dict[str, list[Path]] = defaultdict(list)
        gts: dict[str, list[Path]] = defaultdict(list)
        for stem, path in _files(folder, (".nii.gz", ".nii")):
            match = _ACDC_FRAME.match(stem)
            if not match:  # patientXXX_4d.nii.gz, Info.cfg and the like are not cases
                continue
            case_id = f"{match['patient']}_frame{match['frame']}"
            (gts if match["gt"] else frames)[case_id].append(path)
        for case_id in sorted(frames):
            bad = False
            for what, found in (("image", frames[case_id]), ("label", gts.get(case_id, []))):
                if len(found) > 1:
                    problems.append(
                        f"case {case_id}: duplicate case id, {what} files " + ", ".join(p.name for p in found)
                    )
                    bad = True
            if case_id not in gts:
                problems.append(
                    f"case {case_id}: missing label ({folder.name}/{case_id}_gt.nii.gz not found)"
                )
                bad = True
            if not bad:
                cases.append(CaseFiles(case_id, (frames[case_id][0],), gts[case_id][0], folder.name))
        for case_id in sorted(set(gts) - set(frames)):
            problems.append(f"case {case_id}: label {gts[case_id][0].name} has no image {case_id}.nii.gz")
    return Layout("acdc", root, root.name, ACDC_CLASSES, ("MRI",), tuple(cases), tuple(problems))
