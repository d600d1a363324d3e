"""Cohere2-MoE: top-k on the logits, then softmax over the k (or sigmoid, optional renorm); summed shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.layout import UnsupportedModelError
from nnsight_moe.routing import Routing, SoftmaxTopK


def cohere2_moe_routing(block, router, config) -> Routing:
    """``expert_selection_fn`` "softmax" (over the selected k) or "sigmoid"; weights cast to the input dtype."""
    if getattr(block, "num_shared_experts", 0) and block.shared_expert_combination_strategy != "sum":
        raise UnsupportedModelError(
            f"cohere2_moe with shared_expert_combination_strategy={block.shared_expert_combination_strategy!r} "
            "averages routed and shared outputs, which the hook contract cannot express; accepted: 'sum' "
            "(or num_shared_experts=0)"
        )
    if router.expert_selection_fn == "softmax":  # softmax(dtype=float32) over the k, cast to the input dtype
        return SoftmaxTopK(n_experts=router.num_experts, top_k=router.top_k, cast_weights="input")
    return Routing(  # sigmoid and renormalisation in the logits' dtype (bf16 on a bf16 model)
        n_experts=router.num_experts,
        top_k=router.top_k,
        scoring="sigmoid",
        normalize=bool(router.norm_topk_prob),
        cast_weights="input",
        precision="logits",
    )


COHERE2_MOE = Adapter(
    name="cohere2_moe", model_types=("cohere2_moe",), routing=cohere2_moe_routing, shared="shared_experts"
)
