"""Head–expert recipe: statistics against scipy/numpy, head suppression and router patching oracles."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import stats

import nnsight_moe
from nnsight_moe.recipes import head_expert
from nnsight_moe.recipes.head_expert import _batch, _run, pearson_matrix, suppress_heads
from nnsight_moe.testing import tiny_model


def test_pearson_matrix_equals_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 5)), rng.normal(size=(40, 3))
    b[:, 1] = a[:, 2] * 0.5 + rng.normal(size=40) * 0.1
    b[:, 2] = 7.0  # constant column: no correlation defined
    r, p = pearson_matrix(a, b)
    for i in range(5):
        for j in range(2):
            ref = stats.pearsonr(a[:, i], b[:, j])
            assert r[i, j] == pytest.approx(ref.statistic, abs=1e-12)
            assert p[i, j] == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-12)
    np.testing.assert_allclose(r[:, :2], np.corrcoef(a.T, b[:, :2].T)[:5, 5:], atol=1e-12)
    assert np.isnan(r[:, 2]).all() and np.isnan(p[:, 2]).all()
    q = head_expert._bh(p.ravel())
    finite = np.isfinite(p.ravel())
    np.testing.assert_allclose(q[finite], stats.false_discovery_control(p.ravel()[finite]))
    assert (q[finite] >= p.ravel()[finite] - 1e-15).all()


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
@torch.no_grad()
def test_suppression_equals_zeroed_w_o_columns(family):
    model = tiny_model(family)
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    heads = [(1, 0), (1, 3), (2, 2)]
    reference = copy.deepcopy(model)
    n_heads = model.config.num_attention_heads
    for layer, head in heads:
        o_proj = reference.model.layers[layer].self_attn.o_proj
        d_head = o_proj.in_features // n_heads
        o_proj.weight[:, head * d_head : (head + 1) * d_head] = 0
    with suppress_heads(model, heads):
        suppressed = model(ids).logits
    torch.testing.assert_close(suppressed, reference(ids).logits, atol=1e-5, rtol=0)
    assert not torch.allclose(suppressed, model(ids).logits, atol=1e-4)
    with pytest.raises(IndexError, match=r"valid heads are 0\.\.3"):
        with suppress_heads(model, [(0, 9)]):
            pass


@torch.no_grad()
def test_router_patching_with_clean_selection_reproduces_clean_logits():
    model = tiny_model("qwen2_moe")
    prompts = [[5, 9, 17, 33, 2], [7, 8, 9]]
    batch = _batch(None, prompts, model)
    with nnsight_moe.attached(model) as handle:
        clean, routing = _run(model, handle, batch, capture=True)
        patch = {i: {n: routing[i][n] for n in ("hook_topk_indices", "hook_topk_weights")} for i in routing}
        patched, _ = _run(model, handle, batch, patch=patch)
        assert torch.equal(patched, clean)
        # patching really overrides the router: a different selection changes the output
        other = {i: {n: v.clone() for n, v in d.items()} for i, d in patch.items()}
        other[0]["hook_topk_indices"] = (other[0]["hook_topk_indices"] + 1) % 8
        changed, _ = _run(model, handle, batch, patch=other)
        assert not torch.allclose(changed, clean, atol=1e-4)
