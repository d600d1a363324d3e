"""Jamba: softmax top-k without renormalisation, weights cast to the input dtype; no shared expert."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import Routing


def jamba_routing(block, router, config) -> Routing:
    """Softmax over all experts, top-k, not renormalised."""
    return Routing(n_experts=router.num_experts, top_k=router.top_k, scoring="softmax", cast_weights=True)


JAMBA = Adapter(name="jamba", model_types=("jamba",), routing=jamba_routing, router="router")
