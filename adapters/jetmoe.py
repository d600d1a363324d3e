"""JetMoE: top-k of the float32 logits, softmax over the k cast to the hidden states' dtype; a dispatch router, parallel experts and a learned output bias.

The router returns a dispatch plan and the block runs two ``JetMoeParallelExperts`` (see
:mod:`nnsight_moe.dispatch_experts`); ``hook_expert_acts`` / ``hook_expert_out`` are in slot order as
everywhere, and the block adds its learned bias to the routed sum:
``hook_moe_out = hook_routed_out + bias`` (``LayerLayout.moe_bias``). JetMoE's mixture-of-attention
experts are attention heads, not an MoE MLP: they are not hooked.
"""

from dataclasses import dataclass

from torch import nn

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import SoftmaxTopK


def jetmoe_routing(block, router, config) -> SoftmaxTopK:
    """``logits.topk(k)`` of the float32 logits; weights ``softmax(top-k logits)`` cast to the input dtype."""
    return SoftmaxTopK(n_experts=router.num_experts, top_k=router.top_k, cast_weights="input")


@dataclass(frozen=True)
class JetMoeAdapter(Adapter):
    """The MLP block: a router, ``input_linear`` / ``output_linear`` parallel experts and an activation
    (JetMoE's attention experts have no activation, so they are not taken for a MoE MLP)."""

    def is_block(self, module: nn.Module) -> bool:
        return (isinstance(getattr(module, self.router, None), nn.Module) and hasattr(module, "activation")
                and isinstance(getattr(getattr(module, "output_linear", None), "weight", None), nn.Parameter))

    def expert_width(self, experts: nn.Module) -> int:
        return int(experts.weight.shape[-1])  # output_linear [E, d_model, d_expert]


JETMOE = JetMoeAdapter(
    name="jetmoe",
    model_types=("jetmoe",),
    routing=jetmoe_routing,
    router="router",
    experts="output_linear",
    dispatch_router=True,
    moe_bias="bias",
)
