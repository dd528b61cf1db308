import json

import numpy as np
import pytest

from napari_medcl.io import read_image
from training.data.builders import build_dataset
from training.data.builders.cli import main as data_main
from training.data.builders.mni152 import axial_blocks, tissue_labels


def test_tissue_labels_follow_the_largest_probability_inside_the_brain():
    t1 = np.array([0.0, 0.5, 0.5, 0.5, 0.5])
    gm = np.array([0.9, 0.1, 0.6, 0.3, 0.0])
    wm = np.array([0.1, 0.1, 0.3, 0.6, 0.0])
    # csf = 1 - gm - wm = [0, 0.8, 0.1, 0.1, 1.0]; voxel 0 is outside the brain (T1 = 0)
    np.testing.assert_array_equal(tissue_labels(t1, gm, wm), [0, 1, 2, 3, 1])


def test_axial_blocks_leave_gaps_and_cover_the_extent():
    mask = np.zeros((40, 2, 2), bool)
    mask[3:37] = True
    blocks = axial_blocks(mask, 3, 4)
    assert blocks[0][0] == 3 and blocks[-1][1] == 37
    assert all(b[0] - a[1] == 4 for a, b in zip(blocks, blocks[1:]))
    with pytest.raises(ValueError, match="do not fit"):
        axial_blocks(mask, 10, 4)


def test_mni152_tissue_builds_held_out_blocks_with_geometry(tmp_path):
    out = build_dataset("mni152-tissue", tmp_path / "mni", n_blocks=3, gap_mm=6.0, downsample=2)
    dataset = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert dataset["labels"] == {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
    assert dataset["numTraining"] == 3 and (out / "LICENSE.txt").is_file()
    previous_stop = None
    for block in dataset["blocks"]:
        image = read_image(out / "imagesTr" / f"{block['case']}_0000.nii.gz")
        labels = read_image(out / "labelsTr" / f"{block['case']}.nii.gz")
        assert image.same_geometry(labels) and image.spacing == (2.0, 2.0, 2.0)
        assert set(np.unique(labels.array)) <= {0, 1, 2, 3} and (labels.array > 0).any()
        start, stop = block["slices"]
        assert labels.spatial_shape[0] == stop - start
        if previous_stop is not None:
            assert (start - previous_stop) * 2.0 >= 6.0  # no slice within 6 mm of another block
        previous_stop = stop
    with pytest.raises(FileExistsError, match="not empty"):
        build_dataset("mni152-tissue", out)


def test_medcl_data_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x", encoding="utf-8")
    assert data_main(["build", "mni152-tissue", "-o", str(tmp_path / "full")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err
    assert data_main(["list"]) == 0
    assert "pyradiomics-lesions" in capsys.readouterr().out
