"""MiniMax-M2: sigmoid scores, selection-only bias (the block's ``e_score_correction_bias``), renormalised
float32 weights; no shared expert."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import Routing


def minimax_m2_routing(block, router, config) -> Routing:
    """Choose on ``sigmoid + e_score_correction_bias`` (unsorted top-k); weights renormalised, float32."""
    return Routing(
        n_experts=router.num_experts,
        top_k=router.top_k,
        scoring="sigmoid",
        normalize=True,
        bias=block.e_score_correction_bias,
        sorted=False,
    )


MINIMAX_M2 = Adapter(name="minimax_m2", model_types=("minimax_m2",), routing=minimax_m2_routing)
