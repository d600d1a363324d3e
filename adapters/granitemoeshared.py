"""Granite-MoE-Shared: top-k on the logits, softmax over the selected k; an ungated shared MLP beside the block on the decoder layer.

The decoder layer computes ``block_sparse_moe(x) + shared_mlp(x)``: the shared MLP (fused ``input_linear``
[gate | up], ``output_linear``) is a sibling of the MoE block, not part of it. ``hook_shared_*`` fire on
it and ``hook_moe_out`` is the layer's sum (:attr:`~nnsight_moe.layout.LayerLayout.shared_outside`).
"""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.granitemoe import granitemoe_routing

GRANITEMOESHARED = Adapter(
    name="granitemoeshared",
    model_types=("granitemoeshared",),
    routing=granitemoe_routing,
    router="router",
    shared="shared_mlp",
    shared_on_layer=True,
    shared_down="output_linear",
)
