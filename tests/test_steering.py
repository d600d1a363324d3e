"""Steering interventions (nnsight_moe.steering) against hand edits of the UNMODIFIED HF forward.

Oracle for expert edits: the router's logits are edited by hand where the router computes them (a
TorchFunctionMode intercepting the router's own ``F.linear``), and the family's own router code and the
rest of the HF forward run on them unchanged: the steered attached model must give the same logits.
Oracle for direction edits: a plain torch forward hook on the MoE block (or shared expert) projecting by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import nnsight_moe
from nnsight_moe import steering
from nnsight_moe.testing import tiny_model

# softmax top-k (+shared, no renorm) | sigmoid + selection bias, groups (top2sum), renorm, x2.5 | softmax top-k renorm |
# softmax over the selected logits, router bias | softmax top-k renorm, no shared
FAMILIES = ["qwen2_moe", "deepseek_v3", "mixtral", "gpt_oss", "olmoe"]
#: Families whose router transforms its linear's output before the scoring function.
POST_PROCESSED_LOGITS = ("laguna", "muse_spark")


class RouterLogitEdit(TorchFunctionMode):
    """Edit the output of each MoE router's own ``F.linear`` (its logits [b * p, E]) with ``fn(layer, logits [b, p, E])``."""

    def __init__(self, model, fn, shape):
        super().__init__()
        layout = nnsight_moe.layout(model)
        self.routers = {id(_router_weight(model.get_submodule(layout.layer(i).router), layout.layer(i).n_experts)): i
                        for i in layout.moe_layers}
        self.n_experts = {i: layout.layer(i).n_experts for i in layout.moe_layers}
        self.fn, self.shape = fn, shape
        # Routers that transform the linear's output before scoring it (Laguna's tanh softcap, Muse-Spark's
        # output multiplier) return the transformed logits as hook_router_logits: edit those, where the
        # scoring function (sigmoid) consumes them. ``self.pending`` follows the linear's output to there.
        self.at_scores = getattr(model.config, "model_type", "") in POST_PROCESSED_LOGITS
        self.pending = {}

    def _edit(self, layer, out):
        b, p = self.shape
        e = self.n_experts[layer]
        if out.shape[-1] > e:  # Inkling scores its shared experts with the same linear (last columns): routed only
            return torch.cat([self._edit(layer, out[..., :e]), out[..., e:]], dim=-1)
        return self.fn(layer, out.reshape(b, p, -1)).reshape(out.shape)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.at_scores and func in (torch.sigmoid, torch.Tensor.sigmoid) and id(args[0]) in self.pending:
            layer = self.pending[id(args[0])][1]
            self.pending = {}
            return func(self._edit(layer, args[0]), *args[1:], **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        if func is F.linear and len(args) > 1 and id(args[1]) in self.routers:
            if not self.at_scores:
                return self._edit(self.routers[id(args[1])], out)
            self.pending = {id(out): (out, self.routers[id(args[1])])}  # the tensors are kept: ids stay unique
        elif self.pending and isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor) \
                and id(args[0]) in self.pending:
            self.pending[id(out)] = (out, self.pending[id(args[0])][1])  # float(), /cap, tanh, *cap, *multiplier
        return out


def _router_weight(router, n_experts):
    """The router's logit matrix: its own ``weight``, else its linear's (``gate.weight``, ``wg.weight``; of a
    router MLP, the linear giving the ``n_experts`` logits: Zaya's ``router_mlp.out_proj``)."""
    if isinstance(getattr(router, "weight", None), torch.nn.Parameter):
        return router.weight
    linears = [m for m in router.modules() if isinstance(m, torch.nn.Linear)]
    return next((m.weight for m in linears if m.out_features == n_experts), linears[0].weight)


def _ids(b=3, p=6, seed=1):
    return torch.randint(4, 128, (b, p), generator=torch.Generator().manual_seed(seed))


def _force(on, off, margin, positions=None):
    """Hand edit: logit of each forced-on expert -> max + margin, forced-off -> min - margin."""
    def fn(layer, logits):
        new = logits.clone()
        top = logits.max(-1).values + margin
        bottom = logits.min(-1).values - margin
        for e in on.get(layer, []):
            new[..., e] = top
        for e in off.get(layer, []):
            new[..., e] = bottom
        if positions is not None:
            new = torch.where(positions[..., None], new, logits)
        return new
    return fn


