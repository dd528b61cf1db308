"""Subject grouping: dataset.json or a mapping file names each case's subject, and no split puts a subject on
both sides (CHAOS: the three MR sequences of one patient)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dataset_factory import make_folder2d_dataset, make_msd_dataset
from training.config import load_config
from training.data import DataConfig, DatasetError, prepare_dataset
from training.data.layouts import discover
from training.data.preprocessing import split_cases

# nine cases, three "sequences" of each of three patients, named so that case-level splits would mix them
CASES = [f"case_{k:03d}" for k in range(9)]
PATIENTS = {case: f"patient{k % 3}" for k, case in enumerate(CASES)}


def _chaos_like(tmp_path, form):
    root = make_msd_dataset(tmp_path / "ds", n_cases=9, shape=(4, 10, 10))
    meta = json.loads((root / "dataset.json").read_text())
    if form == "subjects":
        meta["subjects"] = PATIENTS
    elif form == "training":
        meta["training"] = [
            {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz", "subject": s}
            for c, s in PATIENTS.items()
        ]
    (root / "dataset.json").write_text(json.dumps(meta))
    if form == "csv":
        lines = ["case_id,subject", *(f"{c},{s}" for c, s in PATIENTS.items())]
        (root / "subjects.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("form", ["subjects", "training", "csv"])
def test_subjects_from_dataset_json_or_a_mapping_file(tmp_path, form):
    layout = discover("msd", _chaos_like(tmp_path, form))
    assert layout.problems == ()
    assert {case.case_id: case.subject for case in layout.cases} == PATIENTS
    assert layout.subjects_from.endswith("subjects.csv" if form == "csv" else "dataset.json")


def test_no_split_puts_a_subject_on_both_sides(tmp_path):
    cases = list(discover("msd", _chaos_like(tmp_path, "subjects")).cases)
    for fold in range(3):
        train, val = split_cases(cases, fold=fold, num_folds=3, val_fraction=None, split_seed=7)
        assert {c.subject for c in train}.isdisjoint({c.subject for c in val})
        assert len(val) == 3 and len(train) == 6  # one patient (three sequences) per fold
    train, val = split_cases(cases, fold=0, num_folds=5, val_fraction=0.4, split_seed=1)
    assert {c.subject for c in train}.isdisjoint({c.subject for c in val})
    # without the mapping, the same split separates sequences of one patient (what the grouping prevents)
    plain = [c.__class__(c.case_id, c.images, c.label, c.case_id) for c in cases]
    mixed = False
    for fold in range(3):
        train, val = split_cases(plain, fold=fold, num_folds=3, val_fraction=None, split_seed=7)
        mixed |= not {PATIENTS[c.case_id] for c in train}.isdisjoint({PATIENTS[c.case_id] for c in val})
    assert mixed


def test_subject_mapping_for_folder2d_and_its_problems(tmp_path):
    root = make_folder2d_dataset(tmp_path / "isic", n_cases=4)
    stems = sorted(case.case_id for case in discover("folder2d", root).cases)
    (root / "subjects.json").write_text(json.dumps({stems[0]: "a", stems[1]: "a", "ghost": "b"}))
    layout = discover("folder2d", root)
    subjects = {case.case_id: case.subject for case in layout.cases}
    assert subjects[stems[0]] == subjects[stems[1]] == "a"
    assert subjects[stems[2]] == stems[2]  # not named: its own subject
    assert len(layout.problems) == 1 and "ghost" in layout.problems[0]
    (root / "subjects.json").unlink()
    (root / "subjects.csv").write_text(f"{stems[0]},a\nbroken line\n")
    layout = discover("folder2d", root)
    assert len(layout.problems) == 1 and "line 2" in layout.problems[0]


def test_require_subjects_refuses_a_dataset_without_them(tmp_path):
    root = make_msd_dataset(tmp_path / "ds", n_cases=3, shape=(4, 10, 10))
    assert discover("msd", root).subjects_from is None
    with pytest.raises(DatasetError, match="require_subjects"):
        prepare_dataset(DataConfig(root=str(root), require_subjects=True), spatial_dims=3, seed=0)


def test_chaos_preset_requires_subjects():
    cfg = load_config(Path(__file__).parents[2] / "training" / "configs" / "chaos-unet2d-ccdc.yaml")
    assert cfg.data.require_subjects is True
