"""`import napari_medcl` and `medcl-predict --help` stay light: no torch, onnxruntime or SimpleITK, under 1 s."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HEAVY = (
    "torch", "onnxruntime", "SimpleITK", "onnx", "napari", "scipy", "highdicom", "pydicom",
    "fastapi", "uvicorn", "httpx",
)  # fmt: skip
ROOT = Path(__file__).parents[2]

PROBE = """
import json, sys, time
start = time.perf_counter()
{body}
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "loaded": sorted(m for m in {heavy!r} if m in sys.modules)}}))
"""


def _probe(body: str) -> dict:
    code = PROBE.format(body=body, heavy=HEAVY)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_napari_medcl_is_light_and_fast():
    report = _probe("import napari_medcl\nassert napari_medcl.__version__")
    assert report["loaded"] == []
    assert report["seconds"] < 1.0, report


def test_cli_help_is_light_and_fast():
    body = (
        "import contextlib, io\n"
        "from napari_medcl.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0\n"
        "assert 'medcl-predict' in out.getvalue() and '--save-probabilities' in out.getvalue()\n"
    )
    report = _probe(body)
    assert report["loaded"] == []
    assert report["seconds"] < 1.0, report


def test_inference_modules_import_without_torch():
    body = "import napari_medcl.prediction, napari_medcl.onnx_session, napari_medcl.tiling, napari_medcl.preprocess"
    report = _probe(body)
    assert "torch" not in report["loaded"] and "onnxruntime" not in report["loaded"]


def test_remote_client_needs_no_server_package_or_engine():
    report = _probe(
        "import napari_medcl.remote, napari_medcl.transfer\nfrom napari_medcl import RemoteClient"
    )
    assert report["loaded"] == []


def test_serve_help_is_light_and_fast():
    body = (
        "import contextlib, io\n"
        "from napari_medcl.serve.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0\n"
        "assert 'medcl-serve' in out.getvalue() and '--token-file' in out.getvalue()\n"
    )
    report = _probe(body)
    assert report["loaded"] == []
    assert report["seconds"] < 1.0, report


def test_verdict_and_profile_need_numpy_only():
    report = _probe("import napari_medcl.verdict, napari_medcl.training_profile")
    assert report["loaded"] == []


def test_calibrate_help_is_torch_free():
    body = (
        "import contextlib, io\n"
        "from export.calibrate import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0\n"
        "assert 'medcl-calibrate' in out.getvalue()\n"
    )
    report = _probe(body)
    assert report["loaded"] == []


def test_dicom_seg_writer_imports_without_torch():
    report = _probe("import napari_medcl.io.dicom_seg, napari_medcl._writer\nimport highdicom")
    assert "highdicom" in report["loaded"] and "torch" not in report["loaded"]


def test_console_script_help_runs_in_under_a_second():
    script = shutil.which("medcl-predict", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the package is not installed in this environment (no medcl-predict script)")
    start = time.perf_counter()
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - start
    assert result.returncode == 0 and "usage: medcl-predict" in result.stdout
    assert seconds < 1.0 + _interpreter_start_seconds()


def _interpreter_start_seconds() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=60)
    return time.perf_counter() - start


def test_public_predict_stays_the_function_after_submodules_are_imported():
    import napari_medcl
    import napari_medcl.prediction

    assert callable(napari_medcl.predict) and napari_medcl.predict.__name__ == "predict"
    assert callable(napari_medcl.predict_iter)


def test_rank_help_and_corrections_are_torch_free():
    body = (
        "import contextlib, io\n"
        "import napari_medcl.corrections\n"
        "from napari_medcl.rank_cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0\n"
        "assert 'medcl-rank' in out.getvalue()\n"
    )
    report = _probe(body)
    assert report["loaded"] == []
