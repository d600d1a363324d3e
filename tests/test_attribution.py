"""Attribution (LPI) at every level against an independent brute force that builds x + c explicitly."""

from __future__ import annotations

import pytest
import torch

import nnsight_moe
from nnsight_moe.recipes.attribution import attribute, compare
from nnsight_moe.testing import tiny_model

from helpers import naive_expert

PROMPTS = [[5, 9, 17, 33, 2], [7, 8, 9], [11, 12, 13, 14, 15, 16]]
TARGETS = [3, 40, 77]


@torch.no_grad()
def brute_force(model, prompt, target):
    """Every level's LPI for one prompt, from module inputs/outputs and weights, no attribution code."""
    ids = torch.tensor([prompt])
    layers = model.model.layers
    seen, handles = {}, []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k, i=i: seen.__setitem__(("h", i), (a[0] if a else k["hidden_states"])[0, -1]), with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("attn", i), o[0][0, -1])))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("z", i), a[0][0, -1])))
        mlp = getattr(layer, "mlp", None) or layer.feed_forward  # Llama 4: feed_forward
        handles.append(mlp.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("xt", i), a[0][0, -1])))
        handles.append(mlp.register_forward_hook(
            lambda m, a, o, i=i: seen.__setitem__(("mlp", i), (o[0] if isinstance(o, tuple) else o).view(a[0].shape)[0, -1])))
    handles.append(model.model.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("final", a[0][0, -1])))
    logits = model(ids).logits[0, -1]
    for h in handles:
        h.remove()
    norm = model.model.norm
    if isinstance(norm, torch.nn.LayerNorm):  # frozen real mean and variance
        mu, var = seen["final"].mean(), seen["final"].var(unbiased=False)

        def logprob(x):
            return model.lm_head(norm.weight * (x - mu) / torch.sqrt(var + norm.eps) + norm.bias).log_softmax(-1)[target]
    else:  # frozen real RMS
        eps = getattr(norm, "variance_epsilon", None) or norm.eps  # Llama 4's RMSNorm names it eps
        scale = torch.rsqrt(seen["final"].pow(2).mean() + eps)

        def logprob(x):
            return model.lm_head(norm.weight * x * scale).log_softmax(-1)[target]

    assert torch.allclose(logprob(seen["final"]), logits.log_softmax(-1)[target], atol=1e-5)
    lpi = lambda x, c: float(logprob(x + c) - logprob(x))  # noqa: E731
    out = {}
    n_heads = model.config.num_attention_heads
    for i, layer in enumerate(layers):
        h, a = seen[("h", i)], seen[("attn", i)]
        u = h + a
        out[("attn", i)] = lpi(h, a)
        out[("moe", i)] = lpi(u, seen[("mlp", i)])
        w_o = layer.self_attn.o_proj.weight
        d_head = w_o.shape[1] // n_heads
        for hd in range(n_heads):
            sl = slice(hd * d_head, (hd + 1) * d_head)
            out[("head", i, hd)] = lpi(h, w_o[:, sl] @ seen[("z", i)][sl])
        block = getattr(layer, "mlp", None) or layer.feed_forward
        if hasattr(block, "experts") and type(block).__name__ == "Llama4TextMoe":  # the weight scales the INPUT
            dense, logits = block.router(seen[("xt", i)][None])
            for e in torch.topk(logits, block.top_k, dim=1).indices[0].tolist():
                acts, y = naive_expert(block.experts, dense[0, e] * seen[("xt", i)][None], e)
                out[("expert", i, e)] = lpi(u, y[0])
                for k in range(acts.shape[-1]):
                    out[("neuron", i, e, k)] = lpi(u, acts[0, k] * block.experts.down_proj[e][k])
            shared = block.shared_expert
            x = seen[("xt", i)]
            out[("shared", i)] = lpi(u, shared(x[None])[0])
            acts = shared.activation_fn(shared.gate_proj(x)) * shared.up_proj(x)
            for k in range(acts.shape[-1]):
                out[("neuron", i, -1, k)] = lpi(u, acts[k] * shared.down_proj.weight[:, k])
        elif hasattr(block, "experts"):
            router = getattr(block, "gate", None) or block.router
            _, weights, indices = router(seen[("xt", i)][None])[:3]
            for g, e in zip(weights[0].tolist(), indices[0].tolist()):
                acts, y = naive_expert(block.experts, seen[("xt", i)][None], e)
                out[("expert", i, e)] = lpi(u, g * y[0])
                w_down = block.experts.down_proj[e]
                for k in range(acts.shape[-1]):
                    out[("neuron", i, e, k)] = lpi(u, g * acts[0, k] * w_down[:, k])
            shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
            if shared is not None:
                gate_lin = getattr(block, "shared_expert_gate", None)
                s = torch.sigmoid(gate_lin(seen[("xt", i)]))[0] if gate_lin is not None else 1.0
                out[("shared", i)] = lpi(u, s * shared(seen[("xt", i)][None])[0])
                x = seen[("xt", i)]
                acts = shared.act_fn(shared.gate_proj(x)) * shared.up_proj(x)
                for k in range(acts.shape[-1]):
                    out[("neuron", i, -1, k)] = lpi(u, s * acts[k] * shared.down_proj.weight[:, k])
        else:
            mlp = block
            act = getattr(mlp, "act_fn", None) or mlp.activation_fn  # Llama 4: activation_fn
            acts = act(mlp.gate_proj(seen[("xt", i)])) * mlp.up_proj(seen[("xt", i)])
            for k in range(acts.shape[-1]):
                out[("neuron", i, -1, k)] = lpi(u, acts[k] * mlp.down_proj.weight[:, k])
    return out


