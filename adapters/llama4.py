"""Llama 4: top-k of the logits, sigmoid of the chosen logits scales each expert's INPUT (dense experts); an ungated shared expert.

The router's weights multiply the experts' inputs, not their outputs (``LayerLayout.gate_on_input``): the
contract's hook points keep their names and shapes, ``hook_expert_out`` is a selected expert's output on
``weight * x`` and ``hook_routed_out`` is the plain sum of the slots' outputs (see
:mod:`nnsight_moe.input_gated`). ``hook_router_scores`` are the raw logits (selection is on them; the
weights are the sigmoid of the chosen ones, computed in float32 and cast to the logits' dtype).
"""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import SigmoidOfLogits


def llama4_routing(block, router, config) -> SigmoidOfLogits:
    """``topk(logits)`` (sorted), weights ``sigmoid(chosen logits)`` in float32, cast to the logits' dtype."""
    return SigmoidOfLogits(n_experts=router.num_experts, top_k=router.top_k, cast_weights=True)


LLAMA4 = Adapter(
    name="llama4",
    model_types=("llama4", "llama4_text"),
    routing=llama4_routing,
    router="router",
    shared="shared_expert",
    gate_on_input=True,
    experts_transposed=True,
)
