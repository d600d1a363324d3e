"""TransformerLens frontend: contract hook points in TransformerBridge workflows (tiny offline models).

The oracle is the unmodified HF model (same seed, same weights) and TransformerLens' own hooks.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge import sources as tl_sources
from transformers import PreTrainedTokenizerFast

import nnsight_moe
from nnsight_moe import tl
from nnsight_moe.testing import tiny_model
from tests.helpers import down_weights, naive_expert

ARCHS = ["qwen2_moe", "olmoe", "mixtral", "deepseek_v3", "lfm2_moe", "sarvam_mla", "sarvam_moe", "laguna", "llama4",
         "deepseek_v4", "jetmoe"]
#: Tiny models whose layer 0 is dense (DeepSeek-V3's first_k_dense_replace, LFM2-MoE's num_dense_layers).
DENSE_FIRST = {"deepseek_v3", "lfm2_moe", "sarvam_mla", "sarvam_moe", "laguna", "llama4"}
#: TransformerLens does not split these routers' tuple into gate.hook_expert_indices / _weights.
NO_NATIVE_ROUTER_HOOKS = {"deepseek_v3", "sarvam_mla", "laguna", "llama4", "deepseek_v4", "jetmoe"}
#: TransformerLens' own name of the shared expert's output, per family with one.
NATIVE_SHARED_OUT = {"qwen2_moe": "shared_expert.hook_out", "deepseek_v3": "shared_experts.hook_out",
                     "llama4": "shared_expert.hook_out", "deepseek_v4": "shared_experts.hook_out",
                     "sarvam_mla": "shared_experts.hook_out"}  # TL's Glm4Moe adapter (sarvam_moe) maps none


def _ids(b: int = 2, p: int = 6) -> torch.Tensor:
    return torch.randint(3, 128, (b, p), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A WordLevel tokenizer over the tiny models' 128 ids, saved to disk (loaded like a hub one)."""
    vocab = {f"t{i}": i for i in range(3, 128)}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": 2})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="t3"
    )
    path = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=ARCHS)
def bridged(request, tokenizer_dir):
    """(arch, attached bridge, handle, HF reference logits of an identical unbridged model, ids)."""
    arch = request.param
    ids = _ids()
    with torch.no_grad():
        reference = tiny_model(arch)(ids).logits
    bridge = tl.boot(tiny_model(arch), tokenizer=tokenizer_dir)
    yield arch, bridge, nnsight_moe.handle_of(bridge), reference, ids
    nnsight_moe.detach(bridge)


def contract_shapes(layer, b: int, p: int) -> dict[str, tuple[int, ...]]:
    """The contract's shape of every hook point of a MoE ``layer`` (ARCHITECTURE.md)."""
    e, k, d = layer.n_experts, layer.top_k, layer.d_model
    shapes = {
        "hook_router_logits": (b, p, e),
        "hook_router_scores": (b, p, e),
        "hook_topk_indices": (b, p, k),
        "hook_topk_weights": (b, p, k),
        "hook_expert_acts": (b, p, k, layer.d_expert),
        "hook_expert_out": (b, p, k, d),
        "hook_routed_out": (b, p, d),
        "hook_moe_out": (b, p, d),
    }
    if layer.has_shared:
        shapes.update(hook_shared_acts=(b, p, layer.d_shared), hook_shared_out=(b, p, d), hook_shared_gate=(b, p, 1))
    assert set(shapes) == set(layer.hook_names)
    return shapes


def _most_used_expert(bridge, layer: int, ids) -> int:
    name = tl.tl_hook_name(layer, "hook_topk_indices")
    _, cache = bridge.run_with_cache(ids, names_filter=name)
    return int(torch.bincount(cache[name].flatten(), minlength=8).argmax())


# ------------------------------------------------------------- equivalence
def test_bridge_logits_with_hooks_equal_hf(bridged):
    arch, bridge, handle, reference, ids = bridged
    assert handle is not None and handle.layout.family == arch
    with torch.no_grad():
        torch.testing.assert_close(bridge(ids), reference, rtol=1e-5, atol=1e-5)


