"""A corrections dataset (napari_medcl.corrections) is a dataset medcl-train reads and trains on."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medcl.corrections import add_correction
from napari_medcl.volume import Volume
from tests.dataset_factory import blob_image, blob_labels
from training.cli import train_main
from training.config import load_config
from training.data import check_dataset, prepare_dataset
from training.data.layouts import discover

pytestmark = pytest.mark.torch


def test_medcl_train_trains_on_added_corrections(tmp_path, one_torch_thread):
    root = tmp_path / "corrections"
    rng = np.random.default_rng(0)
    model = {
        "name": "tiny",
        "sha256": "0" * 64,
        "classes": [{"index": i, "name": n} for i, n in enumerate(["background", "A", "B"])],
    }
    for k in range(2):
        labels = blob_labels((8, 16, 16), 3, rng)
        image = Volume(blob_image(labels, rng), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
        model_labels = labels.copy()
        model_labels[labels == 2] = 1  # the model confused B with A; the user fixed it
        add_correction(root, image, labels, model=model, model_labels=model_labels, case_id=f"scan{k}")

    layout = discover("msd", root)
    assert not layout.problems
    assert [c.case_id for c in layout.cases] == ["scan0", "scan1"]
    assert layout.class_names == ("background", "A", "B") and layout.channel_names == ("image",)

    overrides = [
        f"data.root={root}",
        "data.val_fraction=0.5",
        "data.num_workers=0",
        "data.augmentation.enabled=false",
        "model.features=[8,16]",
        "train.device=cpu",
        "train.epochs=1",
        "train.iterations_per_epoch=1",
        "train.batch_size=1",
        "train.patch_size=[8,16,16]",
        f"output.dir={tmp_path / 'run'}",
    ]
    cfg = load_config(None, overrides)
    assert any("2 case" in line for line in check_dataset(cfg.data))
    info, train_cases, val_cases = prepare_dataset(cfg.data, spatial_dims=3, seed=0)
    assert len(train_cases) + len(val_cases) == 2 and list(info.class_names) == ["background", "A", "B"]
    argv: list[str] = []
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    for item in overrides:
        argv += ["--set", item]
    assert train_main([str(config), *argv]) == 0
    assert (tmp_path / "run" / "checkpoint_last.pt").is_file()
