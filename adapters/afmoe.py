"""AFMoE: sigmoid scores, selection-only bias (the block's ``expert_bias``), renormalised (eps 1e-20) and
scaled (``route_scale``) weights, shared experts, dense first layers."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import Routing


def afmoe_routing(block, router, config) -> Routing:
    """Choose on ``sigmoid + expert_bias`` (the block passes its bias to the router); renorm, scale."""
    return Routing(
        n_experts=router.num_experts,
        top_k=router.top_k,
        scoring="sigmoid",
        normalize=True,
        norm_eps=1e-20,
        scale=float(router.route_scale),
        bias=block.expert_bias,
    )


AFMOE = Adapter(name="afmoe", model_types=("afmoe",), routing=afmoe_routing, router="router", shared="shared_experts")
