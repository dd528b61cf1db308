"""SIGKILL during medcl-predict and medcl-train leaves no damaged file under a final name; runs resume.

Small versions of ``scripts/kill_campaign.py`` (the full campaigns: 50 predict kills, 10 train kills, see
docs/reliability.md), plus a check that the folder checker itself sees truncated and incomplete outputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from kill_campaign import (
    check_predict_folder,
    check_train_folder,
    run_predict_campaign,
    run_train_campaign,
)


def test_checker_sees_truncated_and_incomplete_outputs(tmp_path):
    import numpy as np

    from napari_medcl.io import write_image
    from napari_medcl.volume import Volume

    volume = Volume(np.zeros((4, 5, 6), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    whole = write_image(volume, tmp_path / "a_labels.nii.gz").read_bytes()
    (tmp_path / "a_labels.nii.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "a.json").write_text(
        json.dumps({"outputs": {"labels": "a_labels.nii.gz", "entropy": "a_entropy.nii.gz"}})
    )
    (tmp_path / "b.json").write_text('{"outputs": {"lab')
    (tmp_path / ".a_entropy.1a2b3c4d.nii.gz").write_bytes(b"partial")
    check = check_predict_folder(tmp_path)
    assert [t.split(":")[0] for t in check.truncated] == ["a_labels.nii.gz", "b.json"]
    assert len(check.incomplete) == 1 and check.incomplete[0].startswith("a:")
    assert check.temp_files == 1 and check.complete_cases == ()

    (tmp_path / "checkpoint_last.pt").write_bytes(b"PK\x03\x04 cut short")
    damaged, _ = check_train_folder(tmp_path)
    assert [d.split(":")[0] for d in damaged] == ["checkpoint_last.pt"]


def test_sigkill_during_predict_leaves_no_truncated_file(tmp_path):
    summary = run_predict_campaign(tmp_path, 5, seed=1)
    assert summary.truncated == [] and summary.incomplete == []
    assert summary.failures == []
    assert summary.kills >= 3  # delays are spread over one run's duration, so nearly all trials are kills
    assert summary.reruns_ok == summary.trials == 5


@pytest.mark.slow
def test_sigkill_during_training_resumes(tmp_path):
    # One kill while Python and torch start (before any checkpoint), one after the first checkpoint: counted
    # from when that checkpoint appears, so a slow start on a loaded machine cannot move it before it.
    summary = run_train_campaign(tmp_path, 2, fractions=(0.1, 0.2), after_checkpoint=(False, True), epochs=3)
    assert summary.damaged == [] and summary.failures == []
    assert summary.kills == 2
    assert summary.before_first_checkpoint == 1 and summary.reruns_ok == 1
    assert summary.resumes_ok == 1


@pytest.mark.slow
def test_sigkill_of_the_jobs_parent_leaves_no_half_case(tmp_path):
    """SIGKILL of ``medcl-predict --jobs 2`` itself: its workers stop by themselves (their case locks are
    free within 60 s), no damaged file stays under a final name, and a re-run finishes every case."""
    summary = run_predict_campaign(tmp_path, 2, fractions=(0.4, 0.8), jobs=2)
    assert summary.truncated == [] and summary.incomplete == []
    assert summary.failures == []
    assert summary.kills >= 1
    assert summary.reruns_ok == summary.trials == 2
