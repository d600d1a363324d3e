"""Attribution (LPI) on decoder layers beyond h + attn + mlp, against independent brute forces.

DBRX (attention inside ``norm_attn_norm``, routing inside the block, 2-D experts), Gemma-4 (post-norms, router
and experts on the decoder layer beside a dense MLP, per-layer inputs, layer scalars, logit soft-cap),
DeepSeek-V4 (hyper-connections: parallel residual streams; hash-routed first layer) and the post-norm families.
Each oracle reads module inputs / outputs and weights, builds every component's vector in the final
residual's frame explicitly and scores it through the frozen final norm; no attribution code is used.
"""

from __future__ import annotations

import pytest
import torch

from nnsight_moe.recipes.attribution import attribute
from nnsight_moe.testing import tiny_model

from helpers import naive_expert

PROMPTS = [[5, 9, 17, 33, 2], [7, 8, 9]]
TARGETS = [3, 40]
LEVELS = ("layer", "head", "expert", "shared", "neuron")


def _key(row):
    if row.level in ("attn", "moe", "shared", "per_layer_input"):
        return (row.level, row.layer)
    if row.level == "head":
        return ("head", row.layer, row.head)
    if row.level == "expert":
        return ("expert", row.layer, row.expert)
    return ("neuron", row.layer, row.expert, row.neuron)


def _compare(model, oracle, atol=1e-4):
    frame = attribute(model, PROMPTS, TARGETS, levels=LEVELS, batch_size=2, progress=False).to_frame()
    worst = 0.0
    for p, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        expected = oracle(model, prompt, target)
        got = {_key(r): r.score for r in frame[frame["prompt"] == p].itertuples()}
        assert set(got) == set(expected), sorted(set(got) ^ set(expected))[:8]
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=atol), key
            worst = max(worst, abs(got[key] - value))
    return frame, worst


class _Seen:
    """Forward hooks that record the last position of module inputs / outputs under a key."""

    def __init__(self):
        self.values, self.handles = {}, []

    def out(self, module, key):
        def hook(m, a, o):
            value = o[0] if isinstance(o, tuple) else o
            self.values[key] = value[0, -1] if value.dim() > 2 else value[-1]  # [b, p, ...] or flat tokens [n, d]
        self.handles.append(module.register_forward_hook(hook))

    def inp(self, module, key):
        def hook(m, a, k):
            x = a[0] if a else k["hidden_states"]
            self.values[key] = x[0, -1] if x.dim() > 2 else x[-1]
        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def __getitem__(self, key):
        return self.values[key]

    def remove(self):
        for h in self.handles:
            h.remove()


def _rms_readout(model, norm, final, target, softcap=None):
    scale = torch.rsqrt(final.pow(2).mean() + (getattr(norm, "variance_epsilon", None) or norm.eps))

    def logprob(x):
        logits = model.lm_head(norm.weight * x * scale)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits.log_softmax(-1)[target]
    return logprob


