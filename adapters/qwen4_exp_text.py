"""Qwen4-Exp (text model): softmax top-k with renormalisation (``norm_topk_prob``), sigmoid-gated shared expert."""

from nnsight_moe.adapters.base import Adapter, softmax_routing

QWEN4_EXP_TEXT = Adapter(
    name="qwen4_exp_text",
    model_types=("qwen4_exp_text",),
    routing=softmax_routing,
    shared="shared_expert",
    shared_gate="shared_expert_gate",
)
