"""GLM-5-Next (text model): DeepSeek-V3 routing (sigmoid, selection bias, grouped top-2-sum, renorm, scale), shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.deepseek_v3 import deepseek_v3_routing

GLM5_NEXT = Adapter(name="glm5_next", model_types=("glm5_next_text", "glm5_next"), routing=deepseek_v3_routing, shared="shared_experts")
