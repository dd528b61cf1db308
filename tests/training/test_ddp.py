"""A 2-process DDP run on CPU (gloo) through `torchrun --standalone --nproc_per_node=2 --no-python medcl-train`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.dataset_factory import make_msd_dataset


def _medcl_train() -> str | None:
    """The installed console script, next to this interpreter (the venv) or on PATH."""
    beside = Path(sys.executable).with_name("medcl-train")
    return str(beside) if beside.exists() else shutil.which("medcl-train")


def _torchrun(command: list[str]) -> subprocess.CompletedProcess:
    # faulthandler prints each process's Python stack should one die of a signal
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)


def _native_abort(done: subprocess.CompletedProcess) -> bool:
    """Whether torchrun's report names a process that died of SIGABRT (exit code -6), not one that exited
    with an error of ours (a plain message and exit code 1 or 2)."""
    return done.returncode != 0 and re.search(r"exitcode\s*:\s*-6\b", done.stderr) is not None


def _tail(done: subprocess.CompletedProcess) -> str:
    return done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_two_process_gloo_run(tmp_path):
    script = _medcl_train()
    assert script is not None, "medcl-train is not installed (pip install -e .)"
    torchrun = Path(sys.executable).with_name("torchrun")
    root = make_msd_dataset(tmp_path / "ds", n_cases=4, shape=(12, 20, 18))
    out = tmp_path / "out"
    config = tmp_path / "ddp.yaml"
    config.write_text(
        f"data: {{root: {root}, val_fraction: 0.5, num_workers: 0, augmentation: {{enabled: false}}}}\n"
        "model: {features: [8, 16, 32], norm: batch, uafr: {enabled: true}}\n"
        "loss: {pdcr: {enabled: true, layers: {encoder2: 8}, cross_pairs: [[encoder2, encoder3]], cross_samples: 4}}\n"
        "train: {device: cpu, epochs: 1, iterations_per_epoch: 2, batch_size: 4, patch_size: [8, 16, 16],"
        " sync_batchnorm: true}\n"
        f"output: {{dir: {out}}}\n"
    )
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", "--no-python", script, str(config)]
    done = _torchrun(command)
    if _native_abort(done):
        # A rank once died in gloo's native code ("terminate called without an active exception", SIGABRT,
        # no Python error) on an otherwise passing run, and in none of 31 runs here. One more try tells
        # such a crash from a defect of ours, which fails both; the first run's output stays in the message.
        first = done
        shutil.rmtree(out, ignore_errors=True)
        done = _torchrun(command)
        # in pytest's warnings summary, so a crash that a second run hid is still seen
        warnings.warn(
            "a rank died of SIGABRT in gloo's native code; the second run "
            + ("passed" if done.returncode == 0 else "failed too"),
            stacklevel=1,
        )
        assert done.returncode == 0, (
            "both runs failed; the first:\n" + _tail(first) + "\nthe second:\n" + _tail(done)
        )
    assert done.returncode == 0, _tail(done)

    log = (out / "train.log").read_text(encoding="utf-8").splitlines()
    assert log[0] == "world size 2"
    assert any("global batch 4 (2 per process)" in line for line in log)
    assert any("sync_batchnorm ignored: SyncBatchNorm needs CUDA" in line for line in log)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 1 and records[0]["val"]["cases"] == 2  # one validation case per rank, summed
    state = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert len(state["rng"]) == 2  # each rank's random state, for an exact resume under DDP
    assert not torch.equal(state["rng"][0]["generator"], state["rng"][1]["generator"])
    assert not any(k.startswith("module.") for k in state["model"])
    # only rank 0 writes: one log, one metrics file, no per-rank copies
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint_best.pt",
        "checkpoint_last.pt",
        "config.yaml",
        "curves.png",
        "metrics.jsonl",
        "train.log",
    ]
