"""Qwen1.5-MoE / Qwen2-MoE: softmax top-k without renormalisation, plus a sigmoid-gated shared expert."""

from nnsight_moe.adapters.base import Adapter, softmax_routing

QWEN2_MOE = Adapter(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    routing=softmax_routing,
    shared="shared_expert",
    shared_gate="shared_expert_gate",
)