def _selected(model, ids, layer):
    seen = {}
    with nnsight_moe.attached(model) as handle:
        point = handle.block(layer).hook_topk_indices
        point.add_hook(lambda t, hook: seen.__setitem__("i", t.clone()))
        try:
            model(ids)
        finally:
            point.remove_hooks()
    return seen["i"]


@pytest.mark.parametrize("family", FAMILIES)
def test_force_on_off_equals_hand_edited_router_logits(family):
    model = tiny_model(family)
    layout = nnsight_moe.layout(model)
    first, last = layout.moe_layers[0], layout.moe_layers[-1]
    ids = _ids()
    # an expert the routers rarely pick at `first`, so forcing it on changes the selection
    with torch.no_grad():
        base = model(ids).logits
        chosen = _selected(model, ids, first)
    counts = torch.bincount(chosen.reshape(-1), minlength=layout.n_experts)
    rare = int(counts.argmin())
    common = int(counts.argmax())
    on, off = {first: [rare]}, {last: [common], first: [common] if common != rare else []}
    with torch.no_grad(), RouterLogitEdit(model, _force(on, off, 0.5), ids.shape):
        expected = model(ids).logits
    with torch.no_grad(), steering.steer_experts(model, on=on, off=off, margin=0.5) as handle:
        got = model(ids).logits
        seen = {}
        handle.block(first).hook_topk_indices.add_hook(lambda t, hook: seen.__setitem__("i", t.clone()))
        model(ids)
        handle.block(first).hook_topk_indices.remove_hooks()
    assert nnsight_moe.handle_of(model) is None, "a model the context attached is detached after it"
    assert not torch.allclose(expected, base, atol=1e-4), "the edit must change the forward for the test to bite"
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    if family != "deepseek_v3":  # a top logit is always selected under plain top-k rules
        assert bool((seen["i"] == rare).any(-1).all()), "a forced-on expert is selected at every position"
    assert not bool((seen["i"] == common).any()), "a forced-off expert is never selected"


