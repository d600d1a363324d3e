"""Qwen3-MoE: softmax top-k with renormalisation (``norm_topk_prob``), no shared expert."""

from nnsight_moe.adapters.base import Adapter, softmax_routing

QWEN3_MOE = Adapter(name="qwen3_moe", model_types=("qwen3_moe",), routing=softmax_routing)
