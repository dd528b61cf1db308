"""benchmarks/adaptation.py's parts that need no training: the new-scanner copy (each block its own
perturbation, labels untouched, the held-out block out of the candidates), the corrections sets, the seeded
random choice and the report's recovered share."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.benchmark_modules import benchmark_module
from tests.dataset_factory import make_msd_dataset


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("adaptation") as module:
        yield module


def test_every_block_gets_its_own_perturbation_and_keeps_its_labels(bench, tmp_path):
    from napari_medcl.io import read_image

    source = make_msd_dataset(tmp_path / "src", n_cases=5, shape=(8, 16, 16), num_classes=4)
    perturbed, held_out, candidates = bench.perturbed_dataset(source, tmp_path / "work")
    assert len(candidates) == 4 and held_out not in candidates
    ratios = []
    for case in sorted([*candidates, held_out]):
        clean = read_image(source / "imagesTr" / f"{case}_0000.nii.gz").array
        new = read_image(perturbed / "imagesTr" / f"{case}_0000.nii.gz").array
        assert new.shape == clean.shape and not np.allclose(new, clean)
        ratios.append(float(np.median(new[clean > 0] / clean[clean > 0])))
        label = perturbed / "labelsTr" / f"{case}.nii.gz"
        assert label.read_bytes() == (source / "labelsTr" / f"{case}.nii.gz").read_bytes()
    assert len({round(r, 4) for r in ratios}) == 5  # five different perturbations
    chosen = bench.corrections_dataset(perturbed, candidates[:2], tmp_path / "work")
    assert sorted(p.name for p in (chosen / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in candidates[:2]]
    assert json.loads((chosen / "dataset.json").read_text())["numTraining"] == 2


def test_random_choice_is_seeded_and_the_report_gives_the_recovered_share(bench):
    blocks = ["b0", "b1", "b2", "b3"]
    assert bench.random_choice(blocks, 2, 0) == bench.random_choice(blocks, 2, 0)
    assert len(set(bench.random_choice(blocks, 4, 1))) == 4
    rows = [
        {"k": 2, "seed": s, "choice": "ranked", "replay": 0.25, "perturbed": p, "clean": 0.89, "seconds": 600}
        for s, p in ((0, 0.76), (1, 0.80))
    ]
    rows.append({**rows[0], "settings": ["init.weight_mix=0.5"], "perturbed": 0.70})
    text = bench.report({"perturbed": 0.68, "clean": 0.90}, rows, "b4", "cmd", threads=1)
    assert "| 2 | ranked | 0.25 | preset | 2 | 0.7800 | +0.1000 | 45% | 0.8900 | -0.0100 | 600 |" in text
    assert "| 2 | ranked | 0.25 | init.weight_mix=0.5 | 1 | 0.7000 | +0.0200 | 9% |" in text
    for row in rows[:2]:
        row["mix_sweep"] = {
            "0.5": {"perturbed": 0.73, "clean": 0.90},
            "1": {"perturbed": 0.80, "clean": 0.85},
        }
    text = bench.report({"perturbed": 0.68, "clean": 0.90}, rows, "b4", "cmd", threads=1)
    assert "| 2 | ranked | preset | 2 | 0.5 | 0.7300 | +0.0500 | 23% | 0.9000 | +0.0000 |" in text
    assert "| 2 | ranked | preset | 2 | 1 | 0.8000 | +0.1200 | 55% | 0.8500 | -0.0500 |" in text
    assert "| 2 | ranked | init.weight_mix=0.5 | 1 | 0.5 |" not in text  # that run was not swept


def test_the_mild_new_scanner_is_kept_apart_from_the_strong_one(bench, tmp_path):
    from napari_medcl.io import read_image

    source = make_msd_dataset(tmp_path / "src", n_cases=5, shape=(8, 16, 16), num_classes=4)
    strong, held_out, candidates = bench.perturbed_dataset(source, tmp_path / "work")
    mild, held_mild, candidates_mild = bench.perturbed_dataset(source, tmp_path / "work", "mild")
    assert mild != strong and (held_mild, candidates_mild) == (held_out, candidates)
    case = f"{candidates[0]}_0000.nii.gz"
    clean = read_image(source / "imagesTr" / case).array
    a, b = (read_image(root / "imagesTr" / case).array for root in (strong, mild))
    # The mild copy is the accuracy benchmark's bias field and noise: closer to the clean scan than the strong.
    assert 0 < np.abs(b - clean).mean() < np.abs(a - clean).mean()
    sets = {bench.corrections_dataset(root, candidates[:1], tmp_path / "work") for root in (strong, mild)}
    assert len(sets) == 2


def test_the_plan_trains_the_held_out_block_itself_only_when_asked(bench):
    ranked, candidates = ["b3", "b1", "b2", "b0"], ["b0", "b1", "b2", "b3"]
    plan = bench.fine_tune_plan([2], [0, 1], ["ranked", "random"], ranked, candidates, "b4")
    assert [(k, seed, how) for k, seed, how, _ in plan] == [
        (2, 0, "ranked"),
        (2, 0, "random"),
        (2, 1, "ranked"),
        (2, 1, "random"),
    ]
    assert plan[0][3] == ["b1", "b3"] and all("b4" not in blocks for *_, blocks in plan)
    ceiling = bench.fine_tune_plan([2, 4], [0, 1], ["held-out"], ranked, candidates, "b4")
    assert ceiling == [(1, 0, "held-out", ["b4"]), (1, 1, "held-out", ["b4"])]


def test_a_mix_sweep_share_holds_for_every_tensor_unless_layers_are_named(bench, tmp_path):
    import torch

    start = {"encoder.0.w": torch.zeros(2), "decoder.0.w": torch.zeros(2)}
    trained = {"encoder.0.w": torch.ones(2), "decoder.0.w": torch.ones(2)}
    config = {"init": {"weight_mix": 0.25, "weight_mix_layers": {"decoder": 0.9}}}
    checkpoint = tmp_path / "checkpoint_last.pt"
    torch.save({"model": start, "trained_model": trained, "config": config}, checkpoint)

    def mixed(**layers):
        bench.mixed_checkpoint(checkpoint, start, 1.0, tmp_path / "mixed.pt", **layers)
        model = torch.load(tmp_path / "mixed.pt", weights_only=True)["model"]
        return float(model["encoder.0.w"][0]), float(model["decoder.0.w"][0])

    assert mixed(layers={}) == (1.0, 1.0)  # what --mix-sweep 1 scores: the trained weights as they are
    assert mixed() == (1.0, pytest.approx(0.9))  # None: the run's own per-layer shares
