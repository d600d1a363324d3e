"""Kimi-Linear: DeepSeek-V3 routing (sigmoid, bias, grouped top-2-sum, renorm, scale), shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.deepseek_v3 import deepseek_v3_routing

KIMI_LINEAR = Adapter(
    name="kimi_linear", model_types=("kimi_linear",), routing=deepseek_v3_routing, shared="shared_experts"
)
