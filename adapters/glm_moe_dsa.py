"""GLM-MoE-DSA: DeepSeek-V3 routing (sigmoid, selection bias, grouped top-2-sum, renorm, scale), shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.deepseek_v3 import deepseek_v3_routing

GLM_MOE_DSA = Adapter(
    name="glm_moe_dsa",
    model_types=("glm_moe_dsa",),
    routing=deepseek_v3_routing,
    shared="shared_experts",
)
