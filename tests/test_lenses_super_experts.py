"""Expert lenses and super experts against plain-loop oracles on tiny models."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import nnsight_moe
from nnsight_moe.recipes import lenses, super_experts
from nnsight_moe.recipes.metrics import mrr_of_ranks
from nnsight_moe.testing import tiny_model

from helpers import capture_hooks, zero_expert_
from test_routing_analytics import _padded, _prompts

FAMILIES = ["qwen2_moe", "deepseek_v3"]


def _captured(hf, prompts):
    """Hook values and the final norm's input [b, p, D] of one right-padded forward of an attached copy."""
    ref = copy.deepcopy(hf)
    handle = nnsight_moe.attach(ref)
    ids, mask = _padded(prompts, "right")
    final = {}
    pre = ref.model.norm.register_forward_pre_hook(lambda m, a: final.__setitem__("x", a[0].detach().clone()))
    with torch.no_grad():
        values = capture_hooks(handle, lambda: ref(input_ids=ids, attention_mask=mask))
    pre.remove()
    return ref, handle.layout, values, final["x"], mask


def _frozen_delta(ref, final, c):
    """Δlogits of adding ``c`` to the final residual with the final norm's RMS frozen, through the real modules:
    norm(final + c) * rms(final + c) / rms(final), minus norm(final), through lm_head."""
    rms = lambda x: (x.pow(2).mean(-1, keepdim=True) + ref.model.norm.variance_epsilon).sqrt()  # noqa: E731
    with torch.no_grad():
        moved = ref.model.norm(final + c) * rms(final + c) / rms(final)
        return ref.lm_head(moved) - ref.lm_head(ref.model.norm(final))


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_lens_equals_frozen_readout_by_loops(family):
    hf = tiny_model(family)
    prompts = _prompts(seed=2, n=4)
    result = lenses.expert_lens(hf, prompts, top=5, weights=False, padding_side="right", batch_size=2)
    ref, layout, values, final, mask = _captured(hf, prompts)
    rows = {(r["layer"], r["expert"]): r for r in result.rows}
    for i in layout.moe_layers:
        path = layout.layer(i).path
        idx, w, out = (values[f"{path}.{n}"] for n in ("hook_topk_indices", "hook_topk_weights", "hook_expert_out"))
        sums, counts = {}, {}
        for r in range(mask.shape[0]):
            for t in range(mask.shape[1]):
                if not mask[r, t]:
                    continue
                for s in range(idx.shape[-1]):
                    e = int(idx[r, t, s])
                    delta = _frozen_delta(ref, final[r, t], w[r, t, s] * out[r, t, s])
                    sums[e] = sums.get(e, 0) + delta
                    counts[e] = counts.get(e, 0) + 1
                if layout.layer(i).has_shared:
                    c = values[f"{path}.hook_shared_gate"][r, t] * values[f"{path}.hook_shared_out"][r, t]
                    sums["shared"] = sums.get("shared", 0) + _frozen_delta(ref, final[r, t], c)
                    counts["shared"] = counts.get("shared", 0) + 1
        assert {e for (l, e) in rows if l == i} == set(sums)  # every used expert (and the shared one), no other
        for e, total in sums.items():
            mean = total / counts[e]
            got = rows[(i, e)]
            assert got["tokens"] == counts[e]
            top = mean.topk(5)
            assert [t for t, _ in got["promoted"]] == top.indices.tolist()
            assert [v for _, v in got["promoted"]] == pytest.approx(top.values.tolist(), abs=2e-4)
            low = (-mean).topk(5)
            assert [t for t, _ in got["suppressed"]] == low.indices.tolist()


def test_neuron_lens_equals_down_columns_through_the_readout():
    hf = tiny_model("qwen2_moe")
    prompts = _prompts(seed=4, n=3)
    ref, layout, values, final, mask = _captured(hf, prompts)
    layer, expert = layout.moe_layers[1], 3
    experts = hf.get_submodule(layout.layer(layer).experts)
    w_down = experts.down_proj[expert]  # [D, d_expert] (transformers' fused layout)
    gamma = hf.model.norm.weight
    weight_only = lenses.neuron_lens(hf, layer, expert, neurons=[0, 5], top=4)
    for row, k in zip(weight_only.rows, [0, 5]):
        logits = hf.lm_head(gamma * w_down[:, k]).detach()
        assert [t for t, _ in row["promoted"]] == logits.topk(4).indices.tolist()
    on_prompts = lenses.neuron_lens(hf, layer, expert, neurons=[2], prompts=prompts, top=4, padding_side="right")
    path = layout.layer(layer).path
    idx, w, acts = (values[f"{path}.{n}"] for n in ("hook_topk_indices", "hook_topk_weights", "hook_expert_acts"))
    coef, n = 0.0, 0
    for r in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            for s in range(idx.shape[-1]):
                if mask[r, t] and int(idx[r, t, s]) == expert:
                    rms = (final[r, t].pow(2).mean() + hf.model.norm.variance_epsilon).sqrt()
                    coef, n = coef + float(w[r, t, s] * acts[r, t, s, 2] / rms), n + 1
    assert on_prompts.rows[0]["tokens"] == n
    logits = (coef / max(n, 1)) * hf.lm_head(gamma * w_down[:, 2]).detach()
    assert [v for _, v in on_prompts.rows[0]["promoted"]] == pytest.approx(logits.topk(4).values.tolist(), abs=2e-4)


