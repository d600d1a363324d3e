"""DBRX: softmax in the logits' dtype, top-k, weights renormalised by their p-norm (``moe_normalize_expert_weights``); routing inside the block and 2-D expert weights.

The router returns only its logits and the block routes (``route_tokens_to_experts``, a method); the
experts' weights are 2-D (``w1``/``v1``/``w2`` of ``[E * d_expert, d_model]``). The contract's hook points
fire from torch hooks on the router and the experts (see :mod:`nnsight_moe.block_routed`) and the
attached model is bit-identical to the unattached one; ``hook_moe_out`` is the block's output.
"""

from dataclasses import dataclass

from torch import nn

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import Routing


def dbrx_routing(block, router, config) -> Routing:
    """Scores, their top-k and the p-norm renormalisation all in the logits' dtype (``precision="scores"``)."""
    p = block.moe_normalize_expert_weights
    return Routing(
        n_experts=router.layer.out_features,
        top_k=int(block.top_k),
        scoring="softmax",
        norm_p=None if p is None else float(p),
        precision="scores",
    )


@dataclass(frozen=True)
class DbrxAdapter(Adapter):
    """DBRX's experts hold 2-D ``mlp.w1`` / ``mlp.v1`` / ``mlp.w2`` instead of fused 3-D weights."""

    def is_block(self, module: nn.Module) -> bool:
        experts = getattr(module, self.experts, None)
        return isinstance(getattr(module, self.router, None), nn.Module) and isinstance(
            getattr(getattr(experts, "mlp", None), "w2", None), nn.Parameter)

    def expert_width(self, experts: nn.Module) -> int:
        return int(experts.ffn_hidden_size)


DBRX = DbrxAdapter(
    name="dbrx",
    model_types=("dbrx",),
    routing=dbrx_routing,
    router="router",
    routing_in_block=True,
)
