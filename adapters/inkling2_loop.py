"""Inkling-2-Loop: Inkling-2's routing (sigmoid scores, selection-only bias, top-k, renormalised and scaled; no shared expert) in a looped transformer whose middle layers run several times per forward.

Layers ``loop_layer_index_start .. loop_layer_index_end - 1`` run ``loop_num_passes`` times per forward
(each later pass restarts from the pre-loop states and mixes in messages from the previous pass), so the
layout lists every *visit*, in execution order: the pre-loop layers, the loop layers once per pass, the
post-loop layers (``config.total_num_hidden_layers`` layout layers). Each pass is a layer of its own, with its
own hook points: pass 0 keeps the block's names (``model.layers.L.mlp.hook_*``), pass p >= 1 has them in a
container ``model.layers.L.mlp.pass<p>`` (``model.layers.L.mlp.pass1.hook_topk_indices``), so
``run_with_cache`` and nnsight see every pass, and interventions on a layout layer act on that pass only
(``LayerLayout.loop_pass``, ``block_path``; see :mod:`nnsight_moe.looped`).
"""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.inkling2_text import inkling2_routing


def inkling2_loop(config) -> tuple[int, int, int]:
    """(first loop layer, end of the loop layers, passes) from the text config."""
    return int(config.loop_layer_index_start), int(config.loop_layer_index_end), int(config.loop_num_passes)


INKLING2_LOOP = Adapter(
    name="inkling2_loop_text",
    model_types=("inkling2_loop_text", "inkling2_loop"),
    routing=inkling2_routing,
    loop=inkling2_loop,
)
