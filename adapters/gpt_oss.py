"""GPT-OSS: router with bias, top-k on the logits, softmax over the selected k; biased, clamped experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import SoftmaxTopK


def gpt_oss_routing(block, router, config) -> SoftmaxTopK:
    """Scores are the softmax over all experts; weights the softmax over the k selected logits, computed
    in the logits' dtype (``softmax(dtype=router_top_value.dtype)``)."""
    return SoftmaxTopK(n_experts=router.num_experts, top_k=router.top_k, cast_weights=True, precision="logits")


GPT_OSS = Adapter(name="gpt_oss", model_types=("gpt_oss",), routing=gpt_oss_routing, router="router")
