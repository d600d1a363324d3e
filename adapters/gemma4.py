"""Gemma-4: softmax over all experts, top-k, renormalised, times a learned per-expert scale; router and experts on the decoder layer beside a dense MLP.

Gemma-4 has no MoE block module: a decoder layer with ``enable_moe_block`` holds the ``router`` and the
fused ``experts`` itself and runs them in parallel with its dense ``mlp``::

    dense = post_feedforward_layernorm_1(mlp(pre_feedforward_layernorm(h)))
    moe   = post_feedforward_layernorm_2(experts(pre_feedforward_layernorm_2(h), router(h)))
    h     = h + post_feedforward_layernorm(dense + moe)

So the decoder layer is the block (the hook points are its submodules, ``model.layers.L.hook_*``) and
``hook_moe_out`` is the experts' output, the routed sum *before* ``post_feedforward_layernorm_2`` (the
normalised sum is no linear function of the experts' outputs): ``hook_moe_out = hook_routed_out``. The
dense MLP is not a shared expert (its own input and output norms, summed after both are normalised): it is
the layer's dense MLP, seen through the usual module hooks. The router returns its softmax probabilities,
not its logits: ``hook_router_logits`` is ``router.proj``'s output (after the router's scale-free RMS norm
and learned input scale).
"""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import Routing


def gemma4_routing(block, router, config) -> Routing:
    """Float32 softmax, sorted top-k, ``w / w.sum()``, then ``* per_expert_scale[indices]`` (float32)."""
    return Routing(
        n_experts=router.proj.out_features,
        top_k=int(router.config.top_k_experts),
        scoring="softmax",
        normalize=True,
        expert_scale=router.per_expert_scale,
    )


GEMMA4 = Adapter(
    name="gemma4",
    model_types=("gemma4", "gemma4_text"),
    routing=gemma4_routing,
    router="router",
    router_logits="proj",
    moe_out="experts",
)
