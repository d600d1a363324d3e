"""GLM-4-MoE-Lite: DeepSeek-V3 routing (sigmoid, selection bias, grouped top-2-sum, renorm, scale), shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.deepseek_v3 import deepseek_v3_routing

GLM4_MOE_LITE = Adapter(
    name="glm4_moe_lite",
    model_types=("glm4_moe_lite",),
    routing=deepseek_v3_routing,
    shared="shared_experts",
)
