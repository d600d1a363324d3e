"""MiMo-V2-Flash: DeepSeek-V3 routing (sigmoid, selection bias, grouped top-2-sum, renorm, scale), no shared expert."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.deepseek_v3 import deepseek_v3_routing

MIMO_V2_FLASH = Adapter(name="mimo_v2_flash", model_types=("mimo_v2_flash",), routing=deepseek_v3_routing)
