"""Hunyuan-A13B (HunYuan MoE V1): softmax top-k, always renormalised, plus an ungated shared MLP."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import Routing


def hunyuan_v1_moe_routing(block, router, config) -> Routing:
    """Softmax over the float32 router logits, top-k, renormalised, cast to the logits' dtype."""
    return Routing(
        n_experts=router.num_experts, top_k=router.top_k, scoring="softmax", normalize=True, cast_weights=True
    )


HUNYUAN_V1_MOE = Adapter(
    name="hunyuan_v1_moe", model_types=("hunyuan_v1_moe",), routing=hunyuan_v1_moe_routing, shared="shared_mlp"
)
