"""LongCat-Flash: float32 softmax over real and zero-compute identity experts, selection-only bias, top-k, scaled; identity experts return their input.

``n_experts`` counts both kinds: ids ``0 .. n_routed_experts - 1`` are real experts, the next
``zero_expert_num`` are identities (``hook_expert_out`` is the token itself, ``hook_expert_acts`` 0; see
:mod:`nnsight_moe.identity_experts`). The routing and every blocking mode treat them as experts.
"""

from dataclasses import dataclass

from torch import nn

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import Routing


def longcat_flash_routing(block, router, config) -> Routing:
    """``topk(softmax(logits) + e_score_correction_bias, sorted=False)``; weights the chosen scores x scale."""
    return Routing(
        n_experts=router.n_routed_experts,  # real + identity experts
        top_k=router.top_k,
        scoring="softmax",
        scale=float(router.routed_scaling_factor),
        bias=router.e_score_correction_bias,
        sorted=False,
    )


@dataclass(frozen=True)
class LongcatFlashAdapter(Adapter):
    """The experts module runs its own loop (no experts interface); its down projection holds only the real experts."""

    def is_block(self, module: nn.Module) -> bool:
        experts = getattr(module, self.experts, None)
        return isinstance(getattr(module, self.router, None), nn.Module) and hasattr(experts, "zero_expert_num")

    def expert_width(self, experts: nn.Module) -> int:
        return int(experts.intermediate_size)


LONGCAT_FLASH = LongcatFlashAdapter(
    name="longcat_flash",
    model_types=("longcat_flash",),
    routing=longcat_flash_routing,
    router="router",
    identity_experts=True,
)
