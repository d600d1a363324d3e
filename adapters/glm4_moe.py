"""GLM-4-MoE: DeepSeek-V3 routing (sigmoid, selection bias, grouped top-2-sum, renorm, scale), shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.deepseek_v3 import deepseek_v3_routing

GLM4_MOE = Adapter(
    name="glm4_moe",
    model_types=("glm4_moe",),
    routing=deepseek_v3_routing,
    shared="shared_experts",
)
