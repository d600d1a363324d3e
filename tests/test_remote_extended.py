"""The remote path (``remote=``, nnsight traces on the UNMODIFIED model) on the blocks of the hook contract's
extension: a block-level routed scale (Laguna, Step-3.7, MiniMax-M3-VL), a latent MoE (Nemotron-H with
``moe_latent_size``), a post-MoE norm (A.X-K1), a shared MLP beside the block (Granite), input-gated experts
(Llama 4) and a dispatch router (JetMoE, also attributed against a brute force here). Oracles: the local recipes (themselves checked against brute force
and the block identities in test_attribution / test_families) and the attached hooks."""

from __future__ import annotations

import copy
import warnings

import nnsight
import pytest
import torch

import nnsight_moe
from nnsight_moe.recipes import blocking
from nnsight_moe.recipes.attribution import LEVELS, attribute
from nnsight_moe.remote import MoEView
from nnsight_moe.testing import tiny_model

from helpers import capture_hooks, language_model, word_tokenizer

PROMPTS = [[5, 9, 17, 33, 2], [7, 8, 9], [11, 12, 13, 14, 15, 16]]
TARGETS = [3, 40, 77]
LATENT = {"moe_latent_size": 32, "mlp_bias": True}

#: (family, config overrides, neuron mode): each extension once, the neuron modes alternating
ATTRIBUTION = [("axk1", {}, "exact"), ("laguna", {}, "fast"), ("step3p7", {}, "exact"), ("minimax_m3_vl", {}, "fast"),
               ("nemotron_h", LATENT, "fast"), ("granitemoeshared", {}, "exact"), ("granitemoehybrid", {}, "fast"),
               ("llama4", {}, "exact")]


@pytest.mark.parametrize("family, overrides, neurons", ATTRIBUTION,
                         ids=[f"{f}-latent" if o else f for f, o, _ in ATTRIBUTION])
def test_remote_attribution_equals_local_on_extended_blocks(family, overrides, neurons):
    """Every level under remote="local" (serialised request, scores computed in the trace) = the local path,
    which maps each part through routed_scale, the latent output projection, the frozen post-norm scale and
    adds a shared MLP beside the block (measured: at most 2e-6)."""
    model = tiny_model(family, **overrides)
    options = dict(levels=LEVELS, batch_size=2, progress=False, neurons=neurons, fast_top=7)
    local = attribute(model, PROMPTS, TARGETS, **options)
    remote = attribute(language_model(model), PROMPTS, TARGETS, remote="local", **options)
    a, b = local.to_frame(), remote.to_frame()
    assert {"moe", "head", "expert", "shared", "neuron"} <= set(a["level"])
    assert len(a) == len(b) and a.drop(columns="score").equals(b.drop(columns="score")), "same rows, same order"
    assert (a["score"] - b["score"]).abs().max() < 1e-5
    assert remote.ranks == local.ranks and remote.targets == local.targets
    assert nnsight_moe.handle_of(model) is None, "the remote path attaches nothing"


def test_remote_attribution_refuses_what_only_the_local_path_holds():
    """Beam scales its residual additions by depth and soft-caps its logits: the local path holds those
    maps fixed per token (checked against a brute force in test_attribution_structure.py), the remote
    path does not model them and refuses by name rather than return scores that do not add up."""
    for model in (tiny_model("beam", final_logit_softcapping=None), tiny_model("beam")):
        frame = attribute(model, PROMPTS, TARGETS, levels=("layer",), progress=False).to_frame()
        assert set(frame["level"]) >= {"attn", "moe"}
        with pytest.raises(ValueError, match=r"depth-scaled residual adds \(Beam\).*run it locally"):
            attribute(language_model(model), PROMPTS, TARGETS, levels=("layer",), remote="local", progress=False)


def _meta_client(hf, tmp_path):
    """(client with meta weights, server backend) as test_meta_client builds them."""
    from test_meta_client import _Server

    hf.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        client = nnsight.LanguageModel(str(tmp_path), tokenizer=word_tokenizer("left"))
        server = nnsight.LanguageModel(hf, tokenizer=word_tokenizer("left"))
    assert next(nnsight_moe.hf_model(client).parameters()).is_meta
    backend = _Server(server)
    client._remote_backend = lambda *args, **kwargs: backend
    return client, backend