@pytest.mark.parametrize("family", nnsight_moe.supported_families())
def test_every_family_force_equals_hand_edit(family):
    """Every supported family's own router on hand-edited logits = the steering API (measured: bit-identical)."""
    model = tiny_model(family)
    layout = nnsight_moe.layout(model)
    ids = _ids()
    on, off = {layout.moe_layers[0]: [0]}, {layout.moe_layers[-1]: [1]}
    with torch.no_grad():
        base = model(ids).logits
        with RouterLogitEdit(model, _force(on, off, 0.5), ids.shape):
            expected = model(ids).logits
        with steering.steer_experts(model, on=on, off=off, margin=0.5):
            got = model(ids).logits
    assert not torch.allclose(expected, base, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_span_restricts_the_edit_to_positions(family):
    model = tiny_model(family)
    layout = nnsight_moe.layout(model)
    ids = _ids()
    on = {layout.moe_layers[0]: [3, 4]}
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[0, 2:4] = True
    mask[2, 5] = True
    with torch.no_grad(), RouterLogitEdit(model, _force(on, {}, 1.0, mask), ids.shape):
        expected = model(ids).logits
    for span in (mask, None):
        with torch.no_grad(), steering.steer_experts(model, on=on, span=span):
            got = model(ids).logits
        if span is not None:
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(got[1], model(ids).logits[1], atol=2e-5, rtol=1e-5)  # row 1 untouched
    # (start, stop) is the same as a mask of those columns
    cols = torch.zeros(ids.shape, dtype=torch.bool)
    cols[:, 1:3] = True
    with torch.no_grad(), RouterLogitEdit(model, _force(on, {}, 1.0, cols), ids.shape):
        expected = model(ids).logits
    with torch.no_grad(), steering.steer_experts(model, on=on, span=(1, 3)):
        torch.testing.assert_close(model(ids).logits, expected, atol=2e-5, rtol=1e-5)


def test_scale_gates_and_composition_with_block_experts():
    """scale = the hook_topk_weights edit by hand; a factor 0 = block_experts(mode="zero"); blocking composes."""
    model = tiny_model("qwen2_moe")
    ids = _ids()
    with torch.no_grad(), nnsight_moe.block_experts(model, {1: [2, 5]}, mode="zero"):
        blocked = model(ids).logits
    with torch.no_grad(), steering.steer_experts(model, scale={1: {2: 0.0, 5: 0}}):
        torch.testing.assert_close(model(ids).logits, blocked, atol=1e-6, rtol=0)
    factors = torch.ones(8)
    factors[3], factors[6] = 2.5, 0.5

    with torch.no_grad(), nnsight_moe.attached(model) as handle:
        point = handle.block(2).hook_topk_weights
        idx = {}
        handle.block(2).hook_topk_indices.add_hook(lambda t, hook: idx.__setitem__("i", t))
        point.add_hook(lambda w, hook: w * factors[idx["i"]])
        with nnsight_moe.block_experts(model, {0: [1]}, mode="renorm"):
            expected = model(ids).logits
        handle.block(2).hook_topk_indices.remove_hooks()
        point.remove_hooks()
        with nnsight_moe.block_experts(model, {0: [1]}, mode="renorm"), \
                steering.steer_experts(model, scale={2: {3: 2.5, 6: 0.5}}):
            got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # blocking a forced-on expert keeps its gate at zero (blocking applies to the steered routing)
    with torch.no_grad(), steering.steer_experts(model, on={1: [4]}), nnsight_moe.block_experts(model, {1: [4]}):
        seen = {}
        with nnsight_moe.attached(model) as handle:
            handle.block(1).hook_topk_weights.add_hook(lambda t, hook: seen.__setitem__("w", t.clone()))
            handle.block(1).hook_topk_indices.add_hook(lambda t, hook: seen.__setitem__("i", t.clone()))
            model(ids)
            handle.block(1).hook_topk_weights.remove_hooks()
            handle.block(1).hook_topk_indices.remove_hooks()
    assert bool((seen["i"] == 4).any(-1).all()) and float(seen["w"][seen["i"] == 4].abs().max()) == 0.0


@pytest.mark.parametrize("hook", ["hook_moe_out", "hook_shared_out", "hook_expert_out"])
@pytest.mark.parametrize("mode", ["remove", "add"])
def test_direction_edit_equals_projection_by_hand(hook, mode):
    model = tiny_model("qwen2_moe")
    layout = nnsight_moe.layout(model)
    ids = _ids()
    g = torch.Generator().manual_seed(3)
    directions = {i: torch.randn(64, generator=g) for i in layout.moe_layers}

    def by_hand(x, d):
        if mode == "remove":
            u = d / d.norm()
            return x - (x @ u)[..., None] * u
        return x + 0.7 * d

    handles = []
    for i in layout.moe_layers:
        info = layout.layer(i)
        if hook == "hook_moe_out":
            module = model.get_submodule(info.path)
            handles.append(module.register_forward_hook(lambda m, a, o, d=directions[i]: by_hand(o, d)))
        elif hook == "hook_shared_out":
            module = model.get_submodule(info.shared)
            handles.append(module.register_forward_hook(lambda m, a, o, d=directions[i]: by_hand(o, d)))
    if hook == "hook_expert_out":  # by hand: each selected expert's output (before its gate) projected
        expected = _expert_out_by_hand(model, layout, ids, directions, by_hand)
    else:
        with torch.no_grad():
            expected = model(ids).logits
    for h in handles:
        h.remove()
    with torch.no_grad(), steering.steer_direction(model, directions, hook=hook, mode=mode, alpha=0.7):
        got = model(ids).logits
    base = model(ids).logits
    assert not torch.allclose(expected, base, atol=1e-4)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def _expert_out_by_hand(model, layout, ids, directions, by_hand):
    """Replace each routed experts module by gate-weighted sum of projected per-expert outputs (naive loop)."""
    from helpers import naive_expert

    handles = []
    for i in layout.moe_layers:
        experts = model.get_submodule(layout.layer(i).experts)

        def forward(module, args, output, d=directions[i], experts=experts):
            x, index, weights = args
            out = torch.zeros_like(x)
            for slot in range(index.shape[1]):
                for e in index[:, slot].unique().tolist():
                    rows = index[:, slot] == e
                    _, y = naive_expert(experts, x[rows], e)
                    out[rows] += weights[rows, slot, None] * by_hand(y, d)
            return out

        handles.append(experts.register_forward_hook(forward))
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in handles:
            h.remove()


def test_generated_span_in_generate_equals_hand_edit_of_later_steps():
    """span="generated": the prompt's positions but its last are unsteered, later steps all steered."""
    model = tiny_model("qwen2_moe")
    ids = _ids(2, 5)
    on = {1: [6]}
    p = steering.plan(model, on=on, span="generated")
    steered = steering.generate(model, {"input_ids": ids}, p, max_new_tokens=4)
    plain = steering.generate(model, {"input_ids": ids}, None, max_new_tokens=4)
    # oracle: full forwards (no cache) of the steered sequence, with the hand edit on positions >= 4
    full = steered
    mask = torch.zeros(full.shape, dtype=torch.bool)
    mask[:, 4:] = True
    with torch.no_grad(), RouterLogitEdit(model, _force(on, {}, 1.0, mask), full.shape):
        logits = model(full).logits
    assert torch.equal(logits[:, 4:-1].argmax(-1), full[:, 5:]), "each generated token is the hand-edited argmax"
    assert not torch.equal(steered, plain), "steering changes what is generated"
    assert torch.equal(steered[:, :5], ids)
    # absolute spans in generate: positions 6.. only (the cache length gives each step's offset)
    p = steering.plan(model, on=on, span=(6, None))
    late = steering.generate(model, {"input_ids": ids}, p, max_new_tokens=4)
    mask = torch.zeros(late.shape, dtype=torch.bool)
    mask[:, 6:] = True
    with torch.no_grad(), RouterLogitEdit(model, _force(on, {}, 1.0, mask), late.shape):
        logits = model(late).logits
    assert torch.equal(logits[:, 4:-1].argmax(-1), late[:, 5:])
    assert not torch.equal(late, steered) and torch.equal(late[:, :7], plain[:, :7])


def test_transformerlens_bridge_equals_hf_steering():
    from transformer_lens.model_bridge import TransformerBridge  # noqa: F401

    from helpers import word_tokenizer

    model = tiny_model("qwen2_moe")
    ids = _ids()
    with torch.no_grad(), steering.steer_experts(model, on={1: [0]}, off={2: [3]}):
        expected = model(ids).logits
    bridge = nnsight_moe.tl.boot(model, tokenizer=word_tokenizer())
    with torch.no_grad(), steering.steer_experts(bridge, on={1: [0]}, off={2: [3]}):
        got = bridge(ids, return_type="logits")
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "inkling_text", "zaya"])  # + router gammas, skip expert
def test_nnsight_local_and_remote_local_equal_hooks(family):
    """The plan in an nnsight trace on the unmodified model (remote="local" and no remote) = the hooks."""
    import nnsight

    from helpers import language_model

    model = tiny_model(family)
    layout = nnsight_moe.layout(model)
    ids = _ids()
    first, last = layout.moe_layers[0], layout.moe_layers[-1]
    d = torch.randn(64, generator=torch.Generator().manual_seed(2))
    p = steering.plan(model, on={first: [1]}, off={last: [2]}, scale={last: {5: 3.0}}, directions={first: d},
                      span=(2, None), mode="remove")
    with torch.no_grad(), steering.steer(model, p), nnsight_moe.block_experts(model, {last: [4]}, mode="renorm"):
        expected = model(ids).logits
    lm = language_model(model)
    view = nnsight_moe.remote.MoEView(lm)
    for remote in (None, "local"):
        with lm.trace(ids, **({"remote": remote} if remote else {})):
            steering.apply_in_trace(view, lm, p, block={last: [4]}, mode="renorm")
            got = nnsight.save(lm.output.logits)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    assert nnsight_moe.handle_of(model) is None


