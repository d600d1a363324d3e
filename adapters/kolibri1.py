"""Kolibri-1: top-k of the raw logits plus a selection-only bias, sigmoid weights (optional renorm), shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import SigmoidOfLogits


def kolibri1_routing(block, router, config) -> SigmoidOfLogits:
    """Choose on ``logits + e_score_correction_bias``; weight by the sigmoid of the chosen logits."""
    return SigmoidOfLogits(
        n_experts=router.num_experts,
        top_k=router.top_k,
        scoring="sigmoid",
        normalize=bool(router.norm_topk_prob),
        bias=router.e_score_correction_bias,
    )


KOLIBRI1 = Adapter(name="kolibri1", model_types=("kolibri1",), routing=kolibri1_routing, shared="shared_experts")