def test_every_hook_in_hook_dict_and_cache_with_contract_shape(bridged):
    arch, bridge, handle, reference, ids = bridged
    hook_dict = bridge.hook_dict
    logits, cache = bridge.run_with_cache(ids)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    expected_layers = [1, 2] if arch in DENSE_FIRST else [0, 1, 2]
    assert handle.layout.moe_layers == expected_layers
    for index in handle.layout.moe_layers:
        layer = handle.layout.layer(index)
        for name, shape in contract_shapes(layer, *ids.shape).items():
            full = f"blocks.{index}.mlp.{name}"
            point = hook_dict[full]
            assert point is handle.hook_points()[f"{layer.path}.{name}"]
            assert point.name == full
            assert full in cache, full
            assert tuple(cache[full].shape) == shape, (full, tuple(cache[full].shape))
        # sparse: the per-slot tensor is cached, never a dense [b, p, E, d_model] one
        assert cache[f"blocks.{index}.mlp.hook_expert_out"].shape[2] == layer.top_k < layer.n_experts
    if arch in DENSE_FIRST:  # the dense layer gets no MoE hook points
        assert not any(name.startswith("blocks.0.mlp.hook_topk") for name in hook_dict)


def test_names_filter_selects_our_hooks(bridged):
    arch, bridge, handle, _, ids = bridged
    last = handle.layout.moe_layers[-1]
    wanted = [tl.tl_hook_name(last, "hook_topk_weights"), tl.tl_hook_name(last, "hook_expert_out")]
    _, cache = bridge.run_with_cache(ids, names_filter=wanted)
    assert set(cache.keys()) == set(wanted)
    _, cache = bridge.run_with_cache(ids, names_filter=wanted[0])
    assert set(cache.keys()) == {wanted[0]}
    _, cache = bridge.run_with_cache(ids, names_filter=lambda name: name.endswith("mlp.hook_router_scores"))
    assert set(cache.keys()) == {tl.tl_hook_name(i, "hook_router_scores") for i in handle.layout.moe_layers}
    assert all(v.shape[-1] == handle.layout.n_experts for v in cache.values())


def test_moe_out_equals_tl_mlp_out(bridged):
    _, bridge, handle, _, ids = bridged
    _, cache = bridge.run_with_cache(ids)
    for index in handle.layout.moe_layers:
        native = f"blocks.{index}.hook_mlp_out"  # DeepSeek-V4's hyper-connection blocks have only mlp.hook_out
        native = native if native in cache else f"blocks.{index}.mlp.hook_out"
        assert torch.equal(cache[f"blocks.{index}.mlp.hook_moe_out"], cache[native])


def test_tl_native_router_hooks_agree_with_ours(bridged):
    _, bridge, handle, _, ids = bridged
    _, cache = bridge.run_with_cache(ids)
    checked = 0
    for index in handle.layout.moe_layers:
        ours_idx = cache[f"blocks.{index}.mlp.hook_topk_indices"]
        ours_w = cache[f"blocks.{index}.mlp.hook_topk_weights"]
        b, p, k = ours_idx.shape
        native = f"blocks.{index}.mlp.gate.hook_expert_indices"
        if native not in cache:  # NO_NATIVE_ROUTER_HOOKS: TL does not split the router's tuple
            continue
        native_idx = cache[native]
        assert torch.equal(native_idx, ours_idx.reshape(b * p, k))
        dense = tl.dense_experts(ours_w, ours_idx, handle.layout.n_experts)
        assert torch.equal(cache[f"blocks.{index}.mlp.gate.hook_expert_weights"], dense.reshape(b * p, -1))
        checked += 1
    assert checked or handle.layout.family in NO_NATIVE_ROUTER_HOOKS


