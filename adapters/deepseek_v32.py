"""DeepSeek-V3.2: DeepSeek-V3 routing (sigmoid, selection bias, grouped top-2-sum, renorm, scale), shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.deepseek_v3 import deepseek_v3_routing

DEEPSEEK_V32 = Adapter(
    name="deepseek_v32",
    model_types=("deepseek_v32",),
    routing=deepseek_v3_routing,
    shared="shared_experts",
)
