"""LFM2-MoE: sigmoid scores, optional selection-only bias (the block's ``expert_bias``), optional renorm (eps 1e-6), scaled; dense first layers."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import Routing


def lfm2_moe_routing(block, router, config) -> Routing:
    """Choose on ``sigmoid(logits) (+ expert_bias)``; weights in the logits' dtype, renorm + 1e-6, x scale."""
    return Routing(
        n_experts=router.num_experts,
        top_k=router.top_k,
        scoring="sigmoid",
        normalize=bool(router.norm_topk_prob),
        norm_eps=1e-6,
        scale=float(router.routed_scaling_factor),
        bias=block.expert_bias if router.use_expert_bias else None,
        cast_weights=True,
        precision="scores",  # choice, sigmoid, renorm and scale all run in the logits' dtype
    )


LFM2_MOE = Adapter(name="lfm2_moe", model_types=("lfm2_moe",), routing=lfm2_moe_routing)
