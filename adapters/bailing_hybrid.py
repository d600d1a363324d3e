"""Bailing-hybrid (Ling): DeepSeek-V3 routing (sigmoid, bias, grouped top-2-sum, renorm, scale), shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.deepseek_v3 import deepseek_v3_routing

BAILING_HYBRID = Adapter(
    name="bailing_hybrid", model_types=("bailing_hybrid",), routing=deepseek_v3_routing, shared="shared_experts"
)
