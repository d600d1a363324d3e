"""Family coverage: every MoE family of the installed transformers is supported, excluded or listed as
not yet supported; families added for issue #14 are exact in bfloat16; detection by structure."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import nnsight_moe
from nnsight_moe import coverage
from nnsight_moe.adapters import adapter_for
from nnsight_moe.testing import tiny_config, tiny_model

#: Families added by issue #14 (the float32 core tests run on them through tests/test_core.py).
ADDED = ["aria", "axk1", "beam", "deepseek_ocr2", "dots3_note", "glm4v_moe", "glm5_next", "granitemoehybrid", "granitemoeshared",
         "hy_v4_vl", "laguna", "lara_mini", "lfm2_moe", "minimax_m3_vl", "muse_spark",
         "mistral4", "mistral_large4", "openai_privacy_filter", "qwen3_vl_moe", "sarvam_mla", "sarvam_moe", "step3p7",
         "unlimited_ocr", "ernie4_5_vl_moe", "qwen3_omni_moe", "inkling2_loop_text", "diffusion_gemma",
         "inkling_text", "zaya"]
#: Families whose router keeps bf16 arithmetic (mistral4, lfm2_moe) or casts weights to the hidden states'
#: dtype (lara_mini): the contract's float32 weights differ from the model's by bf16 rounding.
BF16_ROUNDED = {"lara_mini", "lfm2_moe", "mistral4"}


def test_every_moe_package_is_supported_excluded_or_listed():
    rows = coverage.coverage()
    unlisted = [(package, why) for package, status, why in rows if status == "unlisted"]
    assert not unlisted, (
        f"MoE packages in the installed transformers that nnsight-moe neither supports nor lists: {unlisted}; "
        "add an adapter, or an entry to nnsight_moe.coverage.NOT_YET / EXCLUDED with the reason"
    )
    packages = coverage.moe_packages()
    stale = sorted((set(coverage.EXCLUDED) | set(coverage.NOT_YET)) - set(packages))
    assert not stale, f"coverage tables name packages that are not MoE packages of this transformers: {stale}"
    supported = {package for package, status, _ in rows if status == "supported"}
    assert not supported & (set(coverage.NOT_YET) | set(coverage.EXCLUDED)), "a supported package is still listed"
    assert not set(coverage.NOT_YET) & set(coverage.EXCLUDED)


def test_scan_finds_moe_by_structure_not_by_name():
    packages = coverage.moe_packages()
    # own MoE classes, older families without the experts interface, and packages running another's classes
    for package in ("mixtral", "deepseek_v3", "dbrx", "jetmoe", "llama4", "switch_transformers"):
        assert package in packages
    assert "runs DeepseekV3ForCausalLM (deepseek_v3)" in packages["sarvam_mla"]
    assert "text model is deepseek_v3" in packages["kimi_k25"]
    for dense in ("llama", "qwen2", "gpt2", "mistral"):
        assert dense not in packages
    # every registered family's package is found by the scan
    served = {family for _, status, family in coverage.coverage() if status == "supported"}
    assert served == set(nnsight_moe.supported_families())


@pytest.mark.parametrize("family", ADDED)
@torch.no_grad()
def test_added_families_bfloat16(family):
    """bf16 attached = unattached logits: bit-identical, or within bf16 rounding where the router rounds."""
    model = tiny_model(family, dtype=torch.bfloat16)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    with nnsight_moe.attached(model):
        out = model(ids).logits
    if family in BF16_ROUNDED:
        assert (out.float() - ref.float()).abs().max().item() <= 0.05 * ref.float().abs().max().item()
    else:
        assert torch.equal(out, ref)


def test_detection_by_structure():
    """A config with its own model_type on a supported family's modeling classes is served by that family."""
    from transformers import DeepseekV3ForCausalLM

    config = tiny_config("deepseek_v3")
    config.model_type = "my_deepseek_finetune"
    model = DeepseekV3ForCausalLM(config)
    assert adapter_for(model).name == "deepseek_v3"
    assert nnsight_moe.layout(model).moe_layers == [1, 2]
    # sarvam_mla is DeepseekV3ForCausalLM: its own adapter, and the same layout as DeepSeek-V3
    sarvam = tiny_model("sarvam_mla")
    assert type(sarvam).__name__ == "DeepseekV3ForCausalLM" and adapter_for(sarvam).name == "sarvam_mla"


