"""medcl-serve and napari_medcl.remote against real servers on 127.0.0.1: local and remote predictions agree,
and so do the interactive sessions (prompts, undo, brush edits, next region); tokens, upload limits, model
names, paths and prompts are checked; kills, expiry (mid-prompting too), cancel, busy and concurrent clients."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import warnings

import numpy as np
import pytest

from napari_medcl.corrections import read_record
from napari_medcl.errors import Cancelled, PredictionError, ServerError, UsageError
from napari_medcl.interactive import open_session as open_interactive
from napari_medcl.io import read_image
from napari_medcl.layer_data import segment_volume_iter
from napari_medcl.onnx_session import load_model
from napari_medcl.prediction import Progress, predict_iter
from napari_medcl.prompts import box as prompt_box
from napari_medcl.prompts import point, scribble
from napari_medcl.remote import RemoteClient, SessionRestoredWarning
from napari_medcl.serve import cli as serve_cli
from napari_medcl.server_connection import (
    SERVER,
    SavedServer,
    ServerConnection,
    load_saved_server,
    save_server,
    settings_path,
)
from napari_medcl.transfer import labels_from_npz, labels_to_npz, volume_to_npz
from napari_medcl.volume import Prediction, Volume
from tests.medcl_server import ROOT, running_server
from tests.napari_medcl.test_interactive import EXTRA, MISSED, planted_case
from tests.onnx_models import conv_model, pointwise_labels, pointwise_model, save

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TOKEN = "test-token-0123456789abcdefghij"
OBLIQUE = np.array([[0.0, 0.6, 0.8], [0.0, 0.8, -0.6], [1.0, 0.0, 0.0]])
# float16 keeps values in [0, 1] within 2^-12; a little more for the sum of rounding in the entropy.
HALF_ATOL = 5e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    save(pointwise_model(patch=(8, 8, 8)), folder / "point3d.onnx")
    save(pointwise_model(spatial_dims=2, patch=(16, 16), maps=()), folder / "point2d.onnx")
    save(conv_model(patch=(7, 9, 8)), folder / "conv3d.onnx")
    return folder


@pytest.fixture(scope="module")
def local_models(model_dir):
    return {
        name: load_model(model_dir / f"{name}.onnx", device="cpu", backend="onnxruntime")
        for name in ("point3d", "point2d", "conv3d")
    }


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    args = ("--models", str(model_dir), "--device", "cpu", "--backend", "onnxruntime")
    with running_server(*args, token=TOKEN, token_dir=tmp_path_factory.mktemp("token")) as running:
        yield running


@pytest.fixture
def client(server):
    return RemoteClient(server.url, TOKEN)


def _volume(shape, seed=0, **geometry):
    """Random values in [0, 1], none within 0.02 of the pointwise models' threshold 0.5."""
    x = np.random.default_rng(seed).random(shape).astype(np.float32)
    x[np.abs(x - 0.5) < 0.02] += np.float32(0.04)
    n = len(shape)
    return Volume(
        x,
        geometry.get("spacing", (2.5, 0.7, 0.9)[-n:]),
        geometry.get("origin", (-3.0, 4.0, 10.0)[-n:]),
        geometry.get("direction", OBLIQUE if n == 3 else np.eye(2)),
        source=geometry.get("source"),
        format=geometry.get("format"),
    )


def _outputs(prediction):
    named = {"entropy": prediction.entropy, "top_class_error": prediction.top_class_error}
    if prediction.uafr_uncertainty is not None:
        named["uafr_uncertainty"] = prediction.uafr_uncertainty
    named.update({f"map {k}": v for k, v in prediction.uncertainty_maps.items()})
    if prediction.probabilities is not None:
        named["probabilities"] = prediction.probabilities
    return named


CASES = [
    ("point3d", (13, 17, 11), None, {}),
    ("point3d", (13, 17, 11), ((2, 9), (3, 11), (1, 8)), {}),
    ("point3d", (13, 17, 11), ("slice", 0, 5), {"overlap": 0.25}),
    ("point2d", (5, 20, 18), ("slice", 0, 4), {}),
    ("point2d", (37, 50), ((5, 30), (10, 44)), {}),
    ("conv3d", (12, 14, 10), None, {"return_probabilities": True, "tta": True}),
    ("conv3d", (12, 14, 10), ((0, 12), (2, 9), (3, 10)), {}),
]


