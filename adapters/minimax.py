"""MiniMax(-Text-01): softmax top-k, always renormalised, weights kept in float32; no shared expert."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import Routing


def minimax_routing(block, router, config) -> Routing:
    """Softmax over all experts (float32), top-k, renormalised; the weights stay float32."""
    return Routing(n_experts=router.num_experts, top_k=router.top_k, scoring="softmax", normalize=True)


MINIMAX = Adapter(name="minimax", model_types=("minimax",), routing=minimax_routing)
