"""Builders of ready-to-train datasets from real labelled images that are available offline.

Each builder writes the Medical Segmentation Decathlon layout (``imagesTr/``, ``labelsTr/``, ``dataset.json``) plus
a ``README.md`` stating the source, the licence and how the labels were derived. ``medcl-data build NAME -o DIR``
runs them.
"""

from __future__ import annotations

from training.data.builders.registry import BUILDERS, build_dataset

__all__ = ["BUILDERS", "build_dataset"]