@pytest.mark.parametrize("family, overrides", [("axk1", {}), ("nemotron_h", LATENT)], ids=["axk1", "nemotron_h-latent"])
def test_remote_attribution_on_a_meta_client(family, overrides, tmp_path):
    """As on NDIF: the client has meta weights (the post-norm's γ rule and the paths are read client-side,
    the latent projection's and norms' weights on the server)."""
    hf = tiny_model(family, **overrides)
    client, backend = _meta_client(hf, tmp_path)
    options = dict(levels=("layer", "expert", "shared", "neuron"), neurons="fast", fast_top=5, batch_size=3,
                   progress=False)
    local = attribute(hf, PROMPTS, TARGETS, **options).to_frame()
    remote = attribute(client, PROMPTS, TARGETS, remote=True, **options).to_frame()
    assert backend.calls == 1
    assert remote.drop(columns="score").equals(local.drop(columns="score"))
    assert (remote["score"] - local["score"]).abs().max() < 1e-5


BLOCKING = [("axk1", {}), ("step3p7", {}), ("nemotron_h", LATENT), ("granitemoehybrid", {}), ("llama4", {}),
            ("jetmoe", {})]


@pytest.mark.parametrize("family, overrides", BLOCKING, ids=[f"{f}-latent" if o else f for f, o in BLOCKING])
def test_remote_blocking_equals_local_on_extended_blocks(family, overrides):
    """blocking.evaluate in all three modes (conditions stacked on the batch) and the shared / top-n
    configurations under remote="local" give the local ranks exactly."""
    model = tiny_model(family, **overrides)
    tokenizer = word_tokenizer(padding_side="left")
    g = torch.Generator().manual_seed(7)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(4, 128, (int(n),), generator=g))
               for n in torch.randint(3, 7, (6,), generator=g)]
    with torch.no_grad():  # the model's own top tokens, so blocking can move the ranks
        targets = [int(model(**tokenizer([p], return_tensors="pt")).logits[0, -1].argmax()) for p in prompts]
    lm = nnsight.LanguageModel(model, tokenizer=tokenizer)
    layers = nnsight_moe.layout(model).moe_layers
    conditions = [[], [(layers[0], 1), (layers[-1], 3)], [(layers[-1], e) for e in range(4)]]
    options = dict(tokenizer=tokenizer, batch_size=4, progress=False)
    moved = False
    for mode in ("zero", "renorm", "reroute"):
        local = blocking.evaluate(model, (prompts, targets), conditions, mode=mode, **options)
        remote = blocking.evaluate(lm, (prompts, targets), conditions, mode=mode, remote="local", **options)
        assert torch.equal(remote, local), mode
        moved = moved or bool((local[1:] != local[0]).any())
    assert moved, "blocking changes some rank"
    data = (prompts, targets, ["r1"] * 3 + ["r2"] * 3)
    local_c = blocking.configurations(model, data, **options)
    remote_c = blocking.configurations(lm, data, remote="local", **options)
    assert remote_c.rows == local_c.rows and remote_c.original == local_c.original
    assert nnsight_moe.handle_of(model) is None


