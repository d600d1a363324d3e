"""PhiMoE: sparsemixer routing (two masked argmax picks), evaluation-mode semantics."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import SparseMixer


def phimoe_routing(block, router, config) -> SparseMixer:
    """Scores are the raw logits; see :class:`~nnsight_moe.routing.SparseMixer`."""
    return SparseMixer(
        n_experts=router.num_experts, top_k=2, jitter_eps=float(router.router_jitter_noise), cast_weights=True
    )


PHIMOE = Adapter(name="phimoe", model_types=("phimoe",), routing=phimoe_routing, router="router")