def _frozen(norm, raw):
    """γ / rms(raw): an RMS norm's map with its scale held at its real input ``raw``."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    return (1.0 if weight is None else weight) / torch.sqrt(raw.pow(2).mean() + eps)


# ------------------------------------------------------------------------------------ DBRX
@torch.no_grad()
def dbrx_oracle(model, prompt, target):
    blocks, seen = model.transformer.blocks, _Seen()
    for i, block in enumerate(blocks):
        seen.inp(block, ("h", i))
        seen.out(block.norm_attn_norm.attn, ("attn", i))
        seen.inp(block.norm_attn_norm.attn.out_proj, ("z", i))
        seen.inp(block.ffn, ("xt", i))
        seen.out(block.ffn, ("mlp", i))
    seen.inp(model.transformer.norm_f, "final")
    logits = model(torch.tensor([prompt])).logits[0, -1]
    seen.remove()
    norm = model.transformer.norm_f  # LayerNorm without bias: its real mean and variance held fixed
    mu, var = seen["final"].mean(), seen["final"].var(unbiased=False)

    def logprob(x):
        return model.lm_head(norm.weight * (x - mu) / torch.sqrt(var + norm.eps)).log_softmax(-1)[target]

    assert torch.allclose(logprob(seen["final"]), logits.log_softmax(-1)[target], atol=1e-5)
    lpi = lambda x, c: float(logprob(x + c) - logprob(x))  # noqa: E731
    out, n_heads = {}, model.config.n_heads
    for i, block in enumerate(blocks):
        h, a = seen[("h", i)], seen[("attn", i)]
        u = h + a
        assert torch.allclose(u + seen[("mlp", i)], seen[("h", i + 1)] if i + 1 < len(blocks) else seen["final"], atol=1e-5)
        out[("attn", i)], out[("moe", i)] = lpi(h, a), lpi(u, seen[("mlp", i)])
        w_o = block.norm_attn_norm.attn.out_proj.weight
        d = w_o.shape[1] // n_heads
        for hd in range(n_heads):
            out[("head", i, hd)] = lpi(h, w_o[:, hd * d:(hd + 1) * d] @ seen[("z", i)][hd * d:(hd + 1) * d])
        ffn, x = block.ffn, seen[("xt", i)][None]
        weights, indices = ffn.route_tokens_to_experts(ffn.router(x))  # the block's own routing
        w2 = ffn.experts.mlp.w2.view(ffn.experts.num_experts, ffn.experts.ffn_hidden_size, -1)
        for g, e in zip(weights[0].tolist(), indices[0].tolist()):
            acts, y = naive_expert(ffn.experts, x, e)
            out[("expert", i, e)] = lpi(u, g * y[0])
            for k in range(acts.shape[-1]):
                out[("neuron", i, e, k)] = lpi(u, g * acts[0, k] * w2[e][k])
    return out


def test_dbrx_every_level_equals_brute_force():
    _, worst = _compare(tiny_model("dbrx"), dbrx_oracle)
    assert worst < 1e-4


# ------------------------------------------------------------------------------------ Gemma-4
@torch.no_grad()
def gemma4_oracle(model, prompt, target):
    text = model.model.language_model if hasattr(model.model, "language_model") else model.model
    layers, seen = text.layers, _Seen()
    for i, layer in enumerate(layers):
        seen.inp(layer, ("h", i))
        seen.out(layer.self_attn, ("o", i))
        seen.inp(layer.self_attn.o_proj, ("z", i))
        seen.out(layer.post_attention_layernorm, ("A", i))
        seen.out(layer.pre_feedforward_layernorm, ("xd", i))
        seen.out(layer.mlp, ("m", i))
        seen.out(layer.post_feedforward_layernorm_1, ("D", i))
        seen.out(layer.pre_feedforward_layernorm_2, ("xe", i))
        seen.out(layer.experts, ("R", i))
        seen.inp(layer.post_feedforward_layernorm, ("S", i))
        seen.out(layer.post_feedforward_layernorm, ("F", i))
        seen.out(layer.post_per_layer_input_norm, ("P", i))
    seen.inp(text.norm, "final")
    logits = model(torch.tensor([prompt])).logits[0, -1]
    seen.remove()
    softcap = model.config.get_text_config().final_logit_softcapping
    logprob = _rms_readout(model, text.norm, seen["final"], target, softcap)
    assert torch.allclose(logprob(seen["final"]), logits.log_softmax(-1)[target], atol=1e-5)
    lpi = lambda x, c: float(logprob(x + c) - logprob(x))  # noqa: E731
    n_layers, n_heads = len(layers), model.config.get_text_config().num_attention_heads
    scalars = [float(layer.layer_scalar) for layer in layers]
    out = {}
    for i, layer in enumerate(layers):
        s = torch.tensor(scalars[i:]).prod()  # what layer i's additions are multiplied by on the way to the end
        h, a = seen[("h", i)], seen[("A", i)]
        u = h + a
        after = seen[("h", i + 1)] if i + 1 < n_layers else seen["final"]
        assert torch.allclose(scalars[i] * (u + seen[("F", i)] + seen[("P", i)]), after, atol=1e-5)
        out[("attn", i)], out[("moe", i)] = lpi(s * h, s * a), lpi(s * u, s * seen[("F", i)])
        out[("per_layer_input", i)] = lpi(s * (u + seen[("F", i)]), s * seen[("P", i)])
        post_attn = _frozen(layer.post_attention_layernorm, seen[("o", i)])
        w_o = layer.self_attn.o_proj.weight
        d = w_o.shape[1] // n_heads
        for hd in range(n_heads):
            head = w_o[:, hd * d:(hd + 1) * d] @ seen[("z", i)][hd * d:(hd + 1) * d]
            out[("head", i, hd)] = lpi(s * h, s * post_attn * head)
        post = s * _frozen(layer.post_feedforward_layernorm, seen[("S", i)])
        routed = post * _frozen(layer.post_feedforward_layernorm_2, seen[("R", i)])
        _, weights, indices = layer.router(u[None])  # the router reads the residual, the experts its normed copy
        for g, e in zip(weights[0].tolist(), indices[0].tolist()):
            acts, y = naive_expert(layer.experts, seen[("xe", i)][None], e)
            out[("expert", i, e)] = lpi(s * u, routed * g * y[0])
            for k in range(acts.shape[-1]):
                out[("neuron", i, e, k)] = lpi(s * u, routed * g * acts[0, k] * layer.experts.down_proj[e][:, k])
        out[("shared", i)] = lpi(s * u, post * seen[("D", i)])  # the parallel dense MLP, after its own norm
        dense = post * _frozen(layer.post_feedforward_layernorm_1, seen[("m", i)])
        mlp, x = layer.mlp, seen[("xd", i)]
        acts = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        for k in range(acts.shape[-1]):
            out[("neuron", i, -1, k)] = lpi(s * u, dense * acts[k] * mlp.down_proj.weight[:, k])
    return out


def test_gemma4_every_level_equals_brute_force():
    """Gemma-4 text with a biting logit soft-cap (2.0) and random layer scalars (the tiny model's are drawn)."""
    model = tiny_model("gemma4_text", final_logit_softcapping=2.0)
    assert all(abs(float(layer.layer_scalar) - 1) > 1e-3 for layer in model.model.layers)
    frame, _ = _compare(model, gemma4_oracle)
    assert set(frame["level"]) == {"attn", "moe", "per_layer_input", "head", "expert", "shared", "neuron"}


def test_gemma4_multimodal_model_equals_brute_force():
    """The full Gemma-4 (vision / audio towers, text run only): the same rows as its text model's oracle."""
    _compare(tiny_model("gemma4"), gemma4_oracle)


# ------------------------------------------------------------------------------------ DeepSeek-V4
@torch.no_grad()
def deepseek_v4_oracle(model, prompt, target):
    layers, seen = model.model.layers, _Seen()
    mixing = {}
    for i, layer in enumerate(layers):
        seen.inp(layer, ("R", i))  # [N, D] streams entering layer i
        for name in ("attn_hc", "ffn_hc"):
            seen.handles.append(layer.get_submodule(name).register_forward_hook(
                lambda m, a, o, i=i, name=name: mixing.__setitem__((name, i), (o[0][0, -1], o[1][0, -1]))))
        seen.out(layer.self_attn, ("attn", i))
        seen.handles.append(layer.self_attn.o_a_proj.register_forward_pre_hook(
            lambda m, a, i=i: seen.values.__setitem__(("z", i), a[0][0, -1].reshape(-1))))
        seen.inp(layer.mlp, ("xt", i))
        seen.out(layer.mlp, ("mlp", i))
    seen.inp(model.model.hc_head, "R_final")
    seen.inp(model.model.norm, "final")
    ids = torch.tensor([prompt])
    logits = model(ids).logits[0, -1]
    seen.remove()
    logprob = _rms_readout(model, model.model.norm, seen["final"], target)
    assert torch.allclose(logprob(seen["final"]), logits.log_softmax(-1)[target], atol=1e-5)
    lpi = lambda x, c: float(logprob(x + c) - logprob(x))  # noqa: E731
    # the final collapse weights, solved from the real streams and the real collapse (least squares, exact here)
    pre = torch.linalg.lstsq(seen["R_final"].T, seen["final"][:, None]).solution[:, 0]
    assert torch.allclose(pre @ seen["R_final"], seen["final"], atol=1e-5)
    sites = [(name, i) for i in range(len(layers)) for name in ("attn_hc", "ffn_hc")]

    def to_final(streams, after):  # streams [N, D] right after site `after`: every later mixing, then the collapse
        for site in sites[after + 1:]:
            streams = mixing[site][1].T @ streams  # R_out = post ⊗ out + combᵀ R_in (out not included)
        return pre @ streams

    def from_site(site, c):
        post = mixing[sites[site]][0]
        return to_final(post[:, None] * c[None], site)

    out, n_heads = {}, model.config.num_attention_heads
    for i, layer in enumerate(layers):
        h = to_final(seen[("R", i)], 2 * i - 1)
        a = from_site(2 * i, seen[("attn", i)])
        u = h + a
        out[("attn", i)], out[("moe", i)] = lpi(h, a), lpi(u, from_site(2 * i + 1, seen[("mlp", i)]))
        attn, z = layer.self_attn, seen[("z", i)]
        d = z.shape[0] // n_heads
        for hd in range(n_heads):  # head hd alone through the model's own grouped o_a_proj and o_b_proj
            only = torch.zeros_like(z)
            only[hd * d:(hd + 1) * d] = z[hd * d:(hd + 1) * d]
            y = attn.o_b_proj(attn.o_a_proj(only.view(1, 1, model.config.o_groups, -1)).flatten(2))[0, 0]
            out[("head", i, hd)] = lpi(h, from_site(2 * i, y))
        block, x = layer.mlp, seen[("xt", i)][None]
        _, weights, indices = block.gate(x, ids[:, -1:]) if block.is_hash else block.gate(x)  # hash: by token id
        for g, e in zip(weights[0].tolist(), indices[0].tolist()):
            acts, y = naive_expert(block.experts, x, e)
            out[("expert", i, e)] = lpi(u, from_site(2 * i + 1, g * y[0]))
            for k in range(acts.shape[-1]):
                out[("neuron", i, e, k)] = lpi(u, from_site(2 * i + 1, g * acts[0, k] * block.experts.down_proj[e][:, k]))
        shared = block.shared_experts
        out[("shared", i)] = lpi(u, from_site(2 * i + 1, shared(x)[0]))
        acts = shared.act_fn(shared.gate_proj(x[0]).clamp(max=shared.limit)) * shared.up_proj(x[0]).clamp(
            min=-shared.limit, max=shared.limit)
        for k in range(acts.shape[-1]):
            out[("neuron", i, -1, k)] = lpi(u, from_site(2 * i + 1, acts[k] * shared.down_proj.weight[:, k]))
    return out


def test_deepseek_v4_every_level_equals_brute_force():
    """Hyper-connections (4 streams, mixing held at its real values) and a hash-routed first layer."""
    model = tiny_model("deepseek_v4")
    assert model.model.layers[0].mlp.is_hash
    _compare(model, deepseek_v4_oracle)


# ------------------------------------------------------------------------------------ post-norm families
@torch.no_grad()
def post_norm_oracle(model, prompt, target):
    """Layer, head and expert rows of a post-norm family (h + norm_a(attn) then + norm_f(moe)), from the norms'
    real inputs / outputs (FlexOlmo: post_attention_layernorm; Kolibri: post_self_attn_layernorm). Beam adds
    with depth-scaled weights, h_out = sqrt((i - 1) / i) h + out / sqrt(i) (i = 2l + 2 for the attention, 2l + 3
    for the MLP): every state and output is read times what it is multiplied by on the way to the end."""
    layers, seen = model.model.layers, _Seen()
    norms = []
    for i, layer in enumerate(layers):
        attn_norm = getattr(layer, "post_self_attn_layernorm", None) or layer.post_attention_layernorm
        ffn_norm = getattr(layer, "post_feedforward_layernorm", None) or layer.post_mlp_layernorm
        norms.append((attn_norm, ffn_norm))
        seen.inp(layer, ("h", i))
        seen.inp(layer.self_attn.o_proj, ("z", i))
        seen.inp(attn_norm, ("o", i))
        seen.out(attn_norm, ("A", i))
        seen.inp(layer.mlp, ("xt", i))
        seen.inp(ffn_norm, ("m", i))
        seen.out(ffn_norm, ("F", i))
    seen.inp(model.model.norm, "final")
    logits = model(torch.tensor([prompt])).logits[0, -1]
    seen.remove()
    softcap = getattr(model.config, "final_logit_softcapping", None)  # Beam's
    logprob = _rms_readout(model, model.model.norm, seen["final"], target, softcap)
    assert torch.allclose(logprob(seen["final"]), logits.log_softmax(-1)[target], atol=1e-5)
    lpi = lambda x, c: float(logprob(x + c) - logprob(x))  # noqa: E731
    beam = type(layers[0]).__name__ == "BeamDecoderLayer"
    adds = [(((j - 1) / j) ** 0.5, j ** -0.5) if beam else (1.0, 1.0) for i in range(len(layers)) for j in (2 * i + 2, 2 * i + 3)]
    after = [float(torch.tensor([a for a, _ in adds[s + 1:]]).prod()) for s in range(len(adds))]  # later sites' a
    out, n_heads = {}, model.config.num_attention_heads
    for i, layer in enumerate(layers):
        (a_attn, b_attn), (a_ffn, b_ffn) = adds[2 * i], adds[2 * i + 1]
        to_end_attn, to_end_ffn = b_attn * after[2 * i], b_ffn * after[2 * i + 1]
        h = seen[("h", i)] * a_attn * after[2 * i]  # the state entering layer i, as it reaches the end
        a = seen[("A", i)] * to_end_attn
        u = h + a
        assert torch.allclose(a_ffn * (a_attn * seen[("h", i)] + b_attn * seen[("A", i)]) + b_ffn * seen[("F", i)],
                              seen[("h", i + 1)] if i + 1 < len(layers) else seen["final"], atol=1e-5)
        out[("attn", i)], out[("moe", i)] = lpi(h, a), lpi(u, to_end_ffn * seen[("F", i)])
        w_o, f_a = layer.self_attn.o_proj.weight, to_end_attn * _frozen(norms[i][0], seen[("o", i)])
        d = w_o.shape[1] // n_heads
        for hd in range(n_heads):
            out[("head", i, hd)] = lpi(h, f_a * (w_o[:, hd * d:(hd + 1) * d] @ seen[("z", i)][hd * d:(hd + 1) * d]))
        block, f_m = layer.mlp, to_end_ffn * _frozen(norms[i][1], seen[("m", i)])
        if not hasattr(block, "gate"):  # Beam's dense first layer
            continue
        _, weights, indices = block.gate(seen[("xt", i)][None])
        f_m = f_m * getattr(block, "routed_scaling_factor", 1.0)  # Beam scales the routed sum after the experts
        for g, e in zip(weights[0].tolist(), indices[0].tolist()):
            out[("expert", i, e)] = lpi(u, f_m * g * naive_expert(block.experts, seen[("xt", i)][None], e)[1][0])
    return out


@pytest.mark.parametrize("family", ["flex_olmo", "kolibri1", "beam"])
def test_post_norm_families_equal_brute_force(family):
    model = tiny_model(family)
    frame = attribute(model, PROMPTS, TARGETS, levels=("layer", "head", "expert"), batch_size=2, progress=False).to_frame()
    for p, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        expected = post_norm_oracle(model, prompt, target)
        got = {_key(r): r.score for r in frame[frame["prompt"] == p].itertuples()}
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-4), key


