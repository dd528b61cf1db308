"""A prompt-conditioned network exported: the graph's second input ``prompts``, the spec declaring it and
round-tripping, ONNX Runtime agreeing with torch, and the exported model answering clicks in CaseSession
(engine "network": a click changes labels only inside its box; undo takes it back)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from export import InferenceWrapper, spec_for_model, to_onnx
from napari_medcl.interactive import open_session
from napari_medcl.onnx_session import load_model
from napari_medcl.prompt_channels import PromptEncoding
from napari_medcl.prompts import box, point
from napari_medcl.spec import METADATA_KEY, ModelSpec
from napari_medcl.volume import Volume
from training.models import create_model

pytestmark = pytest.mark.torch

ENCODING = PromptEncoding(num_classes=3, radius_mm=2.0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny prompt model (random weights; the prompt channels' weights made large so that clicks matter)."""
    torch.manual_seed(0)
    network = create_model(
        "unet", spatial_dims=3, in_channels=1 + ENCODING.num_channels, num_classes=3, features=[4, 8]
    ).eval()
    with torch.no_grad():
        network.state_dict()["encoder.0.0.0.weight"][:, 1:] *= 20.0
    spec = spec_for_model(
        network, name="tiny-prompts", patch_size=(8, 16, 16), spacing=(1.0, 1.0, 1.0),
        normalization={"kind": "zscore"}, prompts=ENCODING.to_dict(),
    )  # fmt: skip
    path = tmp_path_factory.mktemp("prompts") / "tiny-prompts.onnx"
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        report = to_onnx(network, path, spec=spec, verify=True)
    assert report.verify.passed
    return path, network, spec


def test_the_graph_takes_the_prompt_channels_as_a_second_input_and_the_spec_round_trips(exported):
    path, network, spec = exported
    graph = onnx.load(str(path)).graph
    inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert list(inputs) == ["image", "prompts"]
    assert inputs["image"][1] == 1 and inputs["prompts"][1] == ENCODING.num_channels == 6
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    stored = ModelSpec.from_json(meta[METADATA_KEY])
    assert stored.in_channels == 1 and stored.prompts == spec.prompts
    assert stored.prompt_encoding == ENCODING


def test_onnx_runtime_feeds_zeros_without_prompts_and_agrees_with_torch(exported, one_torch_thread):
    path, network, spec = exported
    model = load_model(path, device="cpu", backend="onnxruntime")
    image = np.random.default_rng(0).normal(size=(1, 1, 8, 16, 16)).astype(np.float32)
    prompts = np.zeros((1, 6, 8, 16, 16), dtype=np.float32)
    prompts[0, 2, 3:5, 6:9, 6:9] = 1.0
    wrapper = InferenceWrapper(network, prompt_channels=6)
    with torch.no_grad():
        automatic = wrapper(torch.from_numpy(image), torch.zeros(1, 6, 8, 16, 16))[0].numpy()
        clicked = wrapper(torch.from_numpy(image), torch.from_numpy(prompts))[0].numpy()
    assert np.allclose(model.run(image)[0], automatic, atol=1e-4)
    assert np.allclose(model.run(image, prompts)[0], clicked, atol=1e-4)
    assert not np.allclose(automatic, clicked, atol=1e-2)  # the prompt channels reach the output


def test_a_click_through_the_network_engine_changes_only_its_box_and_undo_restores(exported):
    path, _, _ = exported
    rng = np.random.default_rng(1)
    image = rng.normal(size=(16, 40, 40)).astype(np.float32)
    volume = Volume(image, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    session = open_session(volume, load_model(path, device="cpu", backend="onnxruntime"), engine="network")
    assert session.engine == "network"
    session.predict()
    before = session.labels.copy()
    changed_any = False
    for at, label in (((8, 20, 20), 1), ((8, 12, 30), 2), ((4, 30, 10), 0)):
        prompt = point(*at, label=label)
        solved = session._box_for(prompt)
        current = session.labels.copy()
        update = session.add_prompt(prompt)
        assert update.engine == "network"
        outside = np.ones(current.shape, dtype=bool)
        outside[solved] = False
        assert np.array_equal(session.labels[outside], current[outside])
        if update.box is not None:
            changed_any = True
            assert all(u.start >= s.start and u.stop <= s.stop for u, s in zip(update.box, solved))
    assert changed_any
    while session.prompts:
        session.undo()
    assert np.array_equal(session.labels, before)
    # a box prompt is not what the network was trained with: engine (a) answers it
    assert session.add_prompt(box((6, 15, 15), (10, 25, 25), label=1)).engine == "local"
