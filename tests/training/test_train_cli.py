"""medcl-train and medcl-evaluate end to end on tiny datasets (CPU, a few iterations each).

Covers: 3D U-Net + UAFR + PDCR on an MSD layout, 2D DeepLabV3+ + UAFR + CCDC on an ISIC-style folder, a 2D
U-Net + CCDC on an ACDC layout (slices of volumes); the files every run leaves (checkpoints that load with
weights_only, config.yaml, metrics.jsonl with finite pdcr/ccdc terms, curves.png, train.log); --check; user
errors as one line and an exit code; evaluation of a checkpoint and of an ONNX model.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from napari_medcl.spec import ModelSpec
from tests.dataset_factory import (
    make_acdc_dataset,
    make_folder2d_dataset,
    make_msd_dataset,
    make_noisy_label_dataset,
)
from training.cli import evaluate_main, train_main
from training.config import load_config

FAST = [
    "data.num_workers=0",
    "data.augmentation.enabled=false",
    "train.device=cpu",
    "train.epochs=2",
    "train.iterations_per_epoch=2",
    "train.batch_size=2",
]


def run_train(config: Path, *overrides: str, extra: tuple[str, ...] = ()) -> int:
    argv = [str(config)]
    for item in (*FAST, *overrides):
        argv += ["--set", item]
    return train_main([*argv, *extra])


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def check_run_files(out: Path, epochs: int, class_names: list[str], terms: tuple[str, ...]) -> dict:
    """The files of a finished run; returns the last checkpoint (loaded weights-only)."""
    assert (out / "train.log").read_text(encoding="utf-8").splitlines()[0] == "world size 1"
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    for record in records:
        ratio = ("pdcr_grad_ratio",) if "pdcr" in terms else ()
        assert set(record["train"]) == {"loss", "ce", "dice", *terms, *ratio}
        assert all(math.isfinite(v) for v in record["train"].values())
        assert set(record["val"]["dice"]) == set(class_names[1:])
        assert 0.0 <= record["val"]["mean_dice"] <= 1.0
        assert record["lr"] >= 0 and record["seconds"] > 0
    for term in terms:
        assert records[-1]["train"][term] > 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*"))  # no temporary files left behind
    state = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == epochs
    assert (out / "checkpoint_best.pt").is_file()
    spec = ModelSpec.from_dict(state["spec"])
    assert spec.class_names == class_names
    assert load_config(out / "config.yaml").output.dir == str(out)
    return state


@pytest.fixture(scope="module")
def msd_run(tmp_path_factory):
    """One 3D U-Net + UAFR + PDCR run shared by the tests that read its outputs."""
    base = tmp_path_factory.mktemp("msd")
    root = make_msd_dataset(base / "Task99_Tiny", n_cases=4, shape=(12, 20, 18))
    config = base / "run.yaml"
    config.write_text(
        # no crop to the non-zero box: validation then sees the very grid medcl-evaluate sees
        f"data: {{root: {root}, val_fraction: 0.25, crop_nonzero: false}}\n"
        "model:\n  features: [8, 16, 32]\n  uafr: {enabled: true}\n"
        "loss:\n  pdcr: {enabled: true, mode: rf, layers: {encoder2: 16, encoder3: 8},"
        " cross_pairs: [[encoder2, encoder3]], cross_samples: 8}\n"
        "train: {patch_size: [8, 16, 16]}\n"
    )
    out = base / "out"
    code = run_train(config, f"output.dir={out}")
    assert code == 0
    return root, config, out


@pytest.mark.slow
def test_3d_unet_uafr_pdcr_run(msd_run, capsys):
    root, _, out = msd_run
    state = check_run_files(out, 2, ["background", "class1", "class2"], ("pdcr",))
    spec = ModelSpec.from_dict(state["spec"])
    assert spec.spatial_dims == 3 and spec.patch_size == (8, 16, 16) and spec.divisor == (4, 4, 4)
    assert spec.uncertainty_maps and spec.training["uafr"] and spec.training["pdcr"]["mode"] == "rf"
    assert spec.spacing == pytest.approx((2.0, 1.0, 1.2))
    assert spec.training["metrics"]["val_mean_dice"] == state["best"]["mean_dice"]
    # The training cases' profile travels in the spec (the exported file carries it to the verdict).
    profile = spec.training_profile
    assert profile is not None and profile["cases"] == profile["total_cases"] >= 1
    assert profile["normalization"] == spec.normalization and len(profile["intensity"]) == spec.in_channels
    assert len(profile["spacing_mm"]["min"]) == 3
    # PDCR's cross-layer projections are trained and saved with the optimizer
    assert any(k.startswith("pdcr.projections") for k in state["losses"])
    from training.building import build_losses, build_model
    from training.config import config_from_dict

    cfg = config_from_dict(state["config"])
    model = build_model(cfg, spec.in_channels, spec.num_classes)
    _, pdcr, _ = build_losses(cfg, model, spec.num_classes)
    expected = len(list(model.parameters())) + len(list(pdcr.parameters()))
    assert len(state["optimizer"]["param_groups"][0]["params"]) == expected
    assert state["config"]["loss"]["pdcr"]["enabled"] is True
    assert len(state["rng"]) == 1 and set(state["rng"][0]) == {
        "python",
        "numpy",
        "torch",
        "cuda",
        "generator",
    }


@pytest.mark.slow
def test_2d_deeplab_uafr_ccdc_run(tmp_path):
    root = make_folder2d_dataset(tmp_path / "isic", n_cases=5, shape=(40, 48))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {{root: {root}, layout: folder2d, val_fraction: 0.2}}\n"
        "model: {name: deeplabv3plus, spatial_dims: 2, encoder_depth: 18, projection_dim: 16,"
        " uafr: {enabled: true}}\n"
        "loss: {ccdc: {enabled: true, num_queries: 32, num_negatives: 32}}\n"
        "train: {patch_size: [32, 32], optimizer: adam, lr: 1.0e-3, scheduler: cosine}\n"
    )
    out = tmp_path / "out"
    assert run_train(config, f"output.dir={out}", "train.epochs=1") == 0
    state = check_run_files(out, 1, ["background", "foreground"], ("ccdc",))
    spec = ModelSpec.from_dict(state["spec"])
    assert spec.in_channels == 3 and spec.spatial_dims == 2 and spec.training["ccdc"]["temperature"] == 0.5
    assert "uafr" in spec.training["method"] and "ccdc" in spec.training["method"]


@pytest.mark.slow
def test_2d_unet_ccdc_on_acdc_volumes(tmp_path):
    root = make_acdc_dataset(tmp_path / "acdc", n_patients=3, shape=(4, 24, 20))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {{root: {root}, layout: acdc, val_fraction: 0.34}}\n"
        "model: {spatial_dims: 2, features: [8, 16, 32], projection_dim: 8}\n"
        "loss: {ccdc: {enabled: true, num_queries: 16, num_negatives: 16}}\n"
        "train: {patch_size: [16, 16], epochs: 1}\n"
    )
    out = tmp_path / "out"
    assert run_train(config, f"output.dir={out}", "train.epochs=1") == 0
    check_run_files(out, 1, ["background", "RV", "MYO", "LV"], ("ccdc",))


def test_check_mode_only_validates(tmp_path, capsys):
    root = make_msd_dataset(tmp_path / "ds", n_cases=3)
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{root: {root}}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    assert train_main([str(config), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "3 cases" in printed and "class1" in printed and "dataset OK" in printed
    assert not (tmp_path / "out").exists()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_user_errors_are_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train: {epoch: 3}\n")
    assert train_main([str(config)]) == 2
    assert "unknown key 'train.epoch'" in _one_error_line(capsys)

    assert train_main([str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in _one_error_line(capsys)

    config.write_text(f"data: {{root: {tmp_path / 'nowhere'}}}\n")
    assert train_main([str(config), "--set", "train.device=cpu"]) == 1
    assert "no such folder" in capsys.readouterr().err

    config.write_text("")
    assert train_main([str(config), "--set", "train.lr"]) == 2
    assert "expected key=value" in _one_error_line(capsys)


def test_dataset_problem_names_the_case(tmp_path, capsys):
    root = make_msd_dataset(tmp_path / "ds", n_cases=3)
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{root: {root}}}\n")
    assert train_main([str(config), "--check"]) == 1
    err = capsys.readouterr().err
    assert "case_001" in err and "Traceback" not in err


@pytest.mark.slow
def test_existing_run_needs_resume_and_finished_run_cannot_resume(msd_run, capsys):
    _, config, out = msd_run
    assert run_train(config, f"output.dir={out}") == 1
    assert "already holds a training run" in _one_error_line(capsys)
    assert run_train(config, f"output.dir={out}", extra=("--resume",)) == 1
    assert "already finished its 2 epochs" in _one_error_line(capsys)


@pytest.mark.slow
def test_evaluate_checkpoint_matches_validation(msd_run, tmp_path, capsys):
    root, _, out = msd_run
    csv_path = tmp_path / "m.csv"
    capsys.readouterr()
    assert (
        evaluate_main([str(out / "checkpoint_last.pt"), str(root), "--split", "val", "-o", str(csv_path)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "hd95" in printed and "mean Dice" in printed
    rows = list(csv.DictReader(csv_path.open()))
    cases = {r["case"] for r in rows} - {"mean"}
    assert len(cases) == 1  # val_fraction 0.25 of 4 cases
    val = read_metrics(out)[-1]["val"]
    for name, dice in val["dice"].items():
        row = next(r for r in rows if r["case"] == "mean" and r["class"] == name)
        # the same network on the same case: training's validation and medcl-evaluate agree
        assert float(row["dice"]) == pytest.approx(dice, abs=2e-3)


def test_evaluate_onnx_exact_oracle(tmp_path, capsys):
    from tests.onnx_models import nearest_class_model, save

    root = make_noisy_label_dataset(tmp_path / "ds")
    model = save(nearest_class_model(3, maps=(), patch=(4, 8, 8)), tmp_path / "m.onnx")
    assert (
        evaluate_main(
            [str(model), str(root), "--split", "all", "--device", "cpu", "-o", str(tmp_path / "o.csv")]
        )
        == 0
    )
    rows = list(csv.DictReader((tmp_path / "o.csv").open()))
    assert {r["case"] for r in rows} == {"c0", "c1", "mean"}
    assert all(float(r["dice"]) == 1.0 and float(r["hd95"]) == 0.0 for r in rows)


def test_evaluate_errors(tmp_path, capsys):
    assert evaluate_main([str(tmp_path / "none.pt"), str(tmp_path)]) == 1
    assert "no such model file" in _one_error_line(capsys)
    fake = tmp_path / "fake.pt"
    fake.write_bytes(b"not a checkpoint at all")
    assert evaluate_main([str(fake), str(tmp_path)]) == 1
    assert "not a readable napari-medcl checkpoint" in _one_error_line(capsys)
