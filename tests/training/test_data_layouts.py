"""Dataset layouts (msd, folder2d, acdc) and the bad-data checks that run before anything trains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_medcl.io import read_image
from tests.dataset_factory import (
    make_acdc_dataset,
    make_folder2d_dataset,
    make_msd_dataset,
    write_volume,
)
from training.data import DataConfig, DatasetError, check_dataset, prepare_dataset
from training.data.check import read_case
from training.data.layouts import discover

# ------------------------------------------------------------------------------------------------ parsing


def test_msd_v2_layout_parses(tmp_path):
    root = make_msd_dataset(tmp_path / "ds", n_cases=3, num_classes=3, channels=2)
    layout = discover("msd", root)
    assert layout.problems == ()
    assert layout.class_names == ("background", "class1", "class2")
    assert layout.channel_names == ("MRI", "MRI1")
    assert [c.case_id for c in layout.cases] == ["case_000", "case_001", "case_002"]
    assert [p.name for p in layout.cases[1].images] == ["case_001_0000.nii.gz", "case_001_0001.nii.gz"]
    assert layout.cases[1].label.name == "case_001.nii.gz"
    summary = check_dataset(DataConfig(root=str(root), cache_dir=str(tmp_path / "cache")))
    assert "3 cases" in summary[0]
    assert "channels: 2 (MRI, MRI1)" in summary[1]
    assert "classes: 3 (background, class1, class2)" in summary[2]


def test_msd_decathlon_form_and_single_file_cases(tmp_path):
    """MSD's own dataset.json ({"0": "background"}, "modality") and images named <case>.nii.gz."""
    root = make_msd_dataset(tmp_path / "ds", n_cases=2, labels_form="msd", modality="CT")
    for path in (root / "imagesTr").iterdir():  # case_000_0000.nii.gz -> case_000.nii.gz
        path.rename(path.with_name(path.name.replace("_0000", "")))
    (root / "imagesTr" / "._case_000.nii.gz").write_bytes(b"macOS resource fork")  # ignored
    layout = discover("msd", root)
    assert layout.problems == ()
    assert layout.class_names == ("background", "class1", "class2")
    assert layout.channel_names == ("CT",)
    assert [p.name for p in layout.cases[0].images] == ["case_000.nii.gz"]
    image, label, problems = read_case(layout.cases[0], layout)
    assert problems == [] and image.array.shape == (1, 12, 20, 18) and label.dtype == np.uint8


@pytest.mark.parametrize(
    ("mask_style", "rgb", "num_classes", "image_ext", "suffix"),
    [
        ("0/255", True, 2, ".png", "_segmentation"),
        ("0/255", True, 2, ".jpg", "_Segmentation"),  # ISIC 2016 spells it with a capital S
        ("ids", False, 3, ".png", ""),  # same-stem masks with class ids, gray images
    ],
)
def test_folder2d_layout_parses(tmp_path, mask_style, rgb, num_classes, image_ext, suffix):
    root = make_folder2d_dataset(
        tmp_path / "isic",
        n_cases=3,
        rgb=rgb,
        mask_style=mask_style,
        num_classes=num_classes,
        image_ext=image_ext,
        mask_suffix=suffix,
    )
    layout = discover("folder2d", root)
    assert layout.problems == ()
    assert [c.case_id for c in layout.cases] == ["img_000", "img_001", "img_002"]
    image, label, problems = read_case(layout.cases[0], layout)
    assert problems == []
    assert image.array.shape == ((3,) if rgb else (1,)) + (40, 48)
    assert set(np.unique(label)) == set(range(num_classes))  # 255 became 1
    lines = check_dataset(DataConfig(root=str(root), layout="folder2d", cache_dir=str(tmp_path / "c")))
    assert f"channels: {3 if rgb else 1}" in lines[1]
    expected = "background, foreground" if num_classes == 2 else "background, class1, class2"
    assert f"classes: {num_classes} ({expected})" in lines[2]


