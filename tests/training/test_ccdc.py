"""CCDC loss: hand-computed components on tiny tensors, sampling properties, gradients, AMP, ablations, 3D."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.config import CCDCConfig
from training.losses.ccdc import (
    CCDCLoss,
    ccdc_loss,
    class_cores,
    class_statistics,
    easy_hard_threshold,
    negative_class_weights,
    query_split,
    region_embeddings,
    sample_pixels,
)

pytestmark = pytest.mark.torch


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tiny() -> tuple[torch.Tensor, torch.Tensor]:
    """1 x 2 x 2 image, 2 classes: top row class 0, bottom row class 1."""
    labels = torch.tensor([[[0, 0], [1, 1]]])
    p0 = torch.tensor([[[0.9, 0.6], [0.2, 0.4]]])
    return torch.stack([p0, 1 - p0], dim=1), labels  # probs (1, 2, 2, 2)


def _blobs(spatial=(16, 16), batch=2, classes=3, seed=0):
    """Labels made of class bands, with probabilities that are right but not certain."""
    g = _gen(seed)
    coords = torch.arange(spatial[-1]).expand(*spatial)
    labels = (coords * classes // spatial[-1]).expand(batch, *spatial).clone()
    logits = torch.randn(batch, classes, *spatial, generator=g) + 2.0 * F.one_hot(labels, classes).movedim(
        -1, 1
    )
    return logits.softmax(1), labels


# ---------------------------------------------------------------------------------- statistics


def test_class_statistics_hand_values():
    probs, labels = _tiny()
    stats = class_statistics(probs, labels)
    assert stats.counts.tolist() == [2, 2]
    # D_0 = mean(0.9, 0.6); D_0^1 = mean(0.1, 0.4); D_1 = mean(0.8, 0.6); D_1^0 = mean(0.2, 0.4).
    expected = torch.tensor([[0.75, 0.25], [0.3, 0.7]])
    torch.testing.assert_close(stats.confusion, expected)
    torch.testing.assert_close(stats.confidence, torch.tensor([0.75, 0.7]))
    assert stats.present.tolist() == [True, True]


def test_class_statistics_absent_class_and_ignore_index():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.7, 0.2], [0.6, 0.2, 0.2]]).t().reshape(1, 3, 1, 3)
    labels = torch.tensor([[[0, 1, 255]]])
    stats = class_statistics(probs, labels, ignore_index=255)
    assert stats.counts.tolist() == [1, 1, 0]
    torch.testing.assert_close(stats.confusion[0], torch.tensor([0.5, 0.3, 0.2]))
    torch.testing.assert_close(stats.confusion[2], torch.zeros(3))
    assert stats.present.tolist() == [True, True, False]
    with pytest.raises(ValueError, match=r"\[0, 3\).*\[0, 255\]"):
        class_statistics(probs, labels)


def test_easy_hard_threshold():
    confidence = torch.tensor([0.75, 0.3])
    torch.testing.assert_close(easy_hard_threshold(confidence), torch.tensor([0.25, 0.7]))
    torch.testing.assert_close(
        easy_hard_threshold(confidence, adaptive=False, fixed_threshold=0.9), torch.tensor([0.9, 0.9])
    )


def test_query_split_modes_and_empty_pools():
    confidence = torch.tensor([0.75, 0.3, 0.5])
    yes = torch.tensor([True, True, True])
    n_easy, n_hard = query_split(confidence, 256, easy_available=yes, hard_available=yes)
    # easy : hard = (1 - D) : D -> round(256 * 0.25) = 64, round(256 * 0.7) = 179, 128.
    assert n_easy.tolist() == [64, 179, 128]
    assert (n_easy + n_hard).tolist() == [256, 256, 256]
    fixed, _ = query_split(confidence, 256, easy_available=yes, hard_available=yes, adaptive_ratio=False)
    assert fixed.tolist() == [128, 128, 128]
    easy, _ = query_split(confidence, 10, easy_available=yes, hard_available=yes, query_mode="easy")
    hard, _ = query_split(confidence, 10, easy_available=yes, hard_available=yes, query_mode="hard")
    assert easy.tolist() == [10, 10, 10] and hard.tolist() == [0, 0, 0]
    sched, _ = query_split(
        confidence, 100, easy_available=yes, hard_available=yes, query_mode="easy_to_hard", progress=0.25
    )
    assert sched.tolist() == [75, 75, 75]
    with pytest.raises(ValueError, match="progress"):
        query_split(confidence, 8, easy_available=yes, hard_available=yes, query_mode="easy_to_hard")
    # An empty pool gives its quota to the other one.
    n_easy, n_hard = query_split(
        confidence,
        256,
        easy_available=torch.tensor([False, True, True]),
        hard_available=torch.tensor([True, False, True]),
    )
    assert n_easy.tolist() == [0, 256, 128] and n_hard.tolist() == [256, 0, 128]


def test_negative_class_weights():
    probs = torch.tensor(
        [[0.6, 0.3, 0.1, 0.0], [0.2, 0.5, 0.3, 0.0], [0.1, 0.1, 0.8, 0.0], [0.6, 0.3, 0.1, 0.0]]
    ).t()
    probs = probs.reshape(1, 4, 1, 4)
    labels = torch.tensor([[[0, 1, 2, 0]]])  # class 3 absent
    stats = class_statistics(probs, labels)
    dynamic = negative_class_weights(stats, "dynamic")
    torch.testing.assert_close(dynamic[0], torch.tensor([0.0, 0.3, 0.1, 0.0]))
    torch.testing.assert_close(dynamic[1], torch.tensor([0.2, 0.0, 0.3, 0.0]))
    assert negative_class_weights(stats, "random")[1].tolist() == [2.0, 0.0, 1.0, 0.0]
    assert negative_class_weights(stats, "uniform")[2].tolist() == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="negative_sampling"):
        negative_class_weights(stats, "hardest")


# ---------------------------------------------------------------------------------- cores


def _core_case():
    # 1 x 2 x 2 x 2: class 0 at (0, 0) strong and (0, 1) weak; class 1 at (1, 0), (1, 1), both weak.
    vectors = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [5.0, 0.0]])  # pixels in raster order
    embedding = vectors.t().reshape(1, 2, 2, 2)
    labels = torch.tensor([[[0, 0], [1, 1]]])
    p_true = torch.tensor([[[0.99, 0.5], [0.6, 0.9]]])
    return embedding, p_true, labels, torch.tensor([2, 2])


def test_class_cores_strong_mean_and_fallbacks():
    embedding, p_true, labels, counts = _core_case()
    cores = class_cores(embedding, p_true, labels, counts, core_fallback="mean")
    torch.testing.assert_close(cores[0], torch.tensor([0.6, 0.8]))  # only the strong pixel, normalised
    torch.testing.assert_close(cores[1], torch.tensor([1.0, 1.0]) / math.sqrt(2))  # mean of (0, 1), (1, 0)
    topk = class_cores(embedding, p_true, labels, counts, core_fallback="topk", core_topk=1)
    torch.testing.assert_close(topk[0], torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(topk[1], torch.tensor([1.0, 0.0]))  # most confident pixel of class 1
    loose = class_cores(embedding, p_true, labels, counts, strong_threshold=0.4)
    expected0 = F.normalize(torch.tensor([0.6, 0.8]) + torch.tensor([1.0, 0.0]), dim=0)
    torch.testing.assert_close(loose[0], expected0)


def test_class_cores_are_detached():
    embedding, p_true, labels, counts = _core_case()
    embedding.requires_grad_(True)
    assert not class_cores(embedding, p_true, labels, counts).requires_grad


# ---------------------------------------------------------------------------------- region queries


def _region_reference(embedding: torch.Tensor, stride: int) -> torch.Tensor:
    """Replicate-padded {0, stride}^d neighbourhood mean of the normalised map, re-normalised: (B, E, *S)."""
    d = embedding.dim() - 2
    z = F.normalize(embedding, dim=1)
    padded = F.pad(z, (0, stride) * d, mode="replicate")
    dim = z.shape[1]
    kernel = torch.full((dim, 1, *([2] * d)), 1.0 / 2**d)
    conv = F.conv2d if d == 2 else F.conv3d
    return F.normalize(conv(padded, kernel, dilation=stride, groups=dim), dim=1)


@pytest.mark.parametrize(("spatial", "stride"), [((5, 6), 1), ((5, 6), 2), ((3, 4, 5), 1)])
def test_region_embeddings_match_padded_pooling(spatial, stride):
    embedding = torch.randn(2, 4, *spatial, generator=_gen(1))
    reference = _region_reference(embedding, stride).movedim(1, -1).reshape(-1, 4)  # (B * prod(S), E)
    index = torch.arange(reference.shape[0])
    torch.testing.assert_close(region_embeddings(embedding, index, stride=stride), reference)


def test_pixel_level_embeddings_are_normalised_pixels():
    embedding = torch.randn(2, 3, 4, 4, generator=_gen(2))
    index = torch.tensor([0, 5, 31])
    expected = F.normalize(embedding.movedim(1, -1).reshape(-1, 3)[index], dim=1)
    torch.testing.assert_close(region_embeddings(embedding, index, region=False), expected)


# ---------------------------------------------------------------------------------- sampling


def _sample(probs, labels, **kwargs):
    stats = class_statistics(probs, labels)
    p_true = probs.gather(1, labels.unsqueeze(1)).squeeze(1)
    options = {"num_queries": 64, "num_negatives": 32, "threshold": easy_hard_threshold(stats.confidence)}
    options.update(kwargs)
    return stats, p_true, sample_pixels(stats, p_true, labels, generator=_gen(3), **options)


def test_sampled_queries_respect_pools_and_split():
    probs, labels = _blobs()
    stats, p_true, sample = _sample(probs, labels)
    assert sample.classes.tolist() == [0, 1, 2]
    flat_labels, flat_p = labels.reshape(-1), p_true.reshape(-1)
    threshold = 1 - stats.confidence
    n_easy, _ = query_split(
        stats.confidence,
        64,
        easy_available=torch.ones(3, dtype=torch.bool),
        hard_available=torch.ones(3, dtype=torch.bool),
    )
    for row, cls in enumerate(sample.classes.tolist()):
        pixels = sample.query_pixel[row]
        assert (flat_labels[pixels] == cls).all()
        is_hard = flat_p[pixels] < threshold[cls]
        assert torch.equal(is_hard, sample.query_hard[row])
        assert int((~is_hard).sum()) == int(n_easy[cls])


def test_negatives_never_from_query_class_and_follow_confusion():
    probs, labels = _blobs(spatial=(32, 32), classes=4)
    stats, _, sample = _sample(probs, labels, num_queries=128, num_negatives=128)
    negative_labels = labels.reshape(-1)[sample.negative_pixel]  # (P, Q, N_neg)
    weights = negative_class_weights(stats, "dynamic")
    for row, cls in enumerate(sample.classes.tolist()):
        assert not (negative_labels[row] == cls).any()
        frequency = (
            torch.bincount(negative_labels[row].reshape(-1), minlength=4).float()
            / negative_labels[row].numel()
        )
        expected = weights[cls] / weights[cls].sum()
        torch.testing.assert_close(frequency, expected, atol=0.01, rtol=0)  # 16k draws


def test_uniform_and_random_negative_sampling_frequencies():
    # Class 1 is tiny: "random" (per pixel) rarely picks it, "uniform" (per class) picks it half the time.
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[0, :, 24:] = 2
    labels[0, :2, :2] = 1
    probs = F.one_hot(labels, 3).movedim(-1, 1).float() * 0.8 + 0.2 / 3
    for mode, expected_tiny in (("uniform", 0.5), ("random", 4 / (4 + 256))):
        _, _, sample = _sample(probs, labels, negative_sampling=mode)
        negative_labels = labels.reshape(-1)[sample.negative_pixel[0]]  # negatives of class 0 queries
        fraction = (negative_labels == 1).float().mean().item()
        assert abs(fraction - expected_tiny) < 0.03, (mode, fraction)


def test_ignored_pixels_are_never_sampled():
    probs, labels = _blobs()
    labels = labels.clone()
    labels[:, :4] = 255
    loss_args = {"num_queries": 64, "num_negatives": 64}
    stats = class_statistics(probs, labels, ignore_index=255)
    mapped = torch.where(labels == 255, 3, labels)
    p_true = probs.gather(1, torch.where(labels == 255, 0, labels).unsqueeze(1)).squeeze(1)
    sample = sample_pixels(
        stats, p_true, mapped, threshold=1 - stats.confidence, generator=_gen(0), **loss_args
    )
    drawn = torch.cat([sample.query_pixel.reshape(-1), sample.negative_pixel.reshape(-1)])
    assert not (labels.reshape(-1)[drawn] == 255).any()
    embedding = torch.randn(2, 8, 16, 16, generator=_gen(1))
    assert torch.isfinite(
        ccdc_loss(embedding, probs, labels, ignore_index=255, generator=_gen(0), **loss_args)
    )


# ---------------------------------------------------------------------------------- loss values


def test_loss_hand_value_for_orthogonal_classes():
    # Two classes with constant, orthogonal embeddings: cos(q, core) = 1, cos(q, negative) = 0, so
    # loss = -log(e^{1/tau} / (e^{1/tau} + N_neg)) = log(1 + N_neg e^{-1/tau}).
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :, 2:] = 1
    embedding = F.one_hot(labels, 2).movedim(-1, 1).float() * 3.0
    probs = F.one_hot(labels, 2).movedim(-1, 1).float() * 0.98 + 0.01
    loss = ccdc_loss(
        embedding, probs, labels, region=False, num_queries=8, num_negatives=16, generator=_gen()
    )
    torch.testing.assert_close(loss, torch.tensor(math.log(1 + 16 * math.exp(-2.0))))


def test_class_separated_embeddings_score_lower_than_random():
    probs, labels = _blobs(classes=3)
    separated = F.one_hot(labels, 3).movedim(-1, 1).float() + 0.05 * torch.randn(
        2, 3, 16, 16, generator=_gen(5)
    )
    random = torch.randn(2, 3, 16, 16, generator=_gen(6))
    good = ccdc_loss(separated, probs, labels, generator=_gen())
    bad = ccdc_loss(random, probs, labels, generator=_gen())
    assert good < bad - 1.0, (good, bad)


def test_determinism_with_generator():
    probs, labels = _blobs()
    embedding = torch.randn(2, 8, 16, 16, generator=_gen(7))
    first = ccdc_loss(embedding, probs, labels, generator=_gen(11))
    second = ccdc_loss(embedding, probs, labels, generator=_gen(11))
    other = ccdc_loss(embedding, probs, labels, generator=_gen(12))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_gradient_reaches_only_query_neighbourhoods():
    probs, labels = _blobs()
    embedding = torch.randn(2, 8, 16, 16, generator=_gen(8), requires_grad=True)
    options = {"num_queries": 4, "num_negatives": 64}
    loss = ccdc_loss(embedding, probs, labels, generator=_gen(21), **options)
    loss.backward()
    # Replay the same draws: statistics and cores use no randomness, so the generator sees the same calls.
    stats = class_statistics(probs, labels)
    p_true = probs.gather(1, labels.unsqueeze(1)).squeeze(1)
    sample = sample_pixels(
        stats, p_true, labels, threshold=1 - stats.confidence, generator=_gen(21), **options
    )
    rows, cols = sample.query_pixel.reshape(-1) % 256 // 16, sample.query_pixel.reshape(-1) % 16
    batch = sample.query_pixel.reshape(-1) // 256
    allowed = torch.zeros(2, 16, 16, dtype=torch.bool)
    for dr in (0, 1):
        for dc in (0, 1):
            allowed[batch, (rows + dr).clamp_max(15), (cols + dc).clamp_max(15)] = True
    has_grad = embedding.grad.abs().sum(1) > 0
    assert has_grad.any()
    assert not (has_grad & ~allowed).any(), "gradient leaked through cores or negatives"


def test_probabilities_get_no_gradient():
    probs, labels = _blobs()
    probs = probs.clone().requires_grad_(True)
    embedding = torch.randn(2, 8, 16, 16, generator=_gen(9), requires_grad=True)
    ccdc_loss(embedding, probs, labels, generator=_gen()).backward()
    assert probs.grad is None


def test_single_class_gives_zero_with_graph():
    embedding = torch.randn(2, 4, 8, 8, requires_grad=True)
    labels = torch.ones(2, 8, 8, dtype=torch.long)
    probs = torch.full((2, 3, 8, 8), 1 / 3)
    loss = ccdc_loss(embedding, probs, labels, generator=_gen())
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert embedding.grad is not None and torch.count_nonzero(embedding.grad) == 0


def test_bf16_autocast_on_cpu_is_finite():
    probs, labels = _blobs()
    head = torch.nn.Conv2d(4, 16, 1)
    image = torch.randn(2, 4, 16, 16, generator=_gen(10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embedding = head(image)
        assert embedding.dtype == torch.bfloat16
        loss = ccdc_loss(embedding, probs.bfloat16(), labels, generator=_gen())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in head.parameters())


ABLATIONS = [
    {},
    {"adaptive_threshold": False},
    {"adaptive_ratio": False},
    {"adaptive_threshold": False, "adaptive_ratio": False, "fixed_easy_fraction": 0.3},
    {"region": False},
    {"region_stride": 2},
    {"negative_sampling": "random"},
    {"negative_sampling": "uniform"},
    {"query_mode": "easy"},
    {"query_mode": "hard"},
    {"query_mode": "easy_to_hard", "progress": 0.4},
    {"core_fallback": "topk", "strong_threshold": 0.999},
    {"core_fallback": "mean", "strong_threshold": 0.999},
]


@pytest.mark.parametrize(
    "options", ABLATIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
def test_every_ablation_switch_runs(options):
    probs, labels = _blobs()
    embedding = torch.randn(2, 8, 16, 16, generator=_gen(13), requires_grad=True)
    loss = ccdc_loss(embedding, probs, labels, num_queries=32, num_negatives=32, generator=_gen(), **options)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert torch.isfinite(embedding.grad).all() and embedding.grad.abs().sum() > 0


def test_3d_input():
    probs, labels = _blobs(spatial=(4, 8, 8), classes=3)
    embedding = torch.randn(2, 6, 4, 8, 8, generator=_gen(14), requires_grad=True)
    loss = ccdc_loss(embedding, probs, labels, num_queries=16, num_negatives=16, generator=_gen())
    loss.backward()
    assert torch.isfinite(loss) and embedding.grad.abs().sum() > 0


def test_module_applies_weight_and_options():
    probs, labels = _blobs()
    embedding = torch.randn(2, 8, 16, 16, generator=_gen(15))
    module = CCDCLoss(CCDCConfig(weight=0.5, num_queries=16, num_negatives=8, region=False))
    expected = 0.5 * ccdc_loss(
        embedding, probs, labels, num_queries=16, num_negatives=8, region=False, generator=_gen()
    )
    torch.testing.assert_close(module(embedding, probs, labels, generator=_gen()), expected)
    assert "num_queries=16" in repr(module)
    with pytest.raises(ValueError, match="negative_sampling"):
        CCDCLoss(CCDCConfig(negative_sampling="hard"))


def test_shape_errors_name_both_shapes():
    probs, labels = _blobs()
    embedding = torch.randn(2, 8, 16, 15)
    with pytest.raises(ValueError, match=r"\(2, 3, 16, 16\).*\(2, 8, 16, 15\)"):
        ccdc_loss(embedding, probs, labels)
    with pytest.raises(ValueError, match=r"labels \(2, 16\).*\(2, 8, 16, 16\)"):
        ccdc_loss(torch.randn(2, 8, 16, 16), probs, labels[:, 0])
    with pytest.raises(ValueError, match="int64"):
        ccdc_loss(torch.randn(2, 8, 16, 16), probs, labels.int())


def test_sorted_gather_matches_direct_gather(monkeypatch):
    from training.losses import ccdc

    embedding = torch.randn(2, 5, 6, 7, generator=_gen(16))
    index = torch.randint(0, 2 * 42, (300,), generator=_gen(17))
    direct = ccdc._gather(embedding, index)
    monkeypatch.setattr(ccdc, "_SORTED_GATHER_MIN_ELEMENTS", 0)
    torch.testing.assert_close(ccdc._gather_detached(embedding, index), direct)
    assert direct.shape == (300, 5)
    torch.testing.assert_close(direct, embedding.movedim(1, -1).reshape(-1, 5)[index])


def test_ccdc_loss_defaults_are_the_config_defaults():
    """The pure function's keyword defaults and CCDCConfig's fields stay the same options with the same values."""
    import dataclasses
    import inspect

    keywords = {
        name: p.default
        for name, p in inspect.signature(ccdc_loss).parameters.items()
        if p.kind is p.KEYWORD_ONLY and name not in ("progress", "ignore_index", "generator")
    }
    config = {
        f.name: f.default for f in dataclasses.fields(CCDCConfig) if f.name not in ("enabled", "weight")
    }
    assert keywords == config
