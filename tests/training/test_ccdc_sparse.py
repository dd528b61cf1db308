"""CCDC through the projection head (``out.projection``): the same loss and gradients as the dense embedding,
with the head run densely only without gradient and with gradient only at the query pixels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.losses.ccdc import ccdc_loss
from training.models import create_model
from training.models.output import ProjectionInput
from training.models.unet import ProjectionHead

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_torch_thread")]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _targets(batch: int, spatial: tuple[int, ...], classes: int, seed: int):
    """Blob labels (argmax of smooth noise) and probabilities that are right but not certain."""
    g = _gen(seed)
    coarse = torch.randn(batch, classes, *[3] * len(spatial), generator=g)
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    labels = F.interpolate(coarse, size=spatial, mode=mode, align_corners=False).argmax(1)
    logits = torch.randn(batch, classes, *spatial, generator=g) + 2.0 * F.one_hot(labels, classes).movedim(
        -1, 1
    )
    return logits.softmax(1), labels


def _loss_and_grads(model, image, probs, labels, *, dense: bool, **options):
    model.zero_grad(set_to_none=True)
    out = model(image)
    embedding = out.embedding if dense else out.projection
    loss = ccdc_loss(embedding, probs, labels, generator=_gen(3), **options)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same(dense, sparse):
    (dense_loss, dense_grads), (sparse_loss, sparse_grads) = dense, sparse
    torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-5, atol=1e-6)
    assert set(sparse_grads) == set(dense_grads)
    for name, grad in dense_grads.items():
        # Relative to the largest entry of each gradient; the absolute floor covers gradients that are zero up
        # to rounding (a 1x1 first conv followed by instance norm).
        scale = float(grad.abs().max())
        difference = float((sparse_grads[name] - grad).abs().max())
        assert difference <= 1e-5 * scale + 1e-7, (
            f"{name}: max |difference| {difference:.3g}, max |grad| {scale:.3g}"
        )


CASES = [
    # (spatial_dims, image size, model options, loss options)
    (2, (20, 24), {}, {}),
    (2, (19, 22), {}, {"strong_threshold": 0.5}),  # not a multiple of the divisor: cropped head input
    (2, (20, 24), {"projection_level": 2}, {"core_fallback": "topk", "core_topk": 5}),
    (2, (20, 24), {"kernel_sizes": [1, 3, 3]}, {"region": False}),
    (3, (9, 10, 11), {}, {}),
    (3, (8, 12, 12), {"kernel_sizes": [[1, 3, 3], 3, 3]}, {"region_stride": 2, "strong_threshold": 0.5}),
]


@pytest.mark.parametrize(("spatial_dims", "size", "model_options", "loss_options"), CASES)
def test_projection_path_matches_dense_embedding(spatial_dims, size, model_options, loss_options):
    torch.manual_seed(0)
    model = create_model(
        "unet",
        spatial_dims=spatial_dims,
        in_channels=1,
        num_classes=3,
        features=(4, 8, 16),
        projection_dim=12,
        **model_options,
    )
    image = torch.randn(2, 1, *size, generator=_gen(1))
    grid = tuple(model(image).projection.shape[2:])
    probs, labels = _targets(2, grid, 3, seed=2)
    options = {"num_queries": 32, "num_negatives": 16, **loss_options}
    dense = _loss_and_grads(model, image, probs, labels, dense=True, **options)
    sparse = _loss_and_grads(model, image, probs, labels, dense=False, **options)
    assert (
        dense[1]["projection.0.weight"].abs().sum() > 0 and dense[1]["encoder.0.0.0.weight"].abs().sum() > 0
    )
    _assert_same(dense, sparse)


def test_projection_path_matches_dense_embedding_deeplab_with_ignore_index():
    torch.manual_seed(0)
    model = create_model(
        "deeplabv3plus",
        spatial_dims=2,
        in_channels=1,
        num_classes=3,
        encoder_depth=18,
        encoder_width=8,
        aspp_channels=8,
        lowlevel_channels=4,
        decoder_channels=8,
        dropout=0.0,
        projection_dim=6,
    ).eval()  # batch-norm statistics fixed: the two passes see the same network
    image = torch.randn(2, 1, 48, 40, generator=_gen(1))
    probs, labels = _targets(2, tuple(model(image).projection.shape[2:]), 3, seed=2)
    labels[:, :2] = 255
    options = {"num_queries": 32, "num_negatives": 16, "ignore_index": 255}
    _assert_same(
        _loss_and_grads(model, image, probs, labels, dense=True, **options),
        _loss_and_grads(model, image, probs, labels, dense=False, **options),
    )


@pytest.mark.parametrize(("spatial_dims", "kernel"), [(2, 3), (2, (3, 1)), (3, 3), (3, (1, 3, 3))])
def test_head_at_equals_dense_head_at_those_pixels(spatial_dims, kernel):
    torch.manual_seed(0)
    head = ProjectionHead(spatial_dims, 5, 7, kernel)
    full = torch.randn(3, 5, *[7] * spatial_dims, generator=_gen(4))
    x = full[(slice(None), slice(None), *[slice(0, 6)] * spatial_dims)]  # a cropped, non-contiguous view
    dense = head(x).movedim(1, -1).reshape(-1, 7)  # (B * N, E)
    index = torch.cat(
        [torch.arange(0, 6**spatial_dims), torch.randint(0, dense.shape[0], (40,), generator=_gen(5))]
    )
    torch.testing.assert_close(head.at(x, index), dense[index], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        head.at(x, index.view(2, -1)), dense[index].view(2, -1, 7), rtol=1e-5, atol=1e-6
    )


def test_at_sends_gradient_only_to_the_neighbourhood():
    head = ProjectionHead(2, 3, 4, 3)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    head.at(x, torch.tensor([1 * 64 + 0 * 8 + 5])).sum().backward()  # image 1, row 0, column 5
    touched = x.grad.abs().sum(1) > 0
    expected = torch.zeros(2, 8, 8, dtype=torch.bool)
    expected[1, 0:2, 4:7] = True
    assert torch.equal(touched, expected)


def test_embedding_is_computed_on_access_only_and_cached():
    torch.manual_seed(0)
    model = create_model(
        "unet", spatial_dims=2, in_channels=1, num_classes=3, features=(4, 8), projection_dim=6
    )
    calls = []
    model.projection.register_forward_hook(lambda *_: calls.append(1))
    out = model(torch.randn(2, 1, 12, 12))
    assert calls == [] and isinstance(out.projection, ProjectionInput)
    assert out.projection.shape == (2, 6, 12, 12)
    embedding = out.embedding
    assert calls == [1] and embedding.requires_grad and embedding.shape == (2, 6, 12, 12)
    assert out.embedding is embedding and calls == [1]
    torch.testing.assert_close(embedding, model.projection(out.taps["decoder1"]))


def test_loss_never_runs_the_head_densely_with_gradient():
    """Keys come from the head's hidden map and its last layer as a matrix; the E-channel map is never formed."""
    torch.manual_seed(0)
    model = create_model(
        "unet", spatial_dims=3, in_channels=1, num_classes=3, features=(4, 8), projection_dim=6
    )
    calls = []
    model.projection.register_forward_hook(lambda *_: calls.append("head"))
    model.projection[2].register_forward_hook(lambda *_: calls.append("1x1 conv"))
    out = model(torch.randn(2, 1, 6, 8, 8))
    probs, labels = _targets(2, (6, 8, 8), 3, seed=6)
    loss = ccdc_loss(out.projection, probs, labels, num_queries=8, num_negatives=8, generator=_gen())
    loss.backward()
    assert calls == [] and torch.isfinite(loss)


