"""PDCR against the paper's formulas written out by hand: Eq. 9 (default form), the authors' code's shifted form,
the affinity variants (Table V a/d, Fig. 5), the ratio-first series (Table V b), per-tap modes (Table VI b),
reduction and cross-layer weight. Each formula test has a mutation check: a plausible wrong formula must fail it.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from training.config import PDCRConfig  # noqa: E402
from training.losses.pdcr import (  # noqa: E402
    PDCRLoss,
    _cosine_matrix,
    affinity,
    center_affinity,
    dice_affinity,
    dragsaw_loss,
    foreground_ratios,
    pair_affinity,
    window_labels,
)
from training.models import TapInfo  # noqa: E402

pytestmark = pytest.mark.torch


# ---------------------------------------------------------------------------------------- references


def eq9_reference(sim, w, tau):
    """Eq. 9 term by term, in float64: mean over (b, i, j) of -log(exp(s_ij w_ij / tau) / sum_n exp(s_in (1 - w_in) / tau))."""
    sim, w = sim.double(), w.double()
    batch, n, m = sim.shape
    terms = []
    for b in range(batch):
        for i in range(n):
            denominator = sum(torch.exp(sim[b, i, k] * (1 - w[b, i, k]) / tau) for k in range(m))
            for j in range(m):
                numerator = torch.exp(sim[b, i, j] * w[b, i, j] / tau)
                terms.append(-torch.log(numerator / denominator))
    return torch.stack(terms).mean()


def authors_reference(sim, w, tau):
    """The authors' code (3D deep_supervision.py, methods.md §1.3): S = sim / tau, S = S - max(S) over the whole
    tensor (not detached), term = -log(exp(S w) / sum_n exp(S (1 - w))), mean over (b, i, j)."""
    s = sim.double() / tau
    s = s - s.max()
    w = w.double()
    term = -torch.log(torch.exp(s * w) / torch.exp(s * (1 - w)).sum(-1, keepdim=True))
    return term.mean()


MUTANTS = {
    # the released 2D code: numerator and denominator weights swapped
    "swapped": lambda sim, w, tau: eq9_reference(sim, 1 - w, tau),
    # Eq. 9 with the authors' shift
    "shifted": lambda sim, w, tau: eq9_reference(sim - 1, w, tau),
    # w (not 1 - w) in the denominator
    "w_in_denominator": lambda sim, w, tau: (
        -(sim.double() * w / tau) + torch.logsumexp(sim.double() * w / tau, -1, keepdim=True)
    ).mean(),
    # tau applied only to the numerator
    "tau_once": lambda sim, w, tau: (
        -(sim.double() * w / tau) + torch.logsumexp(sim.double() * (1 - w), -1, keepdim=True)
    ).mean(),
}


def _random_case(seed, batch=2, n=5, channels=7, classes=3):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, n, channels, generator=g)
    phi = torch.rand(batch, n, classes, generator=g)
    phi = phi / phi.sum(-1, keepdim=True)
    return feats, affinity(phi, phi)


def _cos(v):
    v = F.normalize(v.double() if v.dtype == torch.float64 else v, dim=-1)
    return v @ v.transpose(1, 2)


HAND_SIM = torch.tensor([[[1.0, 0.5, -0.2], [0.5, 1.0, 0.1], [-0.2, 0.1, 1.0]]])
HAND_W = torch.tensor([[[1.0, 0.25, 0.0], [0.25, 1.0, 0.6], [0.0, 0.6, 1.0]]])


# ---------------------------------------------------------------------------------------- Eq. 9


@pytest.mark.parametrize("tau", [0.5, 1.0, 0.1])
def test_paper_form_equals_eq9_value_and_gradient_fp32(tau):
    for seed in range(3):
        feats, w = _random_case(seed)
        v = feats.clone().requires_grad_(True)
        ours = dragsaw_loss(_cos(v), w, tau)
        ours.backward()
        v_ref = feats.double().clone().requires_grad_(True)
        ref = eq9_reference(_cos(v_ref), w, tau)
        ref.backward()
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v.grad.double(), v_ref.grad, rtol=1e-4, atol=1e-6)
    # hand case
    sim = HAND_SIM.clone().requires_grad_(True)
    dragsaw_loss(sim, HAND_W, tau).backward()
    sim_ref = HAND_SIM.double().clone().requires_grad_(True)
    eq9_reference(sim_ref, HAND_W, tau).backward()
    torch.testing.assert_close(sim.grad.double(), sim_ref.grad, rtol=1e-5, atol=1e-7)


def test_paper_form_by_hand():
    # one row, tau = 1, s = [1, 0], w = [1, 0]: numerator exponents s w = [1, 0]; denominator s (1 - w) = [0, 0]
    # l_00 = -1 + log 2, l_01 = 0 + log 2; row mean = log 2 - 0.5
    sim = torch.tensor([[[1.0, 0.0]]])
    w = torch.tensor([[[1.0, 0.0]]])
    torch.testing.assert_close(dragsaw_loss(sim, w, 1.0), torch.tensor(math.log(2) - 0.5))


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_eq9_reference_rejects_wrong_formulas(name):
    """Mutation check: the reference test above would fail for each of these wrong formulas."""
    feats, w = _random_case(0)
    sim = _cos(feats)
    ours = dragsaw_loss(sim, w, 0.5)
    assert not torch.allclose(ours.double(), MUTANTS[name](sim, w, 0.5), rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------- authors' form


def test_authors_form_equals_the_authors_code_formula():
    for seed in range(3):
        feats, w = _random_case(seed)
        v = feats.clone().requires_grad_(True)
        ours = dragsaw_loss(_cos(v), w, 0.5, form="authors")
        ours.backward()
        v_ref = feats.double().clone().requires_grad_(True)
        ref = authors_reference(_cos(v_ref), w, 0.5)
        ref.backward()
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v.grad.double(), v_ref.grad, rtol=1e-4, atol=1e-6)
        # and it is not Eq. 9: value and gradient differ
        paper = eq9_reference(_cos(feats.double()), w, 0.5)
        assert abs(float(paper) - float(ours.detach())) > 1e-2


def test_authors_form_on_cross_layer_terms_shifts_by_their_own_largest_similarity():
    # two layers' features: no self-pairs, so the largest similarity is below 1 and a fixed shift would differ
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 5, 7, generator=g), torch.randn(2, 6, 7, generator=g)
    phi_a, phi_b = torch.rand(2, 5, 3, generator=g), torch.rand(2, 6, 3, generator=g)
    w = affinity(phi_a / phi_a.sum(-1, keepdim=True), phi_b / phi_b.sum(-1, keepdim=True))
    va, vb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ours = dragsaw_loss(_cosine_matrix(va, vb), w, 0.5, form="authors")
    ours.backward()
    ra, rb = a.double().clone().requires_grad_(True), b.double().clone().requires_grad_(True)
    sim_ref = F.normalize(ra, dim=-1) @ F.normalize(rb, dim=-1).transpose(1, 2)
    assert float(sim_ref.detach().max()) < 0.99
    ref = authors_reference(sim_ref, w, 0.5)
    ref.backward()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(va.grad.double(), ra.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(vb.grad.double(), rb.grad, rtol=1e-4, atol=1e-6)
    fixed = eq9_reference(sim_ref.detach() - 1.0, w, 0.5)  # the shift of a single-layer term
    assert abs(float(fixed) - float(ours.detach())) > 1e-3


@pytest.mark.parametrize("form", ["paper", "authors"])
def test_both_forms_under_bf16_autocast_on_random_and_hand_cases(form):
    reference = eq9_reference if form == "paper" else authors_reference
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 16, generator=g)
    layer = torch.nn.Linear(16, 8)
    _, w = _random_case(8, batch=2, n=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = layer(x)
        assert feats.dtype == torch.bfloat16
        feats.retain_grad()
        ours = dragsaw_loss(_cosine_matrix(feats, feats), w, 0.5, form=form)
    assert ours.dtype == torch.float32
    ours.backward()
    ref_feats = feats.detach().double().requires_grad_(True)
    ref = reference(_cos(ref_feats), w, 0.5)
    ref.backward()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats.grad.double(), ref_feats.grad, rtol=2e-2, atol=2e-3)
    assert float(ref_feats.grad.abs().max()) > 1e-3
    # hand case: the similarities arrive in bf16 (the reference takes the same rounded values), the loss is fp32
    sim = HAND_SIM.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hand = dragsaw_loss(sim, HAND_W, 0.5, form=form)
    assert hand.dtype == torch.float32
    hand.backward()
    sim_ref = sim.detach().double().clone().requires_grad_(True)
    expected = reference(sim_ref, HAND_W, 0.5)
    expected.backward()
    torch.testing.assert_close(hand.double(), expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sim.grad.double(), sim_ref.grad, rtol=1e-2, atol=1e-3)


def test_authors_and_paper_forms_differ_in_gradient_direction():
    """The shift re-weights the negatives: the two gradients are not parallel (the issue measured cosine 0.93)."""
    feats, w = _random_case(11, batch=2, n=16, channels=8)
    grads = []
    for form in ("paper", "authors"):
        v = feats.clone().requires_grad_(True)
        dragsaw_loss(_cos(v), w, 0.5, form=form).backward()
        grads.append(v.grad.flatten())
    cosine = float(F.cosine_similarity(grads[0], grads[1], dim=0))
    assert 0.0 < cosine < 0.999


# ---------------------------------------------------------------------------------------- affinities


def test_affinity_variants_by_hand():
    phi_a = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
    phi_b = torch.tensor([[[0.25, 0.75]]])
    # differences: row 0 (0.75, -0.75); row 1 (0.25, -0.25)
    torch.testing.assert_close(pair_affinity(phi_a, phi_b, "ratio"), torch.tensor([[[0.25], [0.75]]]))
    torch.testing.assert_close(pair_affinity(phi_a, phi_b, "l1"), torch.tensor([[[-0.5], [0.5]]]))
    root2 = math.sqrt(2)
    torch.testing.assert_close(
        pair_affinity(phi_a, phi_b, "l2"), torch.tensor([[[1 - 0.75 * root2], [1 - 0.25 * root2]]])
    )
    torch.testing.assert_close(
        pair_affinity(phi_a, phi_b, "rigid", threshold=0.5), torch.tensor([[[0.0], [1.0]]])
    )
    torch.testing.assert_close(
        pair_affinity(phi_a, phi_b, "rigid", threshold=0.8), torch.tensor([[[0.0], [0.0]]])
    )
    torch.testing.assert_close(
        pair_affinity(phi_a, phi_b, "constant", constant=0.3), torch.full((1, 2, 1), 0.3)
    )
    # mutation: "l1" with the 1/M average would equal Eq. 3 and must not pass as l1
    assert not torch.allclose(pair_affinity(phi_a, phi_b, "l1"), affinity(phi_a, phi_b))
    with pytest.raises(ValueError, match="kind"):
        pair_affinity(phi_a, phi_b, "dice")


def test_dice_and_centre_affinities_by_hand():
    labels = torch.tensor([[[0, 1, 1, 0, 0]]])  # (B=1, 1, 5)
    centers = torch.tensor([[[0, 1], [0, 2], [0, 3], [0, 0]]])
    win = window_labels(labels, centers, (1, 3))
    assert win.tolist() == [[[0, 1, 1], [1, 1, 0], [1, 0, 0], [-1, 0, 1]]]  # -1 outside the image
    w = dice_affinity(win, win, 2)
    # (col 1 vs col 2): class 1 {1,2} vs {0,1} -> 2*1/4; class 0 {0} vs {2} -> 0; mean 0.25
    assert float(w[0, 0, 1]) == pytest.approx(0.25)
    # (col 1 vs col 3): no overlap in either class -> 0, although the fractions (1/3, 2/3) differ only in place
    assert float(w[0, 0, 2]) == pytest.approx(0.0)
    assert float(w[0, 0, 0]) == pytest.approx(1.0)  # a window with itself
    # Eq. 16 as printed (1 - mean dice) would give a window affinity 0 with itself: rejected
    assert float(1 - w[0, 0, 0]) != pytest.approx(float(w[0, 0, 0]))
    # a class absent from both windows agrees (dice 1)
    only_bg = dice_affinity(torch.zeros(1, 1, 3, dtype=torch.long), torch.zeros(1, 1, 3, dtype=torch.long), 3)
    assert float(only_bg) == pytest.approx(1.0)
    c = center_affinity(labels, centers, centers)
    assert c[0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]


def test_dice_affinity_matches_a_loop_reference():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (2, 9, 11), generator=g)
    centers = torch.stack(
        [torch.randint(0, 9, (2, 6), generator=g), torch.randint(0, 11, (2, 6), generator=g)], -1
    )
    win = window_labels(labels, centers, (3, 5))
    w = dice_affinity(win, win, 3)
    for b in range(2):
        for i in range(6):
            for j in range(6):
                scores = []
                for m in range(3):
                    a, c = win[b, i] == m, win[b, j] == m
                    total = int(a.sum() + c.sum())
                    scores.append(1.0 if total == 0 else 2 * int((a & c).sum()) / total)
                assert float(w[b, i, j]) == pytest.approx(sum(scores) / 3, abs=1e-6)


# ---------------------------------------------------------------------------------------- module switches


def _module(**options):
    tap_info = {"a": TapInfo(6, (2, 2), (5, 5)), "b": TapInfo(6, (4, 4), (11, 11))}
    base = {"layers": {"a": 16}, "patch_sizes": (3, 5), "temperature": 0.5, "weight": 1.0}
    return PDCRLoss(tap_info, PDCRConfig(**{**base, **options}), num_classes=3, spatial_dims=2)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[:, 3:9, 2:12] = 1
    labels[:, 10:15, 5:14] = 2
    taps = {"a": torch.randn(2, 6, 8, 8, generator=g), "b": torch.randn(2, 6, 4, 4, generator=g)}
    return taps, labels


def _phi_and_sim(module, taps, labels, size):
    """Grid cells of tap "a" (all 64 for n >= 64, else a centred grid), their fractions and cosine matrix."""
    from training.losses.pdcr import sample_grid_positions, tap_centers

    idx = sample_grid_positions((8, 8), module.layers["a"])
    vec = taps["a"].flatten(2)[:, :, idx[:, 0] * 8 + idx[:, 1]].transpose(1, 2)
    centers = tap_centers(idx, (2, 2), (16, 16), (0, 0))
    phi = foreground_ratios(labels, centers.expand(2, -1, -1), size, 3)
    return phi, _cos(vec), centers


def test_module_default_equals_eq9_on_its_windows():
    module = _module()
    taps, labels = _inputs()
    got = module(taps, labels).per_layer["a"]
    expected = []
    for size in (3, 5):
        phi, sim, _ = _phi_and_sim(module, taps, labels, size)
        expected.append(eq9_reference(sim, affinity(phi, phi), 0.5))
    torch.testing.assert_close(got.double(), torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)


def test_series_ratio_averages_fractions_first():
    taps, labels = _inputs()
    by_loss = _module()(taps, labels).per_layer["a"]
    module = _module(series="ratio")
    by_ratio = module(taps, labels).per_layer["a"]
    phis = [_phi_and_sim(module, taps, labels, size)[0] for size in (3, 5)]
    _, sim, _ = _phi_and_sim(module, taps, labels, 3)
    mean_phi = (phis[0] + phis[1]) / 2
    torch.testing.assert_close(
        by_ratio.double(), eq9_reference(sim, affinity(mean_phi, mean_phi), 0.5), rtol=1e-5, atol=1e-6
    )
    assert abs(float(by_ratio) - float(by_loss)) > 1e-4


@pytest.mark.parametrize("kind", ["l1", "l2", "dice", "constant", "rigid", "center"])
def test_each_affinity_switch_changes_the_loss(kind):
    taps, labels = _inputs()
    base = float(_module()(taps, labels).loss)
    other = _module(affinity=kind)(taps, labels)
    assert math.isfinite(float(other.loss)) and abs(float(other.loss) - base) > 1e-4


def test_constant_affinity_module_matches_eq9_with_constant_w():
    module = _module(affinity="constant", constant_affinity=0.3, patch_sizes=(3,))
    taps, labels = _inputs()
    _, sim, _ = _phi_and_sim(module, taps, labels, 3)
    expected = eq9_reference(sim, torch.full_like(sim, 0.3), 0.5)
    torch.testing.assert_close(module(taps, labels).per_layer["a"].double(), expected, rtol=1e-5, atol=1e-6)


def test_reduction_sum_and_form_through_the_module():
    taps, labels = _inputs()
    mean = _module(patch_sizes=(3,))(taps, labels).per_layer["a"]
    total = _module(patch_sizes=(3,), reduction="sum")(taps, labels).per_layer["a"]
    n = _module().layers["a"]
    torch.testing.assert_close(total, mean * 2 * n * n, rtol=1e-5, atol=1e-4)
    # with a series, the sum is averaged over the P windows (as the 2D code)
    series_sum = _module(reduction="sum")(taps, labels).per_layer["a"]
    series_mean = _module()(taps, labels).per_layer["a"]
    torch.testing.assert_close(series_sum, series_mean * 2 * n * n, rtol=1e-5, atol=1e-4)
    authors = _module(form="authors")(taps, labels).per_layer["a"]
    assert abs(float(authors) - float(series_mean)) > 1e-3


def test_cross_weight_scales_only_the_cross_terms():
    taps, labels = _inputs()
    options = {"cross_pairs": (("a", "b"),), "cross_samples": 8, "weight": 0.5}
    torch.manual_seed(0)
    out = _module(**options, cross_weight=3.0)(taps, labels)
    single, cross = out.per_layer["a"], out.per_layer["a<->b"]
    torch.testing.assert_close(out.loss.detach(), 0.5 * single + 3.0 * cross)
    torch.manual_seed(0)
    default = _module(**options)(taps, labels)
    torch.testing.assert_close(default.loss.detach(), 0.5 * (single + cross))


def test_layer_modes_rf_in_one_tap_h_in_another():
    module = _module(layers={"a": 16, "b": 8}, layer_modes={"b": "rf"})
    windows = module.windows((16, 16))
    assert windows == {"a": ((3, 3), (5, 5)), "b": ((11, 11),)}
    taps, labels = _inputs()
    mixed = module(taps, labels).per_layer["b"]
    all_h = _module(layers={"a": 16, "b": 8})(taps, labels).per_layer["b"]
    assert abs(float(mixed) - float(all_h)) > 1e-4
    with pytest.raises(ValueError, match="mixes modes"):
        _module(layers={"a": 16}, layer_modes={"b": "rf"}, cross_pairs=(("a", "b"),))
    with pytest.raises(ValueError, match="not in tap_info"):
        _module(layer_modes={"z": "rf"})


def test_measured_paper_against_authors_on_a_random_case(capsys):
    """The figures quoted in the report: both forms on one random case (B=2, N=32, tau 0.5)."""
    feats, w = _random_case(21, batch=2, n=32, channels=16)
    sim = _cos(feats)
    paper, authors = dragsaw_loss(sim, w, 0.5), dragsaw_loss(sim, w, 0.5, form="authors")
    with capsys.disabled():
        print(f"\nEq. 9 (paper form) {float(paper):.4f}, authors' form {float(authors):.4f}")
    assert float(paper) != pytest.approx(float(authors), abs=1e-2)


def test_label_side_functions_check_shapes():
    labels = torch.zeros(2, 5, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(2, 5, 6\).*\(1, 3, 2\)"):
        window_labels(labels, torch.zeros(1, 3, 2, dtype=torch.long), (3, 3))
    with pytest.raises(ValueError, match=r"\(1, 3, 9\).*\(1, 3, 4\)"):
        dice_affinity(torch.zeros(1, 3, 9, dtype=torch.long), torch.zeros(1, 3, 4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"\(2, 5, 6\).*\(2, 3, 3\)"):
        center_affinity(
            labels, torch.zeros(2, 3, 3, dtype=torch.long), torch.zeros(2, 3, 2, dtype=torch.long)
        )
