"""ERNIE-4.5-MoE: softmax scores, selection-only bias, top-k, renorm by max(sum, norm_min), shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import ClampNormRouting


def ernie4_5_moe_routing(block, router, config) -> ClampNormRouting:
    """Choose on ``softmax + e_score_correction_bias``; weights are the renormalised softmax scores
    (float32 logits and arithmetic, cast to the hidden states' dtype)."""
    return ClampNormRouting(
        n_experts=router.num_experts,
        top_k=router.top_k,
        scoring="softmax",
        normalize=True,
        bias=router.moe_statics.e_score_correction_bias.squeeze(0),
        cast_weights="input",  # the router computes in float32 and casts the weights to the hidden states' dtype
        norm_min=float(router.norm_min),
    )


ERNIE4_5_MOE = Adapter(
    name="ernie4_5_moe", model_types=("ernie4_5_moe",), routing=ernie4_5_moe_routing, shared="shared_experts"
)
