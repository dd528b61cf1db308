"""A model with a calibrated error map, served by a real medcl-serve on 127.0.0.1: the remote client gets the
error likelihood as a local run gives it, and the server's next likely mistake follows it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from napari_medcl.error_model import ErrorModel
from napari_medcl.interactive import open_session as open_interactive
from napari_medcl.onnx_session import load_model
from napari_medcl.prediction import predict
from napari_medcl.remote import RemoteClient
from napari_medcl.volume import Volume
from tests.medcl_server import running_server
from tests.onnx_models import make_spec, pointwise_model, save

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TOKEN = "test-token-error-map-0123456789"
HALF_ATOL = 5e-4  # the maps travel as float16
ERROR_MODEL = ErrorModel(features=("top_error", "border"), coefficients=(4.0, 3.0), intercept=-3.0)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served-calibrated")
    spec = dataclasses.replace(make_spec(patch=(8, 8, 8)), error_model=ERROR_MODEL.to_dict())
    path = save(pointwise_model(spec=spec, k=3.0), folder / "calibrated.onnx")
    args = ("--models", str(folder), "--device", "cpu", "--backend", "onnxruntime")
    with running_server(*args, token=TOKEN, token_dir=tmp_path_factory.mktemp("token")) as server:
        yield RemoteClient(server.url, TOKEN), load_model(path, device="cpu", backend="onnxruntime")


@pytest.mark.parametrize("region", [None, ((2, 9), (3, 11), (1, 8))])
def test_a_remote_prediction_carries_the_calibrated_map(served, region):
    client, local_model = served
    assert client.models()["calibrated"].error_map_model == ERROR_MODEL
    volume = Volume(
        np.random.default_rng(3).random((13, 17, 11)).astype(np.float32),
        (2.5, 0.7, 0.9),
        (0, 0, 0),
        np.eye(3),
    )
    local = predict(volume, local_model, region=region)
    with client.open_session(volume, "calibrated") as session:
        remote = session.predict(region=region)
        remote_next = session.next_region()
    assert local.error_likelihood is not None and remote.error_likelihood is not None
    assert remote.error_likelihood.array.dtype == np.float32
    assert remote.error_likelihood.same_geometry(volume, atol=0)
    np.testing.assert_allclose(remote.error_likelihood.array, local.error_likelihood.array, atol=HALF_ATOL)
    assert remote.error_map[0] == "error_likelihood"

    session = open_interactive(volume, local_model)
    session.predict(region=region)
    assert remote_next == session.next_region()  # the server's session ranks by the same map
