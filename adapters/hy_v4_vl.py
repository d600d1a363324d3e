"""HY-V4-VL (text model): DeepSeek-V3 routing (sigmoid, selection bias, grouped top-2-sum, renorm, scale), shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.deepseek_v3 import deepseek_v3_routing

HY_V4_VL = Adapter(name="hy_v4_vl", model_types=("hy_v4_vl_text", "hy_v4_vl"), routing=deepseek_v3_routing, shared="shared_experts")
