"""Core contract: every supported family reproduces the HF forward and the decomposition identities."""

from __future__ import annotations

import copy

import pytest
import torch

import nnsight_moe
from nnsight_moe.testing import tiny_model as _tiny_model

from helpers import capture_blocks, capture_hooks, capture_routers, naive_expert, zero_expert_

#: Every supported family, plus model types served by another family's adapter through their text model
#: (Kimi-K2.5: DeepSeek-V3; Nemotron-3.5-Transcribe, Nemotron-H-Omni: Nemotron-H), built as the full
#: multimodal model.
FAMILIES = nnsight_moe.supported_families() + ["kimi_k25", "nemo_speechlm", "nemotron_h_omni", "nemotron_h-latent",
                                               "inkling_mm_model"]  # Inkling's multimodal model (inkling_text inside)
#: Test variants of a family: (model type, tiny-model overrides).
VARIANTS = {"nemotron_h-latent": ("nemotron_h", {"moe_latent_size": 32, "mlp_bias": True})}


def tiny_model(family, **kwargs):  # noqa: F811 - the variants above, else nnsight_moe.testing.tiny_model
    model_type, overrides = VARIANTS.get(family, (family, {}))
    return _tiny_model(model_type, **overrides, **kwargs)
ATOL = 1e-5


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


def _ids(batch=2, pos=7, seed=0):
    return torch.randint(3, 128, (batch, pos), generator=torch.Generator().manual_seed(seed))