def test_fast_screen_gradient_follows_the_softcap():
    """The fast neuron screen's gradient of log p(w | x) equals autograd's through cap * tanh(scale * logits / cap)."""
    from nnsight_moe.recipes.attribution import Readout, _logprob_gradient

    gen = torch.Generator().manual_seed(0)
    unembed, base = torch.randn(50, 8, generator=gen) * 3, torch.randn(3, 8, generator=gen)
    for cap, scale in ((None, None), (1.5, None), (None, 0.3), (1.5, 0.3)):  # Gemma's soft-cap, Cohere's logit_scale
        ro = Readout(unembed, torch.rand(8, generator=gen) + 0.5, torch.rand(3, 1, generator=gen) + 0.5, None,
                     torch.tensor([1, 7, 30]), softcap=cap, logit_scale=scale)
        x = base.clone().requires_grad_(True)
        ro.logprob(x, torch.arange(3)).sum().backward()
        assert torch.allclose(_logprob_gradient(ro, base), x.grad, atol=1e-5), (cap, scale)


def test_gemma4_fast_neurons_keep_exact_scores():
    """neurons="fast" on Gemma-4 (soft-capped, dense-MLP and expert neurons): its rows are exact rows."""
    model = tiny_model("gemma4_text", final_logit_softcapping=2.0)
    exact = attribute(model, PROMPTS, TARGETS, levels=("neuron",), progress=False).to_frame()
    fast = attribute(model, PROMPTS, TARGETS, levels=("neuron",), neurons="fast", fast_top=5, progress=False).to_frame()
    keys = ["prompt", "layer", "expert", "neuron"]
    merged = fast.merge(exact, on=keys, suffixes=("_fast", "_exact"))
    assert len(merged) == len(fast) and (merged["expert"] == -1).any() and (merged["expert"] >= 0).any()
    assert (merged["score_fast"] - merged["score_exact"]).abs().max() < 1e-6


