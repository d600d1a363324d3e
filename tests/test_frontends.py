"""The four frontends give the same attribution rows at every level: HF model, TransformerBridge,
nnsight LanguageModel (local) and remote="local" (the trace path on the unmodified model).

Families: jamba (hybrid: Mamba and attention layers, MoE in every layer), deepseek_v3 (dense first
layer: dense-MLP neurons, which the bridge wraps) and nemotron_h (one mixer per layer: a non-gated MLP,
attention, MoE and Mamba layers). Recipes on the LanguageModel and the bridge use the tokenizer the
model carries (none is passed).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import nnsight_moe
from nnsight_moe.recipes.attribution import LEVELS, attribute
from nnsight_moe.testing import tiny_model

from helpers import word_tokenizer

TEXTS = ["w5 w9 w17 w33 w2", "w7 w8 w9", "w11 w12 w13 w14 w15 w16"]
TARGETS = [3, 40, 77]
KEYS = ["prompt", "layer", "level", "head", "expert", "neuron"]
FAMILIES = {
    "jamba": {},
    "deepseek_v3": {},
    "nemotron_h": {"layers_block_type": ["mlp", "attention", "moe", "mamba"], "num_hidden_layers": 4,
                   "moe_shared_expert_intermediate_size": 32, "ssm_state_size": 16, "mamba_num_heads": 4,
                   "mamba_head_dim": 16, "n_groups": 2, "chunk_size": 16},
}


def _frontends(family):
    from nnsight import LanguageModel

    from nnsight_moe import tl

    kw = FAMILIES[family]
    tok = word_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = LanguageModel(tiny_model(family, **kw), tokenizer=tok)
        bridge = tl.boot(tiny_model(family, **kw), tokenizer=tok)
    return tok, tiny_model(family, **kw), lm, bridge


@pytest.mark.parametrize("family", list(FAMILIES))
def test_four_frontends_give_the_same_rows(family):
    tok, hf, lm, bridge = _frontends(family)
    options = dict(levels=LEVELS, batch_size=2, progress=False)
    try:
        frames = {
            "hf": attribute(hf, TEXTS, TARGETS, tokenizer=tok, **options),
            "bridge": attribute(bridge, TEXTS, TARGETS, **options),  # tokenizer: the bridge's own
            "nnsight": attribute(lm, TEXTS, TARGETS, **options),  # tokenizer: the LanguageModel's own
            "remote": attribute(lm, TEXTS, TARGETS, remote="local", **options),
        }
    finally:
        nnsight_moe.detach(bridge)
    reference = frames["hf"].to_frame().sort_values(KEYS).reset_index(drop=True)
    levels = set(reference["level"])
    assert {"head", "expert", "neuron", "moe"} <= levels
    if family in ("jamba", "nemotron_h"):
        assert "mixer" in levels, "Mamba layers contribute a mixer row"
        mixer_layers = set(reference.loc[reference["level"] == "mixer", "layer"])
        head_layers = set(reference.loc[reference["level"] == "head", "layer"])
        assert head_layers and not head_layers & mixer_layers, "head rows only for attention layers"
    dense = {"deepseek_v3": 0, "nemotron_h": 0}.get(family)  # the dense MLP layer
    if dense is not None:
        neurons = reference[(reference["level"] == "neuron") & (reference["layer"] == dense)]
        assert len(neurons) == 3 * 64, "every dense-MLP neuron of every prompt"
    for name, result in frames.items():
        frame = result.to_frame().sort_values(KEYS).reset_index(drop=True)
        assert frame[KEYS].equals(reference[KEYS]), f"{name}: different rows than the HF model"
        assert (frame["score"] - reference["score"]).abs().max() < 1e-4, name
        assert result.targets == frames["hf"].targets and result.ranks == frames["hf"].ranks, name


def test_recipes_take_the_tokenizer_the_model_carries():
    """blocking and head_expert on a LanguageModel / bridge with string prompts and no tokenizer= equal the
    HF model with the tokenizer passed."""
    from nnsight_moe.recipes import blocking, head_expert

    tok, hf, lm, bridge = _frontends("deepseek_v3")
    data = (TEXTS, TARGETS)
    try:
        expected = blocking.rank_experts(hf, data, tokenizer=tok, by="gate", progress=False)
        mine = blocking.rank_experts(lm, data, by="gate", progress=False)
        assert mine.overall == expected.overall
        flat = lambda r: [s for rows in r.scores.values() for *_, s in rows]  # noqa: E731
        assert flat(mine) == pytest.approx(flat(expected), abs=1e-6) and sum(flat(expected)) > 0
        corr = head_expert.correlate(hf, data, tokenizer=tok, top_k=2, permutations=10)
        mine = head_expert.correlate(bridge, data, top_k=2, permutations=10)
        assert mine.top_heads == corr.top_heads and mine.summary_r == pytest.approx(corr.summary_r, abs=1e-4)
    finally:
        nnsight_moe.detach(bridge)
    with pytest.raises(ValueError, match="string prompts need tokenizer="):
        blocking.rank_experts(hf, data, by="gate", progress=False)
