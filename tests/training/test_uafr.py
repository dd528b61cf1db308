"""UAFR block and normalised entropy: hand-computed values, equivalences, gradient flow, autocast, export."""

from __future__ import annotations

import io
import math

import pytest

torch = pytest.importorskip("torch")

from training.models import UAFR, create_model, normalized_entropy, normalized_entropy_from_logits  # noqa: E402

pytestmark = pytest.mark.torch


def test_normalized_entropy_hand_values():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]]).reshape(3, 2, 1, 1)
    h = normalized_entropy(probs)
    assert h.shape == (3, 1, 1, 1)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)  # 0.811278...
    torch.testing.assert_close(h.flatten(), torch.tensor([1.0, 0.0, expected]))

    # M = 4: uniform -> 1; (0.5, 0.5, 0, 0) -> log 2 / log 4 = 0.5; one-hot -> 0.
    probs4 = torch.tensor([[0.25] * 4, [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]).reshape(3, 4, 1)
    torch.testing.assert_close(normalized_entropy(probs4).flatten(), torch.tensor([1.0, 0.5, 0.0]))


def test_normalized_entropy_single_class_is_zero_and_attached():
    probs = torch.ones(2, 1, 3, 4, requires_grad=True)
    h = normalized_entropy(probs)
    assert h.shape == (2, 1, 3, 4) and torch.equal(h, torch.zeros_like(h))
    h.sum().backward()  # still part of the graph (no NaN from 0/0)
    assert torch.isfinite(probs.grad).all()
    logits = torch.randn(2, 1, 5, requires_grad=True)
    hl = normalized_entropy_from_logits(logits)
    assert torch.equal(hl, torch.zeros(2, 1, 5)) and hl.requires_grad


def test_normalized_entropy_dim_and_gradient_at_zero_probability():
    probs = torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.2, 0.8]], requires_grad=True)  # classes on dim 1
    h = normalized_entropy(probs, dim=1)
    assert h.shape == (3, 1)
    h.sum().backward()
    assert torch.isfinite(probs.grad).all()
    # Classes on the last axis.
    torch.testing.assert_close(
        normalized_entropy(probs.detach().T.unsqueeze(0), dim=1), h.detach().T.unsqueeze(0)
    )


@pytest.mark.parametrize("m", [2, 3, 7])
def test_logits_and_probability_forms_agree(m):
    torch.manual_seed(m)
    logits = torch.randn(2, m, 6, 5, 4) * 3
    from_logits = normalized_entropy_from_logits(logits)
    from_probs = normalized_entropy(torch.softmax(logits, dim=1))
    torch.testing.assert_close(from_logits, from_probs, atol=1e-6, rtol=0)
    assert from_logits.dtype == torch.float32
    assert float(from_logits.min()) >= 0.0 and float(from_logits.max()) <= 1.0
    # Extreme logits: log_softmax stays exact where softmax would saturate.
    big = torch.tensor([[1000.0, -1000.0], [0.0, 0.0]]).reshape(2, 2, 1)
    torch.testing.assert_close(normalized_entropy_from_logits(big).flatten(), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_uafr_output_is_q_times_two_minus_u(spatial_dims):
    torch.manual_seed(0)
    block = UAFR(channels=5, spatial_dims=spatial_dims)
    q = torch.randn(2, 5, *([7] * spatial_dims), requires_grad=True)
    out, u = block(q)
    assert out.shape == q.shape and u.shape == (2, 1, *([7] * spatial_dims))
    assert float(u.detach().min()) >= 0.0 and float(u.detach().max()) <= 1.0
    expected_u = normalized_entropy(torch.softmax(block.attention(q), dim=1))
    torch.testing.assert_close(u, expected_u, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, q * (2 - u))
    # Architecture: conv k (no bias) -> norm -> ReLU -> conv 1 (hidden -> m, bias).
    first, norm, _, last = block.attention
    assert first.bias is None and first.kernel_size == (3,) * spatial_dims and first.out_channels == 16
    assert isinstance(norm, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d))
    assert last.kernel_size == (1,) * spatial_dims and last.out_channels == 2 and last.bias is not None


def test_uafr_uncertainty_is_not_detached():
    torch.manual_seed(0)
    block = UAFR(channels=4, spatial_dims=2, norm="instance")
    q = torch.randn(2, 4, 9, 9)
    _, u = block(q)
    assert u.requires_grad
    u.sum().backward()  # gradient reaches F through u itself
    for name, p in block.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    block.zero_grad()
    out, _ = block(q)
    (out * torch.randn_like(out)).sum().backward()  # and through the re-weighted features
    assert all(float(p.grad.abs().sum()) > 0 for p in block.parameters())


def test_uafr_m1_is_a_plain_gain_of_two():
    block = UAFR(channels=3, spatial_dims=2, m=1)
    q = torch.randn(1, 3, 6, 6)
    out, u = block(q)
    assert torch.equal(u, torch.zeros_like(u))
    torch.testing.assert_close(out, 2 * q)


def test_uafr_rejects_bad_arguments():
    with pytest.raises(ValueError, match="m=0"):
        UAFR(channels=3, spatial_dims=2, m=0)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        UAFR(channels=3, spatial_dims=1)
    with pytest.raises(ValueError, match="norm must be one of"):
        UAFR(channels=3, spatial_dims=2, norm="layer")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_bf16_autocast_on_cpu_is_finite(spatial_dims):
    torch.manual_seed(0)
    block = UAFR(channels=4, spatial_dims=spatial_dims)
    q = torch.randn(2, 4, *([6] * spatial_dims), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, u = block(q.to(torch.bfloat16))
    assert torch.isfinite(out.float()).all() and torch.isfinite(u.float()).all()
    assert float(u.detach().min()) >= 0.0 and float(u.detach().max()) <= 1.0
    out.float().sum().backward()
    assert torch.isfinite(q.grad).all()

    model = create_model(
        "unet",
        spatial_dims=spatial_dims,
        in_channels=1,
        num_classes=2,
        features=(4, 8),
        uafr=True,
        projection_dim=4,
    )
    image = torch.randn(1, 1, *([11] * spatial_dims))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = model(image)
        loss = res.logits.float().square().mean() + res.embedding.float().square().mean()
    loss.backward()
    assert torch.isfinite(res.logits.float()).all()
    assert all(torch.isfinite(u.float()).all() for u in res.uncertainty.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_uafr_block_exports_to_onnx():
    block = UAFR(channels=3, spatial_dims=3).eval()
    buffer = io.BytesIO()
    torch.onnx.export(block, (torch.randn(1, 3, 4, 5, 6),), buffer, dynamo=False, opset_version=17)
    onnx = pytest.importorskip("onnx")
    graph = onnx.load_from_string(buffer.getvalue()).graph
    ops = {node.op_type for node in graph.node}
    assert "LogSoftmax" in ops and len(graph.output) == 2
