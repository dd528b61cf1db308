"""The training-data profile of a dataset's cases (torch-free): what ``medcl-train`` stores in every spec and
``medcl-calibrate`` writes into an existing model file (``ModelSpec.training_profile``).

``dataset_profile`` reads the cases as their files hold them (``training.data.check.read_case``, one at a time)
and measures them with ``napari_medcl.training_profile.profile_cases``, under the model's normalisation. At
most ``MAX_PROFILE_CASES`` cases are read, evenly spread over the list, so a large dataset costs a bounded time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from napari_medcl.training_profile import profile_cases

__all__ = ["MAX_PROFILE_CASES", "dataset_profile", "spread_choice"]

MAX_PROFILE_CASES = 64


def spread_choice(items: Sequence[Any], limit: int) -> list[Any]:
    """At most ``limit`` of ``items``, evenly spread over the list (all of them when there are few)."""
    if len(items) <= limit:
        return list(items)
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def dataset_profile(
    layout: Any,
    cases: Sequence[Any],
    normalization: Any,
    *,
    max_cases: int = MAX_PROFILE_CASES,
    source: str | None = None,
) -> dict[str, Any]:
    """The profile of ``cases`` (CaseFiles of ``layout``, a training.data Layout) under ``normalization`` (a
    ModelSpec normalisation dict or a ModelSpec). DatasetError when a case cannot be read."""
    from training.data.check import read_case
    from training.data.layouts import DatasetError

    if not cases:
        raise DatasetError(["no cases to profile"], root=layout.root)
    chosen = spread_choice(list(cases), max(1, int(max_cases)))

    def read() -> Iterator[tuple[Any, Any]]:
        for case in chosen:
            image, label, problems = read_case(case, layout)
            if problems or image is None:
                raise DatasetError(problems or [f"case {case.case_id}: cannot be read"], root=layout.root)
            yield image, label

    note = source or f"{layout.name}: {len(chosen)} of {len(cases)} training case(s)"
    return profile_cases(
        read(),
        normalization,
        channel_names=layout.channel_names,
        total_cases=len(cases),
        source=note,
    )