def test_weight_lens_projects_the_top_singular_direction():
    hf = tiny_model("qwen2_moe")
    layout = nnsight_moe.layout(hf)
    result = lenses.weight_lens(hf, top=3, directions=2, layers=[layout.moe_layers[0]])
    assert {(r["expert"], r["source"]) for r in result.rows} == {
        (e, s) for e in [*range(layout.n_experts), "shared"] for s in ("weights", "direction 1")}
    w = hf.get_submodule(layout.layer(layout.moe_layers[0]).experts).down_proj[4].detach()
    u = torch.linalg.svd(w, full_matrices=False).U[:, 0]
    logits = hf.lm_head(hf.model.norm.weight * u).detach()
    if logits.max() < -logits.min():
        logits = -logits
    row = next(r for r in result.rows if r["expert"] == 4 and r["source"] == "weights")
    assert [t for t, _ in row["promoted"]] == logits.topk(3).indices.tolist()
    assert json.loads(json.dumps(result.to_json()))["rows"] == result.rows
    with pytest.raises(ValueError, match="expert must be"):
        lenses.neuron_lens(hf, layout.moe_layers[0], 99)


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_maxima_equal_plain_loops(family):
    hf = tiny_model(family)
    prompts = _prompts(seed=6, n=5)
    maxima = super_experts.activation_maxima(hf, prompts, padding_side="right", batch_size=2)
    _, layout, values, _, mask = _captured(hf, prompts)
    rows = {(r["layer"], r["expert"]): r for r in maxima.rows}
    for i in layout.moe_layers:
        path = layout.layer(i).path
        idx = values[f"{path}.hook_topk_indices"]
        acts, out = values[f"{path}.hook_expert_acts"], values[f"{path}.hook_expert_out"]
        best = {}
        for r in range(mask.shape[0]):
            for t in range(mask.shape[1]):
                if not mask[r, t]:
                    continue
                for s in range(idx.shape[-1]):
                    e = int(idx[r, t, s])
                    a, o, n = best.get(e, (0.0, 0.0, 0))
                    best[e] = (max(a, float(acts[r, t, s].abs().max())), max(o, float(out[r, t, s].abs().max())), n + 1)
        for e, (a, o, n) in best.items():
            got = rows[(i, e)]
            assert (got["tokens"], got["max_acts"], got["max_out"]) == (n, pytest.approx(a, rel=1e-6), pytest.approx(o, rel=1e-6))
        assert {e for (l, e) in rows if l == i and e != "shared"} == set(best)
        if layout.layer(i).has_shared:
            shared = values[f"{path}.hook_shared_out"][mask.bool()]
            assert rows[(i, "shared")]["max_out"] == pytest.approx(float(shared.abs().max()), rel=1e-6)
    routed = [r["max_out"] for r in maxima.rows if r["expert"] != "shared"]
    assert maxima.flagged == [(r["layer"], r["expert"]) for r in maxima.rows if r["expert"] != "shared"
                              and r["max_out"] > max(float(torch.quantile(torch.tensor(routed, dtype=torch.float64), 0.995)),
                                                     0.1 * max(routed))]


def test_flag_criterion():
    flags, threshold = super_experts.flag([1.0] * 999 + [100.0])
    assert flags == [False] * 999 + [True]
    flags, _ = super_experts.flag([float(v) for v in range(1, 11)], quantile=0.5, ratio=0.75)  # > 5.5 and > 7.5
    assert [v for v, f in zip(range(1, 11), flags) if f] == [8, 9, 10]
    with pytest.raises(ValueError, match="quantile"):
        super_experts.flag([1.0], quantile=1.5)


def test_blocking_effect_equals_zeroed_down_projections():
    hf = tiny_model("qwen2_moe")
    layout = nnsight_moe.layout(hf)
    prompts = _prompts(seed=8, n=6)
    targets = [int(t) for t in torch.randint(3, 128, (6,), generator=torch.Generator().manual_seed(1))]
    flagged = [(layout.moe_layers[0], 2), (layout.moe_layers[1], 5)]
    effect = super_experts.blocking_effect(hf, (prompts, targets), flagged, seeds=2, batch_size=4)
    assert [r["condition"] for r in effect.rows] == ["none", "flagged", "random", "random"]

    def plain(model):
        ids, mask = _padded(prompts, "left")
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
        target = torch.tensor(targets)
        ranks = (logits > logits.gather(1, target[:, None])).sum(-1) + 1
        return mrr_of_ranks(ranks), float(logits.log_softmax(-1).gather(1, target[:, None]).mean())

    for row in effect.rows:
        blocked = {}
        for l, e in row["experts"]:
            blocked.setdefault(l, []).append(e)
        mrr, logprob = plain(zero_expert_(copy.deepcopy(hf), layout, blocked))
        assert row["mrr"] == pytest.approx(mrr, abs=1e-9) and row["logprob"] == pytest.approx(logprob, abs=1e-4)
        if row["condition"] == "random":
            assert not set(map(tuple, row["experts"])) & set(flagged) and len(row["experts"]) == len(flagged)
    summary = super_experts.BlockingEffect.from_json(json.loads(json.dumps(effect.to_json()))).summary()
    assert summary["random"]["mrr"]["n"] == 2


