"""DeepSeek-V3: sigmoid scores, selection-only correction bias, group-limited (top-2 sum) selection,
renormalised and scaled weights, shared experts, dense first layers."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import Routing


def deepseek_v3_routing(block, router, config) -> Routing:
    """The DeepSeek-V3 router (``noaux_tc``): choose on sigmoid + bias within the best groups."""
    return Routing(
        n_experts=router.num_experts,
        top_k=router.top_k,
        scoring="sigmoid",
        normalize=bool(router.norm_topk_prob),
        norm_eps=1e-20,
        scale=float(router.routed_scaling_factor),
        bias=router.e_score_correction_bias,
        n_group=router.num_group,
        topk_group=router.topk_group,
        sorted=False,
        group_score="top2sum",
    )


DEEPSEEK_V3 = Adapter(
    name="deepseek_v3", model_types=("deepseek_v3",), routing=deepseek_v3_routing, shared="shared_experts"
)
