"""benchmarks/inference.py: its quick mode runs every case end to end, and its pieces measure what they say."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from benchmark_modules import benchmark_module

from napari_medcl.openvino_session import openvino_installed
from napari_medcl.volume import Prediction, Volume


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("inference") as module:
        yield module


@pytest.mark.slow
def test_quick_run_prints_every_table(bench, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench.main(["--quick", "--ct", "--repeats", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "peak increase / (input + outputs)" in text
    assert "share of fp32 peak" in text
    assert "target <= 3" in text
    assert "ONNX Runtime's profiler" in text
    assert "load average after" in text
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"3d", "2d", "bundled", "ct3d", "ct2d"}
    for row in rows.values():
        assert row["graph_flops"] > 0 and row["graph_unknown"] == 0
    for key in ("3d", "2d", "bundled"):
        engines = {e["backend"]: e for e in rows[key]["backends"]["engines"]}
        assert engines["ONNX Runtime CPU"]["window_s"] > 0
        assert engines["ONNX Runtime CPU"]["share"] > 0
        assert rows[key]["backends"]["peak_gflops"] > 0
        assert set(rows[key]["backends"]["ort_ops"]) & set(bench.CONV_OPS)  # ORT's profile names its convs
        if not openvino_installed():
            assert engines["OpenVINO CPU fp32"]["status"] == "not installed"
            assert "| OpenVINO CPU fp32 | n/a | not installed |" in text
    for key in ("ct3d", "ct2d"):
        row = rows[key]
        # Everything the Prediction holds, counted: the three per-voxel outputs and every UAFR map.
        assert {"input", "labels", "entropy", "top_class_error", "map decoder2", "map decoder1"} <= set(
            row["data"]
        )
        assert row["data_bytes"] == sum(row["data"].values())
        assert row["windows"] > 1
    assert rows["ct2d"]["network"]["dims"] == 2 and rows["ct2d"]["windows"] % 6 == 0  # every one of 6 slices


def test_ct_phantom_is_ct_like_and_nowhere_zero(bench):
    image, spacing = bench.ct_phantom((30, 64, 64))
    assert image.dtype == np.float32 and image.shape == (30, 64, 64)
    assert np.allclose(np.array(spacing) * image.shape, bench.CT_FOV_MM)
    assert not (image == 0).any()  # no masked shortcut: every voxel is image
    assert abs(float(np.median(image[:, :4, :4])) + 1000) < 10  # air in the corners
    for low, high in ((-1100, -700), (-150, -50), (20, 75), (300, 1000)):  # lung, fat, soft tissue, bone
        assert ((image > low) & (image < high)).mean() > 0.0005
    again, _ = bench.ct_phantom((30, 64, 64))
    assert np.array_equal(image, again)


def test_prediction_arrays_count_each_buffer_once(bench):
    image = np.ones((4, 5, 6), np.float32)
    volume = Volume(image, (1.0,) * 3, (0.0,) * 3, np.eye(3))
    maps = np.zeros((2, 4, 5, 6), np.float32)
    prediction = Prediction(
        labels=volume.with_array(np.zeros((4, 5, 6), np.uint8)),
        entropy=volume.with_array(np.zeros((4, 5, 6), np.float32)),
        top_class_error=volume.with_array(np.zeros((4, 5, 6), np.float32)),
        uafr_uncertainty=volume.with_array(maps[1]),  # a view of the last map: the same memory
        uncertainty_maps={"a": volume.with_array(maps[0]), "b": volume.with_array(maps[1])},
    )
    sizes = bench.prediction_arrays(image, prediction)
    assert sizes == {
        "input": 480,
        "labels": 120,
        "entropy": 480,
        "top_class_error": 480,
        "map a": 480,
        "map b": 480,
    }


@pytest.mark.torch
def test_pooled_network_matches_its_torch_copy(bench):
    """The CT cases' networks (pooled inside, probabilities resized back) are the same network in ONNX and
    torch, and their probabilities still sum to 1."""
    pytest.importorskip("torch")
    for case in (bench.QUICK_CASES["ct3d"], bench.QUICK_CASES["ct2d"]):
        d = case.spatial_dims
        weights = bench.unet_weights(d, case.channels, case.num_classes, seed=0)
        graph = bench.unet_onnx(d, case.channels, weights, bench.case_spec(case), stem=case.stem)
        session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        window = np.random.default_rng(0).normal(size=(1, 1, *case.patch)).astype(np.float32)
        probabilities, maps = session.run(None, {"image": window})
        assert probabilities.shape == (1, case.num_classes, *case.patch) and maps.shape == (1, 2, *case.patch)
        np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
        torch_probabilities = bench.unet_torch(d, case.channels, weights, stem=case.stem)(window)
        assert np.abs(torch_probabilities - probabilities).max() < 1e-5


def test_demo_floor_is_the_windows_flops_over_the_peak(bench):
    row = {
        "graph_flops": 22.12e9,
        "demo": {"windows": 144, "seconds": 45.9},
        "backends": {"peak_gflops": 173.0},
    }
    line = bench.demo_floor(row)
    # 144 x 22.12 = 3185.3 GFLOP; / 173 GFLOP/s = 18.41 s
    assert "144 windows x 22.12 GFLOP = 3185 GFLOP" in line
    assert "at least 18.4 s" in line and "took 45.9 s" in line