@pytest.mark.parametrize("family", ["gemma4_text", "deepseek_v4"])
def test_layer_rows_telescope_in_the_final_frame(family):
    """Σ_l of the layer rows (Gemma-4: with its per-layer inputs) = log p(w | h^L) - log p(w | h^0), h^0 read in the
    final residual's frame (layer scalars; hyper-connection mixing), and the summary's total counts every row."""
    from nnsight_moe.recipes import efficiency

    model = tiny_model(family)
    result = attribute(model, PROMPTS, TARGETS, levels=("layer",), batch_size=2, progress=False)
    check = efficiency.telescoping(model, PROMPTS, TARGETS, result=result)
    assert check["max identity error"] < 1e-4
    assert efficiency.honest_summary(result)["total gain"] == pytest.approx(check["total gain mean"], abs=1e-6)


@pytest.mark.parametrize("family", ["gemma4_text", "deepseek_v4"])
def test_remote_path_refuses_frozen_maps(family):
    """The remote trace reads h + attn + mlp per layer: these models are refused by name, before any request."""
    from helpers import language_model

    with pytest.raises(ValueError, match="remote attribution reads each layer as h \\+ attn \\+ mlp; .* run it locally"):
        attribute(language_model(tiny_model(family)), PROMPTS, TARGETS, levels=("layer",), remote="local", progress=False)


