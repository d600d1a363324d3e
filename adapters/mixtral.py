"""Mixtral: softmax top-2 of 8, always renormalised, weights kept in float32."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import Routing


def mixtral_routing(block, router, config) -> Routing:
    """Softmax over all experts, top-k, renormalised (the router has no ``norm_topk_prob`` switch)."""
    return Routing(n_experts=router.num_experts, top_k=router.top_k, scoring="softmax", normalize=True)


MIXTRAL = Adapter(name="mixtral", model_types=("mixtral",), routing=mixtral_routing)
