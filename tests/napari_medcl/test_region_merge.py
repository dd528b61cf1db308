"""Region runs write only their region, and keep the user's edits unless told to overwrite them."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medcl.region_merge import (
    count_edits,
    describe_box,
    merged_map,
    plan_labels_write,
    record_model_write,
    region_box,
)
from napari_medcl.volume import Volume


def apply(current: np.ndarray, write) -> np.ndarray:
    out = current.copy()
    out[write.indices] = write.values
    return out


def test_region_box_of_a_slice_a_box_and_the_whole_image():
    volume = Volume(array=np.zeros((5, 6, 7)), spacing=(1, 1, 1), origin=(0, 0, 0), direction=np.eye(3))
    assert region_box(None, volume) == (slice(0, 5), slice(0, 6), slice(0, 7))
    assert region_box(("slice", 0, 3), volume) == (slice(3, 4), slice(0, 6), slice(0, 7))
    assert region_box(((1, 3), (0, 6), (2, 5)), volume) == (slice(1, 3), slice(0, 6), slice(2, 5))
    assert describe_box((slice(3, 4), slice(0, 6), slice(2, 5)), (5, 6, 7)) == (
        "z 3 (1 of 5), y all 6, x 2-4 (3 of 7)"
    )


def test_outside_the_region_nothing_changes_and_edits_inside_are_kept():
    model = np.zeros((4, 5, 5), np.uint8)
    model[:, 1:4, 1:4] = 1
    current = model.copy()
    current[1, 0, 0] = 3  # an edit outside the region
    current[2, 2, 2] = 2  # an edit inside the region
    new = np.full_like(model, 0)
    new[2] = 1  # the run's region is slice 2; the rest of its output is background
    box = (slice(2, 3), slice(0, 5), slice(0, 5))

    assert count_edits(current, model, box) == 1
    write = plan_labels_write(current, model, new, box, keep_edits=True)
    result = apply(current, write)
    np.testing.assert_array_equal(result[:2], current[:2])
    np.testing.assert_array_equal(result[3:], current[3:])
    assert result[2, 2, 2] == 2 and write.kept_edits == 1 and write.overwritten_edits == 0
    expected = np.ones((5, 5), np.uint8)
    expected[2, 2] = 2
    np.testing.assert_array_equal(result[2], expected)

    write = plan_labels_write(current, model, new, box, keep_edits=False)
    result = apply(current, write)
    assert result[2, 2, 2] == 1 and write.overwritten_edits == 1 and write.kept_edits == 0
    assert result[1, 0, 0] == 3  # outside the region even "overwrite" keeps edits


def test_without_a_model_output_nothing_counts_as_an_edit():
    current = np.arange(8, dtype=np.uint8).reshape(2, 4)
    new = np.zeros_like(current)
    box = (slice(0, 2), slice(0, 4))
    assert count_edits(current, None, box) == 0
    write = plan_labels_write(current, None, new, box)
    np.testing.assert_array_equal(apply(current, write), new)
    assert write.changed == 7  # the voxel that already was 0 is not rewritten


def test_record_model_write_updates_only_the_region():
    written = np.zeros((3, 3), np.uint8)
    new = np.full((3, 3), 2, np.uint8)
    out = record_model_write(written, new, (slice(1, 2), slice(0, 3)))
    assert out is written and out.sum() == 6
    fresh = record_model_write(None, new, (slice(0, 1), slice(0, 3)))
    np.testing.assert_array_equal(fresh, new) and fresh is not new


def test_merged_map_and_shape_errors():
    current = np.zeros((2, 3), np.float32)
    new = np.ones((2, 3), np.float32)
    merged = merged_map(current, new, (slice(0, 1), slice(0, 3)))
    np.testing.assert_array_equal(merged, [[1, 1, 1], [0, 0, 0]])
    assert current.sum() == 0
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        merged_map(current, np.ones((3, 2)), (slice(0, 1),))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 2\)"):
        count_edits(current, np.zeros((2, 2)), (slice(0, 1),))