def test_folder2d_ignores_picture_dpi(tmp_path):
    """ITK reads a JPEG's 72 dpi as 0.35 mm spacing and a PNG mask as 1.0: pixels still match pixels."""
    from PIL import Image

    root = make_folder2d_dataset(tmp_path / "isic", n_cases=2)
    for path in sorted((root / "images").iterdir()):
        rgb = np.moveaxis(read_image(path).array, 0, -1)
        Image.fromarray(rgb).save(path.with_suffix(".jpg"), dpi=(72, 72), quality=95)
        path.unlink()
    assert read_image(root / "images" / "img_000.jpg").spacing[0] == pytest.approx(25.4 / 72)
    cfg = DataConfig(root=str(root), layout="folder2d", val_fraction=0.5, cache_dir=str(tmp_path / "c"))
    info, train, val = prepare_dataset(cfg, spatial_dims=2, seed=0)
    assert info.spacing is None  # no resampling at inference either, whatever the file's DPI
    assert train[0].image.shape == (3, 40, 48) and train[0].spacing == (1.0, 1.0)


def test_folder2d_dataset_json_names_classes(tmp_path):
    root = make_folder2d_dataset(tmp_path / "d", n_cases=2, mask_style="ids", num_classes=3, rgb=False)
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "nevus": 1, "melanoma": 2}}))
    assert discover("folder2d", root).class_names == ("background", "nevus", "melanoma")


@pytest.mark.parametrize("nested", [False, True])
def test_acdc_layout_parses(tmp_path, nested):
    base = tmp_path / "ACDC" / "training" if nested else tmp_path / "ACDC"
    make_acdc_dataset(base, n_patients=2, frames=(1, 12))
    layout = discover("acdc", tmp_path / "ACDC")
    assert layout.problems == ()
    assert layout.class_names == ("background", "RV", "MYO", "LV")
    assert layout.channel_names == ("MRI",)
    ids = [c.case_id for c in layout.cases]
    assert ids == ["patient001_frame01", "patient001_frame12", "patient002_frame01", "patient002_frame12"]
    assert [c.subject for c in layout.cases] == ["patient001", "patient001", "patient002", "patient002"]
    assert layout.cases[0].label.name == "patient001_frame01_gt.nii.gz"


# ------------------------------------------------------------------------------------------------ bad data


def _msd(tmp_path: Path, **kwargs) -> Path:
    return make_msd_dataset(tmp_path / "ds", n_cases=3, shape=(6, 10, 9), spacing=(2.0, 1.0, 1.0), **kwargs)


def _label(root: Path, case: str = "case_001") -> Path:
    return root / "labelsTr" / f"{case}.nii.gz"


def _rewrite_label(root: Path, case: str = "case_001", array=None, **geometry) -> None:
    old = read_image(_label(root, case))
    write_volume(
        _label(root, case),
        old.array if array is None else array,
        spacing=geometry.get("spacing", old.spacing),
        origin=geometry.get("origin", old.origin),
        direction=geometry.get("direction", old.direction),
    )


def _break_size(root):
    _rewrite_label(root, array=np.zeros((6, 10, 8), np.uint8))


def _break_spacing(root):
    _rewrite_label(root, spacing=(2.0, 1.0, 1.1))


def _break_origin(root):
    _rewrite_label(root, origin=(0.0, 0.0, 0.5))


def _break_direction(root):
    _rewrite_label(root, direction=np.diag([1.0, -1.0, 1.0]))


def _missing_label(root):
    _label(root).unlink()


def _label_without_image(root):
    shutil.copy(_label(root), _label(root, "case_999"))


def _unexpected_value(root):
    array = read_image(_label(root)).array.copy()
    array[0, 0, 0] = 7
    _rewrite_label(root, array=array)


def _fractional_float_label(root):
    array = read_image(_label(root)).array.astype(np.float32)
    array[array == 1] = 0.999
    _rewrite_label(root, array=array)


def _unreadable(root):
    (root / "imagesTr" / "case_001_0000.nii.gz").write_bytes(b"this is not a NIfTI file at all" * 10)


