"""Every recipe (attribution, blocking, head_expert) runs on the hybrid families, whose stacks mix
attention with Mamba / linear-attention layers: jamba, nemotron_h, qwen3_next and kimi_linear (the last
two with real linear-attention layers here). Head rows and head suppression exist for attention layers only.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from nnsight_moe.recipes import blocking, head_expert
from nnsight_moe.recipes.attribution import attribute
from nnsight_moe.testing import tiny_model

from helpers import language_model

HYBRIDS = {
    "jamba": {},
    "nemotron_h": {"layers_block_type": ["moe", "attention", "mamba", "moe"], "num_hidden_layers": 4,
                   "moe_shared_expert_intermediate_size": 32, "ssm_state_size": 16, "mamba_num_heads": 4,
                   "mamba_head_dim": 16, "n_groups": 2, "chunk_size": 16},
    # two layers keep the (slow on CPU) reference linear-attention kernels to one layer, and
    # linear-attention layers at the tiny width (the defaults are 32 heads x 128)
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"], "num_hidden_layers": 2,
                   "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
                   "linear_num_value_heads": 4},
    "kimi_linear": {"layer_types": ["linear_attention", "full_attention"], "num_hidden_layers": 2,
                    "first_k_dense_replace": 0, "linear_num_heads": 4, "linear_head_dim": 16},
}
PROMPTS = [[5, 9, 17, 33, 2], [7, 8, 9], [11, 12, 13, 14, 15, 16], [20, 21, 22], [30, 31, 32, 33]]
TARGETS = [3, 40, 77, 9, 12]


@pytest.mark.parametrize("family", list(HYBRIDS))
def test_every_recipe_runs_on_hybrids(family):
    model = tiny_model(family, **HYBRIDS[family])
    frame = attribute(model, PROMPTS, TARGETS, levels=("layer", "head", "expert"), progress=False).to_frame()
    mixer_layers = set(frame.loc[frame["level"] == "mixer", "layer"])
    head_layers = set(frame.loc[frame["level"] == "head", "layer"])
    assert mixer_layers and head_layers and not mixer_layers & head_layers
    assert set(frame.loc[frame["level"] == "attn", "layer"]) == head_layers
    data = (PROMPTS, TARGETS)
    ranking = blocking.rank_experts(model, data, by="frequency", progress=False)
    result = blocking.sweep(model, data, ranking=ranking, top_n=(1,), seeds=1, baselines=("uniform",), progress=False)
    assert len(result.to_frame()) > 0
    corr = head_expert.correlate(model, data, top_k=2, permutations=20)
    assert {layer for layer, _ in corr.top_heads} <= head_layers
    assert set(corr.pairs["head_layer"]) <= head_layers
    effects = head_expert.causal(model, data, correlation=corr, k_heads=1, seeds=1, progress=False)
    assert set(effects.to_frame()["condition"]) == {"top-K heads", "random heads"}
    with pytest.raises(ValueError, match=r"has no attention heads .* attention layers: \["):
        with head_expert.suppress_heads(model, [(min(mixer_layers), 0)]):
            pass


def test_hybrid_recipes_remote_local_equal_local():
    """remote="local" on a hybrid (jamba): correlation signals and causal effects equal the local path."""
    model = tiny_model("jamba")
    data = (PROMPTS, TARGETS)
    local = head_expert.correlate(model, data, top_k=2, permutations=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = language_model(model)
    remote = head_expert.correlate(lm, data, top_k=2, permutations=20, remote="local")
    assert local.top_heads == remote.top_heads and local.summary_r == pytest.approx(remote.summary_r, abs=1e-4)
    a = head_expert.causal(model, data, correlation=local, k_heads=2, seeds=1, progress=False).to_frame()
    b = head_expert.causal(lm, data, correlation=local, k_heads=2, seeds=1, remote="local", progress=False).to_frame()
    assert (a.drop(columns=["condition"]) - b.drop(columns=["condition"])).abs().max().max() < 1e-4
