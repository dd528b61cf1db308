"""The GPU check's dry run (CPU, tiny sizes): every section runs and reports, and the report keeps its shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.benchmark_modules import benchmark_module

ROOT = Path(__file__).resolve().parents[2]

# Steps each section must report; a step that silently disappears fails the test.
EXPECTED_STEPS = {
    "environment": {"python", "torch", "onnxruntime", "ort_session", "simpleitk"},
    "inference": {
        "inputs",
        *(
            f"{d}/{part}"
            for d in ("3d", "2d")
            for part in (
                "sample/cuda",
                "sample/cpu",
                "window",
                "window/channel-softmax-rewritten",
                "ct/cuda",
                "ct/cuda/batch32",
                "ct/cpu",
            )
        ),
    },
    "fp16": {"convert", "sessions", "window", "sample", "ct"},
    "training": {f"{amp}/{losses}" for amp in ("bf16", "fp16") for losses in ("CE+Dice", "+ PDCR", "+ CCDC")},
    "finetune": {"corrections", "run"},
    "ddp": {"init", "all_reduce", "ddp_train_step"},
}


@pytest.fixture(scope="module")
def gpu_check():
    with benchmark_module("gpu_check") as module:
        yield module


@pytest.fixture(scope="module")
def dry_run_report(tmp_path_factory):
    """The one command, as documented, in dry-run mode."""
    output = tmp_path_factory.mktemp("gpu_check") / "report.json"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "-o", str(output)],
        capture_output=True, text=True, timeout=400, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(output.read_text(encoding="utf-8")), done.stdout


@pytest.mark.slow
@pytest.mark.torch
def test_dry_run_runs_every_section_and_step(gpu_check, dry_run_report):
    report, stdout = dry_run_report
    assert report["schema"] == gpu_check.SCHEMA and report["mode"] == "dry-run"
    assert tuple(report["sections"]) == gpu_check.SECTIONS == tuple(EXPECTED_STEPS)
    for name, section in report["sections"].items():
        steps = section["steps"]
        assert set(steps) == EXPECTED_STEPS[name], name
        failed = {k: v.get("error") or v.get("reason") for k, v in steps.items() if v["status"] != "ok"}
        assert section["status"] == "ok" and not failed, (name, failed)
        assert f"\n{name} " in stdout  # the printed table has a row per section
    assert report["sections"]["ddp"]["passed"] is True


@pytest.mark.slow
@pytest.mark.torch
def test_dry_run_figures(dry_run_report):
    report, _ = dry_run_report
    env = report["sections"]["environment"]["steps"]
    assert env["ort_session"]["execution_provider"] == "CPUExecutionProvider"
    assert env["ort_session"]["cuda_provider_loaded"] is False
    inference = report["sections"]["inference"]["steps"]
    for d in ("3d", "2d"):
        assert inference[f"{d}/sample/cuda"]["warm_seconds"] > 0
        assert inference[f"{d}/sample/cpu"]["labels_vs_cuda_run"]["agreement"] == 1.0  # both on the CPU here
        assert "estimate_seconds" in inference[f"{d}/ct/cpu"]
        rewritten = inference[f"{d}/window/channel-softmax-rewritten"]
        assert rewritten["max_abs_diff"] < 1e-4 and rewritten["rewritten"]["batch1_ms_per_window"] > 0
    fp16 = report["sections"]["fp16"]["steps"]
    assert fp16["sample"]["labels_fp16_vs_fp32"]["agreement"] > 0.99
    assert isinstance(fp16["ct"]["labels_fp16_vs_fp32"], dict)  # compared with the inference section's run
    for step in report["sections"]["training"]["steps"].values():
        assert step["finite"] and step["it_per_s"] > 0 and step["steps"] == 1
    assert report["sections"]["ddp"]["steps"]["init"]["backend"] == "gloo"
    run = report["sections"]["finetune"]["steps"]["run"]
    assert run["device"] == "cpu" and len(run["epoch_seconds"]) == run["epochs"] == 2
    assert run["preset_estimate_seconds"] > sum(run["epoch_seconds"])  # the preset runs more epochs


def test_a_failing_step_is_recorded_and_the_next_one_runs(gpu_check, tmp_path):
    ctx = gpu_check.Context(
        dry_run=True, deadline=time.time() + 60, workdir=tmp_path, out=tmp_path / "s.json"
    )

    def broken():
        raise RuntimeError("CUDA error: no kernel image is available")

    ctx.step("broken", broken)
    ctx.step("fine", lambda: {"value": 1})
    ctx.step("too_long", lambda: {}, estimate=3600)
    steps = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))["steps"]
    assert steps["broken"]["status"] == "error" and "no kernel image" in steps["broken"]["error"]
    assert steps["fine"] == {"status": "ok", "seconds": steps["fine"]["seconds"], "value": 1}
    assert steps["too_long"]["status"] == "skipped" and steps["too_long"]["reason"] == gpu_check.BUDGET_SKIP


def test_sections_past_the_budget_are_skipped(gpu_check, tmp_path):
    report = gpu_check.run_check(dry_run=True, output=tmp_path / "r.json", budget=1.0)
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["sections"] == report["sections"]
    assert {s["status"] for s in report["sections"].values()} == {"skipped"}
    assert {s["reason"] for s in report["sections"].values()} == {gpu_check.BUDGET_SKIP}


def test_convs_to_fp16_keeps_the_contract(gpu_check):
    import onnx

    from napari_medcl.onnx_session import MODELS_DIR, check_model_bytes

    model = onnx.load(str(MODELS_DIR / "brain-tissue-2d.onnx"))
    half = gpu_check.convs_to_fp16(model)
    spec = check_model_bytes(half.SerializeToString(), Path("half.onnx"))
    assert spec.name == "brain-tissue-2d"
    convs = [n for n in half.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    weights = {t.name: t.data_type for t in half.graph.initializer}
    assert convs and all(weights[n.input[1]] == onnx.TensorProto.FLOAT16 for n in convs)


def test_fallback_nifti_reader_matches_the_product_reader(gpu_check):
    """The reader used where SimpleITK is missing gives the same voxels and spacing as read_image."""
    import numpy as np

    from napari_medcl.io import read_image

    product, fallback = read_image(gpu_check.SAMPLE), gpu_check.read_nifti_minimal(gpu_check.SAMPLE)
    assert fallback.spacing == product.spacing
    np.testing.assert_array_equal(fallback.array, product.array.astype(np.float32))