@pytest.fixture(scope="module")
def bridge_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(3, 128)}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": 2})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="t3").save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["gemma4_text", "deepseek_v4"])
def test_bridge_gives_the_same_rows(family, bridge_tokenizer):
    """Under TransformerLens' own adapters (gemma4_text, deepseek_v4) every row of the HF model, scores within 1e-4
    (the bridge's own processing moves Gemma-4's logits by ~4e-5)."""
    import nnsight_moe
    from nnsight_moe import tl

    keys = ["prompt", "layer", "level", "head", "expert", "neuron"]
    reference = attribute(tiny_model(family), PROMPTS, TARGETS, batch_size=2, progress=False).to_frame()
    bridge = tl.boot(tiny_model(family), tokenizer=bridge_tokenizer)
    try:
        got = attribute(bridge, PROMPTS, TARGETS, batch_size=2, progress=False).to_frame()
    finally:
        nnsight_moe.detach(bridge)
    merged = reference.merge(got, on=keys, how="outer", suffixes=("_hf", "_tl"), indicator=True)
    assert (merged["_merge"] == "both").all() and len(merged) == len(reference)
    assert (merged["score_hf"] - merged["score_tl"]).abs().max() < 1e-4


@torch.no_grad()
def jetmoe_oracle(model, prompt, target):
    """JetMoE: attention (mixture of attention heads: no head rows, its output projection is routed) and the MoE
    block (dispatch router, parallel experts, a bias on the routed sum that is no expert's)."""
    layers, seen = model.model.layers, _Seen()
    for i, layer in enumerate(layers):
        seen.inp(layer, ("h", i))
        seen.out(layer.self_attention, ("attn", i))
        seen.inp(layer.mlp, ("xt", i))
        seen.out(layer.mlp, ("mlp", i))
    seen.inp(model.model.norm, "final")
    logits = model(torch.tensor([prompt])).logits[0, -1]
    seen.remove()
    logprob = _rms_readout(model, model.model.norm, seen["final"], target)
    assert torch.allclose(logprob(seen["final"]), logits.log_softmax(-1)[target], atol=1e-5)
    lpi = lambda x, c: float(logprob(x + c) - logprob(x))  # noqa: E731
    out = {}
    for i, layer in enumerate(layers):
        h, a = seen[("h", i)], seen[("attn", i)]
        u = h + a
        out[("attn", i)], out[("moe", i)] = lpi(h, a), lpi(u, seen[("mlp", i)])
        block, x = layer.mlp, seen[("xt", i)][None]
        top = block.router.layer(x).float().topk(block.router.top_k, dim=1)
        for g, e in zip(top.values.softmax(-1)[0].tolist(), top.indices[0].tolist()):
            acts, y = naive_expert(block, x, e)
            out[("expert", i, e)] = lpi(u, g * y[0])
            for k in range(acts.shape[-1]):
                out[("neuron", i, e, k)] = lpi(u, g * acts[0, k] * block.output_linear.weight[e][:, k])
    return out


