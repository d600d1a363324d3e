"""A.X K2: DeepSeek-V3 routing (sigmoid, selection bias, grouped top-2-sum, renorm, scale), shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.deepseek_v3 import deepseek_v3_routing

AXK2 = Adapter(name="axk2", model_types=("axk2",), routing=deepseek_v3_routing, shared="shared_experts")
