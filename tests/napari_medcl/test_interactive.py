"""The interactive session: prompts refine a local box, undo, re-run replays, where to look next, saved prompts.

The model is ``pointwise_model`` (label 1 where the intensity exceeds 0.5), so its mistakes are planted by
the image: a blob at 0.45 that the truth calls class 1 (the model misses it), a blob at 0.56 that the truth
calls background (the model labels it), and a bright blob at 0.9 that both call class 1.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_medcl.errors import InputError, UsageError
from napari_medcl.interactive import open_session
from napari_medcl.onnx_session import load_model
from napari_medcl.prompts import Prompt, box, load_prompts, point, prompts_path, save_prompts, scribble
from napari_medcl.volume import Volume
from tests.onnx_models import pointwise_model, save

MISSED, EXTRA, RIGHT = (
    (slice(4, 9), slice(4, 10), slice(4, 10)),
    (slice(4, 9), slice(20, 26), slice(4, 10)),
    (
        slice(4, 9),
        slice(4, 10),
        slice(22, 28),
    ),
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("interactive-model")
    return load_model(
        save(pointwise_model(patch=(8, 8, 8), maps=()), folder / "pointwise.onnx"), device="cpu"
    )


def planted_case(spatial_dims: int = 3) -> tuple[Volume, np.ndarray]:
    image = np.full((12, 32, 32), 0.2, dtype=np.float32)
    truth = np.zeros(image.shape, dtype=np.uint8)
    image[MISSED], truth[MISSED] = 0.45, 1
    image[EXTRA] = 0.56
    image[RIGHT], truth[RIGHT] = 0.9, 1
    if spatial_dims == 2:
        return Volume(image[6], (1.0, 1.0), (0.0, 0.0), np.eye(2)), truth[6]
    return Volume(image, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)), truth


def test_a_positive_click_in_a_missed_region_labels_that_region_and_nothing_else(model):
    volume, truth = planted_case()
    session = open_session(volume, model)
    session.predict()
    before = session.labels.copy()
    assert not before[MISSED].any()

    update = session.add_prompt(point(6, 7, 7, label=1))

    after = session.labels
    assert (after[MISSED] == 1).all()
    changed = after != before
    assert changed.sum() == update.changed == before[MISSED].size
    assert np.array_equal(changed[update.box], np.ones_like(changed[update.box]))  # the box is tight
    assert after[update.box].tolist() == update.labels.tolist()


def test_a_negative_click_removes_the_label_there_and_nowhere_else(model):
    volume, truth = planted_case()
    session = open_session(volume, model)
    session.predict()
    assert (session.labels[EXTRA] == 1).all() and (session.labels[RIGHT] == 1).all()

    session.add_prompt(point(6, 22, 6, label=1, positive=False))

    assert not session.labels[EXTRA].any()
    assert (session.labels[RIGHT] == 1).all()
    expected = np.asarray(session.prediction.labels.array).copy()
    expected[EXTRA] = 0
    assert np.array_equal(session.labels, expected)


def test_undo_takes_back_one_prompt_at_a_time(model):
    volume, _ = planted_case()
    session = open_session(volume, model)
    session.predict()
    original = session.labels.copy()
    session.add_prompt(point(6, 7, 7, label=1))
    after_one = session.labels.copy()
    session.add_prompt(point(6, 22, 6, label=1, positive=False))
    assert len(session.prompts) == 2

    session.undo()
    assert np.array_equal(session.labels, after_one) and len(session.prompts) == 1
    session.undo()
    assert np.array_equal(session.labels, original) and session.prompts == []
    assert session.undo().changed == 0


def test_a_prompt_that_changes_nothing_is_still_one_step(model):
    volume, _ = planted_case()
    session = open_session(volume, model)
    session.predict()
    update = session.add_prompt(point(6, 7, 24, label=1))  # the bright blob: already class 1
    assert update.changed == 0 and update.box is None and len(session.prompts) == 1
    session.undo()
    assert session.prompts == []


def test_a_rerun_replays_the_prompts(model):
    volume, _ = planted_case()
    session = open_session(volume, model)
    session.predict()
    session.add_prompt(point(6, 7, 7, label=1))
    corrected = session.labels.copy()
    session.predict()
    assert np.array_equal(session.labels, corrected)
    assert not np.asarray(session.prediction.labels.array)[MISSED].any()  # the model's own output is kept


def test_user_edits_are_one_step_and_survive_a_prompt_elsewhere(model):
    volume, _ = planted_case()
    session = open_session(volume, model)
    session.predict()
    edited = session.labels.copy()
    edited[0, 0, 0] = 1
    session.set_labels(edited)
    session.add_prompt(point(6, 7, 7, label=1))
    assert session.labels[0, 0, 0] == 1
    session.undo()
    session.undo()
    assert session.labels[0, 0, 0] == 0


def test_where_to_look_next_moves_on_once_a_region_is_prompted(model):
    volume, _ = planted_case()
    session = open_session(volume, model)
    session.predict()
    first = session.next_region()
    centre = tuple(int(round(c)) for c in first.center)
    assert all(s.start <= c < s.stop for c, s in zip(centre, MISSED))  # the most expected mistakes
    assert first.score == pytest.approx(float(session._error[first.box].sum()), rel=1e-5)
    session.add_prompt(point(*centre, label=1))
    second = session.next_region()
    touched = session._box_for(session.prompts[0])
    second_centre = tuple(int(round(c)) for c in second.center)
    assert not all(s.start <= c < s.stop for c, s in zip(second_centre, touched))
    assert all(s.start <= c < s.stop for c, s in zip(second_centre, EXTRA))


def test_a_2d_image_is_a_depth_one_case(model, tmp_path):
    model_2d = load_model(
        save(pointwise_model(spatial_dims=2, patch=(16, 16), maps=()), tmp_path / "p2.onnx"), device="cpu"
    )
    volume, _ = planted_case(spatial_dims=2)
    session = open_session(volume, model_2d)
    session.predict()
    assert session.labels.shape == (32, 32)
    update = session.add_prompt(point(0, 7, 7, label=1))
    assert (session.labels[4:10, 4:10] == 1).all()
    assert update.image_box(2) == update.box[1:]


def test_a_box_prompt_keeps_its_class_inside_the_box(model):
    volume, _ = planted_case()
    session = open_session(volume, model)
    session.predict()
    session.add_prompt(box((4, 4, 4), (8, 9, 9), label=1))
    assert (session.labels[MISSED] == 1).all()


def test_a_scribble_acts_like_its_clicks(model):
    volume, _ = planted_case()
    session = open_session(volume, model)
    session.predict()
    session.add_prompt(scribble([(6, 5, 5), (6, 6, 6), (6, 7, 7)], label=1))
    assert (session.labels[MISSED] == 1).all()


def test_prompts_are_checked(model):
    volume, _ = planted_case()
    session = open_session(volume, model)
    with pytest.raises(UsageError, match="run the model"):
        session.add_prompt(point(1, 1, 1, label=1))
    session.predict()
    with pytest.raises(UsageError, match="outside the image"):
        session.add_prompt(point(40, 1, 1, label=1))
    with pytest.raises(UsageError, match="not one of the model's classes"):
        session.add_prompt(point(1, 1, 1, label=5))
    with pytest.raises(UsageError, match="cannot be negative"):
        Prompt("box", 1, np.array([[0, 0, 0], [1, 1, 1]]), positive=False)
    with pytest.raises(UsageError, match=r"\(N, 3\)"):
        Prompt("scribble", 1, np.zeros((3, 2)))
    with pytest.raises(UsageError, match="kind"):
        Prompt("lasso", 1, np.zeros((1, 3)))


def test_prompts_saved_beside_the_labels_reopen_the_case(model, tmp_path):
    volume, _ = planted_case()
    session = open_session(volume, model)
    session.predict()
    session.add_prompt(point(6, 7, 7, label=1))
    session.add_prompt(point(6, 22, 6, label=1, positive=False))
    labels_file = tmp_path / "case.nii.gz"
    written = session.save_prompts(labels_file)
    assert written == tmp_path / "case.prompts.json" == prompts_path(labels_file)

    reopened = open_session(volume, model)
    reopened.predict()
    assert reopened.load_prompts(labels_file) == 2
    assert np.array_equal(reopened.labels, session.labels)
    assert [p.to_dict() for p in reopened.prompts] == [p.to_dict() for p in session.prompts]


def test_a_prompts_file_for_another_image_is_refused(tmp_path):
    path = save_prompts(tmp_path / "a.prompts.json", [point(0, 1, 2, label=1)], shape=(1, 8, 8))
    assert load_prompts(path, shape=(1, 8, 8))[0].voxels.tolist() == [[0, 1, 2]]
    with pytest.raises(InputError, match="shape"):
        load_prompts(path, shape=(1, 9, 9))
    (tmp_path / "bad.prompts.json").write_text("{}")
    with pytest.raises(InputError, match="not a prompts file"):
        load_prompts(tmp_path / "bad.prompts.json")
