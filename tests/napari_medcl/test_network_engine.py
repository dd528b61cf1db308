"""Engine (b) in the interactive session, torch-free: a stand-in prompt model whose answer is exact
(its previous-segmentation channels, overridden by its click maps) shows that CaseSession feeds it every
prompt so far and the labels as they stand, writes its answer only inside the prompt's box as one undoable
step, replays prompts after a re-run, and picks the engine the model offers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from napari_medcl.errors import UsageError
from napari_medcl.interactive import open_session
from napari_medcl.network_refiner import NetworkRefiner
from napari_medcl.prompt_channels import PromptEncoding
from napari_medcl.prompts import box, point
from napari_medcl.volume import Volume
from tests.onnx_models import make_spec

ENCODING = PromptEncoding(num_classes=3, radius_mm=1.0)


class ExactPromptModel:
    """Automatic: class 1 where the image exceeds 0.5. With prompts: the previous segmentation, then each
    positive map's class where it is drawn and background where a negative map covers its class."""

    provider = "numpy"
    path = None
    sha256 = None

    def __init__(self, prompts: bool = True):
        spec = make_spec(num_classes=3, maps=(), patch=(4, 8, 8))
        self.spec = dataclasses.replace(spec, prompts=ENCODING.to_dict() if prompts else None)
        self.seen: list[np.ndarray] = []

    def run(self, batch, prompts=None):
        n, _, *spatial = batch.shape
        labels = (batch[:, 0] > 0.5).astype(np.int64)
        if prompts is not None and prompts.any():
            self.seen.append(prompts.copy())
            previous = prompts[:, 4:6]
            labels = np.where(previous.any(axis=1), previous.argmax(axis=1) + 1, 0)
            for k in (1, 2):
                labels[prompts[:, 2 * (k - 1)] > 0] = k
                labels[(prompts[:, 2 * (k - 1) + 1] > 0) & (labels == k)] = 0
        probabilities = np.full((n, 3, *spatial), 0.05, dtype=np.float32)
        np.put_along_axis(probabilities, labels[:, None], 0.9, axis=1)
        return probabilities, None


def case() -> Volume:
    image = np.zeros((10, 40, 40), dtype=np.float32)
    image[:, 5:15, 5:15] = 1.0  # class 1 for the automatic model
    return Volume(image, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))


def test_the_network_answers_when_asked_and_auto_takes_the_engine_measured_best():
    assert open_session(case(), ExactPromptModel(), engine="network").engine == "network"
    assert open_session(case(), ExactPromptModel()).engine == "local"  # auto: engine (a) measured better
    assert open_session(case(), ExactPromptModel(), engine="local").engine == "local"
    assert open_session(case(), ExactPromptModel(prompts=False)).engine == "local"
    with pytest.raises(UsageError, match="engine 'network' needs a model with prompt channels"):
        _ = open_session(case(), ExactPromptModel(prompts=False), engine="network").engine
    with pytest.raises(UsageError, match="engine must be one of"):
        open_session(case(), ExactPromptModel(), engine="graph")
    with pytest.raises(UsageError, match="has no prompt channels"):
        NetworkRefiner(ExactPromptModel(prompts=False))


def test_a_click_is_answered_by_the_network_inside_its_box_only_and_undo_takes_it_back():
    model = ExactPromptModel()
    session = open_session(case(), model, engine="network")
    session.predict()
    before = session.labels.copy()
    assert (before[:, 5:15, 5:15] == 1).all() and before.sum() == 10 * 100

    update = session.add_prompt(point(5, 20, 20, label=2))

    assert update.engine == "network" and update.changed == 7  # a 1 mm disk: the voxel and its 6 neighbours
    after = session.labels
    assert after[5, 20, 20] == 2 and (after[4:7, 19:22, 19:22] == 2).sum() == 7
    assert np.array_equal(after[after != 2], before[after != 2])  # the rest kept: previous segmentation fed
    assert update.box == (slice(4, 7), slice(19, 22), slice(19, 22))
    assert all(set(np.unique(p)) <= {0.0, 1.0} for p in model.seen)  # prompt channels are never normalised
    # the labels as they stand (the class-1 square, inside the region) reached the previous segmentation
    assert any(p[:, 4].sum() > 0 for p in model.seen)

    session.undo()
    assert np.array_equal(session.labels, before) and not session.prompts