def test_head_gradients_stay_moderate_with_few_hidden_units():
    """With ReLU, a pixel whose 4 hidden units are all dead has the embedding bias = 0 and its normalisation a
    1 / eps gradient (about 1e9 on this model); the head's LeakyReLU keeps every embedding away from 0."""
    torch.manual_seed(0)
    model = create_model(
        "unet", spatial_dims=2, in_channels=1, num_classes=3, features=(4, 8, 16), projection_dim=12
    )
    image = torch.randn(2, 1, 20, 24, generator=_gen(1))
    probs, labels = _targets(2, (20, 24), 3, seed=2)
    _, grads = _loss_and_grads(model, image, probs, labels, dense=False, num_queries=32, num_negatives=16)
    assert max(float(g.abs().max()) for g in grads.values()) < 10.0


def test_bf16_autocast_on_cpu_is_finite_through_the_head():
    torch.manual_seed(0)
    model = create_model(
        "unet", spatial_dims=2, in_channels=1, num_classes=3, features=(4, 8), projection_dim=6
    )
    probs, labels = _targets(2, (12, 12), 3, seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 1, 12, 12, generator=_gen(8)))
        loss = ccdc_loss(out.projection, probs, labels, num_queries=16, num_negatives=16, generator=_gen())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in model.projection.parameters())


def test_single_class_zero_loss_still_reaches_every_head_parameter():
    torch.manual_seed(0)
    model = create_model(
        "unet", spatial_dims=2, in_channels=1, num_classes=3, features=(4, 8), projection_dim=6
    )
    out = model(torch.randn(2, 1, 8, 8))
    labels = torch.ones(2, 8, 8, dtype=torch.long)
    loss = ccdc_loss(out.projection, torch.full((2, 3, 8, 8), 1 / 3), labels, generator=_gen())
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None for p in model.projection.parameters())
    assert model.encoder[0][0][0].weight.grad is not None


@pytest.mark.parametrize(
    ("spatial", "seed", "options", "expected"),
    [
        ((12, 10), 0, {}, 5.8857903480529785),
        ((12, 10), 0, {"strong_threshold": 0.6}, 5.799413681030273),
        ((5, 6, 7), 1, {}, 5.857315540313721),
        ((5, 6, 7), 1, {"strong_threshold": 0.6}, 5.805177211761475),
    ],
)
def test_dense_loss_value_unchanged(spatial, seed, options, expected):
    """Default CCDC values computed by the implementation before the projection path (commit 4942bd0)."""
    g = _gen(seed)
    labels = torch.randint(0, 3, (2, *spatial), generator=g)
    logits = torch.randn(2, 3, *spatial, generator=g) + 2.0 * F.one_hot(labels, 3).movedim(-1, 1)
    embedding = torch.randn(2, 8, *spatial, generator=g)
    loss = ccdc_loss(embedding, logits.softmax(1), labels, generator=_gen(5), **options)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_not_an_embedding_is_a_type_error():
    probs, labels = _targets(1, (4, 4), 2, seed=0)
    with pytest.raises(TypeError, match="ProjectedEmbedding"):
        ccdc_loss([[0.0]], probs, labels)