@pytest.mark.parametrize(("name", "shape", "region", "options"), CASES)
def test_remote_prediction_equals_the_local_one(client, local_models, name, shape, region, options):
    volume = _volume(shape, source="/scans/case.nii.gz", format="nifti")
    local_items = list(predict_iter(volume, local_models[name], region=region, **options))
    with client.open_session(volume, name) as session:
        remote_items = list(session.predict_iter(region=region, **options))
    local, remote = local_items[-1], remote_items[-1]
    assert isinstance(remote, Prediction)
    assert all(isinstance(item, Progress) for item in remote_items[:-1])
    assert [i.stage for i in remote_items[:2]] == ["preprocess", "preprocess"]
    assert remote_items[-2].stage == "postprocess" and remote_items[-2].done == 1

    assert remote.labels.array.dtype == local.labels.array.dtype == np.uint8
    np.testing.assert_array_equal(remote.labels.array, local.labels.array)
    if name.startswith("point"):  # the exact oracle, inside the region
        inside = local.labels.array.astype(bool) | (local.top_class_error.array > 0)
        np.testing.assert_array_equal(remote.labels.array[inside], pointwise_labels(volume.array)[inside])
    local_outputs, remote_outputs = _outputs(local), _outputs(remote)
    assert local_outputs.keys() == remote_outputs.keys()
    for key, output in remote_outputs.items():
        assert output.array.dtype == np.float32, key
        assert output.array.shape == local_outputs[key].array.shape, key
        np.testing.assert_allclose(
            output.array, local_outputs[key].array, atol=HALF_ATOL, rtol=0, err_msg=key
        )
    for output in [remote.labels, *remote_outputs.values()]:
        assert output.same_geometry(volume, atol=0)
        assert output.source == volume.source and output.format == "nifti"

    assert remote.verdict == local.verdict
    sent, kept = remote.provenance.to_dict(), local.provenance.to_dict()
    assert sent["input"] == kept["input"]  # this volume's path and format, restored on the client
    for key in ("roi", "tiling", "preprocessing", "nonzero_box", "verdict"):
        assert sent.get(key) == kept.get(key), key
    assert sent["model"]["sha256"] == kept["model"]["sha256"]
    assert sent["model"]["path"] == f"{client.url}/models/{name}"


def test_one_upload_serves_many_predictions_and_close_frees_the_session(client):
    volume = _volume((10, 12, 9))
    before = client.status()["sessions"]
    session = client.open_session(volume, "point3d")
    assert client.status()["sessions"] == before + 1
    first = session.predict(region=("slice", 0, 3))
    second = session.predict()
    assert session.uploads == 1
    np.testing.assert_array_equal(second.labels.array, pointwise_labels(volume.array))
    assert first.labels.array[4:].max() == 0 and first.labels.array[3].any()
    session.close()
    assert client.status()["sessions"] == before
    with pytest.raises(Exception, match="this session is closed"):
        session.predict()  # not a silent new upload


def test_models_lists_the_served_specs_and_unknown_models_are_refused(client):
    specs = client.models()
    assert sorted(specs) == ["conv3d", "point2d", "point3d"]
    assert specs["point2d"].spatial_dims == 2 and specs["conv3d"].num_classes == 3
    with pytest.raises(
        ServerError, match="unknown model 'nope'; this server serves: conv3d, point2d, point3d"
    ):
        client.open_session(_volume((4, 4, 4)), "nope")


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789abcdef"])
def test_a_missing_or_wrong_token_is_refused(server, token):
    client = RemoteClient(server.url, token)
    assert client.health()["status"] == "ok"  # the only endpoint open to all (load balancer checks)
    for call in (client.models, client.status, lambda: client.open_session(_volume((4, 4, 4)), "point3d")):
        with pytest.raises(ServerError, match="missing or wrong token") as caught:
            call()
        assert "\n" not in str(caught.value)
    status, answer, headers = _raw(server.url, "GET", "/models", token=token)
    assert status == 401 and answer["code"] == "bad_token" and headers.get("www-authenticate") == "Bearer"
    for open_door in ("/openapi.json", "/docs"):  # nothing else answers without the token
        assert _raw(server.url, "GET", open_door)[0] == 404


@pytest.mark.parametrize(
    ("method", "path", "body", "code"),
    [
        ("POST", "/sessions?model=..%2F..%2Fetc%2Fpasswd", b"", "path_refused"),
        ("POST", "/sessions?model=%2Fhome%2Fme%2Fmodel.onnx", b"", "path_refused"),
        ("POST", "/sessions?model=model.onnx", b"", "path_refused"),
    ],
)
def test_a_request_naming_a_path_is_refused(server, method, path, body, code):
    status, answer, _ = _raw(server.url, method, path, body=body, token=TOKEN)
    assert status == 400 and answer["code"] == code, answer
    assert "not paths" in answer["error"]


@pytest.mark.parametrize(
    ("request_body", "code"),
    [
        ({"options": {"series": "/data/dicom/case1"}}, "path_refused"),
        ({"options": {"image": "scan.nii.gz"}}, "bad_option"),
        ({"options": {"device": "cuda"}}, "bad_option"),
        ({"region": "/etc/passwd"}, "path_refused"),
        ({"region": "whole"}, "bad_region"),
        ({"region": [["/etc/passwd", 3]]}, "path_refused"),
        ({"region": [[0, 2], [0, 2]]}, "bad_region"),  # 2 pairs for a 3D image
        ({"region": None, "path": "/tmp/x"}, "bad_request"),
    ],
)
def test_predict_requests_are_checked_before_anything_runs(server, client, request_body, code):
    with client.open_session(_volume((6, 6, 6)), "point3d") as session:
        path = f"/sessions/{session.session_id}/predict"
        status, answer, _ = _raw(
            server.url, "POST", path, body=json.dumps(request_body).encode(), token=TOKEN
        )
    assert status == 400 and answer["code"] == code, answer
    assert "\n" not in answer["error"]