def _key(row):
    if row.level in ("attn", "moe", "shared"):
        return (row.level, row.layer)
    if row.level == "head":
        return ("head", row.layer, row.head)
    if row.level == "expert":
        return ("expert", row.layer, row.expert)
    return ("neuron", row.layer, row.expert, row.neuron)


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe", "mixtral", "deepseek_v3", "llama", "phimoe", "llama4"])
def test_every_level_equals_brute_force(family):
    model = tiny_model(family)
    levels = ("layer", "head", "expert", "shared", "neuron")
    frame = attribute(model, PROMPTS, TARGETS, levels=levels, batch_size=2, progress=False).to_frame()
    assert list(frame.columns) == ["prompt", "layer", "level", "head", "expert", "neuron", "score"]
    for p, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        expected = brute_force(model, prompt, target)
        rows = frame[frame["prompt"] == p]
        got = {_key(r): r.score for r in rows.itertuples()}
        assert set(got) == set(expected), set(got) ^ set(expected)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-4), key


@torch.no_grad()
def test_decomposition_identities():
    """Σ_h A^{l,h} = attention output; Σ_k g m_k W_down[:, k] = g E(x~)."""
    model = tiny_model("qwen2_moe")
    ids = torch.tensor([PROMPTS[0]])
    seen = {}
    attn = model.model.layers[1].self_attn
    h1 = attn.register_forward_hook(lambda m, a, o: seen.__setitem__("a", o[0][0, -1]))
    h2 = attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0][0, -1]))
    with nnsight_moe.attached(model) as handle:
        block = handle.block(1)
        block.hook_expert_acts.add_hook(lambda v, hook: seen.__setitem__("acts", v[0, -1]))
        block.hook_expert_out.add_hook(lambda v, hook: seen.__setitem__("out", v[0, -1]))
        block.hook_topk_indices.add_hook(lambda v, hook: seen.__setitem__("idx", v[0, -1]))
        model(ids)
        block.hook_expert_acts.remove_hooks(), block.hook_expert_out.remove_hooks(), block.hook_topk_indices.remove_hooks()
    h1.remove(), h2.remove()
    w_o, n_heads = attn.o_proj.weight, model.config.num_attention_heads
    d = w_o.shape[1] // n_heads
    heads = sum(w_o[:, h * d : (h + 1) * d] @ seen["z"][h * d : (h + 1) * d] for h in range(n_heads))
    torch.testing.assert_close(heads, seen["a"], atol=1e-5, rtol=0)
    experts = model.model.layers[1].mlp.experts
    for j, e in enumerate(seen["idx"].tolist()):
        by_neuron = sum(seen["acts"][j, k] * experts.down_proj[e][:, k] for k in range(seen["acts"].shape[-1]))
        torch.testing.assert_close(by_neuron, seen["out"][j], atol=1e-5, rtol=0)