# ------------------------------------------------------- editing with hooks
def test_run_with_hooks_zeroing_one_expert_equals_block_experts(bridged):
    _, bridge, handle, _, ids = bridged
    layer = handle.layout.moe_layers[-1]
    expert = _most_used_expert(bridge, layer, ids)
    seen = {}

    def keep_indices(indices, hook):
        seen["indices"] = indices

    def zero_expert(weights, hook):
        return weights.masked_fill(seen["indices"] == expert, 0.0)

    fwd_hooks = [
        (tl.tl_hook_name(layer, "hook_topk_indices"), keep_indices),
        (tl.tl_hook_name(layer, "hook_topk_weights"), zero_expert),
    ]
    with torch.no_grad():
        baseline = bridge(ids)
        hooked = bridge.run_with_hooks(ids, fwd_hooks=fwd_hooks)
        with bridge.hooks(fwd_hooks=fwd_hooks):
            in_context = bridge(ids)
        with nnsight_moe.block_experts(bridge, {layer: [expert]}, mode="zero"):
            blocked = bridge(ids)
        after = bridge(ids)
    assert (hooked - baseline).abs().max() > 1e-4  # the expert mattered
    torch.testing.assert_close(hooked, blocked, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(in_context, blocked, rtol=1e-5, atol=1e-6)
    assert torch.equal(after, baseline)  # hooks and block removed


def test_block_experts_composes_with_a_tl_hook(bridged):
    """block_experts + a native TL hook == zeroed down_proj weights + the same TL hook."""
    _, bridge, handle, _, ids = bridged
    layer = handle.layout.moe_layers[-1]
    expert = _most_used_expert(bridge, layer, ids)
    native = "blocks.0.hook_resid_post" if "blocks.0.hook_resid_post" in bridge.hook_dict else "blocks.0.attn.hook_out"
    tl_hook = [(native, lambda resid, hook: resid * 0.5)]  # DeepSeek-V4 (hyper-connections) has no resid hooks
    with torch.no_grad():
        with nnsight_moe.block_experts(bridge, {layer: [expert]}, mode="zero"):
            blocked = bridge.run_with_hooks(ids, fwd_hooks=tl_hook)
        down_proj = down_weights(handle.states[layer].experts)
        saved = down_proj[expert].clone()
        down_proj[expert].zero_()
        try:
            oracle = bridge.run_with_hooks(ids, fwd_hooks=tl_hook)
        finally:
            down_proj[expert].copy_(saved)
        plain = bridge.run_with_hooks(ids, fwd_hooks=tl_hook)
        for mode in ("renorm", "reroute"):
            with nnsight_moe.block_experts(bridge, {layer: [expert]}, mode=mode):
                other = bridge.run_with_hooks(ids, fwd_hooks=tl_hook)
            assert (other - plain).abs().max() > 1e-4, mode
    torch.testing.assert_close(blocked, oracle, rtol=1e-5, atol=1e-5)
    assert (blocked - plain).abs().max() > 1e-4


def test_restrict_shared_equals_zeroing_tl_shared_expert_hook(bridged):
    arch, bridge, handle, _, ids = bridged
    if arch not in NATIVE_SHARED_OUT and handle.layout.has_shared:
        pytest.skip("TransformerLens has no hook on this family's shared expert to compare with")
    if arch not in NATIVE_SHARED_OUT:
        with pytest.raises(ValueError, match="no shared expert"):
            with nnsight_moe.restrict_experts(bridge, shared=False):
                pass
        return
    native = [
        (f"blocks.{i}.mlp.{NATIVE_SHARED_OUT[arch]}", lambda out, hook: torch.zeros_like(out))
        for i in handle.layout.moe_layers
    ]
    extra_name = "blocks.1.attn.hook_z" if "blocks.1.attn.hook_z" in bridge.hook_dict else "blocks.1.attn.hook_out"
    extra = [(extra_name, lambda z, hook: z * 0.9)]  # a TL hook in the same forward
    with torch.no_grad():
        oracle = bridge.run_with_hooks(ids, fwd_hooks=native + extra)
        with nnsight_moe.restrict_experts(bridge, shared=False):
            restricted = bridge.run_with_hooks(ids, fwd_hooks=extra)
            _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_shared_gate"))
    torch.testing.assert_close(restricted, oracle, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in cache.values()) and cache


# ------------------------------------------------------------------ detach
@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_detach_removes_hooks_and_restores_logits(arch, tokenizer_dir):
    ids = _ids()
    model = tiny_model(arch)
    bridge = tl_sources.build_bridge_from_module(model, tl._architecture(model), hf_config=model.config)
    native = dict(bridge.hook_dict)
    native_scores = native["blocks.1.mlp.hook_router_scores"]  # TL's own, shadowed while attached
    with torch.no_grad():
        before = bridge(ids)

    handle = nnsight_moe.attach(bridge)
    assert nnsight_moe.attach(bridge) is handle  # idempotent
    added = set(bridge.hook_dict) - set(native)
    expected = {tl.tl_hook_name(i, n) for i in handle.layout.moe_layers for n in handle.layout.layer(i).hook_names}
    assert added == expected - {f"blocks.{i}.mlp.hook_router_scores" for i in handle.layout.moe_layers}
    assert bridge.hook_dict["blocks.1.mlp.hook_router_scores"] is not native_scores
    assert expected <= bridge._driver.supported_hook_points
    points = handle.hook_points()
    bridge.add_hook("blocks.1.mlp.hook_topk_weights", lambda w, hook: w * 0)  # left behind on purpose

    handle.detach()
    assert nnsight_moe.handle_of(bridge) is None
    assert set(bridge.hook_dict) == set(native)
    assert all(bridge.hook_dict[name] is point for name, point in native.items())
    assert not expected & bridge._driver.supported_hook_points - set(native)
    assert "hook_topk_weights" not in bridge.blocks[1].mlp.get_hooks()
    assert all(point.name == path and not point.fwd_hooks for path, point in points.items())
    with torch.no_grad():
        assert torch.equal(bridge(ids), before)
    _, cache = bridge.run_with_cache(ids)
    assert not any("hook_topk" in name for name in cache)

    again = nnsight_moe.attach(bridge)  # a fresh attach exposes them again
    assert expected <= set(bridge.hook_dict)
    again.detach()
    assert set(bridge.hook_dict) == set(native)


def test_attach_before_bridging_then_attach_bridge(tokenizer_dir):
    """An HF model attached first, wrapped in a bridge later, exposes the same hook points."""
    ids = _ids()
    model = tiny_model("olmoe")
    with torch.no_grad():
        reference = model(ids).logits
    handle = nnsight_moe.attach(model)
    bridge = tl_sources.build_bridge_from_module(model, "OlmoeForCausalLM", hf_config=model.config)
    assert nnsight_moe.attach(bridge) is handle
    logits, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_expert_out"))
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert set(cache) == {tl.tl_hook_name(i, "hook_expert_out") for i in (0, 1, 2)}
    handle.detach()
    assert not any(".mlp.hook_expert_out" in name for name in bridge.hook_dict)


# -------------------------------------------------------------------- boot
def test_boot_hf_model_with_local_tokenizer(tokenizer_dir):
    model = tiny_model("mixtral")
    bridge = tl.boot(model, tokenizer=str(tokenizer_dir))
    try:
        assert isinstance(bridge, TransformerBridge) and nnsight_moe.handle_of(bridge) is not None
        tokens = bridge.to_tokens("t5 t6 t7", prepend_bos=False)
        assert tokens.tolist() == [[5, 6, 7]]
        _, cache = bridge.run_with_cache("t5 t6 t7", names_filter="blocks.2.mlp.hook_topk_indices")
        assert cache["blocks.2.mlp.hook_topk_indices"].shape[-1] == 2
    finally:
        nnsight_moe.detach(bridge)


def test_boot_local_directory_through_boot_transformers(tmp_path, tokenizer_dir):
    """A saved model directory boots offline through TransformerBridge.boot_transformers."""
    ids = _ids()
    model = tiny_model("olmoe")
    with torch.no_grad():
        reference = model(ids).logits
    model.save_pretrained(tmp_path)
    bridge = tl.boot(tmp_path, tokenizer=tokenizer_dir)
    try:
        assert nnsight_moe.handle_of(bridge).layout.family == "olmoe"
        logits, cache = bridge.run_with_cache(ids, names_filter="blocks.0.mlp.hook_moe_out")
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
        assert cache["blocks.0.mlp.hook_moe_out"].shape == (*ids.shape, 64)
    finally:
        nnsight_moe.detach(bridge)


def test_boot_names_the_required_transformer_lens_version(monkeypatch, tmp_path):
    monkeypatch.delattr(TransformerBridge, "boot_transformers")
    with pytest.raises(ImportError, match=r"transformer-lens>=4\.3.*boot_transformers"):
        tl.boot(tmp_path)
    monkeypatch.delattr(tl_sources, "build_bridge_from_module")
    with pytest.raises(ImportError, match=r"transformer-lens>=4\.3.*build_bridge_from_module"):
        tl.boot(tiny_model("olmoe"))


def test_boot_rejects_other_inputs():
    with pytest.raises(TypeError, match="hub model name, a local model directory or a Hugging Face"):
        tl.boot(42)
    model = tiny_model("olmoe")
    bridge = tl_sources.build_bridge_from_module(model, "OlmoeForCausalLM", hf_config=model.config)
    with pytest.raises(TypeError, match=r"nnsight_moe\.attach\(bridge\)"):
        tl.boot(bridge)


# ------------------------------------------------------------- dense views
def test_dense_experts_against_weights(bridged):
    _, bridge, handle, _, ids = bridged
    index = handle.layout.moe_layers[-1]
    layer = handle.layout.layer(index)
    _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.startswith(f"blocks.{index}.mlp."))
    indices = cache[f"blocks.{index}.mlp.hook_topk_indices"]
    weights = tl.dense_experts(cache[f"blocks.{index}.mlp.hook_topk_weights"], indices, layer.n_experts)
    out = tl.dense_from_cache(cache, index, "hook_expert_out")
    assert weights.shape == (*ids.shape, layer.n_experts)
    assert out.shape == (*ids.shape, layer.n_experts, layer.d_model)
    selected = torch.zeros_like(weights, dtype=torch.bool).scatter_(-1, indices, True)
    assert torch.equal(out.abs().sum(-1) > 0, selected)  # zeros exactly where not selected
    x = cache[f"blocks.{index}.mlp.hook_in"].reshape(-1, layer.d_model)
    experts = handle.states[index].experts
    if type(experts).__name__ == "JetMoeParallelExperts":  # the naive expert needs both of JetMoE's linears
        experts = handle.states[index].block
    for e in indices.unique().tolist():
        rows = selected.reshape(-1, layer.n_experts)[:, e]
        x_in = x[rows]
        if layer.gate_on_input:  # Llama 4: the expert's input is scaled by its weight
            x_in = x_in * weights.reshape(-1, layer.n_experts)[rows, e, None]
        _, naive = naive_expert(experts, x_in, e)
        torch.testing.assert_close(out.reshape(-1, layer.n_experts, layer.d_model)[rows, e], naive, rtol=1e-4, atol=1e-5)
    routed = out.sum(dim=2) if layer.gate_on_input else (weights[..., None] * out).sum(dim=2)
    torch.testing.assert_close(routed, cache[f"blocks.{index}.mlp.hook_routed_out"], rtol=1e-5, atol=1e-5)