def test_generate_remote_local_equals_local():
    from helpers import language_model

    model = tiny_model("qwen2_moe")
    lm = language_model(model)
    ids = _ids(2, 5)
    for span in (None, "generated"):
        p = steering.plan(model, on={1: [6]}, off={2: [0]}, span=span)
        local = steering.generate(model, {"input_ids": ids}, p, max_new_tokens=4)
        remote = steering.generate(lm, {"input_ids": ids}, p, max_new_tokens=4, remote="local")
        assert torch.equal(remote, local)
    p = steering.plan(model, on={1: [6]}, span="generated")  # with blocking, either path
    local = steering.generate(model, {"input_ids": ids}, p, max_new_tokens=4, block={2: [5, 1]}, mode="renorm")
    remote = steering.generate(lm, {"input_ids": ids}, p, max_new_tokens=4, block={2: [5, 1]}, mode="renorm",
                               remote="local")
    assert torch.equal(remote, local)
    assert not torch.equal(local, steering.generate(model, {"input_ids": ids}, p, max_new_tokens=4))


def test_plan_errors_name_the_bad_input():
    model = tiny_model("qwen2_moe")
    with pytest.raises(ValueError, match="both forced on and off"):
        steering.plan(model, on={1: [2]}, off={1: [2]})
    with pytest.raises(ValueError, match="hook must be one of"):
        steering.plan(model, directions=torch.ones(64), hook="hook_router_logits")
    with pytest.raises(ValueError, match="d_model is 64"):
        steering.plan(model, directions={1: torch.ones(3)})
    with pytest.raises(ValueError, match="margin"):
        steering.plan(model, on={1: [2]}, margin=0)
    with pytest.raises(ValueError, match="span"):
        steering.plan(model, on={1: [2]}, span="prompt")
    with pytest.raises(IndexError, match="expert 99 is out of range for layer 1"):
        steering.plan(model, on={1: [99]})
    with pytest.raises(TypeError, match="scale\\[1\\] must be a mapping"):
        steering.plan(model, scale={1: [2.0]})


