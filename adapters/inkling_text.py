"""Inkling (text model): sigmoid top-k with a selection-only bias; the routed weights are normalised jointly with the shared experts' gammas (a shared-expert sink), scaled.

The router scores the routed and the shared experts with one matrix; the chosen routed experts and all
shared experts share one normalisation (their sigmoids divided by the sum, times ``route_scale`` and a
learned ``global_scale``). ``hook_topk_weights`` are the routed part, the weights the experts are
actually multiplied by; ``hook_shared_gammas`` [b, p, n_shared] the shared part, which the shared experts
multiply into their activations (see :mod:`nnsight_moe.shared_gammas`).
"""

from dataclasses import dataclass

from torch import nn

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.layout import UnsupportedModelError
from nnsight_moe.routing import SinkRouting


def inkling_routing(block, router, config) -> SinkRouting:
    """``topk(sigmoid(routed logits) + e_score_correction_bias, sorted=False)`` in float32; weights and gammas
    ``softmax(logsigmoid([chosen | shared logits])) * route_scale * global_scale``, cast to the hidden dtype."""
    if not getattr(config, "shared_expert_sink", True) or router.n_shared_experts < 1:
        raise UnsupportedModelError("inkling without shared experts scored by the router (shared_expert_sink=False "
                                    "or n_shared_experts=0) is not supported; accepted: shared_expert_sink=True, "
                                    "n_shared_experts >= 1")
    return SinkRouting(
        n_experts=router.num_experts,
        top_k=router.top_k,
        scoring="sigmoid",
        scale=float(router.route_scale),
        bias=router.e_score_correction_bias,
        sorted=False,
        cast_weights="input",
        n_shared=router.n_shared_experts,
        global_scale=router.global_scale,
    )


@dataclass(frozen=True)
class InklingAdapter(Adapter):
    """The shared experts are one module of batched ``[S, ...]`` weights (no down-projection module)."""

    def shared_width(self, shared: nn.Module) -> int:
        return int(shared.down_proj.shape[0] * shared.down_proj.shape[2])  # S experts x their width


INKLING_TEXT = InklingAdapter(
    name="inkling_text",
    model_types=("inkling_text", "inkling_mm_model"),
    routing=inkling_routing,
    shared="shared_experts",
)
