"""Qwen3-Next: softmax top-k with renormalisation (``norm_topk_prob``), sigmoid-gated shared expert."""

from nnsight_moe.adapters.base import Adapter, softmax_routing

QWEN3_NEXT = Adapter(
    name="qwen3_next",
    model_types=("qwen3_next",),
    routing=softmax_routing,
    shared="shared_expert",
    shared_gate="shared_expert_gate",
)