def test_jetmoe_every_level_equals_brute_force():
    frame, _ = _compare(tiny_model("jetmoe"), jetmoe_oracle)
    assert set(frame["level"]) == {"attn", "moe", "expert", "neuron"}  # no head rows: MoA's projection is routed


@torch.no_grad()
def cohere2_moe_oracle(model, prompt, target):
    """Cohere2-MoE: parallel attention and MoE on one normed input (h + attn + moe), a mean-subtracting final norm
    of its own class (real mean and variance held fixed) and logits times logit_scale."""
    layers, seen = model.model.layers, _Seen()
    for i, layer in enumerate(layers):
        seen.inp(layer, ("h", i))
        seen.out(layer.self_attn, ("attn", i))
        seen.inp(layer.self_attn.o_proj, ("z", i))
        seen.inp(layer.mlp, ("xt", i))
        seen.out(layer.mlp, ("mlp", i))
    seen.inp(model.model.norm, "final")
    logits = model(torch.tensor([prompt])).logits[0, -1]
    seen.remove()
    norm, final = model.model.norm, seen["final"]
    mu, var = final.mean(), final.var(unbiased=False)

    def logprob(x):
        normed = norm.weight * (x - mu) / torch.sqrt(var + norm.variance_epsilon)
        return (model.lm_head(normed) * model.logit_scale).log_softmax(-1)[target]

    assert torch.allclose(logprob(final), logits.log_softmax(-1)[target], atol=1e-5)
    lpi = lambda x, c: float(logprob(x + c) - logprob(x))  # noqa: E731
    out, n_heads = {}, model.config.num_attention_heads
    for i, layer in enumerate(layers):
        h, a = seen[("h", i)], seen[("attn", i)]
        u = h + a
        out[("attn", i)], out[("moe", i)] = lpi(h, a), lpi(u, seen[("mlp", i)])
        w_o = layer.self_attn.o_proj.weight
        d = w_o.shape[1] // n_heads
        for hd in range(n_heads):
            out[("head", i, hd)] = lpi(h, w_o[:, hd * d:(hd + 1) * d] @ seen[("z", i)][hd * d:(hd + 1) * d])
        block, x = layer.mlp, seen[("xt", i)][None]
        if not hasattr(block, "experts"):
            continue
        _, weights, indices = block.gate(x)
        for g, e in zip(weights[0].tolist(), indices[0].tolist()):
            out[("expert", i, e)] = lpi(u, g * naive_expert(block.experts, x, e)[1][0])
        out[("shared", i)] = lpi(u, block.shared_experts(x)[0])  # combined by "sum"
    return out


