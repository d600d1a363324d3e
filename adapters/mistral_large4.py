"""Mistral-Large-4 (text model): Mistral-4 routing on float32 logits (softmax, grouped top-2-sum, renorm, scale), shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.mistral4 import mistral4_routing

MISTRAL_LARGE4 = Adapter(
    name="mistral_large4",
    model_types=("mistral_large4_text", "mistral_large4"),
    routing=mistral4_routing,
    shared="shared_experts",
)
