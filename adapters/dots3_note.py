"""dots3.note (text model): DeepSeek-V3 routing (sigmoid, selection bias, grouped top-2-sum, renorm, scale), shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.deepseek_v3 import deepseek_v3_routing

DOTS3_NOTE = Adapter(name="dots3_note", model_types=("dots3_note_text", "dots3_note"), routing=deepseek_v3_routing, shared="shared_experts")
