"""A prediction with a progress bar on the terminal, for ``medcl-predict`` and ``make demo``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from napari_medcl.session import InferenceSession
from napari_medcl.volume import Prediction, Volume


def predict_with_bar(
    image: Volume | str | Path, model: InferenceSession, *, desc: str, quiet: bool = False, **options: Any
) -> Prediction:
    """``predict(image, model, **options)`` with a bar counting the windows on stderr (none when ``quiet``)."""
    from tqdm import tqdm

    from napari_medcl.prediction import Progress, predict_iter

    prediction = None
    # disable=None: tqdm draws only on a terminal, so logs and pipes get the callers' own lines alone.
    with tqdm(desc=desc, unit="window", file=sys.stderr, disable=True if quiet else None, leave=False) as bar:
        for item in predict_iter(image, model, **options):
            if not isinstance(item, Progress):
                prediction = item
            elif item.stage == "infer":
                bar.total = item.total
                bar.update(item.done - bar.n)
    return prediction
