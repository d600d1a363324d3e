"""GLM-4.5V (text model): DeepSeek-V3 routing (sigmoid, selection bias, grouped top-2-sum, renorm, scale), shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.deepseek_v3 import deepseek_v3_routing

GLM4V_MOE = Adapter(name="glm4v_moe", model_types=("glm4v_moe_text", "glm4v_moe"), routing=deepseek_v3_routing, shared="shared_experts")