@pytest.mark.parametrize("pos", [5, 1], ids=["pos5", "pos1"])  # pos1: nnsight itself narrows the router's rows
@pytest.mark.parametrize("family", ["llama4", "jetmoe", "gemma4"])
def test_view_several_invokes_equal_separate_traces_and_hooks(family, pos):
    """Three invokes in one trace (unedited, renorm-blocked, rerouted) = three separate traces = the attached
    hooks under block_experts on each prompt alone: every quantity and the logits. Llama 4's router hands
    the block a dense score matrix of every invoke's tokens and its experts an [E * tokens, d] input;
    JetMoE's router one dispatch plan of every invoke's tokens, rebuilt with this invoke's rows edited;
    Gemma-4's experts a flattened [tokens, d] input. (Gemma-4's batched forward itself differs from the
    single-prompt one by up to ~1.2e-5 in its large activations, hence its wider tolerance.)"""
    atol = 1e-4 if family == "gemma4" else 1e-5
    hf = tiny_model(family)
    lm = language_model(hf)
    view = MoEView(lm)
    layers = view.moe_layers
    g = torch.Generator().manual_seed(3)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(4, 128, (pos,), generator=g)) for _ in range(3)]
    tokenizer = word_tokenizer()
    chosen = []  # per prompt and layer the experts of its last token's first two slots: blocking them bites
    for text in prompts[1:]:
        with torch.no_grad(), lm.trace(text):
            chosen.append(nnsight.save({i: view.layer(i, want=("topk_indices",))["topk_indices"][0, -1] for i in layers}))
    options = [{i: {} for i in layers}] + [{i: {"block": found[i].tolist(), "mode": mode} for i in layers}
                                           for found, mode in zip(chosen, ("renorm", "reroute"))]
    with torch.no_grad():
        with lm.trace(remote="local") as tracer:
            with tracer.invoke(prompts[0]):
                q0 = nnsight.save({i: view.layer(i, **options[0][i]) for i in layers})
                l0 = lm.output.logits.save()
            with tracer.invoke(prompts[1]):
                q1 = nnsight.save({i: view.layer(i, **options[1][i]) for i in layers})
                l1 = lm.output.logits.save()
            with tracer.invoke(prompts[2]):
                q2 = nnsight.save({i: view.layer(i, **options[2][i]) for i in layers})
                l2 = lm.output.logits.save()
    for text, option, got, logits in zip(prompts, options, (q0, q1, q2), (l0, l1, l2)):
        with torch.no_grad(), lm.trace(text, remote="local"):
            alone = nnsight.save({i: view.layer(i, **option[i]) for i in layers})
            alone_logits = lm.output.logits.save()
        reference = copy.deepcopy(hf)
        handle = nnsight_moe.attach(reference)
        ids = tokenizer(text, return_tensors="pt").input_ids
        out = {}

        def run():
            out["logits"] = reference(ids).logits

        with torch.no_grad():
            if option[layers[0]]:
                blocked = {i: option[i]["block"] for i in layers}
                with nnsight_moe.block_experts(reference, blocked, mode=option[layers[0]]["mode"]):
                    values = capture_hooks(handle, run)
                plain = hf(ids).logits
                assert (out["logits"] - plain).abs().max() > 1e-3, "the edit changes the output"
            else:
                values = capture_hooks(handle, run)
        torch.testing.assert_close(logits, out["logits"], atol=atol, rtol=0)
        torch.testing.assert_close(logits, alone_logits, atol=atol, rtol=0)
        for i in layers:
            path = handle.layout.layer(i).path
            assert set(got[i]) == {name[5:] for name in handle.layout.layer(i).hook_names}
            for name, value in got[i].items():
                assert value.shape[:2] == (1, pos), name
                expected = values[f"{path}.hook_{name}"]
                torch.testing.assert_close(value.to(expected.dtype), expected, atol=atol, rtol=0, msg=f"{i} {name}")
                torch.testing.assert_close(value, alone[i][name], atol=atol, rtol=0, msg=f"{i} {name} alone")


@torch.no_grad()
def _jetmoe_brute_force(model, prompt, target):
    """JetMoE's LPI per level for one prompt from module inputs / outputs and the experts' weights (no
    attribution code): mixer (its attention) and MoE rows, each selected expert (top-k of the float32 router
    logits, softmax over the k) and each of its neurons (``output_linear`` column k)."""
    seen, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k, i=i: seen.__setitem__(("h", i), (a[0] if a else k["hidden_states"])[0, -1]), with_kwargs=True))
        handles.append(layer.self_attention.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("attn", i), o[0][0, -1])))
        handles.append(layer.mlp.register_forward_hook(
            lambda m, a, o, i=i: seen.update({("x", i): a[0][0, -1], ("mlp", i): o[0, -1]})))
    handles.append(model.model.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("final", a[0][0, -1])))
    logits = model(torch.tensor([prompt])).logits[0, -1]
    for h in handles:
        h.remove()
    norm = model.model.norm
    scale = torch.rsqrt(seen["final"].pow(2).mean() + norm.variance_epsilon)

    def logprob(x):
        return model.lm_head(norm.weight * x * scale).log_softmax(-1)[target]

    assert torch.allclose(logprob(seen["final"]), logits.log_softmax(-1)[target], atol=1e-5)
    out = {}
    for i, layer in enumerate(model.model.layers):
        h, a, x, block = seen[("h", i)], seen[("attn", i)], seen[("x", i)], layer.mlp
        u = h + a
        out[("attn", i)] = float(logprob(u) - logprob(h))
        out[("moe", i)] = float(logprob(u + seen[("mlp", i)]) - logprob(u))
        chosen = block.router.layer(x).float().topk(block.router.top_k)
        for g, e in zip(chosen.values.softmax(-1).tolist(), chosen.indices.tolist()):
            gate, up = (block.input_linear.weight[e] @ x).chunk(2)
            acts = block.activation(gate) * up
            w_out = block.output_linear.weight[e]  # [D, I]
            out[("expert", i, e)] = float(logprob(u + g * (w_out @ acts)) - logprob(u))
            for k in range(acts.shape[0]):
                out[("neuron", i, e, k)] = float(logprob(u + g * acts[k] * w_out[:, k]) - logprob(u))
    return out


