"""The forgetting guard (init.replay): where the original data are found, replay patches really make up the
set share of every batch the training loop sees, and a fine-tuning run reports Dice on the original
validation cases before and after (summary.json), also with no held-out corrected case (data.val_cases: [])."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.dataset_factory import make_msd_dataset
from training.cli import train_main
from training.config import load_config
from training.data.preprocessing import PreparedCase
from training.errors import RunError
from training.replay import find_replay_root, is_replay_index

pytestmark = pytest.mark.torch

FAST = [
    "data.num_workers=0",
    "data.augmentation.enabled=false",
    "data.crop_nonzero=false",
    "train.device=cpu",
    "train.iterations_per_epoch=1",
    "train.batch_size=1",
    "train.patch_size=[8,16,16]",
    "model.features=[8,16,32]",
]


def dataset_at(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "dataset.json").write_text("{}")
    return root


def test_auto_finds_a_bundled_models_training_data_where_medcl_data_puts_it(tmp_path):
    cwd, checkout = tmp_path / "cwd", tmp_path / "checkout"
    cwd.mkdir()
    found, line = find_replay_root(
        "auto", "brain-tissue-3d", "data/mni152-tissue", cwd=cwd, checkout=checkout
    )
    assert found is None and "medcl-data build mni152-tissue -o data/mni152-tissue" in line
    in_checkout = dataset_at(checkout / "data" / "mni152-tissue")
    assert find_replay_root("auto", "brain-tissue-3d", "data/mni152-tissue", cwd=cwd, checkout=checkout)[
        0
    ] == (in_checkout)
    in_cwd = dataset_at(cwd / "data" / "mni152-tissue")  # the working folder comes first
    assert (
        find_replay_root("auto", "brain-tissue-3d", "data/mni152-tissue", cwd=cwd, checkout=checkout)[0]
        == in_cwd
    )
    # auto is for bundled models only; a checkpoint file needs init.replay named
    found, line = find_replay_root(
        "auto", str(tmp_path / "c.pt"), "data/mni152-tissue", cwd=cwd, checkout=checkout
    )
    assert found is None and "set init.replay" in line
    assert find_replay_root(None, "brain-tissue-3d", "data/mni152-tissue", cwd=cwd)[0] is None
    assert find_replay_root(str(in_cwd), str(tmp_path / "c.pt"), None)[0] == in_cwd
    with pytest.raises(RunError, match="no dataset there"):
        find_replay_root(str(tmp_path / "nowhere"), "brain-tissue-3d", None)


def case(case_id: str, value: float) -> PreparedCase:
    """A case whose every voxel has intensity ``value``: a patch tells where it came from."""
    label = np.zeros((8, 16, 16), np.uint8)
    label[2:6, 4:12, 4:12] = 1
    return PreparedCase(case_id, np.full((1, 8, 16, 16), value, np.float32), label, (1.0, 1.0, 1.0), {})


@pytest.mark.parametrize(("fraction", "batch", "per_batch"), [(0.5, 4, 2), (0.25, 4, 1), (0.75, 4, 3)])
def test_every_batch_of_the_training_loop_holds_the_set_share_of_replay_patches(fraction, batch, per_batch):
    from training.loop import _epoch_loader
    from training.runtime import DistInfo

    cfg = load_config(None, [*FAST, f"train.batch_size={batch}", "train.iterations_per_epoch=6"])
    runtime = SimpleNamespace(dist=DistInfo(), local_batch=batch, device=torch.device("cpu"))
    corrections, original = [case("c0", 0.0), case("c1", 0.0)], [case("o0", 1.0), case("o1", 1.0)]
    loader = _epoch_loader(0, cfg, runtime, (8, 16, 16), corrections, (original, fraction))
    batches = list(loader)
    assert len(batches) == 6
    for b in batches:
        from_replay = b["image"].flatten(1).mean(1) == 1.0  # the patch's own pixels say where it came from
        assert int(from_replay.sum()) == per_batch
        assert torch.equal(from_replay, b["replay"])
    assert sum(is_replay_index(i, 0.3) for i in range(1000)) == 300


def train(config: Path, *extra: str, init_from: str | None = None) -> int:
    argv = [str(config)]
    for item in (*FAST, *extra):
        argv += ["--set", item]
    if init_from is not None:
        argv += ["--init-from", init_from]
    return train_main(argv)


def test_finetuning_with_replay_reports_the_original_cases_before_and_after(tmp_path, one_torch_thread):
    original = make_msd_dataset(tmp_path / "original", n_cases=3, shape=(8, 16, 16), num_classes=3)
    corrections = make_msd_dataset(
        tmp_path / "corrections", n_cases=2, shape=(8, 16, 16), num_classes=3, seed=4
    )
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    base = ["data.val_fraction=0.34", "train.epochs=1"]
    assert train(config, *base, f"data.root={original}", f"output.dir={tmp_path / 'first'}") == 0
    start = tmp_path / "first" / "checkpoint_best.pt"

    out = tmp_path / "finetune"
    code = train(
        config,
        f"data.root={corrections}",
        "data.val_cases=[]",  # two corrected cases: too few to hold one out
        "train.epochs=2",
        "train.batch_size=2",
        f"init.replay={original}",
        "init.replay_fraction=0.5",
        f"output.dir={out}",
        init_from=str(start),
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out"] is None and summary["checkpoint"] == "checkpoint_last.pt"
    assert not (out / "checkpoint_best.pt").exists()
    first = json.loads((tmp_path / "first" / "metrics.jsonl").read_text().splitlines()[-1])
    orig = summary["original"]
    assert orig["cases"] == ["case_000"] or len(orig["cases"]) == 1
    # "before" is the starting checkpoint's own validation Dice on the same case
    assert orig["before"] == pytest.approx(first["val"]["mean_dice"], abs=1e-6)
    assert 0.0 <= orig["after"] <= 1.0 and summary["epoch"] == 2
    assert summary["replay"] == {"root": str(original), "fraction": 0.5}
    log = (out / "train.log").read_text()
    assert f"replay: {original} (init.replay); 50% of every batch from its 2 training case(s)" in log
    assert "summary: original validation cases: mean Dice" in log
    # the fine-tuned model has seen both datasets: its training-data profile says so
    profile = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)["spec"][
        "training_profile"
    ]
    assert profile["total_cases"] == 4
    assert "corrections: 2 of 2 training case(s)" in profile["source"]
    assert "original: 2 of 2 training case(s)" in profile["source"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val"] for r in records] == [None, None] and records[-1]["original_val"]["mean_dice"] == orig[
        "after"
    ]
