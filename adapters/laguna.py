"""Laguna: sigmoid scores of the (optionally tanh-softcapped) logits, selection bias, renormalised; the block scales the routed sum; ungated shared expert.

``hook_router_logits`` are the logits the router returns, after its softcapping. ``LagunaSparseMoeBlock``
multiplies the routed sum by ``moe_routed_scaling_factor`` before adding the shared expert:
``hook_moe_out = routed_scale * hook_routed_out + hook_shared_out``.
"""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import Routing


def laguna_routing(block, router, config) -> Routing:
    """``topk(sigmoid + e_score_correction_bias)``; weights renormalised (no eps), cast to the hidden states' dtype."""
    return Routing(
        n_experts=router.num_experts,
        top_k=router.top_k,
        scoring="sigmoid",
        normalize=True,
        bias=router.e_score_correction_bias,
        cast_weights="input",
    )


LAGUNA = Adapter(name="laguna", model_types=("laguna",), routing=laguna_routing, shared="shared_experts",
                 routed_scale="routed_scaling_factor")