def test_nnsight_generate_on_the_attached_model_under_steer():
    """nnsight's own generate on an attached LanguageModel inside steer() = steered HF generate."""
    import nnsight

    from helpers import language_model

    model = tiny_model("qwen2_moe")
    lm = language_model(model)
    ids = _ids(2, 5)
    p = steering.plan(model, on={1: [6]}, off={2: [0]}, span="generated")
    expected = steering.generate(model, {"input_ids": ids}, p, max_new_tokens=4)
    with steering.steer(lm, p):
        with lm.generate({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, max_new_tokens=4,
                         do_sample=False, pad_token_id=0) as tracer:
            out = nnsight.save(tracer.result)
    assert torch.equal(out, expected)
    assert not torch.equal(expected, steering.generate(model, {"input_ids": ids}, None, max_new_tokens=4))


def test_transformerlens_run_with_hooks_sees_the_steered_routing():
    from helpers import word_tokenizer

    model = tiny_model("qwen2_moe")
    bridge = nnsight_moe.tl.boot(model, tokenizer=word_tokenizer())
    ids = _ids()
    seen = {}
    with steering.steer_experts(bridge, on={1: [5]}):
        bridge.run_with_hooks(ids, fwd_hooks=[("blocks.1.mlp.hook_topk_indices",
                                                lambda t, hook: seen.__setitem__("i", t.clone()))])
    assert bool((seen["i"] == 5).any(-1).all())


def test_stacked_plans_equal_each_plan_alone_locally_and_in_a_trace():
    """stack(plans, b) on a batch repeated len(plans) times = each plan on its own copy (hooks and remote view)."""
    import nnsight

    from helpers import language_model

    model = tiny_model("qwen2_moe")
    ids = _ids(2, 5)
    g = torch.Generator().manual_seed(4)
    d = {1: torch.randn(64, generator=g), 2: torch.randn(64, generator=g)}
    plans = [steering.plan(model, span=(1, None)),
             steering.plan(model, on={1: [6]}, off={2: [0, 3]}, margin=0.3, span=(1, None)),
             steering.plan(model, scale={0: {2: 3.0}}, directions={1: d[1]}, span=(1, None)),
             steering.plan(model, on={0: [1]}, directions=d, margin=2.0, span=(1, None))]
    alone = []
    for p in plans:
        with torch.no_grad(), steering.steer(model, p):
            alone.append(model(ids).logits)
    expected = torch.cat(alone)
    stacked = steering.stack(plans, ids.shape[0])
    with torch.no_grad(), steering.steer(model, stacked):
        torch.testing.assert_close(model(ids.repeat(len(plans), 1)).logits, expected, atol=2e-5, rtol=1e-5)
    lm = language_model(model)
    view = nnsight_moe.remote.MoEView(lm)
    with lm.trace(ids.repeat(len(plans), 1), remote="local"):
        steering.apply_in_trace(view, lm, stacked)
        got = nnsight.save(lm.output.logits)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="same span"):
        steering.stack([plans[1], steering.plan(model, on={1: [2]})], 2)
    mask = torch.zeros(ids.shape, dtype=torch.bool)  # a mask span is copied per condition
    mask[0, 3] = mask[1, 1] = True
    masked = [steering.plan(model, on={1: [2]}, span=mask), steering.plan(model, off={2: [3]}, span=mask)]
    alone = []
    for p in masked:
        with torch.no_grad(), steering.steer(model, p):
            alone.append(model(ids).logits)
    with torch.no_grad(), steering.steer(model, steering.stack(masked, ids.shape[0])):
        torch.testing.assert_close(model(ids.repeat(2, 1)).logits, torch.cat(alone), atol=2e-5, rtol=1e-5)
