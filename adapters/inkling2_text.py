"""Inkling2 (text model): sigmoid scores, selection-only bias, top-k, renormalised and scaled; no shared expert."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.layout import UnsupportedModelError
from nnsight_moe.routing import Routing


def inkling2_routing(block, router, config) -> Routing:
    """Choose on ``sigmoid(logits) + e_score_correction_bias`` (float32); weights renormalised x scale."""
    if config.scoring_func != "sigmoid":
        raise UnsupportedModelError(
            f"inkling2 with scoring_func={config.scoring_func!r} is not supported; accepted: 'sigmoid'"
        )
    return Routing(
        n_experts=router.num_experts,
        top_k=router.top_k,
        scoring="sigmoid",
        normalize=True,
        norm_eps=1e-20,
        scale=float(router.routed_scaling_factor),
        bias=router.e_score_correction_bias,
        sorted=False,
    )


INKLING2_TEXT = Adapter(name="inkling2_text", model_types=("inkling2_text",), routing=inkling2_routing)
