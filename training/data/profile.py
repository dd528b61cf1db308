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
    parts: Sequence[tuple[Any, Sequence[Any]]],
    normalization: Any,
    *,
    max_cases: int = MAX_PROFILE_CASES,
    source: str | None = None,
) -> dict[str, Any]:
    """The profile of the cases of ``parts``, (layout, cases) pairs (a training.data Layout and CaseFiles of
    it: a fine-tuning run profiles its own dataset's cases and the replayed original's together), under
    ``normalization`` (a ModelSpec normalisation dict or a ModelSpec). At most ``max_cases`` are read, evenly
    spread over all of them. DatasetError when a case cannot be read, or when there is none."""
    from training.data.check import read_case
    from training.data.layouts import DatasetError

    pairs = [(layout, case) for layout, cases in parts for case in cases]
    if not pairs:
        raise DatasetError(["no cases to profile"], root=parts[0][0].root if parts else None)
    chosen = spread_choice(pairs, max(1, int(max_cases)))

    def read() -> Iterator[tuple[Any, Any]]:
        for layout, case in chosen:
            image, label, problems = read_case(case, layout)
            if problems or image is None:
                raise DatasetError(problems or [f"case {case.case_id}: cannot be read"], root=layout.root)
            yield image, label

    note = source or "; ".join(
        f"{layout.name}: {sum(1 for pick, _ in chosen if pick is layout)} of {len(cases)} training case(s)"
        for layout, cases in parts
        if cases
    )
    return profile_cases(
        read(),
        normalization,
        channel_names=parts[0][0].channel_names,
        total_cases=len(pairs),
        source=note,
    )
