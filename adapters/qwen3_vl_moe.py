"""Qwen3-VL-MoE (text model): softmax top-k, always renormalised, weights cast to the logits' dtype; no shared expert."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import Routing


def qwen3_vl_moe_routing(block, router, config) -> Routing:
    """Softmax (float32) over all experts, top-k, renormalised (the router has no switch), cast back."""
    return Routing(
        n_experts=router.num_experts, top_k=router.top_k, scoring="softmax", normalize=True, cast_weights=True
    )


QWEN3_VL_MOE = Adapter(name="qwen3_vl_moe", model_types=("qwen3_vl_moe_text", "qwen3_vl_moe"), routing=qwen3_vl_moe_routing)
