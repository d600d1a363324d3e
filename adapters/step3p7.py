"""Step-3.7: sigmoid scores, selection-only bias, renormalised float32 weights; the block scales the routed sum; ungated shared expert; clamped-SwiGLU experts outside transformers' experts interface.

``Step3p7SparseMoeBlock`` multiplies the routed sum by ``moe_router_scaling_factor`` before adding the
shared expert: ``hook_moe_out = routed_scale * hook_routed_out + hook_shared_out``. Its experts module is
not dispatched through transformers' ``ExpertsInterface`` (no ``@use_experts_implementation``), so the
hooks run the ``"nnsight_moe"`` experts computation from a forward hook on it (``Adapter.own_experts``).
"""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.minimax_m3_vl import minimax_m3_routing

STEP3P7 = Adapter(name="step3p7", model_types=("step3p7", "step3p5"), routing=minimax_m3_routing,
                  shared="shared_experts", routed_scale="routed_scaling_factor", own_experts=True)
