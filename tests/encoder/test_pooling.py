"""Gated-attention pooling over padded bags."""

import pytest
import torch

from cmr_search.encoder.pooling import GatedAttentionPool


def test_padding_gets_exactly_zero_attention_and_does_not_change_the_result():
    torch.manual_seed(0)
    pool = GatedAttentionPool(8, hidden=4).eval()
    bag = torch.randn(1, 3, 8)
    alone, a_alone = pool(bag, torch.ones(1, 3, dtype=torch.bool))
    padded = torch.cat([bag, 1e3 * torch.randn(1, 2, 8)], dim=1)
    mask = torch.tensor([[True, True, True, False, False]])
    pooled, attention = pool(padded, mask)
    assert torch.equal(attention[0, 3:], torch.zeros(2))
    assert torch.allclose(pooled, alone, atol=1e-6)
    assert torch.allclose(attention[0, :3], a_alone[0], atol=1e-6)
    assert attention.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_attention_follows_the_gated_formula():
    torch.manual_seed(1)
    pool = GatedAttentionPool(5, hidden=3).eval()
    h = torch.randn(2, 4, 5)
    _, attention = pool(h, torch.ones(2, 4, dtype=torch.bool))
    scores = pool.attention_w(torch.tanh(pool.attention_v(h)) * torch.sigmoid(pool.attention_u(h))).squeeze(-1)
    assert torch.allclose(attention, torch.softmax(scores, dim=1), atol=1e-6)


def test_an_empty_bag_is_a_clear_error():
    pool = GatedAttentionPool(4)
    with pytest.raises(ValueError, match="at least one view"):
        pool(torch.randn(2, 3, 4), torch.tensor([[True, False, False], [False, False, False]]))
