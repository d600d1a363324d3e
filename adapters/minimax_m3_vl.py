"""MiniMax-M3 (VL): sigmoid scores, selection-only bias, renormalised float32 weights; the block scales the routed sum; ungated shared expert.

``MiniMaxM3VLSparseMoeBlock`` multiplies the routed sum by ``routed_scaling_factor`` before adding the
shared expert (a fused ``gate_up_proj`` clamped-SwiGLU MLP, run before the router):
``hook_moe_out = routed_scale * hook_routed_out + hook_shared_out``.
"""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import Routing


def minimax_m3_routing(block, router, config) -> Routing:
    """``topk(sigmoid + e_score_correction_bias)`` (unsorted); weights renormalised, float32."""
    return Routing(
        n_experts=router.num_experts,
        top_k=router.top_k,
        scoring="sigmoid",
        normalize=True,
        bias=router.e_score_correction_bias,
        sorted=False,
    )


MINIMAX_M3_VL = Adapter(name="minimax_m3_vl", model_types=("minimax_m3_vl", "minimax_m3_vl_text"),
                        routing=minimax_m3_routing, shared="shared_experts", routed_scale="routed_scaling_factor")