def test_cohere2_moe_layer_head_expert_rows_equal_brute_force():
    model = tiny_model("cohere2_moe")
    assert model.config.shared_expert_combination_strategy == "sum" and model.logit_scale != 1
    frame = attribute(model, PROMPTS, TARGETS, levels=("layer", "head", "expert", "shared"), batch_size=2,
                      progress=False).to_frame()
    for p, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        expected = cohere2_moe_oracle(model, prompt, target)
        got = {_key(r): r.score for r in frame[frame["prompt"] == p].itertuples()}
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-4), key


@torch.no_grad()
def test_lfm2_moe_layer_rows_equal_brute_force():
    """LFM2-MoE: short-convolution layers (``conv``) give ``mixer`` rows, attention layers ``attn`` rows; its final
    norm is named ``embedding_norm`` (it runs after the layers)."""
    model = tiny_model("lfm2_moe")
    layers, seen = model.model.layers, _Seen()
    for i, layer in enumerate(layers):
        seen.inp(layer, ("h", i))
        seen.out(getattr(layer, "conv", None) or layer.self_attn, ("t", i))
        seen.out(layer.feed_forward, ("f", i))
    seen.inp(model.model.embedding_norm, "final")
    frame = attribute(model, PROMPTS, TARGETS, levels=("layer",), batch_size=2, progress=False).to_frame()
    for p, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        seen.values.clear()
        logits = model(torch.tensor([prompt])).logits[0, -1]
        logprob = _rms_readout(model, model.model.embedding_norm, seen["final"], target)
        assert torch.allclose(logprob(seen["final"]), logits.log_softmax(-1)[target], atol=1e-5)
        expected = {}
        for i, layer in enumerate(layers):
            h, t = seen[("h", i)], seen[("t", i)]
            expected[i, "mixer" if hasattr(layer, "conv") else "attn"] = float(logprob(h + t) - logprob(h))
            expected[i, "moe"] = float(logprob(h + t + seen[("f", i)]) - logprob(h + t))
        got = {(r.layer, r.level): r.score for r in frame[frame["prompt"] == p].itertuples()}
        assert set(got) == set(expected) and {"mixer", "attn", "moe"} == {level for _, level in got}
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-4), key
    seen.remove()


