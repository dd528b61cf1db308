import json

import numpy as np
import pytest

from napari_medcl.spec import FORMAT_VERSION, ModelSpec, SpecError, default_classes
from napari_medcl.volume import Volume


def make_spec(**changes):
    fields = {
        "name": "toy",
        "spatial_dims": 3,
        "in_channels": 1,
        "classes": default_classes(["background", "CSF", "GM", "WM"]),
        "patch_size": (32, 48, 48),
        "divisor": (8, 16, 16),
        "spacing": (1.5, 1.0, 1.0),
        "uncertainty_maps": ("encoder1", "decoder1"),
    }
    fields.update(changes)
    return ModelSpec(**fields)


def test_json_round_trip():
    spec = make_spec(
        normalization={"kind": "ct", "clip_low": -100, "clip_high": 300, "mean": 40.0, "std": 80.0}
    )
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec
    assert again.num_classes == 4
    assert again.class_names == ["background", "CSF", "GM", "WM"]
    assert json.loads(spec.to_json())["format_version"] == FORMAT_VERSION
    assert "4D" not in spec.summary() and "3D" in spec.summary()
    older = {k: v for k, v in spec.to_dict().items() if k != "nonzero_is_foreground"}
    assert not ModelSpec.from_dict(older).nonzero_is_foreground  # specs written before the field existed
    ruled = make_spec(nonzero_is_foreground=True)
    assert ModelSpec.from_json(ruled.to_json()).nonzero_is_foreground


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"spatial_dims": 4}, "spatial_dims"),
        ({"patch_size": (32, 48)}, "patch_size"),
        ({"divisor": (0, 16, 16)}, "divisor"),
        ({"spacing": (1.0, -1.0, 1.0)}, "spacing"),
        ({"classes": default_classes(["background"])}, "at least 2 classes"),
        ({"normalization": {"kind": "minmax"}}, "normalization.kind"),
        ({"normalization": {"kind": "ct", "clip_low": 0}}, "needs"),
        ({"uncertainty_maps": ("a", "a")}, "duplicate"),
        ({"in_channels": 0}, "in_channels"),
        ({"nonzero_is_foreground": "yes"}, "nonzero_is_foreground"),
    ],
)
def test_invalid_fields_are_clear_errors(changes, message):
    with pytest.raises(SpecError, match=message):
        make_spec(**changes)


def test_newer_format_version_is_refused():
    data = make_spec().to_dict()
    data["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(SpecError, match="Update napari-medcl"):
        ModelSpec.from_dict(data)


def test_missing_fields_and_bad_json():
    with pytest.raises(SpecError, match="lacks required fields: classes"):
        ModelSpec.from_dict({k: v for k, v in make_spec().to_dict().items() if k != "classes"})
    with pytest.raises(SpecError, match="not valid JSON"):
        ModelSpec.from_json("{not json")


def test_volume_crop_keeps_physical_positions():
    rotation = np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]])
    volume = Volume(np.arange(4 * 5 * 6).reshape(4, 5, 6), (2.0, 0.5, 0.7), (10.0, -3.0, 4.0), rotation)
    cropped = volume.crop((slice(1, 3), slice(2, 5), slice(0, 6)))
    index = np.array([1, 1, 2])

    def position(vol, idx):
        return np.asarray(vol.origin) + vol.direction @ (np.asarray(vol.spacing) * idx)

    np.testing.assert_allclose(position(cropped, index), position(volume, index + [1, 2, 0]))
    assert cropped.array[tuple(index)] == volume.array[2, 3, 2]
    with pytest.raises(ValueError, match="empty or strided"):
        volume.crop((slice(3, 3), slice(None), slice(None)))


def test_per_channel_normalization_is_validated_and_applied():
    from napari_medcl.preprocess import normalize

    norm = {
        "kind": "per_channel",
        "channels": [
            {"kind": "ct", "clip_low": -100, "clip_high": 100, "mean": 0.0, "std": 100.0},
            {"kind": "zscore"},
        ],
    }
    spec = make_spec(in_channels=2, normalization=norm)
    assert ModelSpec.from_json(spec.to_json()).normalization == norm
    with pytest.raises(SpecError, match="list of 2 channel entries"):
        make_spec(in_channels=2, normalization={"kind": "per_channel", "channels": [{"kind": "zscore"}]})
    with pytest.raises(SpecError, match="needs 'clip_high'"):
        make_spec(
            in_channels=1, normalization={"kind": "per_channel", "channels": [{"kind": "ct", "clip_low": 0}]}
        )
    image = np.stack([np.full((3, 4, 5), 500.0), np.arange(60.0).reshape(3, 4, 5)])
    out = normalize(image, norm)
    np.testing.assert_allclose(out[0], 1.0)
    assert abs(out[1].mean()) < 1e-5 and abs(out[1].std() - 1) < 1e-4