def test_dense_experts_inputs():
    values = torch.arange(12.0).reshape(1, 2, 2, 3)
    indices = torch.tensor([[[0, 3], [3, 3]]])
    dense = tl.dense_experts(values, indices, 4)
    assert dense.shape == (1, 2, 4, 3)
    assert torch.equal(dense[0, 0, 3], values[0, 0, 1]) and torch.equal(dense[0, 0, 1], torch.zeros(3))
    assert torch.equal(dense[0, 1, 3], values[0, 1, 0] + values[0, 1, 1])  # repeated expert: summed
    with pytest.raises(ValueError, match=r"indices must lie in 0\.\.2 for n_experts=3"):
        tl.dense_experts(values, indices, 3)
    with pytest.raises(ValueError, match=r"values must be \[b, p, k, \.\.\.\]"):
        tl.dense_experts(values[:, :1], indices, 4)
    with pytest.raises(TypeError, match="integer tensor"):
        tl.dense_experts(values, indices.float(), 4)
    with pytest.raises(ValueError, match="positive integer"):
        tl.dense_experts(values, indices, 0)
    with pytest.raises(ValueError, match="per-slot hooks"):
        tl.dense_from_cache({}, 0, "hook_moe_out")
    with pytest.raises(KeyError, match="blocks.0.mlp.hook_expert_out"):
        tl.dense_from_cache({}, 0)