@torch.no_grad()
def hc_layer_oracle(model, prompt, target):
    """Layer and head rows of a hyper-connection stack from the real streams: each site's mixing (post, comb; HY-V4
    returns no comb: the identity) applied forwards, the final collapse solved from the real final streams."""
    text = getattr(model.model, "language_model", model.model)  # GLM-5-Next: a multimodal model's text stack
    layers, seen, mixing = text.layers, _Seen(), {}
    for i, layer in enumerate(layers):
        seen.inp(layer, ("R", i))
        for name in ("attn_hc", "ffn_hc"):
            seen.handles.append(layer.get_submodule(name).register_forward_hook(
                lambda m, a, o, i=i, name=name: mixing.__setitem__(
                    (name, i), (o[0][0, -1], o[1][0, -1] if len(o) == 3 else torch.eye(o[0].shape[-1])))))
        seen.out(layer.self_attn, ("attn", i))
        seen.inp(layer.self_attn.o_proj, ("z", i))
        seen.out(layer.mlp, ("mlp", i))
    seen.inp(text.hc_head, "R_final")
    seen.inp(text.norm, "final")
    logits = model(torch.tensor([prompt])).logits[0, -1]
    seen.remove()
    logprob = _rms_readout(model, text.norm, seen["final"], target)
    assert torch.allclose(logprob(seen["final"]), logits.log_softmax(-1)[target], atol=1e-5)
    lpi = lambda x, c: float(logprob(x + c) - logprob(x))  # noqa: E731
    pre = torch.linalg.lstsq(seen["R_final"].T, seen["final"][:, None]).solution[:, 0]
    assert torch.allclose(pre @ seen["R_final"], seen["final"], atol=1e-5)
    sites = [(name, i) for i in range(len(layers)) for name in ("attn_hc", "ffn_hc")]

    def to_final(streams, after):
        for site in sites[after + 1:]:
            streams = mixing[site][1].T @ streams
        return pre @ streams

    out, n_heads = {}, model.config.get_text_config().num_attention_heads
    for i, layer in enumerate(layers):
        h = to_final(seen[("R", i)], 2 * i - 1)
        at_attn = lambda c: to_final(mixing[sites[2 * i]][0][:, None] * c[None], 2 * i)  # noqa: E731
        a = at_attn(seen[("attn", i)])
        out[("attn", i)] = lpi(h, a)
        out[("moe", i)] = lpi(h + a, to_final(mixing[sites[2 * i + 1]][0][:, None] * seen[("mlp", i)][None], 2 * i + 1))
        w_o, z = layer.self_attn.o_proj.weight, seen[("z", i)]
        d = w_o.shape[1] // n_heads
        for hd in range(n_heads):
            out[("head", i, hd)] = lpi(h, at_attn(w_o[:, hd * d:(hd + 1) * d] @ z[hd * d:(hd + 1) * d]))
    return out


@pytest.mark.parametrize("family", ["hy_v4", "glm5_next"])
def test_other_hyper_connections_equal_brute_force(family):
    """HY-V4 (no comb: R_out = post ⊗ out + R_in; its own final collapse) and GLM-5-Next (DeepSeek-V4's mixing, a
    plain-mean final collapse): layer and head rows."""
    model = tiny_model(family)
    frame = attribute(model, PROMPTS, TARGETS, levels=("layer", "head"), batch_size=2, progress=False).to_frame()
    for p, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        expected = hc_layer_oracle(model, prompt, target)
        got = {_key(r): r.score for r in frame[frame["prompt"] == p].itertuples()}
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-4), key


def test_longcat_flash_refused_with_its_layout():
    """LongCat-Flash's layer is h + attn_0 + mlp_0 + attn_1 + mlp_1 + moe (checked here from module outputs):
    not h + attn + mlp, so attribution refuses it by that structure at every level instead of mis-reading it."""
    model = tiny_model("longcat_flash")
    layer, seen = model.model.layers[0], {}
    names = {"a0": layer.self_attn[0], "a1": layer.self_attn[1], "m0": layer.mlps[0], "m1": layer.mlps[1], "moe": layer.mlp}
    handles = [m.register_forward_hook(lambda m, a, o, k=k: seen.__setitem__(k, o[0] if isinstance(o, tuple) else o))
               for k, m in names.items()]
    handles.append(layer.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("h", a[0] if a else k["hidden_states"]),
                                                   with_kwargs=True))
    handles.append(layer.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        model(torch.tensor([PROMPTS[0]]))
    for h in handles:
        h.remove()
    total = seen["h"] + sum(seen[k] for k in names)
    assert torch.allclose(seen["out"], total, atol=1e-5)
    assert not torch.allclose(seen["out"], seen["h"] + seen["a0"] + seen["m0"], atol=1e-3)
    for levels in (("layer",), ("layer", "head", "expert")):
        with pytest.raises(ValueError, match="LongcatFlashForCausalLM: each decoder layer .* 2 attention and 2 dense-MLP "
                                             "sub-blocks plus a shortcut MoE .* \\(h \\+ attn \\+ mlp\\)"):
            attribute(model, PROMPTS[:1], TARGETS[:1], levels=levels, progress=False)


def test_qwen4_exp_refused_with_its_hyper_connections():
    """Qwen4-Exp reads hc_count gated residual streams through hyper_connection_mixer (no final norm): refused by
    that structure, not by a missing-module lookup."""
    model = tiny_model("qwen4_exp_text")
    assert not hasattr(model.model, "norm") and hasattr(model.model, "hyper_connection_mixer")
    for levels in (("layer",), ("layer", "expert")):
        with pytest.raises(ValueError, match="Qwen4ExpForCausalLM: its decoder layers write 4 parallel residual streams "
                                             "through gated hyper-connections .*hyper_connection_mixer.*not a final norm"):
            attribute(model, PROMPTS[:1], TARGETS[:1], levels=levels, progress=False)
