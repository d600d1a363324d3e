"""Mistral-4: softmax scores, group-limited (top-2 sum) selection, optional renorm (eps 1e-20), scaled, shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import Routing


def mistral4_routing(block, router, config) -> Routing:
    """Choose within the ``topk_group`` best groups (top-2 sum of softmax scores); renorm, scale."""
    return Routing(
        n_experts=router.num_experts,
        top_k=router.top_k,
        scoring="softmax",
        normalize=bool(getattr(router, "norm_topk_prob", True)),  # Mistral-Large-4 always renormalises
        norm_eps=1e-20,
        scale=float(router.routed_scaling_factor),
        n_group=router.num_group,
        topk_group=router.topk_group,
        group_score="top2sum",
        sorted=False,
        precision="scores",  # choice, softmax, renorm and scale in the logits' dtype
        cast_weights=True,  # Mistral-4 routes in the model dtype; Mistral-Large-4 in float32 logits
    )


MISTRAL4 = Adapter(name="mistral4", model_types=("mistral4",), routing=mistral4_routing, shared="shared_experts")
