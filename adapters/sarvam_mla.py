"""Sarvam-MLA (runs as ``DeepseekV3ForCausalLM``): DeepSeek-V3 routing (sigmoid, selection bias, grouped top-2-sum, renorm, scale), shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.deepseek_v3 import deepseek_v3_routing

SARVAM_MLA = Adapter(name="sarvam_mla", model_types=("sarvam_mla",), routing=deepseek_v3_routing, shared="shared_experts")
