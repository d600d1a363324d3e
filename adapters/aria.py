"""Aria (text model): top-k on the logits, softmax over the selected k; ungated shared experts (transposed experts)."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import SoftmaxTopK


def aria_routing(block, router, config) -> SoftmaxTopK:
    """``topk(logits)``, weights the softmax over the k chosen logits, in the logits' dtype."""
    return SoftmaxTopK(n_experts=router.num_experts, top_k=router.top_k, cast_weights=True)


ARIA = Adapter(
    name="aria", model_types=("aria_text", "aria"), routing=aria_routing, router="router", shared="shared_experts"
)
