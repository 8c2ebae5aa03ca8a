"""The contrastive loss on hand-computed cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from cmr_search.encoder.loss import ContrastiveLoss, claim_loss, pair_infonce


def nll(pos, *others):
    return -pos + math.log(sum(math.exp(x) for x in (pos, *others)))


def test_pair_infonce_matches_hand_computation_with_same_study_mask():
    # views 0 and 1 belong to study 0, view 2 to study 1
    a, b, c, d, e, f = 2.0, -1.0, 1.5, 0.5, 0.3, 1.2
    logits = torch.tensor([[a, b], [c, d], [e, f]])
    lam = 0.7
    loss, v2t, t2v = pair_infonce(logits, torch.tensor([0, 0, 1]), lam)
    l_vu = [nll(a, b), nll(c, d), nll(f, e)]
    # report 0's other view (1) is not a negative of the pair (0, view 0), and vice versa
    l_uv = [nll(a, e), nll(c, e), nll(f, b, d)]
    assert v2t.item() == pytest.approx(sum(l_vu) / 3, abs=1e-6)
    assert t2v.item() == pytest.approx(sum(l_uv) / 3, abs=1e-6)
    expected = sum(lam * x + (1 - lam) * y for x, y in zip(l_vu, l_uv)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_claim_loss_matches_hand_computation():
    # views 0 and 1 belong to study 0 (two rewrites), view 2 to study 1 (one rewrite, one pad)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    claims = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    rewrites = torch.tensor([[[0.0, 1.0], [0.6, 0.8]], [[1.0, 0.0], [9.0, 9.0]]])
    valid = torch.tensor([[True, True], [True, False]])
    scale = torch.tensor(2.0)
    loss, err = claim_loss(x, claims, rewrites, valid, torch.tensor([0, 0, 1]), scale)
    rows = [nll(2 * 1.0, 2 * 0.0, 2 * 0.6), nll(2 * 0.0, 2 * 1.0, 2 * 0.8), nll(2 * 0.8, 2 * 0.6)]
    assert loss.item() == pytest.approx(sum(rows) / 3, abs=1e-6)
    assert err.item() == pytest.approx(1 / 3)  # view 1 prefers a rewrite to its claim
    # a study without rewrites adds nothing; none at all gives a zero loss
    none = torch.zeros(2, 2, dtype=torch.bool)
    assert claim_loss(x, claims, rewrites, none, torch.tensor([0, 0, 1]), scale)[0].item() == 0.0
    only0 = torch.tensor([[True, True], [False, False]])
    part, _ = claim_loss(x, claims, rewrites, only0, torch.tensor([0, 0, 1]), scale)
    assert part.item() == pytest.approx(sum(rows[:2]) / 2, abs=1e-6)


def test_the_hard_term_joins_the_loss_with_its_weight():
    torch.manual_seed(1)
    views, reports = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(2, 8), dim=1)
    studies, claims = F.normalize(torch.randn(2, 8), dim=1), F.normalize(torch.randn(2, 8), dim=1)
    rewrites = F.normalize(torch.randn(2, 3, 8), dim=1)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    study_of_view, scale = torch.tensor([0, 0, 1, 1]), torch.tensor(10.0)
    fn = ContrastiveLoss(lam=0.6, flood=0.0, study_weight=0.5, hard_weight=0.3)
    out = fn(views, reports, study_of_view, scale, studies, claims, rewrites, valid)
    plain = fn(views, reports, study_of_view, scale, studies)
    by_views, _ = claim_loss(views, claims, rewrites, valid, study_of_view, scale)
    by_studies, _ = claim_loss(studies, claims, rewrites, valid, torch.arange(2), scale)
    assert out["hard"].item() == pytest.approx((by_views + 0.5 * by_studies).item(), abs=1e-6)
    assert out["loss"].item() == pytest.approx(plain["loss"].item() + 0.3 * out["hard"].item(), abs=1e-5)
    assert out["pair"].item() == pytest.approx(plain["pair"].item())  # the report terms are untouched


def test_one_view_per_study_is_the_asymmetric_clip_loss():
    torch.manual_seed(0)
    v, u = F.normalize(torch.randn(6, 8), dim=1), F.normalize(torch.randn(6, 8), dim=1)
    logits = 10 * v @ u.t()
    loss, _, _ = pair_infonce(logits, torch.arange(6), 0.25)
    ref = 0.25 * F.cross_entropy(logits, torch.arange(6)) + 0.75 * F.cross_entropy(logits.t(), torch.arange(6))
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)


def test_flooding_turns_the_gradient_around_below_the_level():
    v = torch.eye(3, requires_grad=True)
    u = torch.eye(3)
    scale = torch.tensor(20.0)
    plain = ContrastiveLoss(lam=0.5, flood=0.0)(v, u, torch.arange(3), scale)
    flooded = ContrastiveLoss(lam=0.5, flood=0.05)(v, u, torch.arange(3), scale)
    raw = plain["loss"].item()
    assert raw < 0.05
    assert flooded["loss"].item() == pytest.approx(0.1 - raw, abs=1e-7)
    g_plain = torch.autograd.grad(plain["loss"], v)[0]
    g_flood = torch.autograd.grad(flooded["loss"], v)[0]
    assert torch.allclose(g_flood, -g_plain)


def test_flooding_leaves_a_loss_above_the_level_unchanged():
    torch.manual_seed(1)
    v, u = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    out = ContrastiveLoss(flood=0.05)(v, u, torch.arange(4), torch.tensor(10.0))
    assert out["loss"].item() == pytest.approx(out["raw"].item())


def test_study_term_is_added_with_its_weight():
    torch.manual_seed(2)
    views = F.normalize(torch.randn(6, 8), dim=1)
    reports = F.normalize(torch.randn(3, 8), dim=1)
    studies = F.normalize(torch.randn(3, 8), dim=1)
    sov = torch.tensor([0, 0, 1, 1, 2, 2])
    out = ContrastiveLoss(lam=0.75, flood=0.0, study_weight=0.5)(views, reports, sov, torch.tensor(10.0), studies)
    logits = 10.0 * studies @ reports.t()
    ref_study = 0.75 * F.cross_entropy(logits, torch.arange(3)) + 0.25 * F.cross_entropy(logits.t(), torch.arange(3))
    assert out["study"].item() == pytest.approx(ref_study.item(), abs=1e-5)
    assert out["loss"].item() == pytest.approx(out["pair"].item() + 0.5 * ref_study.item(), abs=1e-5)


def test_lambda_out_of_range_is_refused():
    with pytest.raises(ValueError, match="lambda"):
        ContrastiveLoss(lam=1.5)


def test_match_loss_matches_hand_computation():
    from cmr_search.encoder.loss import match_loss

    texts = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    studies = F.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0]]), dim=-1)
    # text 0 holds for study 0 only; text 1 holds for both (no negative: left out of its
    # row); text 2 holds for study 1 and is unknown for study 0
    targets = torch.tensor([[1, 0], [1, 1], [-1, 1]], dtype=torch.int8)
    scale = torch.tensor(5.0)
    lg = (scale * texts @ studies.t()).tolist()
    rows = -math.log(math.exp(lg[0][0]) / (math.exp(lg[0][0]) + math.exp(lg[0][1])))
    # study 0: texts 0, 1 positive, none negative -> left out; study 1: text 0 negative, texts 1, 2 positive
    d = math.log(math.exp(lg[0][1]) + math.exp(lg[1][1]) + math.exp(lg[2][1]))
    cols = ((d - lg[1][1]) + (d - lg[2][1])) / 2
    got = match_loss(texts, studies, targets, scale)
    assert got.item() == pytest.approx((rows + cols) / 2, rel=1e-5)
    none = torch.ones(3, 2, dtype=torch.int8)  # nothing to contrast: zero, still differentiable
    assert match_loss(texts.requires_grad_(), studies, none, scale).item() == 0.0


def test_the_match_term_joins_the_loss_with_its_weight():
    torch.manual_seed(0)
    views, reports = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(2, 8), dim=-1)
    texts, studies = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(2, 8), dim=-1)
    targets = torch.tensor([[1, 0], [0, 1], [-1, 1]], dtype=torch.int8)
    sov, scale = torch.tensor([0, 0, 1, 1]), torch.tensor(10.0)
    base = ContrastiveLoss(flood=0.0)(views, reports, sov, scale, studies)
    with_match = ContrastiveLoss(flood=0.0, match_weight=0.5)(views, reports, sov, scale, studies,
                                                              match=(texts, studies, targets))
    from cmr_search.encoder.loss import match_loss

    expected = base["raw"] + 0.5 * match_loss(texts, studies, targets, scale)
    assert with_match["raw"].item() == pytest.approx(expected.item(), rel=1e-6)
