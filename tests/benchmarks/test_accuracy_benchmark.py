"""The accuracy benchmark's own arithmetic: grids, perturbation, run order and the report's statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_medcl.volume import Volume
from tests.benchmark_modules import benchmark_module


@pytest.fixture(scope="module")
def accuracy():
    with benchmark_module("accuracy") as module:
        yield module


def _physical(volume: Volume, index) -> np.ndarray:
    return np.asarray(volume.origin) + volume.direction @ (np.asarray(volume.spacing) * np.asarray(index))


def test_downsample_keeps_block_centres_means_and_majorities(accuracy):
    direction = np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]])
    image = Volume(
        np.arange(5 * 4 * 6, dtype=np.float32).reshape(5, 4, 6), (1.0, 2.0, 0.5), (3, -1, 7), direction
    )
    small = accuracy.downsample(image, 2, labels=False)
    assert small.array.shape == (2, 2, 3) and small.spacing == (2.0, 4.0, 1.0)
    assert small.array[1, 0, 2] == pytest.approx(image.array[2:4, 0:2, 4:6].mean())
    # The coarse voxel's centre is the centre of the fine voxels it averages.
    centre = (_physical(image, (2, 0, 4)) + _physical(image, (3, 1, 5))) / 2
    np.testing.assert_allclose(_physical(small, (1, 0, 2)), centre)
    labels = np.zeros((2, 2, 2), np.uint8)
    labels[0, 0, :] = 3
    labels[1, 1, 1] = labels[1, 0, 0] = 3
    labels[0, 1, 0] = 1
    label_volume = Volume(labels, (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3))
    assert accuracy.downsample(label_volume, 2, labels=True).array.tolist() == [
        [[3]]
    ]  # 4 votes of 8 beat 3 and 1


def test_perturbation_keeps_the_brain_mask_and_is_seeded(accuracy):
    rng = np.random.default_rng(0)
    array = np.zeros((8, 10, 12), np.float32)
    array[2:6, 2:8, 3:9] = rng.uniform(0.3, 0.9, (4, 6, 6))
    volume = Volume(array, (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3))
    a, b = accuracy.perturb(volume, seed=3), accuracy.perturb(volume, seed=3)
    np.testing.assert_array_equal(a.array, b.array)
    assert ((a.array > 0) == (array > 0)).all()
    assert not np.allclose(a.array, array)
    assert not np.array_equal(accuracy.perturb(volume, seed=4).array, a.array)


def test_plan_fills_folds_and_seeds_before_the_next(accuracy):
    keys = accuracy.plan(2, [0, 1], [0, 1], ["limited", "full"], ["CE+Dice", "+UAFR"])
    assert len(keys) == 16 and len({k.name() for k in keys}) == 16
    assert [k.fold for k in keys[:8]] == [0] * 8 and [k.seed for k in keys[:4]] == [0] * 4
    assert keys[1].name() == "2d/limited/fold0/plus-uafr/seed0"


def test_report_means_over_seeds_and_pairs_by_fold_and_seed(accuracy):
    classes = accuracy.TASKS["tissue"].classes

    def record(arm, fold, seed, dice):
        scores = {"dice": dict.fromkeys(classes, dice), "hd95": dict.fromkeys(classes, 2.0)}
        return {
            "dims": 2, "regime": "full", "arm": arm, "fold": fold, "seed": seed, "train_seconds": 10.0,
            "clean": scores, "perturbed": scores,
        }  # fmt: skip

    records = []
    for fold in (0, 1):
        for seed in (0, 1, 2):
            base = 0.5 + 0.1 * fold + 0.01 * seed
            records += [
                record("CE+Dice", fold, seed, base),
                record("+UAFR", fold, seed, base + 0.02 + 0.001 * seed),
            ]
    records.append(record("CE+Dice", 2, 0, 0.99))  # a fold the other arm has not reached
    table = accuracy.report(records, 2)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    # Per seed the fold mean is 0.55 + 0.01 * seed: mean 0.56, sample sd 0.01.
    assert "| 0.560 ± 0.010 |" in rows["CE+Dice"]
    assert (
        "+0.0210 (p=0.031, n=6)" in rows["+UAFR"]
    )  # six positive paired differences: exact two-sided p = 2/64
    assert "(folds 0, 1; seeds 0, 1, 2; fold(s) 2 incomplete, left out)" in table and "limited" not in table


def _write_case(root: Path, case: str, image: np.ndarray, label: np.ndarray, spacing) -> None:
    from napari_medcl.io import write_image

    for folder, name, array in (("imagesTr", f"{case}_0000", image), ("labelsTr", case, label)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        write_image(Volume(array, spacing, (0.0, 0.0, 0.0), np.eye(3)), root / folder / f"{name}.nii.gz")


def test_lesion_folds_leave_one_case_out_on_the_cases_own_grid(accuracy, tmp_path):
    source = tmp_path / "lesions"
    rng = np.random.default_rng(0)
    cases = {"brain1": (6, 20, 18), "brain2": (5, 20, 18), "breast1": (4, 12, 10)}
    for case, shape in cases.items():
        label = np.zeros(shape, np.uint8)
        label[2, 3:6, 3:6] = 1
        _write_case(source, case, rng.uniform(1, 100, shape).astype(np.float32), label, (0.8, 0.8, 6.5))
    (source / "dataset.json").write_text(
        '{"name": "t", "channel_names": {"0": "MRI"}, "labels": {"background": 0, "lesion": 1}, '
        '"numTraining": 3, "file_ending": ".nii.gz"}'
    )
    task = accuracy.TASKS["lesions"]
    held_out = []
    for fold in range(task.num_folds):
        root, test = accuracy.fold_dataset(source, tmp_path / "work", 2, fold, "full", task)
        held_out.append(test)
        images = sorted(p.name for p in (root / "imagesTr").iterdir())
        assert images == sorted(f"{c}_0000.nii.gz" for c in cases)  # the test case sits beside the others
        assert (root / "perturbed" / f"{test}_0000.nii.gz").is_file()
        written = accuracy._read(root / "labelsTr" / f"{test}.nii.gz")
        assert written.array.shape == cases[test]  # no downsampling for this task
    assert sorted(held_out) == sorted(cases)  # every case is held out exactly once


def test_scanner_task_images_every_block_with_its_own_scanner(accuracy, tmp_path):
    source = tmp_path / "tissue"
    rng = np.random.default_rng(1)
    for k in range(5):
        label = np.zeros((8, 12, 10), np.uint8)
        label[1:7, 2:10, 2:8] = rng.integers(1, 4, (6, 8, 6))
        image = np.where(label > 0, 0.2 + 0.25 * label + rng.normal(0, 0.02, label.shape), 0).astype(
            np.float32
        )
        _write_case(source, f"mni152_block{k}", image, label, (1.0, 1.0, 1.0))
    (source / "dataset.json").write_text(
        '{"name": "t", "channel_names": {"0": "T1"}, "labels": {"background": 0, "CSF": 1, "GM": 2, "WM": 3}, '
        '"numTraining": 5, "file_ending": ".nii.gz"}'
    )
    plain, varied = accuracy.TASKS["tissue"], accuracy.TASKS["tissue-scanners"]
    roots = {}
    for name, task in (("plain", plain), ("varied", varied)):
        for fold in (0, 1):
            roots[name, fold] = accuracy.fold_dataset(source, tmp_path / "work", 3, fold, "full", task)
    (plain_root, test), (varied_root, varied_test) = roots["plain", 0], roots["varied", 0]
    assert varied_root != plain_root and varied_test == test
    meta = json.loads((varied_root / "dataset.json").read_text())
    assert set(meta["scanners"]) == {f"mni152_block{k}" for k in range(5)}
    gammas = [meta["scanners"][b]["gamma"] for b in sorted(meta["scanners"])]
    assert len(set(gammas)) == 5 and all(0.6 <= g <= 1.6 for g in gammas)  # one scanner per block
    for block in (f"mni152_block{k}" for k in range(5)):
        a = accuracy._read(plain_root / "imagesTr" / f"{block}_0000.nii.gz").array
        b = accuracy._read(varied_root / "imagesTr" / f"{block}_0000.nii.gz").array
        assert ((a > 0) == (b > 0)).all() and not np.allclose(a, b)  # same brain, another acquisition
        np.testing.assert_array_equal(
            accuracy._read(plain_root / "labelsTr" / f"{block}.nii.gz").array,
            accuracy._read(varied_root / "labelsTr" / f"{block}.nii.gz").array,
        )
        # A block keeps its scanner in every fold.
        other = accuracy._read(roots["varied", 1][0] / "imagesTr" / f"{block}_0000.nii.gz").array
        np.testing.assert_array_equal(other, b)
    assert varied.results_name(3) == "results-tissue-scanners-3d.jsonl"
    assert plain.results_name(3) == "results-3d.jsonl"
    assert accuracy.TASKS["lesions"].results_name(2) == "results-lesions.jsonl"
    assert accuracy.committed_results_path(2, "tissue-scanners").name == "accuracy-tissue-scanners-2d.jsonl"
    # The picture of the task: every block before and after its scanner; a missing dataset is a plain error.
    png = tmp_path / "scanners.png"
    assert accuracy.main(["scanners", "--data", str(source), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert accuracy.main(["scanners", "--data", str(tmp_path / "none"), "-o", str(png)]) == 1


def test_lesion_report_has_one_class_column(accuracy):
    def record(arm, fold, seed, dice):
        scores = {"dice": {"lesion": dice}, "hd95": {"lesion": float("inf") if dice == 0 else 3.0}}
        return {
            "dims": 2, "regime": "full", "arm": arm, "fold": fold, "seed": seed, "train_seconds": 5.0,
            "clean": scores, "perturbed": scores, "task": "lesions",
        }  # fmt: skip

    records = [record(arm, f, s, 0.1 * f) for arm in ("CE+Dice", "+PDCR") for f in range(3) for s in range(3)]
    table = accuracy.report(records, 2, accuracy.TASKS["lesions"])
    assert "#### Lesions, 2D, leave-one-case-out, full labels (folds 0, 1, 2; seeds 0, 1, 2)" in table
    header = next(line for line in table.splitlines() if line.startswith("| arm"))
    assert "Dice lesion" in header and "CSF" not in header
    rows = [line for line in table.splitlines() if line.startswith("| CE+Dice")]
    # Fold 0 finds nothing (HD95 infinite): the HD95 cell averages only the seeds' finite means, none here.
    assert rows and "| 0.100 ± 0.000 | 0.100 ± 0.000 |" in rows[0] and "n/a" in rows[0]


def test_series_runs_have_their_own_names_and_tables_with_the_median_grad_ratio(accuracy, tmp_path):
    classes = accuracy.TASKS["tissue"].classes
    key = accuracy.RunKey(2, "limited", 3, 0, "+PDCR-sum0.1", series="pdcr-sweep")
    assert key.name() == "pdcr-sweep/2d/limited/fold3/plus-pdcr-sum0.1/seed0"
    assert accuracy.RunKey(2, "limited", 3, 0, "+PDCR").name() == "2d/limited/fold3/plus-pdcr/seed0"

    def record(arm, fold, seed, dice, series=None, ratios=()):
        scores = {"dice": dict.fromkeys(classes, dice), "hd95": dict.fromkeys(classes, 2.0)}
        r = {
            "dims": 2, "regime": "limited", "arm": arm, "fold": fold, "seed": seed, "train_seconds": 10.0,
            "clean": scores, "perturbed": scores, "pdcr_grad_ratio": list(ratios),
        }  # fmt: skip
        return r | ({"series": series} if series else {})

    records = []
    for fold in range(3):
        for seed in (0, 1, 2):  # the six-arm runs: three seeds, their own CE+Dice
            records += [record("CE+Dice", fold, seed, 0.9), record("+PDCR", fold, seed, 0.9)]
        # the sweep: one seed; its CE+Dice is lower, so pairing with the six-arm baseline would show
        records += [
            record("CE+Dice", fold, 0, 0.3 + 0.1 * fold, "pdcr-sweep"),
            record("+PDCR", fold, 0, 0.3 + 0.1 * fold, "pdcr-sweep", [0.01, 0.02, 0.03]),
            record("+PDCR-sum0.1", fold, 0, 0.2 + 0.1 * fold, "pdcr-sweep", [1e4, 2e4, 5e4 + fold]),
        ]
    table = accuracy.report(records, 2)
    six, sweep = table.split("PDCR strength sweep")
    assert "#### 2D, limited labels (folds 0, 1, 2; seeds 0, 1, 2)" in six and "grad ratio" not in six
    assert "(folds 0, 1, 2; seeds 0; one seed: ± is the sd over folds)" in sweep
    assert "PDCR/seg grad ratio (median)" in sweep
    rows = {line.split(" | ")[0].lstrip("| "): line for line in sweep.splitlines() if line.startswith("| ")}
    assert rows["CE+Dice"].endswith("| — |") and rows["+PDCR"].endswith("| 0.02 |")
    assert rows["+PDCR-sum0.1"].endswith("| 2e+04 |")  # median of 9 epoch values
    assert "-0.1000 (p=0.25, n=3)" in rows["+PDCR-sum0.1"]  # paired with the sweep's own CE+Dice
    assert "| 0.400 ± 0.100 |" in rows["CE+Dice"]  # one seed: folds 0.3, 0.4, 0.5
    assert "| 0.300 ± 0.100 |" in rows["+PDCR-sum0.1"]

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        '{"epoch": 1, "train": {"loss": 1.0, "pdcr_grad_ratio": 0.5}}\n{"epoch": 2, "train": {"loss": 0.9}}\n'
    )
    assert accuracy.grad_ratios(metrics) == [0.5] and accuracy.grad_ratios(tmp_path / "none") == []


def test_revision_is_dirty_for_code_changes_not_for_appended_results(accuracy, tmp_path, monkeypatch):
    import subprocess

    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "benchmarks" / "accuracy.py").write_text("x = 1\n")
    (repo / "benchmarks" / "results" / "accuracy-2d.jsonl").write_text("{}\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    monkeypatch.setattr(accuracy, "HERE", repo / "benchmarks")
    clean = accuracy._revision()
    assert clean and not clean.endswith("+dirty")
    with open(repo / "benchmarks" / "results" / "accuracy-2d.jsonl", "a") as f:
        f.write("{}\n")  # a run's record
    assert accuracy._revision() == clean
    (repo / "benchmarks" / "accuracy.py").write_text("x = 2\n")
    assert accuracy._revision() == clean + "+dirty"


def test_learning_curves_come_from_the_runs_metrics_and_plot_per_regime(accuracy, tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    lines = [
        {"epoch": 1, "train": {"loss": 1.0}, "val": None},
        {"epoch": 2, "train": {"loss": 0.8}, "val": {"mean_dice": 0.51234, "dice": {}}},
        {"epoch": 3, "train": {"loss": 0.7}, "val": None},
        {"epoch": 4, "train": {"loss": 0.6}, "val": {"mean_dice": 0.7, "dice": {}}},
    ]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert accuracy.val_curve(metrics) == [[2, 0.5123], [4, 0.7]]
    assert accuracy.val_curve(tmp_path / "missing.jsonl") == []

    results = tmp_path / "results-3d.jsonl"
    records = []
    for regime, start in (("limited", 0.6), ("full", 0.5)):
        for fold in (0, 1):
            for arm in ("CE+Dice", "+PDCR"):
                curve = [[e, start + 0.1 * min(e, 6) / 6 + 0.01 * fold] for e in (2, 4, 6, 8, 10, 12)]
                records.append(
                    {"run": f"s/3d/{regime}/fold{fold}/{arm}/seed0", "series": "s", "dims": 3, "regime": regime,
                     "fold": fold, "seed": 0, "arm": arm, "iterations": 720, "val_curve": curve}
                )  # fmt: skip
    records.append(records[0] | {"series": "other"})  # another series is not plotted
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    png = tmp_path / "curves.png"
    assert accuracy.main(["curves", "--results", str(results), "--series", "s", "-o", str(png)]) == 0
    printed = capsys.readouterr().out
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Fold means 0.605..0.705 (limited): flat over the last third (epochs 8-12).
    assert "limited: CE+Dice mean over 2 fold(s) at epochs [2, 4, 6, 8, 10, 12]" in printed
    assert "over the last third (epochs 8-12) it moves +0.000" in printed
    assert accuracy.main(["curves", "--results", str(results), "--series", "none", "-o", str(png)]) == 1
