"""On-disk cache of per-case results, so that a second run (or the next fold) does not read the images again.

Two kinds of entries, each keyed by a digest of the case's files (path, size, modification time) and of the
settings that produced it:

- ``fingerprints/<case>-<key>.npz``: what checking a case found (shape, spacing, label values, problems) and
  a sample of its foreground intensities (for CT statistics);
- ``preprocessed/<case>-<key>.image.npy`` / ``.label.npy`` / ``.locations.npz`` / ``.json``: the cropped,
  normalised, resampled case and where its foreground classes are (for patch sampling). Arrays are ``.npy`` so they load memory-mapped: DataLoader workers share the pages instead of each
  holding a copy, and datasets larger than memory still train.

Every file is written atomically (temporary name, then rename), and the ``.json`` last, so an entry is either
complete or ignored. A cache folder that cannot be written only costs speed: a warning is logged once and the
run goes on without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl.atomic import atomic_path

__all__ = ["CaseCache", "digest", "file_stamps"]

log = logging.getLogger(__name__)


def file_stamps(paths: list[Path]) -> list[list[Any]]:
    """[resolved path, size, mtime_ns] of each file: changes whenever a file is replaced or edited."""
    out = []
    for path in paths:
        try:
            stat = path.stat()
            out.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
        except OSError:
            out.append([str(path), None, None])
    return out


def digest(obj: Any) -> str:
    """Short stable hash of a JSON-able object (keys sorted)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def _safe(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", case_id)


class CaseCache:
    """Per-case entries under ``folder`` (None: a cache that stores nothing)."""

    def __init__(self, folder: Path | None):
        self.folder = None if folder is None else Path(folder)

    def _path(self, kind: str, case_id: str, key: str, suffix: str) -> Path:
        assert self.folder is not None
        return self.folder / kind / f"{_safe(case_id)}-{key}{suffix}"

    def _disable(self, error: Exception) -> None:
        log.warning("cannot write the dataset cache in %s (%s); going on without it", self.folder, error)
        self.folder = None

    # ------------------------------------------------------------------------------------- fingerprints

    def load_fingerprint(self, case_id: str, key: str) -> tuple[dict[str, Any], np.ndarray] | None:
        """(meta, foreground samples (C, n) float32) or None when absent or unreadable."""
        if self.folder is None:
            return None
        path = self._path("fingerprints", case_id, key, ".npz")
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                samples = np.asarray(data["samples"], dtype=np.float32)
        except (OSError, ValueError, KeyError):
            return None
        return meta, samples

    def save_fingerprint(self, case_id: str, key: str, meta: dict[str, Any], samples: np.ndarray) -> None:
        if self.folder is None:
            return
        path = self._path("fingerprints", case_id, key, ".npz")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as temp, open(temp, "wb") as file:
                np.savez(file, meta=np.array(json.dumps(meta)), samples=samples.astype(np.float32))
        except OSError as error:  # OutputError is an OSError too
            self._disable(error)

    # ------------------------------------------------------------------------------------- preprocessed

    def load_case(
        self, case_id: str, key: str
    ) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray], dict[str, Any]] | None:
        """(image, label, locations, meta) with image and label memory-mapped read-only, or None when absent."""
        if self.folder is None:
            return None
        meta_path = self._path("preprocessed", case_id, key, ".json")
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            image = np.load(self._path("preprocessed", case_id, key, ".image.npy"), mmap_mode="r")
            label = np.load(self._path("preprocessed", case_id, key, ".label.npy"), mmap_mode="r")
            with np.load(
                self._path("preprocessed", case_id, key, ".locations.npz"), allow_pickle=False
            ) as data:
                locations = {int(name[5:]): np.asarray(data[name]) for name in data.files}
        except (OSError, ValueError):
            return None
        return image, label, locations, meta

    def save_case(
        self,
        case_id: str,
        key: str,
        image: np.ndarray,
        label: np.ndarray,
        locations: dict[int, np.ndarray],
        meta: dict[str, Any],
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Store the case; return its arrays memory-mapped from the cache (None when it could not be stored)."""
        if self.folder is None:
            return None
        try:
            self._path("preprocessed", case_id, key, "").parent.mkdir(parents=True, exist_ok=True)
            for suffix, array in ((".image.npy", image), (".label.npy", label)):
                with (
                    atomic_path(self._path("preprocessed", case_id, key, suffix)) as temp,
                    open(temp, "wb") as f,
                ):
                    np.save(f, np.ascontiguousarray(array), allow_pickle=False)
            with (
                atomic_path(self._path("preprocessed", case_id, key, ".locations.npz")) as temp,
                open(temp, "wb") as f,
            ):
                np.savez(f, **{f"class{c}": v for c, v in locations.items()})
            with atomic_path(self._path("preprocessed", case_id, key, ".json")) as temp:
                temp.write_text(json.dumps(meta, sort_keys=True), encoding="utf-8")
        except OSError as error:
            self._disable(error)
            return None
        loaded = self.load_case(case_id, key)
        return None if loaded is None else loaded[:2]
