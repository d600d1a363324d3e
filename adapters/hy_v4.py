"""HY-V4: DeepSeek-V3 routing (sigmoid, selection bias, grouped top-2-sum, renorm, scale), shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.deepseek_v3 import deepseek_v3_routing

HY_V4 = Adapter(name="hy_v4", model_types=("hy_v4",), routing=deepseek_v3_routing, shared="shared_experts")