def test_client_refuses_options_the_server_chooses(client):
    with client.open_session(_volume((6, 6, 6)), "point3d") as session:
        with pytest.raises(Exception, match="chosen by the server"):
            session.predict(device="cuda")
        assert session.predict(overlap=0.0).labels.array.shape == (6, 6, 6)


def test_a_prediction_error_keeps_its_class_and_line(model_dir, tmp_path):
    save(pointwise_model(produce_nan=True, name="nan-model"), tmp_path / "nan.onnx")
    args = ("--models", str(tmp_path), "--device", "cpu", "--backend", "onnxruntime")
    with (
        running_server(*args) as running,
        RemoteClient(running.url).open_session(_volume((6, 6, 6)), "nan") as session,
    ):
        with pytest.raises(PredictionError, match="nan-model") as caught:
            session.predict()
        assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def limited_server(model_dir, tmp_path_factory):
    args = ("--models", str(model_dir), "--device", "cpu", "--backend", "onnxruntime")
    args += ("--max-sessions", "2", "--max-upload-bytes", "20000")
    with running_server(*args, token=TOKEN, token_dir=tmp_path_factory.mktemp("token")) as running:
        yield running


def test_an_oversize_upload_is_refused_before_it_is_read(limited_server):
    client = RemoteClient(limited_server.url, TOKEN)
    big = _volume((40, 40, 40))  # random floats: about 200 kB compressed
    with pytest.raises(ServerError, match=r"more than the server's limit of 20,000") as caught:
        client.open_session(big, "point3d")
    assert "\n" not in str(caught.value)
    # The server itself: refused from Content-Length, before the body (never sent here) is read.
    status, answer, _ = _raw(
        limited_server.url,
        "POST",
        "/sessions?model=point3d",
        token=TOKEN,
        headers={"Content-Length": "10000000"},
    )
    assert status == 413 and answer["code"] == "too_large" and "10,000,000 bytes" in answer["error"]
    # A chunked body (no Content-Length) is cut off once it passes the limit.
    chunks = iter([b"x" * 8192] * 4)
    status, answer, _ = _raw(limited_server.url, "POST", "/sessions?model=point3d", body=chunks, token=TOKEN)
    assert status == 413 and answer["code"] == "too_large" and "more than 20,000 bytes" in answer["error"]
    assert client.status()["sessions"] == 0


def test_at_max_sessions_a_new_session_hears_the_server_is_busy(limited_server):
    client = RemoteClient(limited_server.url, TOKEN)
    small = _volume((5, 5, 5))
    first, second = client.open_session(small, "point3d"), client.open_session(small, "point3d")
    with pytest.raises(ServerError, match=r"server busy \(2 of 2 sessions in use\)"):
        client.open_session(small, "point3d")
    first.close()
    third = client.open_session(small, "point3d")
    assert third.predict().labels.array.shape == (5, 5, 5)
    second.close()
    third.close()
    assert client.status()["sessions"] == 0


def test_an_expired_session_is_uploaded_again_once(model_dir, tmp_path):
    args = ("--models", str(model_dir), "--device", "cpu", "--backend", "onnxruntime", "--idle-timeout", "1")
    with running_server(*args, token=TOKEN, token_dir=tmp_path) as running:
        client = RemoteClient(running.url, TOKEN)
        volume = _volume((8, 9, 10))
        with client.open_session(volume, "point3d") as session:
            session.predict()
            old = session.session_id
            time.sleep(1.8)  # past the idle timeout; the server's sweeper drops it
            assert client.status()["sessions"] == 0
            status, answer, _ = _raw(running.url, "POST", f"/sessions/{old}/predict", body=b"{}", token=TOKEN)
            assert status == 410 and answer["code"] == "session_expired"
            assert answer["error"] == "session expired after 1 s without a request; upload the image again"
            prediction = session.predict(region=((0, 4), (0, 9), (0, 10)))
            assert session.uploads == 2 and session.session_id != old
            np.testing.assert_array_equal(prediction.labels.array[:4], pointwise_labels(volume.array)[:4])