def test_non_bridges_are_ignored_by_the_frontend():
    model = tiny_model("olmoe")
    handle = nnsight_moe.attach(model)
    try:
        assert not tl.is_bridge(model)
        tl.expose_hook_points(model, handle)  # no-op
        assert all(name.startswith("model.layers.") for name in handle.hook_points())
        assert all(point.name == path for path, point in handle.hook_points().items())
    finally:
        handle.detach()


def test_attach_again_after_compatibility_mode():
    """enable_compatibility_mode() rebuilds TL's registry; attaching again restores every name."""
    ids = _ids()
    bridge = tl.boot(tiny_model("olmoe"))
    try:
        bridge.enable_compatibility_mode()
        assert nnsight_moe.attach(bridge) is nnsight_moe.handle_of(bridge)
        _, cache = bridge.run_with_cache(ids)
        layout = nnsight_moe.handle_of(bridge).layout
        for index in layout.moe_layers:
            for name, shape in contract_shapes(layout.layer(index), *ids.shape).items():
                assert tuple(cache[tl.tl_hook_name(index, name)].shape) == shape
            torch.testing.assert_close(cache[f"blocks.{index}.mlp.hook_moe_out"], cache[f"blocks.{index}.hook_mlp_out"])
    finally:
        nnsight_moe.detach(bridge)
    assert not any(".mlp.hook_topk" in name for name in bridge.hook_dict)


