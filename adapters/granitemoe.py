"""Granite-MoE: top-k on the logits, softmax over the selected k; no shared expert."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import SoftmaxTopK


def granitemoe_routing(block, router, config) -> SoftmaxTopK:
    """Scores are the softmax over all experts; weights the softmax over the k selected logits.

    The router upcasts its logits to float32 and casts the weights to the hidden states' dtype."""
    return SoftmaxTopK(n_experts=router.num_experts, top_k=router.top_k, cast_weights="input")


GRANITEMOE = Adapter(
    name="granitemoe", model_types=("granitemoe",), routing=granitemoe_routing, router="router"
)
