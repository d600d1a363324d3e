"""DeepSeek-OCR-2 (text model): DeepSeek-V2 routing (softmax, greedy or group-limited top-k, scaled), shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.deepseek_v2 import deepseek_v2_routing

DEEPSEEK_OCR2 = Adapter(name="deepseek_ocr2", model_types=("deepseek_ocr2_text", "deepseek_ocr2"), routing=deepseek_v2_routing, shared="shared_experts")
