"""export.onnx_weights: a network's weights recovered from its exported ONNX file reproduce it in eval mode,
folded BatchNorms included; the deep-supervision heads the graph lacks are named; calibration gives the
BatchNorms their input's statistics without changing the eval-mode output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export import spec_for_model, to_onnx
from export.onnx_weights import calibrate_batchnorms, fit_heads_not_in_graph, recover_state_dict
from training.models import create_model
from training.models.inference_wrapper import InferenceWrapper

pytestmark = pytest.mark.torch


def network(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(
        "unet",
        spatial_dims=3,
        in_channels=1,
        num_classes=3,
        features=[8, 16, 32],
        uafr=True,
        deep_supervision=True,
    )


def probabilities(model: torch.nn.Module, image: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return InferenceWrapper(model.eval())(image)[0].numpy()


def test_recovered_network_reproduces_the_exported_one(tmp_path, one_torch_thread):
    trained = network(0)
    with torch.no_grad():  # a trained look: BatchNorm statistics and affine far from their initial values
        for module in trained.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
            elif isinstance(module, torch.nn.InstanceNorm3d) and module.affine:
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    spec = spec_for_model(trained, name="tiny", patch_size=(8, 16, 16))
    path = tmp_path / "tiny.onnx"
    to_onnx(trained, path, spec=spec)
    from napari_medcl.onnx_session import check_model_bytes

    spec = check_model_bytes(path.read_bytes(), path)  # with the export's record, as a bundled file has it

    recovered = network(1)  # other random weights: everything that matters must come from the file
    recovery = recover_state_dict(path, recovered, spec)
    assert recovery.not_in_graph and set(recovery.not_in_graph) == {
        k for k, _ in recovered.named_parameters() if k.startswith("deep_supervision_heads.")
    }
    assert recovery.folded and all(name.startswith("uafr.") for name in recovery.folded)

    image = torch.from_numpy(np.random.default_rng(0).normal(0, 1, (2, 1, 8, 16, 16)).astype(np.float32))
    expected = probabilities(trained, image)
    np.testing.assert_allclose(probabilities(recovered, image), expected, atol=1e-5)

    calibrate_batchnorms(recovered, recovery.folded, [image])
    np.testing.assert_allclose(probabilities(recovered, image), expected, atol=1e-5)
    bn = dict(recovered.named_modules())[recovery.folded[0]]
    # its input's statistics, not the identity's
    assert float(bn.running_var.mean()) != pytest.approx(1.0, abs=1e-3)

    labels = torch.from_numpy(np.random.default_rng(1).integers(0, 3, (2, 8, 16, 16)))
    before = {
        k: v.clone() for k, v in recovered.state_dict().items() if not k.startswith("deep_supervision_heads.")
    }
    losses = fit_heads_not_in_graph(recovered, [(image, labels)], steps=5)
    assert len(losses) == 1 and np.isfinite(losses[0])
    for key, value in before.items():  # only the heads the graph lacked were fitted
        assert torch.equal(recovered.state_dict()[key], value), key
