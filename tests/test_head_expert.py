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
def test_grouped_output_projection_suppression_equals_zeroed_columns():
    """DeepSeek-V4's o_a_proj reads the heads as [.., groups, width / groups] (here a head spans two groups):
    suppressing head h equals zeroing its columns of each group's block of o_a_proj."""
    model = tiny_model("deepseek_v4")
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    heads, d_head = [(1, 0), (2, 3)], model.config.head_dim
    reference = copy.deepcopy(model)
    for layer, head in heads:
        o_a = reference.model.layers[layer].self_attn.o_a_proj
        weight = o_a.weight.view(o_a.n_groups, -1, o_a.in_features)  # [G, rank, width / G]
        for position in range(head * d_head, (head + 1) * d_head):
            weight[position // o_a.in_features, :, position % o_a.in_features] = 0
    with suppress_heads(model, heads):
        suppressed = model(ids).logits
    torch.testing.assert_close(suppressed, reference(ids).logits, atol=1e-5, rtol=0)
    assert not torch.allclose(suppressed, model(ids).logits, atol=1e-4)


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


def _prompts(n=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)], torch.randint(3, 128, (n,), generator=g).tolist()


def test_correlate_equals_numpy_on_attribution_signals():
    from nnsight_moe.recipes.attribution import attribute

    model = tiny_model("qwen2_moe")
    prompts, targets = _prompts()
    result = head_expert.correlate(model, (prompts, targets), top_k=2, permutations=50)
    frame = attribute(model, prompts, targets, levels=("head", "expert"), progress=False).to_frame()
    heads = frame[frame.level == "head"].pivot_table(index="prompt", columns=["layer", "head"], values="score")
    experts = (frame[frame.level == "expert"].pivot_table(index="prompt", columns=["layer", "expert"],
                                                          values="score", aggfunc="sum")
               .reindex(range(len(prompts))).fillna(0.0))
    checked = 0
    for row in result.pairs.itertuples():
        assert row.head_layer <= row.expert_layer
        if (row.expert_layer, row.expert) not in experts.columns:
            assert np.isnan(row.r)  # never selected: constant zero signal
            continue
        x = heads[(row.head_layer, row.head)].to_numpy()
        y = experts[(row.expert_layer, row.expert)].to_numpy()
        if np.std(y) == 0:
            continue
        assert row.r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-6)
        checked += 1
    assert checked > 20
    assert -1 <= result.summary_r <= 1 and 0 < result.summary_p <= 1
    assert len(result.top_heads) == 2 and len(result.top_experts) == 2


def test_causal_rows_and_controls(tmp_path):
    model = tiny_model("olmoe")
    prompts, targets = _prompts()
    corr = head_expert.correlate(model, (prompts, targets), top_k=2, permutations=20)
    effects = head_expert.causal(model, (prompts, targets), correlation=corr, k_heads=2, seeds=3)
    frame = effects.to_frame()
    assert list(frame["condition"]) == ["top-K heads"] + ["random heads"] * 3
    assert (frame["mrr_clean"] == frame["mrr_clean"].iloc[0]).all()
    # suppression measured independently: zeroed heads through suppress_heads + plain forward
    with torch.no_grad(), suppress_heads(model, corr.top_heads[:2]):
        batch = _batch(None, prompts, model)
        logits = model(**batch).logits[:, -1]
    from nnsight_moe.recipes.metrics import mrr

    assert frame["mrr_suppressed"].iloc[0] == pytest.approx(mrr(logits, torch.tensor(targets)))
    again = head_expert.CausalResult.load(effects.save(tmp_path / "c.json"))
    assert again.rows.equals(effects.rows)
    assert effects.plot().axes and corr.plot().axes


def test_correlate_remote_local_equals_local():
    from helpers import language_model

    model = tiny_model("qwen2_moe")
    prompts, targets = _prompts()
    local = head_expert.correlate(model, (prompts, targets), top_k=2, permutations=20)
    remote = head_expert.correlate(language_model(model), (prompts, targets), top_k=2, permutations=20,
                                   remote="local")
    np.testing.assert_allclose(remote.pairs["r"].to_numpy(), local.pairs["r"].to_numpy(), atol=1e-4, equal_nan=True)
    assert remote.top_heads == local.top_heads and remote.summary_r == pytest.approx(local.summary_r, abs=1e-4)
    local = head_expert.correlate(model, (prompts, targets), signal="router_prob", top_k=2, permutations=20)
    remote = head_expert.correlate(language_model(model), (prompts, targets), signal="router_prob", top_k=2,
                                   permutations=20, remote="local")
    np.testing.assert_allclose(remote.pairs["r"].to_numpy(), local.pairs["r"].to_numpy(), atol=1e-4, equal_nan=True)
    assert remote.top_experts == local.top_experts