# ------------------------------------------------------------------ group 3: shared expert beside the block
GRANITE_SHARED = ["granitemoeshared", "granitemoehybrid"]


def _ids(batch=2, pos=7, seed=0):
    return torch.randint(3, 128, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _zeroed(model, layout, routed=False, shared=False):
    """A copy of ``model`` with every routed expert's and/or every shared expert's down projection zeroed."""
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():
        for index in layout.moe_layers:
            info = layout.layer(index)
            if routed:
                model.get_submodule(info.experts).down_proj.zero_()
            if shared:
                model.get_submodule(info.shared_down).weight.zero_()
    return model


@pytest.mark.parametrize("family", GRANITE_SHARED)
@torch.no_grad()
def test_shared_beside_the_block(family):
    """Granite's shared_mlp is a sibling of the block: hook_shared_* fire on it, hook_moe_out is the layer's
    sum, and restricting / ablating / editing hook_moe_out equal zeroed weights."""
    from nnsight_moe.remote import moe_spec

    from helpers import capture_hooks

    model = tiny_model(family)
    ids = _ids()
    layout = nnsight_moe.layout(model)
    info = layout.layer(layout.moe_layers[0])
    assert info.shared_outside and info.shared == info.path.rsplit(".", 1)[0] + ".shared_mlp"
    assert info.shared_down == info.shared + ".output_linear" and info.d_shared == 48
    assert not moe_spec(model)["layers"][info.index]["shared_first"], "the layer calls the block, then shared_mlp"
    shared_ref = {}
    handle = model.get_submodule(info.shared).register_forward_hook(lambda m, a, o: shared_ref.setdefault("out", o))
    ref = model(ids).logits
    handle.remove()
    with nnsight_moe.attached(model) as attached:
        values = capture_hooks(attached, lambda: model(ids))
        torch.testing.assert_close(values[f"{info.path}.hook_shared_out"], shared_ref["out"], atol=0, rtol=0)
        with nnsight_moe.restrict_experts(model, 0):
            shared_only = model(ids).logits
        with nnsight_moe.ablate_shared(model):
            routed_only = model(ids).logits
        point = attached.block(info.index).hook_moe_out
        point.add_hook(lambda moe, hook: torch.zeros_like(moe))
        try:
            moe_zeroed = model(ids).logits
        finally:
            point.remove_hooks()
        assert torch.equal(model(ids).logits, ref)
    torch.testing.assert_close(shared_only, _zeroed(model, layout, routed=True)(ids).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(routed_only, _zeroed(model, layout, shared=True)(ids).logits, atol=1e-5, rtol=0)
    # zeroing hook_moe_out of one layer = zeroing that layer's routed and shared experts
    first_only = replace(layout, layers=tuple(l if l.index == info.index else replace(l, kind="dense") for l in layout.layers))
    partial = _zeroed(model, first_only, routed=True, shared=True)
    torch.testing.assert_close(moe_zeroed, partial(ids).logits, atol=1e-5, rtol=0)
    for out in (shared_only, routed_only, moe_zeroed):
        assert (out - ref).abs().max() > 1e-3, "the edit changed the output"



@torch.no_grad()
def test_granitemoehybrid_bridge_hooks(tmp_path):
    """TransformerLens' GraniteMoeHybrid adapter recomputes shared_mlp from its linears (JointGateUpMLPBridge):
    the shared hooks and hook_moe_out still fire under blocks.{L}.mlp, and shared ablation reaches the bridge."""
    from nnsight_moe import tl

    from helpers import word_tokenizer

    word_tokenizer().save_pretrained(tmp_path)
    model = tiny_model("granitemoehybrid")
    ids = _ids(pos=6)
    ref = model(ids).logits
    layout = nnsight_moe.layout(model)
    routed_only = _zeroed(model, layout, shared=True)(ids).logits
    bridge = tl.boot(model, tokenizer=str(tmp_path))
    try:
        logits, cache = bridge.run_with_cache(ids)
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
        for index in layout.moe_layers:
            info = layout.layer(index)
            for name in info.hook_names:
                assert tl.tl_hook_name(index, name) in cache, name
            get = lambda name: cache[tl.tl_hook_name(index, name)]  # noqa: E731
            torch.testing.assert_close(get("hook_moe_out"), get("hook_routed_out") + get("hook_shared_out"),
                                       atol=1e-6, rtol=0)
            torch.testing.assert_close(get("hook_shared_out"), cache[f"blocks.{index}.shared_mlp.hook_out"],
                                       atol=0, rtol=0)
        with nnsight_moe.ablate_shared(bridge):
            torch.testing.assert_close(bridge(ids), routed_only, atol=1e-5, rtol=0)
    finally:
        nnsight_moe.detach(bridge)


# ------------------------------------------------------------------ group 2: post-processed routed sums
@pytest.mark.parametrize("family, overrides", [("nemotron_h", {"moe_latent_size": 32}), ("muse_spark", {}), ("axk1", {})],
                         ids=["nemotron_h-latent", "muse_spark", "axk1"])
def test_post_processed_remote_view_equals_hooks(family, overrides):
    """The extension's hook points (latent_in / latent_out, moe_sum) in the remote view = the hooks', also with
    rerouted experts and the shared expert ablated (which runs after the latent projection / before the norm)."""
    import nnsight

    from helpers import language_model
    from nnsight_moe.remote import MoEView
    from test_remote import _assert_view_equals_hooks, _oracle

    hf = tiny_model(family, **overrides)
    layout = nnsight_moe.layout(hf)
    assert any(layout.layer(i).d_latent or layout.layer(i).post for i in layout.moe_layers)
    ids = _ids(pos=5)
    blocked = {index: [0, 3] for index in layout.moe_layers}
    lm = language_model(hf) if hf.can_generate() else nnsight.NNsight(hf)
    view = MoEView(lm)
    shared = layout.has_shared
    edits = [(None, {}), (lambda m: nnsight_moe.block_experts(m, blocked, mode="reroute"), "reroute")]
    if shared:
        edits.append((lambda m: nnsight_moe.ablate_shared(m), "shared"))
    for edit, kind in edits:
        _, values, logits = _oracle(hf, ids, edit)
        options = (lambda i: {"block": blocked[i], "mode": "reroute"}) if kind == "reroute" else (
            (lambda i: {"shared": False}) if kind == "shared" else (lambda i: {}))
        with torch.no_grad(), lm.trace(ids, remote="local"):
            views = nnsight.save({i: view.layer(i, **options(i)) for i in view.moe_layers})
            out = lm.output.logits.save()
        _assert_view_equals_hooks(layout, views, values)
        torch.testing.assert_close(out, logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_post_norm_sum_edits_and_frozen_scale_decomposition():
    """A.X-K1: hook_moe_out = post_mlp_layernorm(hook_moe_sum); with the norm's per-token scale frozen the
    output splits exactly into routed and shared parts, and an edit of hook_moe_sum reaches the norm."""
    model = tiny_model("axk1")
    ids = _ids()
    layout = nnsight_moe.layout(model)
    from helpers import capture_hooks

    with nnsight_moe.attached(model) as handle:
        values = capture_hooks(handle, lambda: model(ids))
        for index in layout.moe_layers:
            info = layout.layer(index)
            get = lambda name: values[f"{info.path}.{name}"]  # noqa: E731
            norm = model.get_submodule(info.post)
            total = get("hook_moe_sum")
            scale = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
            parts = norm.weight * (get("hook_routed_out") * scale) + norm.weight * (get("hook_shared_out") * scale)
            torch.testing.assert_close(get("hook_moe_out"), parts, atol=1e-5, rtol=0)
        with nnsight_moe.ablate_shared(model):
            ablated = model(ids).logits
        # dropping the shared part from hook_moe_sum = ablating the shared expert
        names = {f"{layout.layer(i).path}.hook_routed_out": i for i in layout.moe_layers}
        routed = {}
        points = handle.hook_points()
        for name in names:
            points[name].add_hook(lambda v, hook: routed.__setitem__(hook.name, v) or v)
            points[name.replace("hook_routed_out", "hook_moe_sum")].add_hook(
                lambda v, hook: routed[hook.name.replace("hook_moe_sum", "hook_routed_out")])
        try:
            edited = model(ids).logits
        finally:
            for point in points.values():
                point.remove_hooks()
    torch.testing.assert_close(edited, ablated, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family, overrides", [("granitemoeshared", {}), ("axk1", {}), ("muse_spark", {}),
                                               ("step3p7", {}), ("nemotron_h", {"moe_latent_size": 32})],
                         ids=["granitemoeshared", "axk1", "muse_spark", "step3p7", "nemotron_h-latent"])
def test_routing_check_passes_with_the_extension(family, overrides):
    """``nnsight-moe check`` knows the extended identities (and the shared expert beside the block)."""
    model = tiny_model(family, dtype=torch.bfloat16, **overrides)
    report = nnsight_moe.check_routing(model, input_ids=_ids(), compare_float32=False, implementations=())
    assert report.ok, report.format()


@pytest.mark.parametrize("family, overrides", [("axk1", {}), ("nemotron_h", {"moe_latent_size": 32, "mlp_bias": True}),
                                               ("laguna", {})], ids=["axk1", "nemotron_h-latent-bias", "laguna"])
@torch.no_grad()
def test_attribution_maps_parts_to_the_block_output(family, overrides):
    """Attribution's per-expert / shared contributions, mapped through the extension (routed_scale, latent
    projection, frozen post-norm scale), add up to the block output; and every recipe runs."""
    from nnsight_moe.recipes import blocking
    from nnsight_moe.recipes.attribution import _block_maps, attribute

    from helpers import capture_hooks

    model = tiny_model(family, **overrides)
    ids = _ids()
    layout = nnsight_moe.layout(model)
    with nnsight_moe.attached(model) as handle:
        values = capture_hooks(handle, lambda: model(ids))
    for index in layout.moe_layers:
        info = layout.layer(index)
        moe = {name[5:]: values[f"{info.path}.{name}"].reshape(-1, *values[f"{info.path}.{name}"].shape[2:])
               for name in info.hook_names}
        routed, shared = _block_maps(model, info, moe)
        n, k = moe["topk_indices"].shape
        rows = torch.arange(n).repeat_interleave(k)
        parts = routed((moe["topk_weights"][..., None] * moe["expert_out"]).reshape(n * k, -1), rows)
        total = parts.reshape(n, k, -1).sum(1)
        if info.has_shared:
            total = total + shared(moe["shared_gate"] * moe["shared_out"], torch.arange(n))
        if info.d_latent and model.get_submodule(info.latent_out).bias is not None:
            total = total + model.get_submodule(info.latent_out).bias
        torch.testing.assert_close(total, moe["moe_out"], atol=1e-5, rtol=0)
    prompts, targets = [[5, 9, 17, 33], [7, 8, 9], [11, 12, 13, 14]], [3, 40, 77]
    frame = attribute(model, prompts, targets, levels=("layer", "expert", "shared", "neuron"), progress=False).to_frame()
    assert {"moe", "expert", "neuron"} <= set(frame["level"])
    ranking = blocking.rank_experts(model, (prompts, targets), by="frequency", progress=False)
    assert len(blocking.sweep(model, (prompts, targets), ranking=ranking, top_n=(1,), seeds=1, baselines=("uniform",),
                              progress=False).to_frame())


@torch.no_grad()
def test_latent_nemotron_h_bridge_hooks(tmp_path):
    """TransformerLens' NemotronH adapter on a LatentMoE: the extension's hook points under blocks.{L}.mlp."""
    from nnsight_moe import tl

    from helpers import word_tokenizer

    word_tokenizer().save_pretrained(tmp_path)
    model = tiny_model("nemotron_h", moe_latent_size=32)
    ids = _ids(pos=6)
    ref = model(ids).logits
    layout = nnsight_moe.layout(model)
    bridge = tl.boot(model, tokenizer=str(tmp_path))
    try:
        logits, cache = bridge.run_with_cache(ids)
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
        for index in layout.moe_layers:
            get = lambda name: cache[tl.tl_hook_name(index, name)]  # noqa: E731
            assert set(layout.layer(index).hook_names) <= {k.split(".")[-1] for k in cache if k.startswith(f"blocks.{index}.mlp.")}
            assert get("hook_latent_in").shape[-1] == get("hook_routed_out").shape[-1] == 32
            torch.testing.assert_close(get("hook_moe_out"), get("hook_latent_out") + get("hook_shared_out"), atol=1e-6, rtol=0)
    finally:
        nnsight_moe.detach(bridge)


@torch.no_grad()
def test_granite_shared_hooks_in_nnsight():
    """nnsight envoys of the hook points (execution order: routed, shared, then moe_out on the layer's sum);
    setting hook_moe_out to zero = zeroing that layer's routed and shared experts."""
    from helpers import language_model

    hf = tiny_model("granitemoeshared")
    ids = _ids(pos=6)
    ref = hf(ids).logits
    layout = nnsight_moe.layout(hf)
    info = layout.layer(layout.moe_layers[0])
    first_only = replace(layout, layers=tuple(l if l.index == info.index else replace(l, kind="dense") for l in layout.layers))
    zeroed = _zeroed(hf, first_only, routed=True, shared=True)(ids).logits
    lm = language_model(hf)
    nnsight_moe.attach(lm)
    with lm.trace(ids):
        block = lm.model.layers[info.index].block_sparse_moe
        routed = block.hook_routed_out.output.save()
        shared = block.hook_shared_out.output.save()
        moe = block.hook_moe_out.output.save()
        out = lm.output.logits.save()
    assert torch.equal(out, ref)
    torch.testing.assert_close(moe, routed + shared, atol=1e-6, rtol=0)
    with lm.trace(ids):
        block = lm.model.layers[info.index].block_sparse_moe
        block.hook_moe_out.output = torch.zeros_like(block.hook_moe_out.output)
        edited = lm.output.logits.save()
    torch.testing.assert_close(edited, zeroed, atol=1e-5, rtol=0)
    nnsight_moe.detach(lm)


def test_qwen3_omni_moe_two_stacks_key_the_thinker():
    """The full Qwen3-Omni-MoE model (thinker + talker + code2wav, from the shrunk nested config): the layout and
    the hook points are the thinker's MoE layers (``thinker.model.language_model.layers.L.mlp``), the talker's
    MoE blocks get none; attached, the thinker's forward is unchanged and its hook_topk_indices are its routers'."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    config = tiny_config("qwen3_omni_moe")
    assert config.talker_config.text_config.hidden_size == 64 and config.thinker_config.text_config.num_experts == 8
    torch.manual_seed(0)
    full = Qwen3OmniMoeForConditionalGeneration._from_config(config).eval()
    from nnsight_moe.testing import randomize_

    randomize_(full)
    layout = nnsight_moe.layout(full)
    assert layout.family == "qwen3_omni_moe" and layout.moe_layers == [0, 1, 2]
    assert all(l.path == f"thinker.model.language_model.layers.{l.index}.mlp" for l in layout.layers)
    talker_blocks = [n for n, m in full.talker.named_modules() if type(m).__name__ == "Qwen3OmniMoeTalkerTextSparseMoeBlock"]
    assert len(talker_blocks) == config.talker_config.text_config.num_hidden_layers > 0
    ids = _ids(pos=6)
    ref = full.thinker(ids).logits
    handle = nnsight_moe.attach(full)
    try:
        points = handle.hook_points()
        assert points and all(name.startswith("thinker.") for name in points)
        assert not any(name.startswith(f"talker.{b}.hook_") for b in talker_blocks for name in points)
        seen, own = {}, {}
        for layer in layout.moe_layers:
            path = layout.hook_name(layer, "hook_topk_indices")
            points[path].register_forward_hook(lambda m, a, out, layer=layer: seen.__setitem__(layer, out.clone()))
            full.get_submodule(layout.layer(layer).router).register_forward_hook(
                lambda m, a, out, layer=layer: own.__setitem__(layer, out[2].clone()))
        out = full.thinker(ids).logits
        assert torch.equal(out, ref)
        assert sorted(seen) == layout.moe_layers
        for layer in layout.moe_layers:
            assert torch.equal(seen[layer].reshape(own[layer].shape).sort(-1).values, own[layer].sort(-1).values)
    finally:
        handle.detach()


# ---------------------------------------------------------------- Inkling-2-Loop: looped layers (group 6)
def _router_calls(model, path, edit=None):
    """Forward hook on the router at ``path`` recording every call's (weights, indices) in order; ``edit(call,
    output)`` may return a replacement output (the independent oracle of per-pass interventions)."""
    calls = []

    def hook(module, args, output):
        calls.append((output[1].detach().clone(), output[2].detach().clone()))
        return None if edit is None else edit(len(calls) - 1, output)

    return calls, model.get_submodule(path).register_forward_hook(hook)


@torch.no_grad()
def test_inkling2_loop_layout_lists_every_pass_with_its_own_hook_points():
    """Each pass of a loop layer is a layout layer (execution order) whose hook points see that pass's call."""
    from helpers import capture_hooks

    model = tiny_model("inkling2_loop_text")
    layout = nnsight_moe.layout(model)
    assert layout.n_layers == model.config.total_num_hidden_layers == 8
    assert [l.path for l in layout.layers] == [
        "model.layers.0.mlp", "model.layers.1.mlp", "model.layers.2.mlp", "model.layers.1.mlp.pass1",
        "model.layers.2.mlp.pass1", "model.layers.1.mlp.pass2", "model.layers.2.mlp.pass2", "model.layers.3.mlp"]
    assert [l.loop_pass for l in layout.layers] == [0, 0, 0, 1, 1, 2, 2, 0]
    assert [l.module_path for l in layout.layers][3] == "model.layers.1.mlp"
    ids = _ids(pos=6)
    ref = model(ids).logits
    calls, h = _router_calls(model, "model.layers.1.mlp.gate")
    model(ids)
    h.remove()
    assert len(calls) == 3
    handle = nnsight_moe.attach(model)
    out = {}
    values = capture_hooks(handle, lambda: out.__setitem__("logits", model(ids).logits))
    assert torch.equal(out["logits"], ref)
    names = [f"model.layers.1.mlp{s}.hook_topk_indices" for s in ("", ".pass1", ".pass2")]
    per_pass = [values[name].reshape(calls[0][1].shape) for name in names]  # a name -> tensor cache keeps them all
    for (weights, indices), got, name in zip(calls, per_pass, names):
        assert torch.equal(got, indices), name
        assert torch.equal(values[name.replace("indices", "weights")].reshape(weights.shape), weights)
    assert not torch.equal(per_pass[0], per_pass[1]), "the passes route differently (the test must bite)"
    # nnsight: each pass container is a module envoy
    from helpers import language_model

    lm = language_model(model)
    nnsight_moe.attach(lm)
    with lm.trace(ids):
        first = lm.model.layers[1].mlp.hook_topk_indices.output.save()  # in execution order, as nnsight asks
        got = lm.model.layers[1].mlp.pass2.hook_topk_indices.output.save()
    assert torch.equal(got, values[names[2]]) and torch.equal(first, values[names[0]])
    handle.detach()
    assert torch.equal(model(ids).logits, ref)
    assert not any("hook_" in name or ".pass" in name for name, _ in model.named_modules())
    assert not any("_nnsight_moe" in module.__dict__ for module in model.modules())


@torch.no_grad()
def test_inkling2_loop_refuses_a_forward_while_another_thread_runs_a_pass():
    from nnsight_moe.hooks import ConcurrentForwardError

    model = tiny_model("inkling2_loop_text")
    with nnsight_moe.attached(model) as handle:
        handle.states[3]._thread = -1  # another thread is inside pass 1 of layer 1
        with pytest.raises(ConcurrentForwardError, match="model.layers.1.mlp: .*another thread"):
            model(_ids(pos=4))
        handle.states[3]._thread = None
        model(_ids(pos=4))  # and runs again once it has left


@torch.no_grad()
def test_inkling2_loop_interventions_act_per_pass():
    """Blocking one pass = zeroing that expert's weight in that router call only (a hand-edited HF forward);
    blocking every pass = its zeroed weights; steering one pass leaves the earlier passes' routing as it was."""
    from helpers import capture_hooks, zero_expert_

    model = tiny_model("inkling2_loop_text")
    layout = nnsight_moe.layout(model)
    ids = _ids(pos=6)
    base = model(ids).logits
    calls, h = _router_calls(model, "model.layers.1.mlp.gate")
    model(ids)
    h.remove()
    expert = int(torch.bincount(calls[1][1].reshape(-1), minlength=8).argmax())  # common in pass 1

    def zero_in_pass1(call, output):
        if call != 1:
            return None
        logits, weights, indices = output
        return logits, weights.masked_fill(indices == expert, 0), indices

    _, h = _router_calls(model, "model.layers.1.mlp.gate", zero_in_pass1)
    expected = model(ids).logits
    h.remove()
    with nnsight_moe.block_experts(model, {3: [expert]}, mode="zero"):
        got = model(ids).logits
    assert not torch.allclose(expected, base, atol=1e-4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    everywhere = {1: [expert], 3: [expert], 5: [expert]}
    reference = zero_expert_(__import__("copy").deepcopy(model), layout, {1: [expert]})(ids).logits
    with nnsight_moe.block_experts(model, everywhere, mode="zero"):
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=0)
    assert not torch.allclose(reference, got, atol=1e-4), "one pass is not every pass"
    # steering pass 1 only: pass 0 routes as before, pass 1 never picks the forced-off expert
    from nnsight_moe import steering

    handle = nnsight_moe.attach(model)
    clean = capture_hooks(handle, lambda: model(ids))
    with steering.steer_experts(model, off={3: [expert]}, margin=0.5):
        steered = capture_hooks(handle, lambda: model(ids))
    # reroute and renorm on pass 1 only
    first, second = "model.layers.1.mlp", "model.layers.1.mlp.pass1"
    with nnsight_moe.block_experts(model, {3: [expert]}, mode="reroute"):
        rerouted = capture_hooks(handle, lambda: model(ids))
    with nnsight_moe.block_experts(model, {3: [expert]}, mode="renorm"):
        renormed = capture_hooks(handle, lambda: model(ids))
    handle.detach()
    for edited in (rerouted, renormed):
        assert torch.equal(edited[f"{first}.hook_topk_weights"], clean[f"{first}.hook_topk_weights"])
    assert not (rerouted[f"{second}.hook_topk_indices"] == expert).any()
    hit = clean[f"{second}.hook_topk_indices"] == expert
    assert hit.any() and (renormed[f"{second}.hook_topk_weights"][hit] == 0).all()
    torch.testing.assert_close(renormed[f"{second}.hook_topk_weights"].sum(-1), clean[f"{second}.hook_topk_weights"].sum(-1),
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(steered["model.layers.1.mlp.hook_topk_indices"], clean["model.layers.1.mlp.hook_topk_indices"])
    assert not (steered["model.layers.1.mlp.pass1.hook_topk_indices"] == expert).any()
    assert (clean["model.layers.1.mlp.pass1.hook_topk_indices"] == expert).any()


# ---------------------------------------------------------------- DiffusionGemma: two stacks (group 5)
@torch.no_grad()
def test_diffusion_gemma_hooks_both_stacks_on_a_canvas_of_its_own_length():
    """Encoder layers 0..n-1 see the prompt, decoder layers n..2n-1 the canvas; logits = HF's; selection = routers'."""
    from helpers import capture_hooks

    model = tiny_model("diffusion_gemma")
    layout = nnsight_moe.layout(model)
    n = model.config.text_config.num_hidden_layers
    assert [l.path for l in layout.layers] == ([f"model.encoder.language_model.layers.{i}" for i in range(n)]
                                               + [f"model.decoder.layers.{i}" for i in range(n)])
    ids = _ids(pos=7)
    canvas = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    ref = model(input_ids=ids, decoder_input_ids=canvas).logits
    assert ref.shape[:2] == (2, 5)
    own = {}
    handles = [model.get_submodule(layout.layer(i).router).register_forward_hook(
        lambda m, a, out, i=i: own.__setitem__(i, out[2].clone())) for i in layout.moe_layers]
    model(input_ids=ids, decoder_input_ids=canvas)
    for h in handles:
        h.remove()
    with nnsight_moe.attached(model) as handle:
        out = {}
        values = capture_hooks(handle, lambda: out.__setitem__("logits", model(input_ids=ids, decoder_input_ids=canvas).logits))
    assert torch.equal(out["logits"], ref)
    for i in layout.moe_layers:
        got = values[layout.hook_name(i, "hook_topk_indices")]
        assert got.shape == (2, 7 if i < n else 5, 2), i
        assert torch.equal(got.reshape(own[i].shape), own[i])
    # the remote view (nnsight's local serialisation) reads both stacks in execution order = the hooks
    import nnsight

    from helpers import language_model
    from nnsight_moe.remote import MoEView
    from test_remote import _assert_view_equals_hooks

    lm = language_model(model)
    view = MoEView(lm)
    with lm.trace(input_ids=ids, decoder_input_ids=canvas, remote="local"):
        views = nnsight.save({i: view.layer(i) for i in view.moe_layers})
        logits = lm.output.logits.save()
    _assert_view_equals_hooks(layout, views, values)
    assert torch.equal(logits, ref)


@torch.no_grad()
def test_diffusion_gemma_tied_stacks_block_both_layers_for_zeroed_weights():
    """A tied checkpoint (the released ones) shares each layer's experts between the stacks: blocking layout layers
    L and n + L equals zeroing the shared weights, blocking one stack does not."""
    import copy

    from helpers import zero_expert_

    model = tiny_model("diffusion_gemma", tie_word_embeddings=True)
    assert model.model.encoder.language_model.layers[0].experts.down_proj is model.model.decoder.layers[0].experts.down_proj
    layout = nnsight_moe.layout(model)
    n = model.config.text_config.num_hidden_layers
    ids = _ids(pos=6)
    reference = zero_expert_(copy.deepcopy(model), layout, {1: [0, 3]})(ids).logits
    with nnsight_moe.block_experts(model, {1: [0, 3], n + 1: [0, 3]}, mode="zero"):
        both = model(ids).logits
    with nnsight_moe.block_experts(model, {1: [0, 3]}, mode="zero"):
        one = model(ids).logits
    torch.testing.assert_close(both, reference, atol=1e-5, rtol=0)
    assert not torch.allclose(one, reference, atol=1e-4)


_RECIPE_PROMPTS = [[5, 9, 17, 33], [7, 8, 9], [11, 12, 13, 14, 15]]
_RECIPE_DATA = (_RECIPE_PROMPTS * 2, torch.tensor([3, 40, 77] * 2), ["a"] * 3 + ["b"] * 3)


def test_diffusion_gemma_recipes_refuse_with_the_reason():
    """Every recipe refuses DiffusionGemma up front, saying why (no next-token targets on a canvas decoder)."""
    from nnsight_moe.recipes import attribution, blocking, head_expert
    from nnsight_moe.recipes.routing_stats import collect_routing

    model = tiny_model("diffusion_gemma")
    pairs = (_RECIPE_PROMPTS, [3, 40, 77])
    for run in (lambda: collect_routing(model, [[5, 6, 7]], batch_size=1),
                lambda: attribution.attribute(model, *pairs, levels=("layer",), progress=False),
                lambda: blocking.rank_experts(model, _RECIPE_DATA, by="gate", progress=False),
                lambda: blocking.rank_experts(model, _RECIPE_DATA, by="gate", batch_size="auto", progress=False),
                lambda: head_expert.correlate(model, pairs, signal="router_prob", top_k=2, permutations=5)):
        with pytest.raises(nnsight_moe.UnsupportedModelError, match="do not run on diffusion_gemma models: .*canvas"):
            run()


def test_inkling2_loop_blocking_recipe_ranks_the_experts_of_every_pass():
    """The blocking recipe runs on a looped model: its ranking covers every expert of every layout layer (each
    pass). (Attribution and head-expert correlation refuse it as they refuse inkling2_text: its final logit
    softcap is not the frozen final projection they read out through.)"""
    from nnsight_moe.recipes import blocking

    model = tiny_model("inkling2_loop_text")
    layout = nnsight_moe.layout(model)
    ranking = blocking.rank_experts(model, _RECIPE_DATA, by="gate", progress=False)
    assert {layer for layer, _ in ranking.overall} == set(layout.moe_layers)
    assert len(ranking.overall) == len(layout.moe_layers) * layout.n_experts
