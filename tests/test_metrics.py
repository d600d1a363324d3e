"""MRR / HIT@k equal a direct computation from sorted logits."""

import pytest
import torch

from nnsight_moe.recipes.metrics import hit_at_k, hits_of_ranks, mrr, mrr_of_ranks, target_ranks


def test_metrics_match_direct_sort():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 300, generator=g)
    targets = torch.randint(0, 300, (50,), generator=g)
    order = logits.argsort(dim=1, descending=True)
    direct = torch.tensor([int((order[i] == targets[i]).nonzero()) + 1 for i in range(50)])
    assert torch.equal(target_ranks(logits, targets), direct)
    assert mrr(logits, targets) == pytest.approx(float((1 / direct.double()).mean()))
    assert hit_at_k(logits, targets, 10) == pytest.approx(float((direct <= 10).double().mean()))
    assert hit_at_k(logits, targets, 300) == 1.0
    assert mrr_of_ranks([1, 2, 4]) == pytest.approx((1 + 0.5 + 0.25) / 3)
    assert hits_of_ranks(torch.tensor([1, 10, 11]), 10) == pytest.approx(2 / 3)
    assert mrr_of_ranks([]) != mrr_of_ranks([])  # nan for no prompts


def test_metrics_errors():
    with pytest.raises(ValueError, match="k must be >= 1"):
        hits_of_ranks([1, 2], 0)
    with pytest.raises(ValueError, match="last-position logits"):
        mrr(torch.zeros(2, 3, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="targets"):
        mrr(torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"0\.\.2"):
        mrr(torch.zeros(2, 3), torch.tensor([0, 5]))
