"""HY-V3: sigmoid scores, selection-only bias (the block's ``e_score_correction_bias``), renormalised
(eps 1e-20) and scaled (``router_scaling_factor``) weights, shared experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import Routing


def hy_v3_routing(block, router, config) -> Routing:
    """Choose on ``sigmoid + e_score_correction_bias`` (unsorted top-k); renorm, scale."""
    return Routing(
        n_experts=router.num_experts,
        top_k=router.top_k,
        scoring="sigmoid",
        normalize=True,
        norm_eps=1e-20,
        scale=float(router.router_scaling_factor),
        bias=block.e_score_correction_bias,
        sorted=False,
    )


HY_V3 = Adapter(name="hy_v3", model_types=("hy_v3",), routing=hy_v3_routing, shared="shared_experts")