def test_padding_and_frontends_agree():
    model = tiny_model("mixtral")
    batched = attribute(model, PROMPTS, TARGETS, levels=("layer", "expert"), batch_size=3, progress=False).to_frame()
    single = [attribute(model, [p], [t], levels=("layer", "expert"), progress=False).to_frame() for p, t in zip(PROMPTS, TARGETS)]
    for i, frame in enumerate(single):
        mine = batched[batched["prompt"] == i].reset_index(drop=True)
        assert (mine["score"] - frame["score"]).abs().max() < 1e-4
    from nnsight import NNsight

    wrapped = attribute(NNsight(model), PROMPTS, TARGETS, levels=("layer", "expert"), batch_size=3, progress=False)
    assert (wrapped.to_frame()["score"] - batched["score"]).abs().max() == 0


def test_fast_neurons_keep_exact_top_scores():
    model = tiny_model("olmoe")
    exact = attribute(model, PROMPTS[:1], TARGETS[:1], levels=("neuron",), progress=False).to_frame()
    fast = attribute(model, PROMPTS[:1], TARGETS[:1], levels=("neuron",), neurons="fast", fast_top=20,
                     progress=False).to_frame()
    assert len(fast) == 20 * 3  # per prompt and layer
    merged = fast.merge(exact, on=["prompt", "layer", "expert", "neuron"], suffixes=("_fast", "_exact"))
    assert len(merged) == 60 and (merged["score_fast"] - merged["score_exact"]).abs().max() < 1e-6
    top_exact = set(exact.reindex(exact["score"].abs().sort_values(ascending=False).index).head(10)
                    [["layer", "expert", "neuron"]].itertuples(index=False))
    found = set(fast[["layer", "expert", "neuron"]].itertuples(index=False))
    assert len(top_exact & found) >= 8, "the first-order screen keeps most of the exact top-10"


def test_summary_compare_and_errors(tmp_path):
    moe = attribute(tiny_model("qwen2_moe"), PROMPTS, TARGETS, levels=("layer", "expert", "shared"), progress=False)
    dense = attribute(tiny_model("llama"), PROMPTS, TARGETS, levels=("layer",), progress=False)
    table, ratio = compare([moe, dense])
    gains = moe.layer_gains()
    assert table.loc["qwen2_moe", "FFN gain"] == pytest.approx(gains["moe"].sum())
    assert table.loc["qwen2_moe", "efficiency"] == pytest.approx(gains["moe"].sum() / 3)
    assert ratio == pytest.approx(table.loc["qwen2_moe", "efficiency"] / table.loc["dense", "efficiency"])
    path = moe.save(tmp_path / "a.csv")
    again = type(moe).load(path)
    assert again.frame.equals(moe.frame) and again.targets == moe.targets
    for fig in (moe.plot_gains(), moe.plot_experts(), moe.plot_shared_routed()):
        assert fig.axes
    with pytest.raises(ValueError, match="unknown levels"):
        attribute(tiny_model("olmoe"), PROMPTS, TARGETS, levels=("expertz",))
    with pytest.raises(TypeError, match="needs an nnsight model"):
        attribute(tiny_model("olmoe"), PROMPTS, TARGETS, remote="local")
    with pytest.raises(ValueError, match="3 prompts but 2 targets"):
        attribute(tiny_model("olmoe"), PROMPTS, TARGETS[:2])


