"""Beam: DeepSeek-V3-style routing (sigmoid, selection bias, grouped top-2-sum, renorm eps 1e-20); the block scales the routed sum.

The router returns renormalised weights without ``routed_scaling_factor``; ``BeamMoE`` multiplies the
experts' summed output by it, so ``hook_moe_out = routed_scale * hook_routed_out``
(:attr:`~nnsight_moe.layout.LayerLayout.routed_scale`) and ``hook_topk_weights`` are the router's own.
"""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import Routing


def beam_routing(block, router, config) -> Routing:
    """``sigmoid + e_score_correction_bias`` within the best groups (sorted top-k); weights float32, no scale."""
    return Routing(
        n_experts=router.num_experts,
        top_k=router.top_k,
        scoring="sigmoid",
        normalize=bool(router.norm_topk_prob),
        norm_eps=1e-20,
        bias=router.e_score_correction_bias,
        n_group=router.num_group,
        topk_group=router.topk_group,
        group_score="top2sum",
    )


BEAM = Adapter(name="beam", model_types=("beam",), routing=beam_routing, routed_scale="routed_scaling_factor")
