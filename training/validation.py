"""Validation during training, through the product's predictor.

Each validation case is read from its own files when it is validated, and segmented by
``napari_medcl.predict`` with the network in a ``TorchSession``: the same cropping, normalisation, resampling,
windows, Gaussian stitching, resampling back and label rules that ``medcl-predict`` applies to the exported model, scored on the case's own grid.
So the Dice that picks ``checkpoint_best.pt`` is the Dice ``medcl-evaluate`` gives on its ONNX export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from napari_medcl.spec import ModelSpec
from napari_medcl.volume import Volume
from training.runtime import DistInfo, all_reduce
from training.torch_session import TorchSession

__all__ = ["ValidationCase", "read_validation_cases", "validate", "validation_session"]


@dataclass(frozen=True, eq=False)
class ValidationCase:
    """One validation case: its files in the dataset's layout, read when it is validated (each process reads
    only its share, and nothing stays in memory between validations)."""

    files: Any  # training.data's CaseFiles
    layout: Any  # training.data's Layout

    @property
    def case_id(self) -> str:
        return self.files.case_id

    def read(self) -> tuple[Volume, np.ndarray]:
        """(image (C, *S) with its geometry, label (*S) uint8 on the same grid). DatasetError when the files
        changed since the dataset was checked."""
        from training.data.check import read_case
        from training.data.layouts import DatasetError

        image, label, problems = read_case(self.files, self.layout)
        if problems or image is None or label is None:
            raise DatasetError(problems or [f"case {self.case_id}: cannot be read"], root=self.layout.root)
        return image, label


def read_validation_cases(data_cfg: Any, case_ids: Sequence[str]) -> list[ValidationCase]:
    """The cases ``case_ids`` of the dataset ``data_cfg`` describes (training.data's DataConfig). Raises
    DatasetError when a case's files are gone."""
    from training.data.layouts import DatasetError, discover

    layout = discover(data_cfg.layout, data_cfg.root)
    files = {case.case_id: case for case in layout.cases}
    missing = [case_id for case_id in case_ids if case_id not in files]
    if missing:
        raise DatasetError([f"case {case_id}: its files are gone" for case_id in missing], root=layout.root)
    return [ValidationCase(files[case_id], layout) for case_id in case_ids]


def validate(
    session: TorchSession,
    cases: Sequence[ValidationCase],
    *,
    overlap: float,
    batch_size: int,
    max_cases: int | None,
    dist: DistInfo,
) -> dict[str, Any]:
    """Mean Dice per foreground class over the first ``max_cases`` of ``cases`` (all when None), each
    process predicting its share; ``{"dice": {class: v}, "mean_dice": v, "cases": n}``."""
    from napari_medcl.prediction import predict
    from training.metrics import evaluate_case

    cases = list(cases)
    if max_cases is not None:
        cases = cases[:max_cases]
    names = list(session.spec.class_names)
    k = len(names) - 1
    totals = torch.zeros(k + 1, dtype=torch.float64)  # per-class Dice sums, then the case count
    for case in cases[dist.rank :: dist.world_size]:
        image, label = case.read()
        labels = predict(image, session, overlap=overlap, batch_size=batch_size).labels.array
        scores = evaluate_case(labels, label, names, compute_hd95=False)
        totals[:k] += torch.tensor([scores.dice[n] for n in names[1:]], dtype=torch.float64)
        totals[k] += 1
    if dist.world_size > 1:
        device = session.device if session.device.type == "cuda" else torch.device("cpu")
        totals = all_reduce(totals.to(device), dist).cpu()
    count = max(1.0, float(totals[k]))
    dice = {n: float(totals[i]) / count for i, n in enumerate(names[1:])}
    return {"dice": dice, "mean_dice": float(np.mean(list(dice.values()))), "cases": int(totals[k])}


def validation_session(
    model: torch.nn.Module, spec: ModelSpec, device: torch.device, autocast: Any
) -> TorchSession:
    """The network as an inference session for validation: labels only, so no UAFR maps are computed."""
    return TorchSession(
        model, dataclasses.replace(spec, uncertainty_maps=()), device=device, autocast=autocast
    )
