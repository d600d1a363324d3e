"""ZAYA1: an MLP router on a cross-layer router state; softmax over the experts and a skip expert, selection-only balancing bias, top-1; the skip expert computes nothing.

Expert ids ``0 .. num_experts - 1`` are real experts and ``num_experts`` is the *skip* expert
(``n_experts`` counts it): a token routed there gets gate weight 0 and no expert output (``hook_expert_acts``
and ``hook_expert_out`` are 0 in its slot). The router hands the experts such a slot as expert 0 with
weight 0, as the model does. Each router adds the previous layer's router state (its down-projected input)
before its MLP and returns its own for the next layer: attaching passes that state on unchanged.
The router computes in the model's dtype (``precision="scores"``).
"""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import SkipRouting


def zaya_routing(block, router, config) -> SkipRouting:
    """``topk(softmax(logits) + balancing_biases)`` over ``num_experts + 1`` classes; weights the chosen
    probabilities, 0 for the skip expert."""
    return SkipRouting(
        n_experts=router.num_router_classes,  # real experts + the skip expert
        top_k=router.top_k,
        scoring="softmax",
        bias=router.balancing_biases,
        cast_weights=True,
        precision="scores",
    )


ZAYA = Adapter(name="zaya", model_types=("zaya",), routing=zaya_routing)
