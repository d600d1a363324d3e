"""Sarvam-MoE (runs as ``Glm4MoeForCausalLM``): DeepSeek-V3 routing (sigmoid, selection bias, grouped top-2-sum, renorm, scale), shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.deepseek_v3 import deepseek_v3_routing

SARVAM_MOE = Adapter(name="sarvam_moe", model_types=("sarvam_moe",), routing=deepseek_v3_routing, shared="shared_experts")