def test_every_earlier_prompt_is_fed_again_and_a_rerun_replays_them():
    model = ExactPromptModel()
    session = open_session(case(), model, engine="network")
    session.predict()
    session.add_prompt(point(5, 20, 20, label=2))
    first = len(model.seen)
    session.add_prompt(point(5, 14, 14, label=1, positive=False))  # inside the class-1 square
    assert session.labels[5, 14, 14] == 0 and session.labels[5, 20, 20] == 2
    second = np.concatenate(model.seen[first:])
    assert second[:, 1].any() and second[:, 2].any()  # the earlier click is in the second answer's input too
    session.predict()
    assert session.labels[5, 14, 14] == 0 and session.labels[5, 20, 20] == 2


def test_a_box_prompt_goes_to_the_local_engine():
    session = open_session(case(), ExactPromptModel(), engine="network")
    session.predict()
    assert session.add_prompt(box((3, 25, 25), (6, 35, 35), label=2)).engine == "local"


def test_keep_connected_writes_only_the_changes_that_touch_the_prompt():
    from napari_medcl.network_refiner import _connected_changes

    old = np.zeros((3, 10, 10), dtype=np.uint8)
    new = old.copy()
    new[1, 2:5, 2:5] = 2  # the click's region
    new[1, 8, 8] = 1  # a far disagreement with the labels
    box = (slice(10, 13), slice(20, 30), slice(20, 30))
    kept = _connected_changes(new, old, point(11, 23, 23, label=2), box)
    assert (kept[1, 2:5, 2:5] == 2).all() and kept[1, 8, 8] == 0
    assert not _connected_changes(new, old, point(10, 20, 20, label=2), box).any()
    with pytest.raises(ValueError, match="keep must be one of"):
        NetworkRefiner(ExactPromptModel(), keep="all")


class RegionalPromptModel(ExactPromptModel):
    """One window holds the whole case. With prompts it labels the window's first voxel class 2 whatever was
    clicked (a window's own disagreement with the stitched labels), and answers a positive class-2 click at
    the window's last voxel too, away from the click (a regional answer)."""

    def __init__(self):
        super().__init__()
        self.spec = dataclasses.replace(self.spec, patch_size=(10, 40, 40))

    def run(self, batch, prompts=None):
        probabilities, maps = super().run(batch, prompts)
        if prompts is not None:
            probabilities[:, :, 0, 0, 0] = (0.05, 0.05, 0.9)
            if prompts[:, 2].any():
                probabilities[:, :, -1, -1, -1] = (0.05, 0.05, 0.9)
        return probabilities, maps


@pytest.mark.parametrize(
    "keep, window_edge, far_answer",
    [("box", True, True), ("caused", False, True), ("connected", False, False)],
)
def test_keep_chooses_what_of_the_answer_is_written(keep, window_edge, far_answer):
    session = open_session(
        case(), RegionalPromptModel(), engine="network", network_options={"keep": keep, "margin_mm": 40.0}
    )
    session.predict()
    assert session.labels[0, 0, 0] == 0 and session.labels[9, 39, 39] == 0
    session.add_prompt(point(5, 20, 20, label=2))
    labels = session.labels
    assert labels[5, 20, 20] == 2
    # "caused" leaves out what the window says with and without the click alike; "connected" what is away
    assert bool(labels[0, 0, 0] == 2) is window_edge
    assert bool(labels[9, 39, 39] == 2) is far_answer


class DeafPromptModel(ExactPromptModel):
    """Ignores the click maps: answers with the previous segmentation alone."""

    def run(self, batch, prompts=None):
        if prompts is not None:
            prompts = prompts.copy()
            prompts[:, :4] = 0
        return super().run(batch, prompts)


def test_the_clicked_voxels_are_hard_seeds_even_when_the_network_ignores_the_click():
    session = open_session(case(), DeafPromptModel(), engine="network")
    session.predict()
    before = session.labels.copy()
    update = session.add_prompt(point(5, 30, 30, label=2))
    assert update.changed == 1 and session.labels[5, 30, 30] == 2
    session.add_prompt(point(5, 10, 10, label=1, positive=False))
    assert session.labels[5, 10, 10] in (0, 2)  # the likeliest other class
    changed = session.labels != before
    assert changed.sum() == 2 and changed[5, 30, 30] and changed[5, 10, 10]