def test_a_server_killed_during_a_prediction_is_one_line_and_no_result(model_dir, tmp_path):
    args = ("--models", str(model_dir), "--device", "cpu", "--backend", "onnxruntime")
    with running_server(*args, token=TOKEN, token_dir=tmp_path) as running:
        client = RemoteClient(running.url, TOKEN)
        session = client.open_session(_volume((48, 48, 48)), "point3d")  # 11^3 windows of 8^3
        items = []
        with pytest.raises(ServerError) as caught:
            for item in session.predict_iter(overlap=0.5):
                items.append(item)
                if item.stage == "infer":
                    os.kill(running.process.pid, signal.SIGKILL)
                    running.process.wait(timeout=10)
        message = str(caught.value)
        assert "\n" not in message and running.url in message
        assert "stopped answering" in message or "cannot reach" in message
        assert not any(isinstance(item, Prediction) for item in items)
        with pytest.raises(ServerError, match="cannot reach the server"):
            session.predict()  # the session cannot be uploaded again either: one line, no retry loop


def test_cancel_stops_the_server_and_frees_its_device(client):
    cancel = threading.Event()
    before = client.status()["predictions"]
    with client.open_session(_volume((40, 40, 40)), "point3d") as session:
        with pytest.raises(Cancelled):
            for item in session.predict_iter(cancel=cancel, overlap=0.5):
                if item.stage == "infer":
                    cancel.set()
        deadline = time.monotonic() + 10
        while client.status()["queue"]["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.status()["queue"]["running"] == 0
        after = client.status()["predictions"]
        assert after["cancelled"] == before["cancelled"] + 1 and after["done"] == before["done"]
        assert session.predict(region=("slice", 0, 1)).labels.array[1].any()


def test_eight_concurrent_clients_get_their_own_results_one_prediction_at_a_time(server):
    results, failures = {}, []

    def one_client(k):
        try:
            volume = _volume((10 + k, 12, 9), seed=k)
            with RemoteClient(server.url, TOKEN).open_session(volume, "point3d") as session:
                whole = session.predict()
                runs = [session.last_server_run]
                part = session.predict(region=("slice", 0, k))
                runs.append(session.last_server_run)
            results[k] = (volume, whole, part, runs)
        except Exception as error:  # reported below, with the client it happened in
            failures.append((k, error))

    threads = [threading.Thread(target=one_client, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures
    assert sorted(results) == list(range(8))
    runs = []
    for k, (volume, whole, part, intervals) in results.items():
        expected = pointwise_labels(volume.array)
        np.testing.assert_array_equal(whole.labels.array, expected)
        np.testing.assert_array_equal(part.labels.array[k], expected[k])
        assert part.labels.array.sum() == expected[k].sum()
        runs += intervals
    # One device queue: the sixteen predictions ran one after the other, never two at once.
    runs.sort()
    assert all(end <= next_start for (_, end), (next_start, _) in zip(runs, runs[1:]))


def test_the_command_refuses_an_open_server_without_a_token(capsys):
    assert serve_cli.main(["--no-token", "--host", "0.0.0.0"]) == 2
    assert "--no-token is for development on this machine" in capsys.readouterr().err
    assert serve_cli.main([]) == 2
    assert "pass --token-file FILE" in capsys.readouterr().err


def test_a_missing_token_file_gets_a_new_private_token(tmp_path):
    path = tmp_path / "token"
    args = serve_cli.build_parser().parse_args(["--token-file", str(path)])
    token = serve_cli._token(args)
    assert path.read_text().strip() == token and len(token) >= serve_cli.MIN_TOKEN_CHARS
    assert path.stat().st_mode & 0o777 == 0o600
    assert serve_cli._token(args) == token  # read back, not replaced
    path.write_text("short\n")
    with pytest.raises(Exception, match="at least 22 characters"):
        serve_cli._token(args)


def _raw(url, method, path, *, body=None, token=None, headers=None):
    """One request with http.client (no client library logic): status, JSON answer, headers (lower case)."""
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    try:
        chunked = body is not None and not isinstance(body, bytes)
        connection.request(method, path, body=body, headers=all_headers, encode_chunked=chunked)
        response = connection.getresponse()
        data = response.read()
        return response.status, json.loads(data or b"{}"), {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


def test_raw_upload_of_a_volume_opens_a_session(server):
    """The wire format is plain .npz: any HTTP client can open a session."""
    body = volume_to_npz(_volume((4, 5, 6)))
    status, answer, _ = _raw(server.url, "POST", "/sessions?model=point3d", body=body, token=TOKEN)
    assert status == 201 and answer["model"] == "point3d" and answer["spec"]["spatial_dims"] == 3
    status, _, _ = _raw(server.url, "DELETE", f"/sessions/{answer['session']}", token=TOKEN)
    assert status == 204


def test_the_widget_path_gives_the_same_layers_and_uploads_each_image_once(server, local_models):

    def drain(steps):
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                return stop.value

    volume = _volume((9, 11, 10), source="/scans/case.nii.gz", format="nifti")
    connection = ServerConnection(server.url, TOKEN)
    remote_model = connection.model("point3d")
    local = drain(segment_volume_iter(volume, local_models["point3d"], name="case"))
    remote = drain(segment_volume_iter(volume, remote_model, name="case"))
    drain(segment_volume_iter(volume, remote_model, name="case", roi=("slice", 0, 2)))
    assert [kind for _, _, kind in remote.layers] == [kind for _, _, kind in local.layers]
    for (data, meta, kind), (want, want_meta, _) in zip(remote.layers, local.layers):
        if kind == "labels":
            np.testing.assert_array_equal(data, want)
        else:
            np.testing.assert_allclose(data, want, atol=HALF_ATOL, rtol=0)
        np.testing.assert_allclose(meta["scale"], want_meta["scale"])
    assert remote.model is remote_model and remote_model.session_for(volume).uploads == 1
    with pytest.raises(Exception, match="cannot run on the server"):
        connection.model("/home/me/model.onnx")
    connection.close()
    assert client_sessions(server) == 0


def client_sessions(server):
    return RemoteClient(server.url, TOKEN).status()["sessions"]


def test_the_server_choice_is_remembered_privately(tmp_path, monkeypatch):

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert load_saved_server() == SavedServer()  # nothing remembered: this computer
    saved = SavedServer(where=SERVER, url="https://seg.example.org", token=TOKEN)
    path = save_server(saved)
    assert path == settings_path() == tmp_path / "napari-medcl" / "server.json"
    assert path.stat().st_mode & 0o777 == 0o600 and load_saved_server() == saved
    path.write_text("{not json")
    assert load_saved_server() == SavedServer()


def test_a_client_process_that_exits_without_closing_frees_its_session(server):
    code = (
        "import numpy as np\n"
        "from napari_medcl.remote import RemoteClient\n"
        "from napari_medcl.volume import Volume\n"
        f"client = RemoteClient({server.url!r}, {TOKEN!r})\n"
        "session = client.open_session(Volume(np.ones((4, 4, 4), np.float32), (1,) * 3, (0,) * 3, np.eye(3)), 'point3d')\n"
        "session.predict()\n"
        "print(client.status()['sessions'])\n"
    )
    before = client_sessions(server)

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) == before + 1  # open while it ran
    assert client_sessions(server) == before  # closed when its process ended


# -- the interactive session on the server: prompts, undo, brush edits, next region


def _walk(session, spatial_dims):
    """The steps of tests/napari_medcl/test_interactive.py on one session; what each gave: (the step, the
    labels after it, the update's box, changed count and labels)."""
    z = 6 if spatial_dims == 3 else 0
    seen = []

    def step(name, update):
        box = None if update is None or update.box is None else tuple((s.start, s.stop) for s in update.box)
        numbers = (None, None) if update is None else (update.changed, update.labels)
        seen.append((name, session.labels.copy(), box, *numbers))

    session.predict()
    step("predict", None)
    step("click in the missed blob", session.add_prompt(point(z, 7, 7, label=1)))
    step("negative click in the extra blob", session.add_prompt(point(z, 22, 6, label=1, positive=False)))
    step("click that changes nothing", session.add_prompt(point(z, 7, 24, label=1)))
    step("undo", session.undo())
    edited = session.labels.copy()
    edited[(0,) * spatial_dims] = 1
    step("brush", session.set_labels(edited))
    step("brush again, nothing new", session.set_labels(edited))
    step("box", session.add_prompt(prompt_box((z, 4, 4), (z + 2 * (spatial_dims == 3), 9, 9), label=1)))
    step("scribble", session.add_prompt(scribble([(z, 20, 5), (z, 21, 6)], label=0)))
    step("undo", session.undo())
    region = session.next_region()
    seen.append(("next region", region.box, region.center, round(region.score, 9), region.labelled_voxels))
    session.predict(region=("slice", 0, z) if spatial_dims == 3 else None)
    step("re-run replays the prompts", None)
    step("undo after a re-run does nothing", session.undo())
    seen.append(("prompts", [p.to_dict() for p in session.prompts]))
    return seen


@pytest.mark.parametrize(("spatial_dims", "name"), [(3, "point3d"), (2, "point2d")])
def test_prompts_on_the_server_give_the_labels_of_a_local_session(client, local_models, spatial_dims, name):
    volume, _truth = planted_case(spatial_dims)
    local = _walk(open_interactive(volume, local_models[name]), spatial_dims)
    with client.open_session(volume, name) as session:
        remote = _walk(session, spatial_dims)
        assert session.uploads == 1 and session.restores == 0
        labels_after = session.labels.copy()
    assert [entry[0] for entry in remote] == [entry[0] for entry in local]
    for got, want in zip(remote, local):
        assert len(got) == len(want), got[0]
        for a, b in zip(got[1:], want[1:]):
            if isinstance(b, np.ndarray):
                assert a.dtype == b.dtype, got[0]
                np.testing.assert_array_equal(a, b, err_msg=got[0])
            else:
                assert a == b, got[0]
    # and the steps did what test_interactive.py says they do (so the comparison is not of two wrong runs)
    by_step = {entry[0]: entry for entry in remote}
    missed, extra = (MISSED, EXTRA) if spatial_dims == 3 else (MISSED[1:], EXTRA[1:])
    assert (by_step["click in the missed blob"][1][missed] == 1).all()
    assert not by_step["negative click in the extra blob"][1][extra].any()
    assert by_step["click that changes nothing"][3] == 0 and by_step["undo"][3] == 0
    assert by_step["brush"][3] == 1 and by_step["brush again, nothing new"][2] is None
    assert by_step["undo after a re-run does nothing"][3] == 0
    assert len(by_step["prompts"][1]) == 3
    rerun, before = by_step["re-run replays the prompts"][1], remote[-5][1]
    outside_brush = np.ones(rerun.shape, dtype=bool)
    outside_brush[(0,) * spatial_dims] = False  # the 2D re-run covers the brushed voxel: the model's again
    np.testing.assert_array_equal(rerun[outside_brush], before[outside_brush])
    assert not labels_after[extra].any() and labels_after[missed].any()


def test_a_click_sends_back_only_the_box_it_changed(server, client):
    volume, _ = planted_case()
    with client.open_session(volume, "point3d") as session:
        session.predict()
        path = f"/sessions/{session.session_id}/prompts"
        body = json.dumps(point(6, 7, 7, label=1).to_dict()).encode()
        status, data = _raw_bytes(server.url, "POST", path, body=body, token=TOKEN)
        assert status == 200
        box, labels, numbers = labels_from_npz(data, session.grid)
        assert box == MISSED and labels.dtype == np.uint8 and (labels == 1).all()
        assert numbers["changed"] == labels.size and numbers["prompts"] == 1 and numbers["seconds"] > 0
        assert len(data) < 1000  # the box, not the map (12 x 32 x 32 voxels)
        status, answer, _ = _raw(server.url, "GET", path, token=TOKEN)
        assert answer == {"prompts": [point(6, 7, 7, label=1).to_dict()]}


MISSED_SIZE = 5 * 6 * 6
PROMPT = {"kind": "point", "label": 1, "voxels": [[6, 7, 7]], "positive": True}


@pytest.mark.parametrize(
    ("change", "code", "says"),
    [
        ({"kind": "lasso"}, "bad_prompt", "kind must be one of"),
        ({"label": 5}, "bad_prompt", "not one of the model's classes (0..1)"),
        ({"label": True}, "bad_prompt", "not one of the model's classes"),
        ({"label": -1}, "bad_prompt", "not one of the model's classes"),
        ({"label": "1"}, "bad_prompt", "not one of the model's classes"),
        ({"positive": "yes"}, "bad_prompt", "positive must be true or false"),
        ({"voxels": [[40, 1, 1]]}, "bad_prompt", "lies outside the image (shape (12, 32, 32))"),
        ({"voxels": [[-1, 1, 1]]}, "bad_prompt", "lies outside the image"),
        ({"voxels": [[6.5, 1, 1]]}, "bad_prompt", "whole-number indices"),
        ({"voxels": [[6, 1]]}, "bad_prompt", "whole-number indices"),
        ({"voxels": []}, "bad_prompt", "list of 1 to 100,000"),
        ({"voxels": [[6, 7, 7]] * 100_001}, "bad_prompt", "list of 1 to 100,000"),
        ({"voxels": [[6, 7, 7], [6, 7, 8]]}, "bad_prompt", "a point prompt has one voxel"),
        (
            {"kind": "box", "voxels": [[1, 1, 1], [2, 2, 2]], "positive": False},
            "bad_prompt",
            "cannot be negative",
        ),
        ({"path": "/etc/passwd"}, "path_refused", "the prompt names a path"),
        ({"kind": "../../etc/passwd"}, "path_refused", "the prompt names a path"),
        ({"image": "case.nii.gz"}, "bad_prompt", "has the fields kind, label, voxels and positive"),
        ({"voxels": None}, "bad_prompt", "list of 1 to 100,000"),
    ],
)
def test_a_bad_prompt_is_refused_in_one_line_and_changes_nothing(server, client, change, code, says):
    volume, _ = planted_case()
    with client.open_session(volume, "point3d") as session:
        session.predict()
        before = session.labels.copy()
        path = f"/sessions/{session.session_id}/prompts"
        body = json.dumps({**PROMPT, **change}).encode()
        status, answer, _ = _raw(server.url, "POST", path, body=body, token=TOKEN)
        assert status == 400 and answer["code"] == code, answer
        assert says in answer["error"] and "\n" not in answer["error"], answer
        assert _raw(server.url, "GET", path, token=TOKEN)[1] == {"prompts": []}
        session._labels_stale = True  # fetch the server's labels: untouched
        session._catch_up()
        np.testing.assert_array_equal(session.labels, before)


def test_prompt_requests_that_are_not_prompts_are_refused(server, client):
    volume, _ = planted_case()
    with client.open_session(volume, "point3d") as session:
        path = f"/sessions/{session.session_id}"
        with pytest.raises(UsageError, match=r"run the model on this case first"):
            session.add_prompt(point(6, 7, 7, label=1))  # as in-process
        with pytest.raises(UsageError, match=r"run the model on this case first"):
            session.next_region()
        status, answer, _ = _raw(
            server.url, "POST", path + "/prompts", body=json.dumps(PROMPT).encode(), token=TOKEN
        )
        assert status == 409 and answer["code"] == "no_prediction"
        session.predict()
        for body in (b"not json", b"[1, 2]", b"null"):
            status, answer, _ = _raw(server.url, "POST", path + "/prompts", body=body, token=TOKEN)
            assert status == 400 and answer["code"] in ("bad_request", "bad_prompt"), answer
        with pytest.raises(UsageError, match="outside the image"):
            session.add_prompt(point(40, 1, 1, label=1))  # the server's check, the local message
        grid = session.grid
        bad_labels = [
            labels_to_npz((slice(0, 2), slice(0, 2), slice(30, 33)), np.ones((2, 2, 3), np.uint8)),  # outside
            labels_to_npz((slice(0, 2),) * 3, np.ones((2, 2, 2), np.float32)),  # not labels
            labels_to_npz((slice(0, 2),) * 3, np.ones((2, 3, 2), np.uint8)),  # not the box's shape
            labels_to_npz(None, None, changed=3),  # no box
            b"PK not a zip",
        ]
        for body in bad_labels:
            status, answer, _ = _raw(server.url, "PUT", path + "/labels", body=body, token=TOKEN)
            assert status == 400 and answer["code"] == "bad_labels", answer
            assert "\n" not in answer["error"]
        status, answer, _ = _raw(server.url, "GET", path + "/next-region?window_mm=-3", token=TOKEN)
        assert status == 400 and "window_mm" in answer["error"]
        status, data = _raw_bytes(server.url, "GET", path + "/labels", token=TOKEN)
        box, labels, _ = labels_from_npz(data, grid)
        np.testing.assert_array_equal(labels, session.labels)  # none of it changed the labels


def test_an_expired_session_in_the_middle_of_prompting_is_rebuilt_and_says_so_once(
    model_dir, local_models, tmp_path
):
    args = ("--models", str(model_dir), "--device", "cpu", "--backend", "onnxruntime", "--idle-timeout", "1")
    volume, _ = planted_case()
    local = open_interactive(volume, local_models["point3d"])
    with running_server(*args, token=TOKEN, token_dir=tmp_path) as running:
        client = RemoteClient(running.url, TOKEN)
        with client.open_session(volume, "point3d") as remote:
            for session in (local, remote):
                session.predict()
                session.add_prompt(point(6, 7, 7, label=1))
                session.add_prompt(point(6, 22, 6, label=1, positive=False))
                session.undo()
                edited = session.labels.copy()
                edited[0, 0, :3] = 1
                session.set_labels(edited)
            old = remote.session_id
            time.sleep(1.8)  # past the idle timeout; the server's sweeper drops it
            assert client.status()["sessions"] == 0
            with pytest.warns(
                SessionRestoredWarning, match="1 prediction.s. re-run and 1 prompt.s. and 1 edit"
            ):
                update = remote.add_prompt(point(6, 22, 6, label=1, positive=False))
            assert update.box == local.add_prompt(point(6, 22, 6, label=1, positive=False)).box
            assert remote.uploads == 2 and remote.restores == 1 and remote.session_id != old
            assert "uploaded again" in remote.notice
            np.testing.assert_array_equal(remote.labels, local.labels)
            # the history came back too: the same steps undo the same way, with no second warning
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                for _ in range(3):
                    assert remote.undo().changed == local.undo().changed
                    np.testing.assert_array_equal(remote.labels, local.labels)
            assert [p.to_dict() for p in remote.prompts] == [p.to_dict() for p in local.prompts]

        # predictions only: re-uploaded at once, replayed only when a prompt needs the server's state
        local = open_interactive(volume, local_models["point3d"])
        with client.open_session(volume, "point3d") as remote:
            for session in (local, remote):
                session.predict(region=("slice", 0, 6))
                session.predict(region=((0, 12), (0, 16), (0, 32)))
            time.sleep(1.8)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # nothing to say: no prompt was lost
                for session in (local, remote):
                    session.predict(region=((0, 12), (10, 20), (0, 32)))
                assert remote.uploads == 2
                np.testing.assert_array_equal(remote.labels, local.labels)
                for session in (local, remote):
                    session.add_prompt(point(6, 22, 6, label=1, positive=False))
            np.testing.assert_array_equal(remote.labels, local.labels)
            assert remote.next_region() == local.next_region()


def test_two_clients_prompt_their_own_sessions_at_once(server, local_models):
    results, failures = {}, []
    clicks = [(6, 7, 7, 1, True), (6, 22, 6, 1, False), (6, 7, 24, 1, True), (3, 3, 3, 1, True)]

    def one_client(k):
        try:
            volume, _ = planted_case()
            volume.array[...] = np.roll(volume.array, 3 * k, axis=2)  # each its own image
            with RemoteClient(server.url, TOKEN).open_session(volume, "point3d") as session:
                session.predict()
                for _round in range(3):
                    for z, y, x, label, positive in clicks:
                        session.add_prompt(point(z, y, (x + 3 * k) % 32, label=label, positive=positive))
                    for _ in clicks:
                        session.undo()
                for z, y, x, label, positive in clicks:
                    session.add_prompt(point(z, y, (x + 3 * k) % 32, label=label, positive=positive))
                results[k] = (volume, session.labels.copy())
        except Exception as error:  # reported below, with the client it happened in
            failures.append((k, error))

    threads = [threading.Thread(target=one_client, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures
    for k, (volume, labels) in results.items():
        local = open_interactive(volume, local_models["point3d"])
        local.predict()
        for z, y, x, label, positive in clicks:
            local.add_prompt(point(z, y, (x + 3 * k) % 32, label=label, positive=positive))
        np.testing.assert_array_equal(labels, local.labels)
    assert not np.array_equal(results[0][1], results[1][1])


def _raw_bytes(url, method, path, *, body=None, token=None):
    """One request with http.client: status and the raw answer."""
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# -- a corrected case into the server's corrections dataset


@pytest.fixture(scope="module")
def corrections_server(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("corrections") / "dataset"
    args = ("--models", str(model_dir), "--device", "cpu", "--backend", "onnxruntime")
    args += ("--corrections-dir", str(folder))
    with running_server(*args, token=TOKEN, token_dir=tmp_path_factory.mktemp("token")) as running:
        yield running, folder


def test_a_corrected_case_goes_into_the_servers_corrections_dataset(corrections_server):
    running, folder = corrections_server
    client = RemoteClient(running.url, TOKEN)
    volume, _ = planted_case()
    with client.open_session(volume, "point3d") as session:
        session.predict(region=((0, 12), (0, 16), (0, 32)))
        session.predict(region=((0, 12), (16, 32), (0, 32)))  # the model's labels: both halves
        model_labels = session.labels.copy()
        session.add_prompt(point(6, 7, 7, label=1))
        edited = session.labels.copy()
        edited[0, 0, :4] = 1  # a brush stroke not yet sent: add_correction sends it first
        answer = session.add_correction(edited, case_id="planted-1")
        assert answer["case_id"] == "planted-1" and answer["replaced"] is False
        assert answer["changed_voxels"] == int((edited != model_labels).sum()) == MISSED_SIZE + 4
        np.testing.assert_array_equal(session.labels, edited)

        written = read_image(folder / "labelsTr" / "planted-1.nii.gz")
        np.testing.assert_array_equal(written.array, edited)
        assert written.same_geometry(volume)
        image = read_image(folder / "imagesTr" / "planted-1_0000.nii.gz")
        np.testing.assert_allclose(image.array, volume.array)
        record = read_record(folder, "planted-1")
        assert record["model"]["name"] and record["model"]["path"] == "point3d"  # no server folder in it
        assert record["changed"]["voxels"] == answer["changed_voxels"]
        assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 1

        again = session.add_correction(case_id="planted-1")  # the same name replaces the case
        assert again["replaced"] is True
        named = session.add_correction()  # no name: a new dated one
        assert named["case_id"].startswith("case-") and named["case_id"] != "planted-1"
        assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 2
        with pytest.raises(UsageError, match="case_id must be"):
            session.add_correction(case_id="../planted")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"case_id": "../../etc/cron.d/x"}, "path_refused"),
        ({"case_id": "/tmp/x"}, "path_refused"),
        ({"case_id": "a\\b"}, "path_refused"),
        ({"path": "/data/corrections"}, "path_refused"),
        ({"folder": "corrections"}, "bad_request"),
        ({"case_id": "with space"}, "bad_request"),
        ({"case_id": 7}, "bad_request"),
        ({"channel_names": ["T1", "../x"]}, "path_refused"),
        ({"channel_names": "T1"}, "bad_request"),
    ],
)
def test_a_correction_request_names_a_case_never_a_path(corrections_server, body, code):
    running, folder = corrections_server
    with RemoteClient(running.url, TOKEN).open_session(planted_case()[0], "point3d") as session:
        session.predict()
        path = f"/sessions/{session.session_id}/corrections"
        status, answer, _ = _raw(running.url, "POST", path, body=json.dumps(body).encode(), token=TOKEN)
    assert status == 400 and answer["code"] == code, answer
    assert "\n" not in answer["error"]


def test_without_corrections_dir_a_corrected_case_is_refused(client):
    with client.open_session(planted_case()[0], "point3d") as session:
        with pytest.raises(UsageError, match="run the model"):
            session.next_region()
        session.predict()
        with pytest.raises(
            ServerError, match=r"keeps no corrections dataset \(start it with .*--corrections-dir"
        ):
            session.add_correction(case_id="x")