def test_gemma4_bridge(tokenizer_dir):
    """Gemma-4 under TransformerLens' own gemma4_text adapter: the decoder layer is the block, its hook points
    are blocks.L.mlp.hook_* with the contract's shapes, attaching leaves the bridge's logits bit-identical,
    and zero blocking equals zeroing the expert's down_proj. (The bridge itself differs from HF by ~4e-5 on
    logits of ~4: TransformerLens' processing, with or without us.)"""
    ids = _ids()
    bridge = tl.boot(tiny_model("gemma4_text"), tokenizer=tokenizer_dir)
    handle = nnsight_moe.handle_of(bridge)
    try:
        with torch.no_grad():
            attached, cache = bridge.run_with_cache(ids)
            for index in handle.layout.moe_layers:
                for name, shape in contract_shapes(handle.layout.layer(index), *ids.shape).items():
                    assert tuple(cache[f"blocks.{index}.mlp.{name}"].shape) == shape, (index, name)
            layer, expert = 1, _most_used_expert(bridge, 1, ids)
            with nnsight_moe.block_experts(bridge, {layer: [expert]}, mode="zero"):
                blocked = bridge(ids)
            down = handle.states[layer].experts.down_proj
            saved = down[expert].clone()
            down[expert].zero_()
            try:
                oracle = bridge(ids)
            finally:
                down[expert].copy_(saved)
        torch.testing.assert_close(blocked, oracle, rtol=1e-5, atol=1e-5)
        assert (blocked - attached).abs().max() > 1e-4
    finally:
        nnsight_moe.detach(bridge)
    with torch.no_grad():
        assert torch.equal(bridge(ids), attached), "attaching left the bridge's logits bit-identical"