def test_jetmoe_attribution_equals_brute_force_locally_and_remotely():
    """JetMoE (dispatch router, parallel experts, output bias; its attention is `self_attention`, a
    mixture of attention heads whose output projection is routed: an `attn` row, no head rows, as there is
    no fixed W_O[:, h]): every level against the
    brute force, and remote="local" = local (neurons exact, then fast)."""
    model = tiny_model("jetmoe")
    levels = ("layer", "head", "expert", "shared", "neuron")
    frame = attribute(model, PROMPTS, TARGETS, levels=levels, batch_size=2, progress=False).to_frame()
    assert set(frame["level"]) == {"attn", "moe", "expert", "neuron"}
    for p, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        expected = _jetmoe_brute_force(model, prompt, target)
        got = {}
        for row in frame[frame["prompt"] == p].itertuples():
            key = {"expert": (row.level, row.layer, row.expert), "neuron": (row.level, row.layer, row.expert, row.neuron)}
            got[key.get(row.level, (row.level, row.layer))] = row.score
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-5), key
    lm = language_model(model)
    for neurons in ("exact", "fast"):
        options = dict(levels=levels, batch_size=2, progress=False, neurons=neurons, fast_top=7)
        local = frame if neurons == "exact" else attribute(model, PROMPTS, TARGETS, **options).to_frame()
        remote = attribute(lm, PROMPTS, TARGETS, remote="local", **options).to_frame()
        assert local.drop(columns="score").equals(remote.drop(columns="score"))
        assert (local["score"] - remote["score"]).abs().max() < 1e-5


@pytest.mark.parametrize("family, overrides", [("llama4", {}), ("granitemoehybrid", {}), ("nemotron_h", LATENT)],
                         ids=["llama4", "granitemoehybrid", "nemotron_h-latent"])
def test_remote_causal_head_expert_equals_local(family, overrides):
    """head_expert.causal(remote=...) patches the routers through the view (edit_routing), so Llama 4's
    router output (dense scores, logits) is written in its own format; equal to the local hooks path."""
    from nnsight_moe.recipes import head_expert

    import test_head_expert_remote as helper

    hf = tiny_model(family, **overrides)
    attention = sorted(head_expert._attention_modules(hf))
    corr = helper._correlation(hf, [(attention[0], 1), (attention[-1], 3), (attention[-1], 0)])
    local = helper._frame(hf, corr)
    remote = helper._frame(language_model(hf), corr, remote="local", progress=False)
    helper._assert_same(remote, local)
    assert (remote["d_prob_selected"].abs() > 1e-5).all(), "suppression moves the router"


def test_remote_causal_refuses_a_decoder_layer_block():
    """Gemma-4's router and experts sit on the decoder layer: the trace cannot read the layer's input after
    suppressing its heads (nnsight's execution order), so remote causal refuses it by name."""
    from nnsight_moe.recipes import head_expert

    import test_head_expert_remote as helper

    hf = tiny_model("gemma4")
    corr = helper._correlation(hf, [(0, 1), (2, 3), (2, 0)])
    with pytest.raises(ValueError, match=r"remote causal\(\) does not support gemma4: its MoE layers \[0, 1, 2\]"):
        helper._frame(language_model(hf), corr, remote="local", progress=False)
    assert len(head_expert.causal(hf, helper._prompts(), correlation=corr, k_heads=3, seeds=1).to_frame()) == 2


@pytest.mark.parametrize("family, hook", [("granitemoeshared", "hook_moe_out"), ("granitemoehybrid", "hook_shared_out"),
                                          ("gemma4", "hook_moe_out"), ("llama4", "hook_moe_out")])
