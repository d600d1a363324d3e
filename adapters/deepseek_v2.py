"""DeepSeek-V2: softmax scores, greedy or group-limited (group max) top-k, scaled, shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import Routing


def deepseek_v2_routing(block, router, config) -> Routing:
    """``topk_method`` "greedy" or "group_limited_greedy"; weights are scores x ``routed_scaling_factor``."""
    grouped = router.topk_method == "group_limited_greedy"
    return Routing(
        n_experts=router.num_experts,
        top_k=router.top_k,
        scoring="softmax",
        scale=float(router.routed_scaling_factor),
        n_group=router.num_group if grouped else 1,
        topk_group=router.topk_group if grouped else 1,
        sorted=False,
        group_score="max",
    )


DEEPSEEK_V2 = Adapter(
    name="deepseek_v2", model_types=("deepseek_v2",), routing=deepseek_v2_routing, shared="shared_experts"
)
