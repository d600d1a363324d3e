"""Unlimited-OCR (text model): DeepSeek-V2 routing (softmax, greedy or group-limited top-k, scaled), shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.deepseek_v2 import deepseek_v2_routing

UNLIMITED_OCR = Adapter(name="unlimited_ocr", model_types=("unlimited_ocr_text", "unlimited_ocr"), routing=deepseek_v2_routing, shared="shared_experts")
