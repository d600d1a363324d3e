"""OpenAI-Privacy-Filter: router with bias, top-k on the float32 logits, softmax over the k divided by k; the block multiplies the routed sum by k; float32 experts (a bidirectional token classifier)."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import SoftmaxTopK


def openai_privacy_filter_routing(block, router, config) -> SoftmaxTopK:
    """Weights ``softmax(top-k logits) / k``, float32; the block's ``* k`` is the layer's ``routed_scale``."""
    return SoftmaxTopK(n_experts=router.num_experts, top_k=router.top_k, scale=1.0 / router.top_k)


OPENAI_PRIVACY_FILTER = Adapter(
    name="openai_privacy_filter",
    model_types=("openai_privacy_filter",),
    routing=openai_privacy_filter_routing,
    router="router",
    routed_scale="num_experts",  # OpenAIPrivacyFilterMLP.num_experts is num_experts_per_tok
    experts_float32=True,  # "Key change to original gpt oss is to stay in fp32 precision" (its experts forward)
)
