"""Exact resume on CPU, resume refusals, and checkpoint loading (weights-only, clear errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dataset_factory import make_folder2d_dataset
from training.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint
from training.cli import train_main
from training.config import CONFIG_VERSION, load_config
from training.run import RunError, train


class Crash(Exception):
    """Stands for the process dying right after epoch 1's checkpoint was written."""


def crash_after_epoch_1(record: dict) -> None:
    if record["epoch"] == 1:
        raise Crash


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_folder2d_dataset(tmp_path_factory.mktemp("data") / "isic", n_cases=5, shape=(36, 40))


def overrides(root: Path, out: Path) -> list[str]:
    # Every source of randomness is on: augmentation, dropout, PDCR grid phases, CCDC sampling.
    return [
        f"data.root={root}",
        "data.layout=folder2d",
        "data.val_fraction=0.2",
        "data.num_workers=0",
        "model.spatial_dims=2",
        "model.features=[8,16,32]",
        "model.dropout=0.2",
        "model.projection_dim=8",
        "model.uafr.enabled=true",
        "loss.pdcr.enabled=true",
        "loss.pdcr.layers={encoder2: 8}",
        "loss.pdcr.cross_pairs=[[encoder2, encoder3]]",
        "loss.pdcr.cross_samples=4",
        "loss.ccdc.enabled=true",
        "loss.ccdc.num_queries=16",
        "loss.ccdc.num_negatives=16",
        "train.device=cpu",
        "train.epochs=2",
        "train.iterations_per_epoch=2",
        "train.batch_size=2",
        "train.patch_size=[16,16]",
        f"output.dir={out}",
    ]


@pytest.mark.slow
def test_killed_run_resumes_with_identical_losses(dataset, tmp_path):
    reference = train(load_config(None, overrides(dataset, tmp_path / "a")))

    out = tmp_path / "b"
    with pytest.raises(Crash):
        train(load_config(None, overrides(dataset, out)), on_epoch_end=crash_after_epoch_1)
    # What a SIGKILL can leave besides: a half-written checkpoint under a temporary name, and
    # metrics.jsonl written before or after the checkpoint.
    (out / ".checkpoint_last.0badc0de.pt").write_bytes(b"partial")
    (out / "metrics.jsonl").write_text("")
    args = [str(tmp_path / "none.yaml")]
    (tmp_path / "none.yaml").write_text("")
    for item in overrides(dataset, out):
        args += ["--set", item]
    assert train_main([*args, "--resume"]) == 0

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for mine, theirs in zip(records, reference.history):
        assert mine["train"] == theirs["train"]  # bit-identical floats, pdcr and ccdc included
        assert mine["val"] == theirs["val"]
        assert mine["lr"] == theirs["lr"]
    assert set(records[1]["train"]) == {"loss", "ce", "dice", "pdcr", "ccdc", "pdcr_grad_ratio"}
    a = torch.load(tmp_path / "a" / "checkpoint_last.pt", weights_only=True)
    b = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["losses"][k], b["losses"][k]) for k in a["losses"])
    assert torch.equal(a["rng"][0]["generator"], b["rng"][0]["generator"])
    assert not list(out.glob(".*"))
    log = (out / "train.log").read_text(encoding="utf-8").splitlines()
    assert log[0] == "world size 1" and any("resumed from" in line for line in log)


@pytest.mark.slow
def test_resume_refuses_a_changed_config(dataset, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Crash):
        train(load_config(None, overrides(dataset, out)), on_epoch_end=crash_after_epoch_1)
    changed = load_config(None, [*overrides(dataset, out), "train.lr=0.5", "loss.ccdc.temperature=0.1"])
    with pytest.raises(RunError, match=r"differs .* in loss.ccdc.temperature, train.lr"):
        train(changed, resume=True)
    # where the data live and how often to validate may change
    moved = load_config(None, [*overrides(dataset, out), "train.val_every=2", "data.num_workers=1"])
    result = train(moved, resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2]


def test_resume_without_checkpoint(tmp_path):
    cfg = load_config(None, [f"output.dir={tmp_path}", "train.device=cpu"])
    with pytest.raises(RunError, match="nothing to resume"):
        train(cfg, resume=True)


def _minimal_state(**changes) -> dict:
    state = {
        "format": CHECKPOINT_FORMAT,
        "config_version": CONFIG_VERSION,
        "config": {},
        "epoch": 1,
        "model": {"w": torch.zeros(2)},
        "losses": {},
        "optimizer": {},
        "scheduler": {},
        "scaler": None,
        "rng": [],
        "sampler": {"seed": 0, "epoch": 1},
        "spec": {},
        "history": [],
        "best": {"epoch": None, "mean_dice": None},
    }
    state.update(changes)
    return state


class Payload:
    """Anything that is not a plain type must be refused by the weights-only unpickler."""


def test_checkpoint_loading_errors(tmp_path):
    path = tmp_path / "c.pt"
    torch.save(_minimal_state(), path)
    assert load_checkpoint(path)["epoch"] == 1

    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")
    for junk in (b"\x00garbage", b"hello, I am text\n" * 20):  # the text used to escape as a bare KeyError
        path.write_bytes(junk)
        with pytest.raises(CheckpointError, match="not a readable napari-medcl checkpoint"):
            load_checkpoint(path)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not a napari-medcl checkpoint"):
        load_checkpoint(path)
    state = _minimal_state()
    del state["optimizer"], state["rng"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="missing optimizer, rng"):
        load_checkpoint(path)
    torch.save(_minimal_state(config_version=CONFIG_VERSION + 1), path)
    with pytest.raises(CheckpointError, match=f"written with config_version {CONFIG_VERSION + 1}.*newer"):
        load_checkpoint(path)
    torch.save(_minimal_state(extra=Payload()), path)
    with pytest.raises(CheckpointError, match="weights only"):
        load_checkpoint(path)


@pytest.mark.slow
def test_a_best_dice_measured_the_old_way_is_not_compared_on_resume(dataset, tmp_path):
    """A checkpoint whose best validation Dice predates validation through the predictor: the resumed run
    says so and picks checkpoint_best.pt anew, rather than compare two different measures."""
    from training.checkpoint import save_checkpoint

    out = tmp_path / "run"
    with pytest.raises(Crash):
        train(load_config(None, overrides(dataset, out)), on_epoch_end=crash_after_epoch_1)
    state = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert state["best"]["validation"] == "predictor"
    state["best"] = {"epoch": 1, "mean_dice": 0.999}  # as written before the field existed
    save_checkpoint(state, out / "checkpoint_last.pt")
    result = train(load_config(None, overrides(dataset, out)), resume=True)
    log = (out / "train.log").read_text(encoding="utf-8")
    assert "was measured on the preprocessed grid" in log
    assert result.best_epoch == 2 and result.best_mean_dice < 0.999