def test_required_families_supported():
    required = {"qwen2_moe", "olmoe", "mixtral", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe"}
    assert required <= set(FAMILIES)


@torch.no_grad()
def test_equivalence_and_decomposition(family):
    model = tiny_model(family)
    ids = _ids()
    layout = nnsight_moe.layout(model)
    assert layout.moe_layers, "tiny model has MoE layers"
    ref_logits = model(ids).logits
    blocks = capture_blocks(model, layout, lambda: model(ids))
    routers = capture_routers(model, layout, lambda: model(ids))

    handle = nnsight_moe.attach(model)
    values = {}
    logits = None

    def run():
        nonlocal logits
        logits = model(ids).logits

    values = capture_hooks(handle, run)
    assert (logits - ref_logits).abs().max().item() <= ATOL

    for index in layout.moe_layers:
        info = layout.layer(index)
        get = lambda name: values[f"{info.path}.{name}"]  # noqa: E731
        b, p = ids.shape
        k, e_count, d = info.top_k, info.n_experts, info.d_model
        x, block_out = blocks[index]
        x = x.reshape(b * p, d)
        d_out = info.d_latent or d  # a latent MoE's experts run in d_latent
        if info.d_latent:
            assert get("hook_latent_in").shape == (b, p, d_out)
            x = get("hook_latent_in").reshape(b * p, d_out)  # the experts' input
        # shapes of the contract
        assert get("hook_router_logits").shape == (b, p, e_count)
        assert get("hook_router_scores").shape == (b, p, e_count)
        assert get("hook_topk_indices").shape == (b, p, k)
        assert get("hook_topk_weights").shape == (b, p, k)
        assert get("hook_expert_acts").shape == (b, p, k, info.d_expert)
        assert get("hook_expert_out").shape == (b, p, k, d_out)
        assert get("hook_routed_out").shape == (b, p, d_out)
        # selection equals HF's own router on the same input
        hf_weights, hf_indices = (t.reshape(b * p, k) for t in routers[index])
        assert torch.equal(get("hook_topk_indices").reshape(b * p, k), hf_indices)
        assert torch.allclose(get("hook_topk_weights").reshape(b * p, k).float(), hf_weights.float(), atol=ATOL)
        # routed_out = sum_slots weight * expert_out (gate_on_input, Llama 4: the weight scales the input)
        w, out = get("hook_topk_weights"), get("hook_expert_out")
        weighted = out if info.gate_on_input else w[..., None] * out
        torch.testing.assert_close(get("hook_routed_out"), weighted.sum(-2), atol=ATOL, rtol=0)
        # moe_out = routed + gate * shared = HF block output
        moe = info.routed_scale * get("hook_routed_out")
        if info.d_latent:  # the extension: the routed sum's output projection replaces it in the block's sum
            projection = model.get_submodule(info.latent_out)
            torch.testing.assert_close(get("hook_latent_out"), projection(moe), atol=ATOL, rtol=0)
            moe = get("hook_latent_out")
        if info.moe_bias:  # JetMoE adds a learned bias to the routed sum
            moe = moe + model.get_parameter(info.moe_bias)
        if info.has_shared:
            assert get("hook_shared_out").shape == (b, p, d)
            assert get("hook_shared_gate").shape == (b, p, 1)
            assert get("hook_shared_acts").shape == (b, p, info.d_shared)
            moe = moe + get("hook_shared_gate") * get("hook_shared_out")
        if info.post:  # the extension: the block post-processes its sum
            torch.testing.assert_close(get("hook_moe_sum"), moe, atol=ATOL, rtol=0)
            moe = model.get_submodule(info.post)(moe)
        torch.testing.assert_close(get("hook_moe_out"), moe, atol=ATOL, rtol=0)
        torch.testing.assert_close(get("hook_moe_out"), block_out.reshape(b, p, d), atol=ATOL, rtol=0)
        # each slot's expert output equals the expert MLP applied straight from its weights
        experts = model.get_submodule(info.experts)
        if type(experts).__name__ == "JetMoeParallelExperts":  # the naive expert needs both of JetMoE's linears
            experts = model.get_submodule(info.path)
        idx = get("hook_topk_indices").reshape(b * p, k)
        acts_all = get("hook_expert_acts").reshape(b * p, k, -1)
        out_all = out.reshape(b * p, k, d_out)
        w_flat = w.reshape(b * p, k)
        for j in range(k):
            for t in range(b * p):
                x_in = x[t : t + 1] * w_flat[t, j].to(x.dtype) if info.gate_on_input else x[t : t + 1]
                acts, direct = naive_expert(experts, x_in, int(idx[t, j]))
                torch.testing.assert_close(out_all[t, j], direct[0], atol=ATOL, rtol=0)
                torch.testing.assert_close(acts_all[t, j], acts[0], atol=ATOL, rtol=0)

    handle.detach()
    assert torch.equal(model(ids).logits, ref_logits), "detach restores bit-identical logits"
    assert not any("hook_" in name for name, _ in model.named_modules())


@torch.no_grad()
def test_attach_twice_is_noop_and_context_manager(family):
    model = tiny_model(family)
    ids = _ids()
    ref = model(ids).logits
    h1 = nnsight_moe.attach(model)
    h2 = nnsight_moe.attach(model)
    assert h1 is h2
    n_hooks = sum("hook_" in name for name, _ in model.named_modules())
    assert n_hooks == sum(len(layer.hook_names) for layer in h1.layout.layers)
    h1.detach()
    h1.detach()  # idempotent
    with nnsight_moe.attached(model) as handle:
        assert handle.attached
        torch.testing.assert_close(model(ids).logits, ref, atol=ATOL, rtol=0)
    assert nnsight_moe.handle_of(model) is None
    assert torch.equal(model(ids).logits, ref)


def _two_experts(layout, reroute=False):
    """Experts to block in the first and last MoE layers (for ``reroute``: of those layers that choose from
    scores; a hash-routed layer, DeepSeek-V4's first, refuses rerouting)."""
    layers = [i for i in layout.moe_layers if not (reroute and layout.layer(i).routing._kind == "hash")]
    return {layers[0]: [0, 3], layers[-1]: [1]}


@torch.no_grad()
def test_block_zero_equals_zeroed_down_proj(family):
    model = tiny_model(family)
    ids = _ids()
    layout = nnsight_moe.layout(model)
    blocked = _two_experts(layout)
    reference = zero_expert_(copy.deepcopy(model), layout, blocked)(ids).logits
    with nnsight_moe.block_experts(model, blocked, mode="zero"):
        blocked_logits = model(ids).logits
    torch.testing.assert_close(blocked_logits, reference, atol=ATOL, rtol=0)
    assert nnsight_moe.handle_of(model) is None, "block_experts detaches a model it attached"
    assert not torch.allclose(blocked_logits, model(ids).logits, atol=1e-4), "blocking changed something"


@torch.no_grad()
def test_block_reroute_and_renorm(family):
    model = tiny_model(family)
    ids = _ids()
    handle = nnsight_moe.attach(model)
    blocked = _two_experts(handle.layout, reroute=True)
    clean = capture_hooks(handle, lambda: model(ids))
    with nnsight_moe.block_experts(model, blocked, mode="reroute"):
        rerouted = capture_hooks(handle, lambda: model(ids))
    for index, experts in blocked.items():
        path = handle.layout.layer(index).path
        chosen = rerouted[f"{path}.hook_topk_indices"]
        assert not torch.isin(chosen, torch.tensor(experts)).any(), "reroute never selects a blocked expert"
    # renorm: checked on the first blocked layer, whose input the blocking does not change
    index, experts = next(iter(blocked.items()))
    with nnsight_moe.block_experts(model, {index: experts}, mode="renorm"):
        renormed = capture_hooks(handle, lambda: model(ids))
    if True:
        path = handle.layout.layer(index).path
        clean_sum = clean[f"{path}.hook_topk_weights"].float().sum(-1)
        renorm_w = renormed[f"{path}.hook_topk_weights"]
        hit = torch.isin(clean[f"{path}.hook_topk_indices"], torch.tensor(experts))
        assert (renorm_w[hit] == 0).all()
        full = hit.sum(-1) < hit.shape[-1]  # tokens that keep at least one expert
        torch.testing.assert_close(renorm_w.float().sum(-1)[full], clean_sum[full], atol=1e-5, rtol=1e-5)
    handle.detach()


@torch.no_grad()
def test_hash_routing():
    """DeepSeek-V4's hash layer: indices are the token-id table's, weights the renormalised scores there;
    reroute is refused with a clear error, zero blocking equals zeroed weights."""
    model = tiny_model("deepseek_v4")
    ids = _ids()
    layout = nnsight_moe.layout(model)
    info = layout.layer(0)
    assert info.routing._kind == "hash" and layout.layer(1).routing._kind == "topk"
    with nnsight_moe.attached(model) as handle:
        values = capture_hooks(handle, lambda: model(ids))
    table = model.get_submodule(info.router).tid2eid
    assert torch.equal(values[f"{info.path}.hook_topk_indices"], table[ids])
    with pytest.raises(ValueError, match="layer 0 is hash-routed .* mode='reroute' has no meaning"):
        with nnsight_moe.block_experts(model, {0: [1]}, mode="reroute"):
            pass
    with pytest.raises(ValueError, match="hash-routed layer chooses its experts by token id"):
        info.routing.select(values[f"{info.path}.hook_router_scores"])


@torch.no_grad()
def test_identity_experts():
    """LongCat-Flash's zero-compute experts (ids 8, 9 of 10): their slots' output is the token itself and
    their acts 0; blocking them (zero) removes exactly weight * token from the routed sum."""
    model = tiny_model("longcat_flash")
    ids = _ids()
    layout = nnsight_moe.layout(model)
    info = layout.layer(0)
    blocks = capture_blocks(model, layout, lambda: model(ids))
    with nnsight_moe.attached(model) as handle:
        clean = capture_hooks(handle, lambda: model(ids))
        with nnsight_moe.block_experts(model, {0: [8, 9]}, mode="zero"):
            blocked = capture_hooks(handle, lambda: model(ids))
    get = lambda values, name: values[f"{info.path}.{name}"]  # noqa: E731
    x = blocks[0][0].reshape(*ids.shape, -1)
    identity = get(clean, "hook_topk_indices") >= 8
    assert identity.any() and not identity.all(), "the tiny model picks identity experts sometimes"
    torch.testing.assert_close(get(clean, "hook_expert_out")[identity], x[..., None, :].expand(-1, -1, 2, -1)[identity])
    assert not get(clean, "hook_expert_acts")[identity].any()
    dropped = (get(clean, "hook_topk_weights") * identity)[..., None] * x[..., None, :]
    torch.testing.assert_close(get(blocked, "hook_routed_out"), get(clean, "hook_routed_out") - dropped.sum(-2),
                               atol=ATOL, rtol=0)


@torch.no_grad()
def test_router_logit_edit_forces_expert(family):
    model = tiny_model(family)
    ids = _ids()
    handle = nnsight_moe.attach(model)
    layer = handle.layout.layer(handle.layout.moe_layers[-1])
    forced = layer.n_experts - 1
    point = handle.hook_points()[f"{layer.path}.hook_router_logits"]

    def force(logits, hook):
        logits = torch.full_like(logits, -1e4)
        logits[..., forced] = 1e4
        return logits

    point.add_hook(force)
    values = capture_hooks(handle, lambda: model(ids))  # capture_hooks removes all hooks after
    chosen = values[f"{layer.path}.hook_topk_indices"]
    assert (chosen == forced).any(-1).all(), "the forced expert is selected at every position"
    handle.detach()


def test_restrict_shared_only_equals_zeroed_routed():
    model = tiny_model("qwen2_moe")
    ids = _ids()
    layout = nnsight_moe.layout(model)
    all_experts = {i: list(range(layout.layer(i).n_experts)) for i in layout.moe_layers}
    with torch.no_grad():
        reference = zero_expert_(copy.deepcopy(model), layout, all_experts)(ids).logits
        with nnsight_moe.restrict_experts(model, 0):
            shared_only = model(ids).logits
        torch.testing.assert_close(shared_only, reference, atol=ATOL, rtol=0)
        # shared ablation: shared gate 0 equals a copy whose shared down_proj is zeroed
        ref_shared = copy.deepcopy(model)
        for i in layout.moe_layers:
            ref_shared.get_submodule(layout.layer(i).shared).down_proj.weight.zero_()
        with nnsight_moe.ablate_shared(model):
            ablated = model(ids).logits
        torch.testing.assert_close(ablated, ref_shared(ids).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_restrict_top1_keeps_largest_weight():
    model = tiny_model("olmoe")
    ids = _ids()
    handle = nnsight_moe.attach(model)
    path = handle.layout.layer(0).path
    clean = capture_hooks(handle, lambda: model(ids))[f"{path}.hook_topk_weights"]
    with nnsight_moe.restrict_experts(model, 1):
        top1 = capture_hooks(handle, lambda: model(ids))[f"{path}.hook_topk_weights"]
    assert ((top1 > 0).sum(-1) == 1).all()
    torch.testing.assert_close(top1.max(-1).values, clean.max(-1).values)
    handle.detach()


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "mixtral", "gpt_oss"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_low_precision(family, dtype):
    model = tiny_model(family, dtype=dtype)
    ids = _ids()
    ref = model(ids).logits.float()
    with nnsight_moe.attached(model):
        out = model(ids).logits.float()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() <= 0.05 * scale + 0.05


@torch.no_grad()
def test_padded_batch(family):
    model = tiny_model(family)
    ids = _ids(batch=3, pos=6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :4] = 0
    ref = model(ids, attention_mask=mask).logits
    with nnsight_moe.attached(model) as handle:
        values = {}
        out = None

        def run():
            nonlocal out
            out = model(ids, attention_mask=mask).logits

        values = capture_hooks(handle, run)
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=ATOL, rtol=0)
    first = handle.layout.layer(handle.layout.moe_layers[0]).path
    assert values[f"{first}.hook_topk_indices"].shape[:2] == ids.shape


def test_errors():
    dense = tiny_model("llama")
    with pytest.raises(nnsight_moe.UnsupportedModelError, match="Supported families: .*qwen2_moe"):
        nnsight_moe.attach(dense)
    with pytest.raises(TypeError, match="expected a Hugging Face"):
        nnsight_moe.attach(object())
    model = tiny_model("deepseek_v3")  # layer 0 is dense
    layout = nnsight_moe.layout(model)
    with pytest.raises(IndexError, match=r"layers 0\.\.2"):
        with nnsight_moe.block_experts(model, {7: [0]}):
            pass
    with pytest.raises(IndexError, match=r"valid experts are 0\.\.7"):
        with nnsight_moe.block_experts(model, {1: [8]}):
            pass
    with pytest.raises(ValueError, match="layer 0 is a dense layer"):
        with nnsight_moe.block_experts(model, {0: [1]}):
            pass
    with pytest.raises(ValueError, match="mode must be one of"):
        with nnsight_moe.block_experts(model, {1: [1]}, mode="drop"):
            pass
    with pytest.raises(ValueError, match=r"top must be an integer in 0\.\.2"):
        with nnsight_moe.restrict_experts(model, 3):
            pass
    with pytest.raises(ValueError, match="no shared expert"):
        with nnsight_moe.ablate_shared(tiny_model("olmoe")):
            pass
    assert layout.layer(0).kind == "dense" and layout.moe_layers == [1, 2]
    assert "deepseek_v3" in str(layout)


@torch.no_grad()
def test_per_row_masks_equal_separate_runs():
    """A [batch, E] mask blocks different experts per batch row (conditions stacked on the batch)."""
    model = tiny_model("qwen2_moe")
    ids = _ids(batch=1)
    handle = nnsight_moe.attach(model)
    layer = handle.layout.moe_layers[0]
    separate = []
    for experts, mode in (([0], "zero"), ([1, 2], "zero")):
        with nnsight_moe.block_experts(model, {layer: experts}, mode=mode):
            separate.append(model(ids).logits)
    state = handle.states[layer]
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 0] = True
    mask[1, [1, 2]] = True
    state.zero = mask
    stacked = model(ids.repeat(2, 1)).logits
    state.exclude, state.zero = mask, None
    rerouted = capture_hooks(handle, lambda: model(ids.repeat(2, 1)))
    state.exclude = None
    torch.testing.assert_close(stacked, torch.cat(separate), atol=ATOL, rtol=0)
    chosen = rerouted[f"{handle.layout.layer(layer).path}.hook_topk_indices"]
    assert not (chosen[0] == 0).any() and not torch.isin(chosen[1], torch.tensor([1, 2])).any()
    state.zero = torch.zeros(3, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="per-row expert mask has 3 rows but the batch has 2"):
        model(ids.repeat(2, 1))
    handle.detach()


