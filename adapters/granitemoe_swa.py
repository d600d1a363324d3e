"""Granite-MoE-SWA: top-k on the logits, softmax over the selected k (as Granite-MoE); no shared expert."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.granitemoe import granitemoe_routing

GRANITEMOE_SWA = Adapter(
    name="granitemoe_swa", model_types=("granitemoe_swa",), routing=granitemoe_routing, router="router"
)