def _word_tokenizer(tmp_path, padding_side):
    """A WordLevel tokenizer over the tiny models' 128 ids ("t5 t9 ..."), saved like a hub one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(3, 128)}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": 2})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="t3", padding_side=padding_side)
    tok.save_pretrained(tmp_path)
    return tok


def test_bridge_language_model_and_right_padding_agree(tmp_path):
    """HF, TransformerBridge (tl.boot), nnsight LanguageModel: same numbers; right padding = left padding."""
    from nnsight import LanguageModel

    from nnsight_moe import tl

    levels = ("layer", "head", "expert", "shared")
    left = _word_tokenizer(tmp_path, "left")
    right = _word_tokenizer(tmp_path / "r", "right")
    texts = ["t5 t9 t17 t40 </s>", "t7 t8 t9", "t11 t12 t13 t14 t15 t16"]
    ids = [left(t)["input_ids"] for t in texts]
    assert [len(i) for i in ids] == [5, 3, 6]
    model = tiny_model("qwen2_moe")
    reference = attribute(model, ids, TARGETS, levels=levels, batch_size=3, progress=False).to_frame()
    for tok in (left, right):
        strings = attribute(model, texts, TARGETS, tokenizer=tok, levels=levels, batch_size=3, progress=False)
        assert (strings.to_frame()["score"] - reference["score"]).abs().max() < 1e-5
    lm = attribute(LanguageModel(model, tokenizer=left), texts, TARGETS, tokenizer=left, levels=levels,
                   batch_size=3, progress=False).to_frame()
    assert (lm["score"] - reference["score"]).abs().max() < 1e-5
    bridge = tl.boot(tiny_model("qwen2_moe"), tokenizer=tmp_path)
    try:
        bridged = attribute(bridge, ids, TARGETS, levels=levels, batch_size=3, progress=False).to_frame()
    finally:
        nnsight_moe.detach(bridge)
    assert (bridged["score"] - reference["score"]).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe", "mixtral", "deepseek_v3", "llama"])
def test_remote_local_equals_local(family):
    """remote="local" (serialised request, unmodified model, scores computed in the trace) = local path."""
    from helpers import language_model

    model = tiny_model(family)
    levels = ("layer", "head", "expert", "shared")
    local = attribute(model, PROMPTS, TARGETS, levels=levels, batch_size=2, progress=False)
    remote = attribute(language_model(model), PROMPTS, TARGETS, levels=levels, batch_size=2, remote="local",
                       progress=False)
    a, b = local.to_frame(), remote.to_frame()
    assert a.drop(columns="score").equals(b.drop(columns="score"))
    assert (a["score"] - b["score"]).abs().max() < 1e-4
    assert remote.ranks == local.ranks and remote.targets == local.targets
    assert nnsight_moe.handle_of(model) is None, "the remote path attaches nothing"


def test_remote_failure_resumes_and_ships_no_client_code(tmp_path, monkeypatch):
    """A batch failing mid-run keeps finished batches; the rerun resumes; requests carry no nnsight_moe code
    by reference (the flaky backend inspects every serialised request)."""
    import nnsight
    import test_remote
    from helpers import language_model
    from test_remote import _Flaky

    from nnsight_moe.remote import RemoteBatchError

    nnsight.register(test_remote)  # the test backend's own module ships by value, as in test_remote

    model = tiny_model("qwen2_moe")
    lm = language_model(model)
    levels = ("layer", "expert", "shared")
    expected = attribute(model, PROMPTS, TARGETS, levels=levels, batch_size=1, progress=False).to_frame()
    path = tmp_path / "partial.pt"
    calls: list = []
    fail_on: set = set()
    monkeypatch.setattr(lm, "_remote_backend", lambda *a, **k: _Flaky(lm, fail_on, calls))
    attribute(lm, PROMPTS, TARGETS, levels=levels, batch_size=1, remote="local", progress=False)
    full = len(calls)  # remote requests of a whole run (3 batches)
    calls.clear()
    fail_on.add(full - 1)  # the last request fails
    with pytest.raises(RemoteBatchError, match="batch 2 of 3"):
        attribute(lm, PROMPTS, TARGETS, levels=levels, batch_size=1, remote="local", results_path=path, progress=False)
    calls.clear()
    fail_on.clear()
    resumed = attribute(lm, PROMPTS, TARGETS, levels=levels, batch_size=1, remote="local", results_path=path,
                        progress=False).to_frame()
    assert len(calls) == full // 3, "only the failed batch ran again"
    assert (resumed["score"] - expected["score"]).abs().max() < 1e-4


def test_memory_is_one_batch_of_last_position_logits(monkeypatch):
    """attribute() is O(batch x vocab): each batch projects only its scored positions ([b, 1, V] from the
    unembedding) and its [b, V] logits are released once the batch is scored (ranks are kept instead)."""
    import weakref

    from nnsight_moe.recipes import attribution

    model = tiny_model("olmoe")
    vocab = model.config.vocab_size
    alive, still_alive_at_capture, projected = [], [], []
    real = attribution.capture

    def spy(hf, batch, parts, handle=None):
        still_alive_at_capture.append(sum(ref() is not None for ref in alive))
        got = real(hf, batch, parts, handle)
        assert got["logits"].shape == (batch["input_ids"].shape[0], vocab)
        alive.append(weakref.ref(got["logits"]))
        return got

    monkeypatch.setattr(attribution, "capture", spy)
    hook = model.lm_head.register_forward_hook(lambda m, a, o: projected.append(tuple(o.shape)))
    try:
        result = attribution.attribute(model, PROMPTS * 4, TARGETS * 4, levels=("layer",), batch_size=2,
                                       progress=False)
    finally:
        hook.remove()
    assert len(still_alive_at_capture) == 6 and max(still_alive_at_capture) == 0, still_alive_at_capture
    assert all(shape[1:] == (1, vocab) for shape in projected), projected  # never [b, positions, V]
    reference = attribute(model, PROMPTS, TARGETS, levels=("layer",), progress=False)
    assert result.ranks == reference.ranks * 4 and result.targets == TARGETS * 4


@torch.no_grad()
def _hybrid_layer_oracle(model, prompt, target, mixer_of, mlp_of, gamma):
    """attn / mixer / moe LPI of one prompt from module outputs and an explicit final-norm γ."""
    seen, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k, i=i: seen.__setitem__(("h", i), (a[0] if a else k["hidden_states"])[0, -1]), with_kwargs=True))
        for key, module in (("t", mixer_of(layer)), ("f", mlp_of(layer))):
            if module is not None:
                handles.append(module.register_forward_hook(
                    lambda m, a, o, key=key, i=i: seen.__setitem__((key, i), (o[0] if isinstance(o, tuple) else o)[0, -1])))
    norm = getattr(model.model, "norm", None) or model.model.final_layernorm
    handles.append(norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("final", a[0][0, -1])))
    logits = model(torch.tensor([prompt])).logits[0, -1]
    for h in handles:
        h.remove()
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    scale = torch.rsqrt(seen["final"].pow(2).mean() + eps)
    logprob = lambda x: model.lm_head(gamma * x * scale).log_softmax(-1)[target]  # noqa: E731
    assert torch.allclose(logprob(seen["final"]), logits.log_softmax(-1)[target], atol=1e-5)
    out = {}
    for i in range(len(model.model.layers)):
        h = seen[("h", i)]
        t = seen.get(("t", i), torch.zeros_like(h))
        if ("t", i) in seen:
            out[i, "mixer" if hasattr(model.model.layers[i], "mamba") or hasattr(model.model.layers[i], "linear_attn")
                else "attn"] = float(logprob(h + t) - logprob(h))
        if ("f", i) in seen:
            out[i, "moe"] = float(logprob(h + t + seen[("f", i)]) - logprob(h + t))
    return out


@pytest.mark.parametrize("family", ["jamba", "qwen3_next"])
def test_hybrid_layer_level_equals_brute_force(family):
    """Mamba (jamba) and gated-delta-net (qwen3_next, whose final norm scales by 1 + weight) layers give a
    ``mixer`` row = LPI of their output; attention layers an ``attn`` row; every layer a ``moe`` row."""
    if family == "jamba":
        model = tiny_model("jamba")
        mixer_of = lambda layer: getattr(layer, "mamba", None) or layer.self_attn  # noqa: E731
        mlp_of, gamma = (lambda layer: layer.feed_forward), model.model.final_layernorm.weight
    else:
        model = tiny_model("qwen3_next", layer_types=["linear_attention", "full_attention"], num_hidden_layers=2,
                           linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                           linear_num_value_heads=4)
        mixer_of = lambda layer: getattr(layer, "linear_attn", None) or layer.self_attn  # noqa: E731
        mlp_of, gamma = (lambda layer: layer.mlp), 1.0 + model.model.norm.weight
    frame = attribute(model, PROMPTS, TARGETS, levels=("layer",), batch_size=2, progress=False).to_frame()
    for p, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        expected = _hybrid_layer_oracle(model, prompt, target, mixer_of, mlp_of, gamma)
        got = {(r.layer, r.level): r.score for r in frame[frame["prompt"] == p].itertuples()}
        assert set(got) == set(expected) and {"mixer", "attn", "moe"} == {level for _, level in got}
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-4), key


def test_prediction_targets_and_only_correct():
    model = tiny_model("olmoe")
    levels = ("layer", "expert")
    predicted = attribute(model, PROMPTS, "prediction", levels=levels, progress=False)
    assert predicted.ranks == [1, 1, 1]
    gold = [predicted.targets[0], (predicted.targets[1] + 1) % 128, predicted.targets[2]]  # prompt 1 answered wrong
    kept = attribute(model, PROMPTS, gold, levels=levels, batch_size=2, only_correct=True, progress=False)
    assert kept.prompt_ids == [0, 2] and kept.targets == [gold[0], gold[2]] and kept.ranks == [1, 1]
    expected = predicted.to_frame()
    keys = ["prompt", "layer", "level", "head", "expert", "neuron"]
    expected = expected[expected["prompt"].isin([0, 2])].replace({"prompt": {2: 1}})
    expected = expected.sort_values(keys).reset_index(drop=True)
    got = kept.to_frame().sort_values(keys).reset_index(drop=True)
    assert got.drop(columns="score").equals(expected.drop(columns="score"))
    assert (got["score"] - expected["score"]).abs().max() < 1e-5  # batch composition differs: float noise
    with pytest.raises(ValueError, match="only_correct=True compares"):
        attribute(model, PROMPTS, None, only_correct=True)


def test_parallel_residual_streams_are_refused():
    """Hyper-connections whose final collapse attribution does not know (here DeepSeek-V4's hc_head under another
    class): a clear error naming the modelled forms, not a shape crash. DeepSeek-V4's, GLM-5-Next's and HY-V4's
    are attributed (test_attribution_structure.py)."""
    model = tiny_model("deepseek_v4")
    head = model.model.hc_head
    head.__class__ = type("OtherHyperHead", (type(head),), {})
    with pytest.raises(ValueError, match=r"parallel residual streams \(hyper-connections\) in a form attribution does not"):
        attribute(model, PROMPTS, TARGETS, levels=("layer",), progress=False)