def _nan_image(root):
    path = root / "imagesTr" / "case_001_0000.nii.gz"
    volume = read_image(path)
    array = volume.array.copy()
    array[1, 1, 1] = np.nan
    write_volume(path, array, spacing=volume.spacing)


def _duplicate_id(root):
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    del meta["file_ending"]  # without it every supported extension is a candidate
    (root / "dataset.json").write_text(json.dumps(meta))
    path = root / "imagesTr" / "case_001_0000.nii.gz"
    write_volume(path.with_name("case_001_0000.nii"), read_image(path).array, spacing=(2.0, 1.0, 1.0))


def _missing_channel_file(root):
    (root / "imagesTr" / "case_001_0001.nii.gz").unlink()


@pytest.mark.parametrize(
    ("breaker", "words", "channels"),
    [
        (_break_size, ["case case_001", "size [6, 10, 8]"], 1),
        (_break_spacing, ["case case_001", "spacing"], 1),
        (_break_origin, ["case case_001", "origin"], 1),
        (_break_direction, ["case case_001", "direction"], 1),
        (_missing_label, ["case case_001", "missing label"], 1),
        (_label_without_image, ["case case_999", "has no image"], 1),
        (_unexpected_value, ["case case_001", "[7]", "not in the dataset's labels 0..2"], 1),
        (_fractional_float_label, ["case case_001", "not integers", "0.999"], 1),
        (_unreadable, ["case case_001", "unreadable", "case_001_0000.nii.gz"], 1),
        (_nan_image, ["case case_001", "NaN"], 1),
        (_duplicate_id, ["case case_001", "duplicate case id"], 1),
        (_missing_channel_file, ["case case_001", "has 1 channel file(s), dataset.json lists 2"], 2),
    ],
    ids=lambda v: v.__name__ if callable(v) else None,
)
def test_bad_msd_case_is_named(tmp_path, breaker, words, channels):
    root = _msd(tmp_path, channels=channels)
    breaker(root)
    cfg = DataConfig(root=str(root), num_folds=2, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DatasetError) as info:
        check_dataset(cfg)
    message = str(info.value)
    for word in words:
        assert word in message
    assert len(info.value.problems) == 1, message
    with pytest.raises(DatasetError) as again:  # training refuses with the same message, before preprocessing
        prepare_dataset(cfg, spatial_dims=3, seed=0)
    assert str(again.value) == message
    assert not (tmp_path / "cache" / "preprocessed").exists()


def test_integer_valued_float_labels_are_fine(tmp_path):
    root = _msd(tmp_path)
    _rewrite_label(root, array=read_image(_label(root)).array.astype(np.float32))
    check_dataset(DataConfig(root=str(root), cache_dir=str(tmp_path / "c")))


def test_every_problem_is_listed_at_once(tmp_path):
    root = _msd(tmp_path)
    _break_size(root)
    _label(root, "case_002").unlink()
    (root / "imagesTr" / "case_000_0000.nii.gz").write_bytes(b"garbage" * 20)
    with pytest.raises(DatasetError) as info:
        check_dataset(DataConfig(root=str(root), cache_dir=str(tmp_path / "c")))
    lines = str(info.value).splitlines()
    assert lines[0].endswith("3 problems in the dataset")
    assert [line.split(":")[0].strip(" -") for line in lines[1:]] == [
        "case case_002",  # the listing's problems come first
        "case case_000",
        "case case_001",
    ]


def test_channel_count_differing_between_cases(tmp_path):
    root = make_folder2d_dataset(tmp_path / "isic", n_cases=3)
    gray = read_image(root / "images" / "img_001.png").array[0]
    write_volume(root / "images" / "img_001.png", gray)
    with pytest.raises(DatasetError, match=r"case img_001: has 1 channel\(s\), most cases have 3"):
        check_dataset(DataConfig(root=str(root), layout="folder2d", cache_dir=str(tmp_path / "c")))


