"""Self-supervised pre-training (paper A, Table V e): the three losses by hand, the views, and a tiny run whose
encoder weights a fine-tuning config loads."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from tests.dataset_factory import make_folder2d_dataset  # noqa: E402
from training.building import build_model  # noqa: E402
from training.config import load_config  # noqa: E402
from training.pretrain import (  # noqa: E402
    SSLHead,
    byol_loss,
    main,
    nt_xent_loss,
    simsiam_loss,
    two_views,
)

pytestmark = pytest.mark.torch


def nt_xent_reference(z1, z2, tau):
    """Loop form: for each of the 2B vectors, -log(exp(c(i, pos)/tau) / sum over k != i of exp(c(i, k)/tau))."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=-1)
    n = z.shape[0]
    batch = n // 2
    terms = []
    for i in range(n):
        pos = (i + batch) % n
        denominator = sum(torch.exp(z[i] @ z[k] / tau) for k in range(n) if k != i)
        terms.append(-torch.log(torch.exp(z[i] @ z[pos] / tau) / denominator))
    return torch.stack(terms).mean()


def test_nt_xent_by_hand_and_against_the_loop():
    eye = torch.eye(2)
    # identical views, orthogonal images, tau 1: -log(e / (1 + e + 1)) for each of the 4 vectors
    assert float(nt_xent_loss(eye, eye, 1.0)) == pytest.approx(-1 + math.log(math.e + 2))
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    torch.testing.assert_close(nt_xent_loss(z1, z2, 0.5).double(), nt_xent_reference(z1, z2, 0.5))
    # mutation: keeping the self-similarity in the denominator is another loss
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    with_self = F.cross_entropy(z @ z.t() / 0.5, torch.cat([torch.arange(4, 8), torch.arange(4)]))
    assert abs(float(with_self) - float(nt_xent_loss(z1, z2, 0.5))) > 1e-3
    with pytest.raises(ValueError, match=r"\(4, 6\).*\(3, 6\)"):
        nt_xent_loss(z1, z2[:3])


def test_byol_and_simsiam_values_and_stop_gradient():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    z = torch.tensor([[2.0, 0.0], [1.0, 0.0]], requires_grad=True)
    # cosines 1 and 0: BYOL mean (0 + 2) / 2 = 1; SimSiam mean -(1 + 0) / 2 = -0.5
    assert float(byol_loss(p, z).detach()) == pytest.approx(1.0)
    loss = simsiam_loss(p, z)
    assert float(loss.detach()) == pytest.approx(-0.5)
    loss.backward()
    assert z.grad is None and p.grad is not None and float(p.grad.abs().sum()) > 0


def test_views_are_seeded_different_and_keep_the_shape():
    image = torch.randn(3, 2, 16, 20)
    a1, a2 = two_views(image, torch.Generator().manual_seed(1))
    b1, _ = two_views(image, torch.Generator().manual_seed(1))
    assert a1.shape == a2.shape == image.shape
    assert torch.equal(a1, b1) and not torch.allclose(a1, a2)
    v1, _ = two_views(torch.randn(2, 1, 8, 10, 12), torch.Generator().manual_seed(0))
    assert v1.shape == (2, 1, 8, 10, 12)


def test_head_shapes():
    z, p = SSLHead(16, "simclr", hidden=8, out=4)(torch.randn(3, 16, 5, 5))
    assert z.shape == (3, 4) and p is None
    z, p = SSLHead(16, "byol", hidden=8, out=4)(torch.randn(3, 16, 2, 3, 4))
    assert z.shape == p.shape == (3, 4)


@pytest.mark.parametrize("method", ["simclr", "byol", "simsiam"])
def test_tiny_pretrain_writes_weights_that_fine_tuning_loads(tmp_path, method):
    root = make_folder2d_dataset(tmp_path / "isic", n_cases=4, shape=(48, 48))
    config = tmp_path / "ft.yaml"
    config.write_text(
        f"data: {{root: {root}, layout: folder2d, val_fraction: 0.25, num_workers: 0}}\n"
        "model: {name: deeplabv3plus, spatial_dims: 2, encoder_depth: 18}\n"
        "train: {batch_size: 4, patch_size: [32, 32], iterations_per_epoch: 2, device: cpu, lr: 0.001}\n"
    )
    out = tmp_path / "pre"
    assert main([str(config), "--method", method, "--epochs", "1", "-o", str(out)]) == 0
    network = torch.load(out / "network.pt", weights_only=True)
    encoder = torch.load(out / "encoder.pt", weights_only=True)
    cfg = load_config(config, [f"model.encoder_weights={out / 'encoder.pt'}"])
    model = build_model(cfg, 3, 2)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, encoder[key]) and torch.equal(value, network[f"encoder.{key}"])
    fresh = build_model(load_config(config), 3, 2)
    changed = [
        k
        for k, v in fresh.encoder.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, encoder[k])
    ]
    assert changed  # the pre-training moved the encoder


def test_unet_pretraining_writes_the_whole_network(tmp_path):
    root = make_folder2d_dataset(tmp_path / "isic", n_cases=4, shape=(48, 48))
    config = tmp_path / "unet.yaml"
    config.write_text(
        f"data: {{root: {root}, layout: folder2d, val_fraction: 0.25, num_workers: 0}}\n"
        "model: {name: unet, spatial_dims: 2, features: [4, 8, 16]}\n"
        "train: {batch_size: 4, patch_size: [32, 32], iterations_per_epoch: 2, device: cpu}\n"
    )
    out = tmp_path / "pre"
    assert main([str(config), "--method", "simsiam", "--epochs", "1", "-o", str(out)]) == 0
    assert not (out / "encoder.pt").exists()  # the U-Net has no encoder_weights option
    model = build_model(load_config(config), 3, 2)
    model.load_state_dict(torch.load(out / "network.pt", weights_only=True))