@torch.no_grad()
def test_editing_semantics():
    """Edited indices re-derive weights; edited acts/gates flow into the outputs."""
    model = tiny_model("qwen2_moe")
    ids = _ids()
    handle = nnsight_moe.attach(model)
    layer = handle.layout.layer(1)
    block = handle.block(1)
    rule = layer.routing

    def fixed_indices(indices, hook):
        return torch.zeros_like(indices) + torch.arange(indices.shape[-1])

    block.hook_topk_indices.add_hook(fixed_indices)
    block.hook_expert_acts.add_hook(lambda acts, hook: torch.cat([acts[..., :1, :] * 0, acts[..., 1:, :]], dim=-2))
    block.hook_shared_gate.add_hook(lambda gate, hook: torch.full_like(gate, 0.25))
    values = capture_hooks(handle, lambda: model(ids))
    get = lambda name: values[f"{layer.path}.{name}"]  # noqa: E731
    expected = rule.weights(get("hook_router_scores"), get("hook_topk_indices")).to(get("hook_topk_weights").dtype)
    assert torch.equal(get("hook_topk_indices")[0, 0], torch.tensor([0, 1]))
    torch.testing.assert_close(get("hook_topk_weights"), expected)
    assert torch.count_nonzero(get("hook_expert_out")[..., 0, :]) == 0, "zeroed acts give a zero output"
    torch.testing.assert_close(get("hook_shared_gate"), torch.full_like(get("hook_shared_gate"), 0.25))
    torch.testing.assert_close(
        get("hook_moe_out"), get("hook_routed_out") + 0.25 * get("hook_shared_out"), atol=ATOL, rtol=0
    )
    handle.detach()


def test_gradients_flow_through_hooks():
    model = tiny_model("mixtral")
    ids = _ids()
    handle = nnsight_moe.attach(model)
    saved = {}

    def keep(tensor, hook):
        tensor.retain_grad()
        saved[hook.name] = tensor
        return tensor

    point = handle.block(1).hook_expert_out
    point.add_hook(keep)
    model(ids).logits[:, -1].sum().backward()
    grad = saved[point.name].grad
    assert grad is not None and grad.shape == saved[point.name].shape and grad.abs().sum() > 0
    point.remove_hooks()
    handle.detach()