def test_steering_in_a_trace_equals_hooks_on_extended_blocks(family, hook):
    """steering.apply_in_trace (experts on / off, a gate scale, a direction removed, blocking) on the
    unmodified model under remote="local" = steering.steer on the attached one. hook_moe_out is Granite's
    block + shared MLP sum (the shared output is set to edited sum - block output) and Gemma-4's experts'
    output (not its decoder layer's)."""
    from nnsight_moe import steering

    model = tiny_model(family)
    layout = nnsight_moe.layout(model)
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    first, last = layout.moe_layers[0], layout.moe_layers[-1]
    direction = torch.randn(64, generator=torch.Generator().manual_seed(2))
    plan = steering.plan(model, on={first: [1]}, off={last: [2]}, scale={last: {5: 3.0}}, directions={first: direction},
                         hook=hook, span=(2, None), mode="remove")
    with torch.no_grad():
        plain = model(ids).logits
        with steering.steer(model, plan), nnsight_moe.block_experts(model, {last: [4]}, mode="renorm"):
            expected = model(ids).logits
    lm = language_model(model)
    view = MoEView(lm)
    with torch.no_grad(), lm.trace(ids, remote="local"):
        steering.apply_in_trace(view, lm, plan, block={last: [4]}, mode="renorm")
        got = nnsight.save(lm.output.logits)
    assert (expected - plain).abs().max() > 1e-2, "the plan changes the output"
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    assert nnsight_moe.handle_of(model) is None


@pytest.mark.parametrize("family", nnsight_moe.supported_families())
def test_view_two_invokes_equal_hooks_on_every_family(family):
    """One trace, two invokes: the first unedited, the second with expert 0 blocked by reroute (zero for
    phimoe, whose sparsemixer is not re-derived; hash layers unedited); each invoke's quantities and logits
    = the attached hooks on its prompt alone. The batched forward itself differs from a single prompt's by
    float rounding (measured: 1.1e-5 on MiniMax-M3-VL's moe_out of magnitude 19, 1.2e-5 on Gemma-4's expert
    activations), hence rtol 1e-5 beside atol 1e-5; Inkling-2-Loop's passes compound it (the plain HF forward
    of the two prompts batched differs from the second alone by 2.2e-5 on MoE outputs of magnitude 10-14),
    hence atol 1e-4 there."""
    from test_remote import _oracle

    hf = tiny_model(family)
    if not hf.can_generate():
        pytest.skip("a token classifier: no LanguageModel to batch invokes in")
    layout = nnsight_moe.layout(hf)
    mode = "zero" if family == "phimoe" else "reroute"
    atol = 1e-4 if family == "inkling2_loop_text" else 1e-5
    blocked = {i: [0] for i in layout.moe_layers if mode != "reroute" or layout.layer(i).routing._kind != "hash"}
    g = torch.Generator().manual_seed(4)
    first, second = (torch.randint(3, 128, (1, 4), generator=g) for _ in range(2))
    lm = language_model(hf)
    view = MoEView(lm)
    with torch.no_grad(), lm.trace(remote="local") as tracer:
        with tracer.invoke(first):
            a = nnsight.save({i: view.layer(i) for i in view.moe_layers})
            a_logits = lm.output.logits.save()
        with tracer.invoke(second):
            b = nnsight.save({i: view.layer(i, block=blocked.get(i), mode=mode) for i in view.moe_layers})
            b_logits = lm.output.logits.save()
    for ids, views, logits, edit in ((first, a, a_logits, None), (second, b, b_logits, blocked)):
        _, values, expected = _oracle(hf, ids, edit and (lambda m: nnsight_moe.block_experts(m, blocked, mode=mode)))
        for index, quantities in views.items():
            path = layout.layer(index).path
            assert set(quantities) == {name[5:] for name in layout.layer(index).hook_names}
            for name, value in quantities.items():
                reference = values[f"{path}.hook_{name}"]
                assert value.shape == reference.shape, name
                torch.testing.assert_close(value.to(reference.dtype), reference, atol=atol, rtol=1e-5,
                                           msg=f"layer {index} {name}")
        torch.testing.assert_close(logits, expected, atol=atol, rtol=1e-5)
