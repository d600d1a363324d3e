"""Granite-4 (Granite-MoE-Hybrid): top-k on the logits, softmax over the selected k; an ungated shared MLP beside the block on the decoder layer; Mamba-2 / attention stack.

As Granite-MoE-Shared: the decoder layer computes ``block_sparse_moe(x) + shared_mlp(x)``, so
``hook_moe_out`` is that sum, fired once the shared MLP has run. Layers without experts
(``num_local_experts=0``) run the shared MLP alone and are dense layers.
"""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.granitemoe import granitemoe_routing

GRANITEMOEHYBRID = Adapter(
    name="granitemoehybrid",
    model_types=("granitemoehybrid",),
    routing=granitemoe_routing,
    router="router",
    shared="shared_mlp",
    shared_on_layer=True,
    shared_down="output_linear",
)