def test_255_in_a_mask_that_is_not_binary(tmp_path):
    root = make_folder2d_dataset(tmp_path / "isic", n_cases=2)
    mask = read_image(root / "masks" / "img_001_segmentation.png").array.copy()
    mask[:3, :3] = 128  # a JPEG-like grey level next to 0/255
    write_volume(root / "masks" / "img_001_segmentation.png", mask)
    with pytest.raises(DatasetError, match=r"case img_001: .* 255 in a mask that is not 0/255 binary"):
        check_dataset(DataConfig(root=str(root), layout="folder2d", cache_dir=str(tmp_path / "c")))


def test_mask_without_image_and_image_without_mask(tmp_path):
    root = make_folder2d_dataset(tmp_path / "isic", n_cases=3)
    (root / "images" / "img_000.png").unlink()
    (root / "masks" / "img_002_segmentation.png").unlink()
    with pytest.raises(DatasetError) as info:
        check_dataset(DataConfig(root=str(root), layout="folder2d", cache_dir=str(tmp_path / "c")))
    assert "case img_002: missing label" in str(info.value)
    assert "case img_000: mask img_000_segmentation.png has no image" in str(info.value)


def test_acdc_frame_without_gt(tmp_path):
    root = make_acdc_dataset(tmp_path / "acdc", n_patients=2, shape=(3, 12, 10))
    (root / "patient002" / "patient002_frame12_gt.nii.gz").unlink()
    with pytest.raises(DatasetError, match="case patient002_frame12: missing label"):
        check_dataset(DataConfig(root=str(root), layout="acdc", cache_dir=str(tmp_path / "c")))


@pytest.mark.parametrize(
    ("setup", "pattern"),
    [
        (lambda r: (r / "imagesTr").mkdir(parents=True), "dataset.json: not found"),
        (lambda r: _empty_msd(r), "no cases found"),
        (lambda r: _empty_msd(r, labels={"background": 0, "a": 1, "b": 3}), r"0..K-1 .* got \[0, 1, 3\]"),
        (lambda r: _empty_msd(r, labels={"background": 0, "tumour": [1, 2]}), "region-based labels"),
        (lambda r: (r / "dataset.json").write_text("{not json"), "not valid JSON"),
    ],
)
def test_dataset_level_problems(tmp_path, setup, pattern):
    root = tmp_path / "ds"
    root.mkdir()
    setup(root)
    with pytest.raises(DatasetError, match=pattern):
        check_dataset(DataConfig(root=str(root), cache_dir=str(tmp_path / "c")))


def _empty_msd(root: Path, labels=None) -> None:
    for name in ("imagesTr", "labelsTr"):
        (root / name).mkdir(parents=True, exist_ok=True)
    meta = {"labels": labels or {"background": 0, "a": 1}, "channel_names": {"0": "MRI"}}
    (root / "dataset.json").write_text(json.dumps(meta))


def test_missing_root_and_all_background(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        check_dataset(DataConfig(root=str(tmp_path / "nowhere")))
    with pytest.raises(DatasetError, match="data.root is empty"):
        check_dataset(DataConfig())
    root = _msd(tmp_path)
    for case in ("case_000", "case_001", "case_002"):
        _rewrite_label(root, case, array=np.zeros((6, 10, 9), np.uint8))
    with pytest.raises(DatasetError, match="no case has any foreground label"):
        check_dataset(DataConfig(root=str(root), cache_dir=str(tmp_path / "c")))


def test_2d_dataset_refuses_a_3d_model(tmp_path):
    root = make_folder2d_dataset(tmp_path / "isic", n_cases=2)
    with pytest.raises(DatasetError, match="set model.spatial_dims: 2"):
        prepare_dataset(
            DataConfig(root=str(root), layout="folder2d", val_fraction=0.5, cache_dir=str(tmp_path / "c")),
            spatial_dims=3,
            seed=0,
        )


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="layout must be one of"):
        DataConfig(layout="nnunet")
    with pytest.raises(ValueError, match="fraction"):
        DataConfig(fraction=0.0)
    with pytest.raises(ValueError, match="fold must be in 0..4"):
        DataConfig(fold=5)
    with pytest.raises(ValueError, match="target_spacing"):
        DataConfig(target_spacing="mean")
    assert DataConfig(target_spacing=[1, 2]).target_spacing == (1.0, 2.0)