def test_super_experts_remote_local_equal_local():
    from helpers import language_model

    hf = tiny_model("qwen2_moe")
    prompts = _prompts(seed=9, n=4)
    local = super_experts.activation_maxima(hf, prompts, batch_size=2)
    lm = language_model(copy.deepcopy(hf))
    remote = super_experts.activation_maxima(lm, prompts, batch_size=2, remote="local")
    assert [(r["layer"], r["expert"], r["tokens"], r["flagged"]) for r in remote.rows] == \
        [(r["layer"], r["expert"], r["tokens"], r["flagged"]) for r in local.rows]
    for a, b in zip(local.rows, remote.rows):
        assert (b["max_acts"], b["max_out"]) == (pytest.approx(a["max_acts"], abs=1e-5), pytest.approx(a["max_out"], abs=1e-5))
    targets = [7, 8, 9, 10]
    effect_local = super_experts.blocking_effect(hf, (prompts, targets), local.flagged, seeds=1, batch_size=2)
    effect_remote = super_experts.blocking_effect(lm, (prompts, targets), local.flagged, seeds=1, batch_size=2,
                                                  remote="local")
    for a, b in zip(effect_local.rows, effect_remote.rows):
        assert a["experts"] == b["experts"] and a["mrr"] == pytest.approx(b["mrr"], abs=1e-9)
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)


def test_transformer_bridge_gives_the_hf_results(tmp_path):
    """Routing, lenses and maxima of an (attached) TransformerBridge equal those of the same HF model."""
    from nnsight_moe import tl
    from nnsight_moe.recipes.routing_stats import collect_routing

    from helpers import word_tokenizer

    word_tokenizer().save_pretrained(tmp_path)
    bridge = tl.boot(tiny_model("qwen2_moe"), tokenizer=tmp_path)
    hf = tiny_model("qwen2_moe")
    prompts = _prompts(seed=12, n=4)
    try:
        a, b = collect_routing(hf, prompts, batch_size=2), collect_routing(bridge, prompts, batch_size=2)
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(a.weights, b.weights, atol=1e-5, rtol=0)
        la = lenses.expert_lens(hf, prompts, top=3, weights=False, tokenizer=word_tokenizer())
        lb = lenses.expert_lens(bridge, prompts, top=3, weights=False)
        assert [[t for t, _ in r["promoted"]] for r in la.rows] == [[t for t, _ in r["promoted"]] for r in lb.rows]
        ma, mb = super_experts.activation_maxima(hf, prompts), super_experts.activation_maxima(bridge, prompts)
        assert [r["max_out"] for r in ma.rows] == pytest.approx([r["max_out"] for r in mb.rows], abs=1e-5)
    finally:
        nnsight_moe.detach(bridge)


def test_attention_sink_equals_loops_over_eager_attention_weights():
    hf = tiny_model("qwen2_moe")
    prompts = _prompts(seed=14, n=4)
    before = hf.config._attn_implementation
    got = super_experts.attention_sink(hf, prompts, batch_size=2)
    assert hf.config._attn_implementation == before  # the eager switch is undone
    ref = copy.deepcopy(hf)
    ref.set_attn_implementation("eager")
    total, count = 0.0, 0
    for start in (0, 2):
        ids, mask = _padded(prompts[start : start + 2], "left")
        with torch.no_grad():
            attentions = ref(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        for r in range(ids.shape[0]):
            first = int(mask[r].nonzero()[0])
            for q in range(first + 1, ids.shape[1]):
                for attn in attentions:
                    total += float(attn[r, :, q, first].mean()) / len(attentions)
                count += 1
    assert got == pytest.approx(total / count, abs=1e-6)


@pytest.mark.parametrize("family", ["dbrx", "llama4", "jetmoe"])
def test_expert_down_projection_of_non_fused_layouts(family):
    """lenses' expert W_down [d_model, d_expert] for DBRX's 2-D w2, Llama 4's [E, in, out] and JetMoE's
    output_linear [E, out, in]: column k is what neuron k writes (checked against the expert's own output)."""
    from helpers import naive_expert

    hf = tiny_model(family)
    layout = nnsight_moe.layout(hf)
    layer = layout.moe_layers[-1]
    experts = hf.get_submodule(layout.layer(layer).experts)
    block = hf.get_submodule(layout.layer(layer).path) if family == "jetmoe" else experts
    x = torch.randn(3, hf.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        acts, out = naive_expert(block, x, 2)
    torch.testing.assert_close(acts @ lenses._down(hf, layout, layer, 2).T, out, atol=1e-5, rtol=0)
