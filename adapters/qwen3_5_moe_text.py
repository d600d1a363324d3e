"""Qwen3.5-MoE (text model): softmax top-k with renormalisation, sigmoid-gated shared expert."""

from nnsight_moe.adapters.base import Adapter, softmax_routing

QWEN3_5_MOE_TEXT = Adapter(
    name="qwen3_5_moe_text",
    model_types=("qwen3_5_moe_text",),
    routing=softmax_routing,
    shared="shared_expert",
    shared_gate="shared_expert_gate",
)
