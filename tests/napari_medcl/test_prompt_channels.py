"""Prompt channels of a prompt-conditioned network: click maps where the clicks are, the previous
segmentation one-hot, and the spec's ``prompts`` entry round-tripping (napari_medcl.prompt_channels)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medcl.prompt_channels import Click, PromptEncoding
from napari_medcl.spec import ModelSpec, SpecError, default_classes

SHAPE = (9, 12, 12)


def distance_mm(at, spacing=(1.0, 1.0, 1.0), shape=SHAPE):
    grid = np.indices(shape).astype(float)
    return np.sqrt(sum(((g - a) * s) ** 2 for g, a, s in zip(grid, at, spacing)))


def test_channel_order_is_positive_negative_per_class_then_previous():
    encoding = PromptEncoding(num_classes=3)
    assert encoding.channel_names == [
        "positive:1", "negative:1", "positive:2", "negative:2", "previous:1", "previous:2",
    ]  # fmt: skip
    assert PromptEncoding(num_classes=3, previous=False).num_channels == 4


def test_a_click_is_a_disk_of_its_radius_in_its_own_channel_only():
    encoding = PromptEncoding(num_classes=3, radius_mm=2.0, shape="disk")
    channels = encoding.encode([Click(2, True, (4, 5, 6))], None, SHAPE, (1.0, 1.0, 1.0))
    assert channels.shape == (6, *SHAPE) and channels.dtype == np.float32
    expected = distance_mm((4, 5, 6)) <= 2.0
    assert np.array_equal(channels[2] == 1, expected) and np.array_equal(channels[2] > 0, expected)
    others = np.delete(channels, 2, axis=0)
    assert not others.any()


def test_the_radius_is_in_millimetres_on_an_anisotropic_grid():
    encoding = PromptEncoding(num_classes=2, radius_mm=2.0)
    channels = encoding.encode([Click(1, False, (4, 5, 6))], None, SHAPE, (3.0, 1.0, 1.0))
    negative = channels[1] > 0
    assert negative[4].sum() == (distance_mm((5, 6), shape=SHAPE[1:]) <= 2.0).sum()
    assert not negative[3].any() and not negative[5].any()  # 3 mm away: outside the disk
    assert not channels[0].any()


def test_a_gaussian_click_peaks_at_its_voxel():
    encoding = PromptEncoding(num_classes=2, radius_mm=1.5, shape="gaussian")
    plane = encoding.encode([Click(1, True, (4, 5, 6))], None, SHAPE, (1.0, 1.0, 1.0))[0]
    assert plane[4, 5, 6] == pytest.approx(1.0)
    assert np.unravel_index(plane.argmax(), plane.shape) == (4, 5, 6)
    assert plane[4, 5, 7] == pytest.approx(np.exp(-1 / (2 * 1.5**2)), rel=1e-5)
    assert plane[4, 5, 11] == 0  # 5 mm > 3 sigma


def test_background_clicks_and_the_previous_segmentation():
    encoding = PromptEncoding(num_classes=3)
    previous = np.zeros(SHAPE, dtype=np.uint8)
    previous[:2] = 1
    previous[7:] = 2
    channels = encoding.encode(
        [Click(0, True, (4, 5, 6)), Click(0, False, (1, 1, 1)), Click(1, True, (20, 0, 0))],
        previous, SHAPE, (1.0, 1.0, 1.0),
    )  # fmt: skip
    disk = distance_mm((4, 5, 6)) <= 2.0
    # "this is background": not class 1 and not class 2; "not background" and a click off the grid: nothing
    assert np.array_equal(channels[1] > 0, disk) and np.array_equal(channels[3] > 0, disk)
    assert not channels[0].any() and not channels[2].any()
    assert np.array_equal(channels[4], previous == 1) and np.array_equal(channels[5], previous == 2)


def test_encoding_errors_name_what_is_wrong():
    encoding = PromptEncoding(num_classes=2)
    with pytest.raises(ValueError, match="classes 0..1"):
        encoding.encode([Click(2, True, (0, 0, 0))], None, SHAPE, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"\(9, 12\).*\(9, 12, 12\)"):
        encoding.encode([], np.zeros((9, 12)), SHAPE, (1.0, 1.0, 1.0))


def spec(prompts):
    return ModelSpec(
        name="p", spatial_dims=3, in_channels=1, classes=default_classes(["background", "a", "b"]),
        patch_size=(8, 8, 8), divisor=(1, 1, 1), normalization={"kind": "none"}, prompts=prompts,
    )  # fmt: skip


def test_the_spec_declares_the_prompt_channels_and_round_trips():
    encoding = PromptEncoding(num_classes=3, radius_mm=3.0, shape="gaussian")
    declared = spec(encoding.to_dict())
    again = ModelSpec.from_json(declared.to_json())
    assert again == declared
    assert again.prompt_encoding == encoding
    assert again.prompts["input"] == "prompts" and len(again.prompts["channels"]) == 6
    assert "prompts" not in spec(None).to_dict() and spec(None).prompt_encoding is None


def test_a_malformed_prompts_entry_is_a_spec_error():
    good = PromptEncoding(num_classes=3).to_dict()
    with pytest.raises(SpecError, match="do not match"):
        spec({**good, "channels": good["channels"][::-1]})
    with pytest.raises(SpecError, match="version"):
        spec({**good, "version": 99})
    with pytest.raises(SpecError, match="for 2 classes, the model has 3"):
        spec(PromptEncoding(num_classes=2).to_dict())


def test_the_amplitude_scales_every_channel_and_a_first_reader_refuses_it():
    previous = np.zeros(SHAPE, dtype=np.uint8)
    previous[:2] = 2
    clicks = [Click(1, True, (4, 5, 6)), Click(2, False, (6, 6, 6))]
    plain = PromptEncoding(num_classes=3).encode(clicks, previous, SHAPE, (1.0, 1.0, 1.0))
    loud = PromptEncoding(num_classes=3, amplitude=10.0)
    assert np.array_equal(loud.encode(clicks, previous, SHAPE, (1.0, 1.0, 1.0)), 10.0 * plain)
    # written as version 2 (a reader of version 1 would feed channels of value 1), read back whole
    assert loud.to_dict()["version"] == 2 and PromptEncoding(num_classes=3).to_dict()["version"] == 1
    assert spec(loud.to_dict()).prompt_encoding == loud
    # the first prompt models' files have no amplitude: 1
    first = {k: v for k, v in PromptEncoding(num_classes=3).to_dict().items() if k != "amplitude"}
    assert spec(first).prompt_encoding.amplitude == 1.0
    with pytest.raises(SpecError, match="amplitude must be a positive number"):
        spec({**loud.to_dict(), "amplitude": 0})
