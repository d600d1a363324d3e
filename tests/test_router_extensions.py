"""Routers beyond (logits, weights, indices): Inkling's shared-expert gammas and Zaya's skip expert.

Oracles are the unmodified HF model: its router's own outputs (the gammas it returns, the slots it masks
for the skip expert), copies with weights zeroed, and copies whose selection-only bias excludes an expert
(``-inf``), which is what ``reroute`` means; the shared experts are recomputed from their weights.
"""

from __future__ import annotations

import copy

import nnsight
import pytest
import torch

import nnsight_moe
from nnsight_moe.remote import MoEView
from nnsight_moe.testing import tiny_model

from helpers import capture_blocks, capture_hooks, capture_routers, language_model

ATOL = 1e-5


def _ids(batch=2, pos=7, seed=0):
    return torch.randint(3, 128, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _router_outputs(model, ids):
    """{layer: the router's full output tuple} of an UNATTACHED model."""
    layout = nnsight_moe.layout(model)
    seen, handles = {}, []
    for index in layout.moe_layers:
        router = model.get_submodule(layout.layer(index).router)
        handles.append(router.register_forward_hook(
            lambda m, a, out, index=index: seen.__setitem__(index, tuple(t.detach().clone() for t in out))))
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def _excluded(model, layer, expert, bias):
    """A copy whose router never chooses ``expert`` at ``layer``: its selection-only ``bias`` there set to -inf."""
    clone = copy.deepcopy(model)
    path = nnsight_moe.layout(model).layer(layer).router
    with torch.no_grad():
        getattr(clone.get_submodule(path), bias)[expert] = float("-inf")
    return clone


# ---------------------------------------------------------------------------------------------- Inkling
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_inkling_gammas_are_the_routers_and_normalised_with_the_weights(dtype):
    model = tiny_model("inkling_text", dtype=dtype)
    ids = _ids()
    layout = nnsight_moe.layout(model)
    routers = _router_outputs(model, ids)
    blocks = capture_blocks(model, layout, lambda: model(ids))
    with nnsight_moe.attached(model) as handle:
        values = capture_hooks(handle, lambda: model(ids))
    for index in layout.moe_layers:
        info = layout.layer(index)
        get = lambda name: values[f"{info.path}.{name}"]  # noqa: E731
        router = model.get_submodule(info.router)
        assert info.shared_gammas == 2 and "hook_shared_gammas" in info.hook_names
        gammas = get("hook_shared_gammas")
        assert gammas.shape == (2, 7, 2) and gammas.dtype == dtype
        assert torch.equal(gammas.reshape(-1, 2), routers[index][3]), "the gammas the router hands the shared experts"
        assert torch.equal(get("hook_topk_weights").reshape(-1, 2), routers[index][1])
        # one normalisation over the k routed and S shared sigmoids, times route_scale * global_scale
        total = get("hook_topk_weights").float().sum(-1) + gammas.float().sum(-1)
        scale = float(router.route_scale) * float(router.global_scale)
        torch.testing.assert_close(total, torch.full_like(total, scale), atol=1e-5 if dtype == torch.float32 else 0.1,
                                   rtol=0)
        if dtype != torch.float32:
            continue
        # the shared experts from their weights: acts before the gamma, output = sum_s down_s(gamma_s * acts_s)
        shared = model.get_submodule(info.shared)
        x = blocks[index][0].reshape(-1, info.d_model)
        d = shared.down_proj.shape[-1]
        out = torch.zeros_like(x)
        for s in range(2):
            acts = shared.act_fn(x @ shared.gate_proj[s].T) * (x @ shared.up_proj[s].T)
            torch.testing.assert_close(get("hook_shared_acts").reshape(-1, 2 * d)[:, s * d:(s + 1) * d], acts,
                                       atol=ATOL, rtol=0)
            out = out + (gammas.reshape(-1, 2)[:, s : s + 1] * acts) @ shared.down_proj[s].T
        torch.testing.assert_close(get("hook_shared_out").reshape(-1, info.d_model), out, atol=ATOL, rtol=0)
        assert torch.equal(get("hook_shared_gate"), torch.ones_like(get("hook_shared_gate")))


@torch.no_grad()
def test_inkling_gamma_edits_and_shared_ablation_equal_zeroed_shared_experts():
    model = tiny_model("inkling_text")
    ids = _ids()
    layout = nnsight_moe.layout(model)
    zeroed = copy.deepcopy(model)
    for index in layout.moe_layers:
        zeroed.get_submodule(layout.layer(index).shared).down_proj.zero_()
    reference = zeroed(ids).logits
    with nnsight_moe.ablate_shared(model):
        ablated = model(ids).logits
    torch.testing.assert_close(ablated, reference, atol=ATOL, rtol=0)
    with nnsight_moe.attached(model) as handle:
        for index in layout.moe_layers:
            handle.block(index).hook_shared_gammas.add_hook(lambda g, hook: torch.zeros_like(g))
        no_gammas = model(ids).logits
        for index in layout.moe_layers:
            handle.block(index).hook_shared_gammas.remove_hooks()
        assert not torch.allclose(model(ids).logits, reference, atol=1e-3), "the shared experts matter"
        point = handle.block(layout.moe_layers[0]).hook_shared_gammas
        point.add_hook(lambda g, hook: g[..., :1])
        with pytest.raises(ValueError, match=r"hook_shared_gammas must be a tensor of shape \[2, 7, 2\] "
                                             r"\(\[batch, pos, shared experts\]\)"):
            model(ids)
        point.remove_hooks()
    torch.testing.assert_close(no_gammas, reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_inkling_reroute_equals_excluding_bias_and_rederives_the_gammas(dtype):
    """Rerouting renormalises the new selection with the shared experts: weights and gammas equal the HF router
    whose selection bias excludes the expert, bit for bit."""
    model = tiny_model("inkling_text", dtype=dtype)
    ids = _ids()
    layout = nnsight_moe.layout(model)
    layer = layout.moe_layers[0]
    clean = _router_outputs(model, ids)[layer]
    expert = int(clean[2].reshape(-1).mode().values)  # the most chosen expert: rerouting it changes much
    oracle = _excluded(model, layer, expert, "e_score_correction_bias")
    expected, routers = oracle(ids).logits, _router_outputs(oracle, ids)[layer]
    with nnsight_moe.attached(model) as handle, nnsight_moe.block_experts(model, {layer: [expert]}, mode="reroute"):
        out = {}
        values = capture_hooks(handle, lambda: out.__setitem__("logits", model(ids).logits))
    path = layout.layer(layer).path
    assert not (values[f"{path}.hook_topk_indices"] == expert).any()
    assert torch.equal(values[f"{path}.hook_topk_indices"].reshape(-1, 2), routers[2])
    assert torch.equal(values[f"{path}.hook_topk_weights"].reshape(-1, 2), routers[1])
    assert torch.equal(values[f"{path}.hook_shared_gammas"].reshape(-1, 2), routers[3])
    assert not torch.equal(routers[3], clean[3]), "the gammas follow the new selection"
    assert torch.equal(out["logits"], expected)


@pytest.mark.parametrize("options", [{"shared": False}, {"keep_top": 1}, {"keep_top": 0, "shared": True},
                                     {"block": [2, 5], "mode": "zero"}, {"block": [2, 5], "mode": "renorm"},
                                     {"edit_logits": "force"}])
@torch.no_grad()
def test_inkling_remote_view_equals_hooks(options):
    hf = tiny_model("inkling_text")
    ids = _ids(pos=5)
    layout = nnsight_moe.layout(hf)
    options = dict(options)
    local = {"shared": lambda m: nnsight_moe.ablate_shared(m),
             "keep_top": lambda m: nnsight_moe.restrict_experts(m, options["keep_top"]),
             "block": lambda m: nnsight_moe.block_experts(m, {i: options["block"] for i in layout.moe_layers},
                                                          mode=options["mode"])}
    if options.get("edit_logits"):  # expert 0 forced on: scores, selection, weights and gammas re-derived
        force = lambda logits: logits.index_fill(-1, torch.tensor([0]), 30.0)  # noqa: E731
        options["edit_logits"] = force
        reference = copy.deepcopy(hf)
        handle = nnsight_moe.attach(reference)
        for index in layout.moe_layers:
            handle.block(index).hook_router_logits.add_hook(lambda t, hook: force(t), is_permanent=True)
        edit = None
    else:
        reference = copy.deepcopy(hf)
        handle = nnsight_moe.attach(reference)
        edit = local["block" if "block" in options else "keep_top" if "keep_top" in options else "shared"](reference)
    out = {}
    if edit is None:
        values = capture_hooks(handle, lambda: out.__setitem__("logits", reference(ids).logits))
    else:
        with edit:
            values = capture_hooks(handle, lambda: out.__setitem__("logits", reference(ids).logits))
    lm = language_model(hf)
    view = MoEView(lm)
    with lm.trace(ids, remote="local"):
        views = nnsight.save({i: view.layer(i, **options) for i in view.moe_layers})
        logits = lm.output.logits.save()
    for index, quantities in views.items():
        path = layout.layer(index).path
        assert set(quantities) == {name[5:] for name in layout.layer(index).hook_names}
        for name, value in quantities.items():
            torch.testing.assert_close(value, values[f"{path}.hook_{name}"], atol=ATOL, rtol=0, msg=name)
    torch.testing.assert_close(logits, out["logits"], atol=ATOL, rtol=0)
    assert not torch.allclose(logits, hf(ids).logits, atol=1e-4), "the edit changed the forward"


# ---------------------------------------------------------------------------------------------- Zaya
@torch.no_grad()
def test_zaya_skip_slots_compute_nothing_and_the_router_state_passes_unchanged():
    model = tiny_model("zaya")
    ids = _ids()
    layout = nnsight_moe.layout(model)
    routers = _router_outputs(model, ids)
    skip = layout.layer(0).n_experts - 1
    states = {}

    def keep_states(run):
        handles = [model.get_submodule(layout.layer(i).path).register_forward_hook(
            lambda m, a, out, i=i: states.setdefault(run, {}).__setitem__(i, out[1].clone())) for i in layout.moe_layers]
        return handles

    handles = keep_states("hf")
    model(ids)
    with nnsight_moe.attached(model) as handle:
        values = capture_hooks(handle, lambda: model(ids))
        for h in keep_states("attached"):
            handles.append(h)
        model(ids)
    for h in handles:
        h.remove()
    chosen = torch.cat([values[f"{layout.layer(i).path}.hook_topk_indices"] for i in layout.moe_layers])
    assert (chosen == skip).any() and (chosen != skip).any(), "the tiny model skips at some tokens, not all"
    for index in layout.moe_layers:
        path = layout.layer(index).path
        get = lambda name: values[f"{path}.{name}"]  # noqa: E731
        hit = get("hook_topk_indices") == skip
        # the router's own masking: a skip slot is handed on as (expert 0, weight 0)
        assert torch.equal(hit.reshape(-1, 1), (routers[index][1] == 0) & (routers[index][2] == 0))
        assert not get("hook_topk_weights")[hit].any() and not get("hook_expert_out")[hit].any()
        assert not get("hook_expert_acts")[hit].any()
        assert not get("hook_moe_out")[hit[..., 0]].any()
        assert torch.equal(states["attached"][index], states["hf"][index]), "cross-layer router state unchanged"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_zaya_blocking_the_skip_expert(dtype):
    """Blocking the skip expert with zero / renorm changes nothing (its slots carry no output); reroute makes the
    next-best real expert compute, as the HF router whose balancing bias excludes the skip expert."""
    model = tiny_model("zaya", dtype=dtype)
    ids = _ids()
    layout = nnsight_moe.layout(model)
    skip = layout.layer(0).n_experts - 1
    ref = model(ids).logits
    layers = layout.moe_layers
    for mode in ("zero", "renorm"):
        with nnsight_moe.block_experts(model, {i: [skip] for i in layers}, mode=mode):
            assert torch.equal(model(ids).logits, ref)
    oracle = copy.deepcopy(model)
    for index in layers:
        oracle.get_submodule(layout.layer(index).router).balancing_biases[skip] = float("-inf")
    expected = oracle(ids).logits
    assert not torch.allclose(expected.float(), ref.float(), atol=1e-3)
    with nnsight_moe.attached(model) as handle, nnsight_moe.block_experts(model, {i: [skip] for i in layers},
                                                                          mode="reroute"):
        out = {}
        values = capture_hooks(handle, lambda: out.__setitem__("logits", model(ids).logits))
    assert torch.equal(out["logits"], expected)
    assert not any((values[f"{layout.layer(i).path}.hook_topk_indices"] == skip).any() for i in layers)


@torch.no_grad()
def test_zaya_reroute_equals_excluding_bias_and_forcing_the_skip_expert_zeroes_the_block():
    model = tiny_model("zaya")
    ids = _ids()
    layout = nnsight_moe.layout(model)
    layer = layout.moe_layers[-1]
    chosen = _router_outputs(model, ids)[layer][2]
    expert = int(chosen.reshape(-1).mode().values)
    expected = _excluded(model, layer, expert, "balancing_biases")(ids).logits
    with nnsight_moe.block_experts(model, {layer: [expert]}, mode="reroute"):
        torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)
    skip = layout.layer(layer).n_experts - 1
    with nnsight_moe.attached(model) as handle:
        handle.block(layer).hook_router_logits.add_hook(lambda t, hook: t.index_fill(-1, torch.tensor([skip]), 50.0))
        values = capture_hooks(handle, lambda: model(ids))
    path = layout.layer(layer).path
    assert (values[f"{path}.hook_topk_indices"] == skip).all()
    assert not values[f"{path}.hook_moe_out"].any(), "every token skips: the block adds nothing"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocked, mode", [("skip", "reroute"), ("skip", "zero"), ("real", "renorm"), ("real", "reroute")])
@torch.no_grad()
def test_zaya_remote_view_equals_hooks(dtype, blocked, mode):
    hf = tiny_model("zaya", dtype=dtype)
    ids = _ids(pos=5)
    layout = nnsight_moe.layout(hf)
    experts = [layout.layer(0).n_experts - 1] if blocked == "skip" else [0, 1, 3]
    block = {i: experts for i in layout.moe_layers}
    reference = copy.deepcopy(hf)
    out = {}
    with nnsight_moe.attached(reference) as handle, nnsight_moe.block_experts(reference, block, mode=mode):
        values = capture_hooks(handle, lambda: out.__setitem__("logits", reference(ids).logits))
    lm = nnsight.NNsight(hf)
    view = MoEView(lm)
    with lm.trace(ids, remote="local"):
        views = nnsight.save({i: view.layer(i, block=block[i], mode=mode) for i in view.moe_layers})
        logits = lm.output.logits.save()
    for index, quantities in views.items():
        path = layout.layer(index).path
        for name, value in quantities.items():
            expected = values[f"{path}.hook_{name}"]
            assert value.dtype == expected.dtype and torch.equal(value, expected), f"layer {index} {name}"
    assert torch.equal(logits, out["logits"])


# ---------------------------------------------------------------------------------------------- both
@pytest.mark.parametrize("family", ["inkling_text", "zaya"])
@torch.no_grad()
def test_routing_check_passes(family):
    """`nnsight-moe check` on both: the router's own selection (Zaya's skip slots given their id back), every
    identity, bit-identical logits in float16."""
    from nnsight_moe.check import check_routing

    model = tiny_model(family, dtype=torch.float16)
    report = check_routing(model, _ids(seed=1))
    assert report.ok, report.failures()
    assert report.max_dlogit == 0.0 and all(layer.router_indices_equal for layer in report.layers)


@torch.no_grad()
def test_inkling_configurations_equal_zeroed_copies():
    """The blocking recipe's Table-2 configurations: 'shared only' = every routed down_proj zeroed, 'shared
    ablation' = the shared experts' down projections zeroed (gammas included, nothing else changes)."""
    from nnsight_moe.recipes import blocking
    from nnsight_moe.recipes.metrics import target_ranks

    model = tiny_model("inkling_text")
    layout = nnsight_moe.layout(model)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (int(n),), generator=g).tolist() for n in torch.randint(3, 8, (8,), generator=g)]
    targets = torch.tensor([int(model(torch.tensor([p])).logits[0, -1].argmax()) if i % 2 else 5
                            for i, p in enumerate(prompts)])
    result = blocking.configurations(model, (prompts, targets, ["r1"] * 4 + ["r2"] * 4), batch_size=4, progress=False)
    table = result.table("mrr")

    def mrr(zero):
        clone = copy.deepcopy(model)
        for index in layout.moe_layers:
            clone.get_submodule(layout.layer(index).experts if zero == "routed" else layout.layer(index).shared
                                ).down_proj.zero_()
        logits = torch.stack([clone(torch.tensor([p])).logits[0, -1] for p in prompts])
        return float((1 / target_ranks(logits, targets).double()).mean())

    assert table.loc["all", "shared only"] == pytest.approx(mrr("routed"), abs=1e-12)
    assert table.loc["all", "shared ablation (routed top-2 only)"] == pytest.approx(mrr("shared"), abs=1e-12)
    assert table.loc["all", "shared only"] != table.loc["all", "shared + top-2 (default)"]


@pytest.mark.parametrize("family, message", [
    ("zaya", "residual stream is not h \\+ attn \\+ mlp"),  # ZayaResidualScaling around every sub-layer
    ("inkling_text", "frozen final projection"),  # the muP divide before the unembedding (and short convolutions)
])
def test_attribution_refuses_with_a_clear_error(family, message):
    from nnsight_moe.recipes import attribution

    model = tiny_model(family)
    with pytest.raises(ValueError, match=message):
        attribution.attribute(model, [[5, 9, 17, 33], [7, 8, 9, 10]], [3, 4], progress=False, batch_size=2)
