"""Flint: sigmoid scores, top-k, optional renormalisation (``norm_topk_prob``), ungated shared expert."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import Routing


def flint_routing(block, router, config) -> Routing:
    """Top-k of the sigmoid of the float32 logits (no selection bias); weights stay float32."""
    return Routing(
        n_experts=router.num_experts, top_k=router.top_k, scoring="sigmoid", normalize=bool(router.norm_topk_prob)
    )


FLINT = Adapter(name="flint", model_types=("flint",), routing=flint_routing, shared="shared_expert")
