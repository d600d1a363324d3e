"""Looped transformers (Inkling-2-Loop): hook points and interventions per pass of a loop layer.

A looped model runs its loop layers several times per forward. The layout lists every visit as a layer of
its own, in execution order (:func:`nnsight_moe.adapters._unrolled`): pass 0 of a loop layer is its MoE
block (``model.layers.L.mlp``, hook points ``model.layers.L.mlp.hook_*``), pass p >= 1 a *pass container*
``model.layers.L.mlp.pass<p>`` that :func:`pass_state` adds to the block, holding that pass's hook points
(``model.layers.L.mlp.pass1.hook_topk_indices``). So every pass has its own names: TransformerLens'
``run_with_cache`` (name -> tensor) keeps them all, nnsight sees each container as a module, and every
intervention set on a layout layer (``block_experts``, ``restrict_experts``, steering plans: they live on
the layer's :class:`~nnsight_moe.hooks.BlockState`) acts on that pass only; block a loop layer in every
pass by listing each of its layout layers.

The torch hooks are installed once, on the block (with pass 0's state, :func:`nnsight_moe.hooks.install`).
A forward pre-hook on the decoder layer (:func:`install`) tells the pass from the layer's call and binds
that pass's state to every module the hooks read it from, so the block's hooks fire into that pass's
hook points with that pass's interventions. Inkling-2-Loop calls a loop layer without ``cache_offset`` in
pass 0 and with ``cache_offset = num_hidden_layers + (p - 1) * n_loop - loop_start`` in pass p (each pass
has its own cache layers), which gives p exactly, independent of any call counting.
"""

from __future__ import annotations

import threading
from typing import Any

from torch import nn

from nnsight_moe import hooks
from nnsight_moe.layout import LayerLayout

__all__ = ["install", "pass_of", "pass_state"]


def pass_state(hf: nn.Module, layer: LayerLayout, adapter: Any, config: Any) -> hooks.BlockState:
    """The state of a later pass (``layer.loop_pass >= 1``): a pass container on the block, with its hook points."""
    block = hooks.unwrap(hf.get_submodule(layer.block_path))
    container = nn.Module()
    block.add_module(layer.path.rsplit(".", 1)[-1], container)
    state = hooks.BlockState(block, layer, adapter, config, points=container)
    hooks.add_hook_points(state)
    return state


def pass_of(kwargs: dict, n_layers: int, start: int, end: int) -> int:
    """The pass of a loop layer's call, from its ``cache_offset`` keyword (absent or 0 in pass 0; in pass p,
    ``n_layers + (p - 1) * (end - start) - start``: the loop layers ``start .. end - 1`` of a stack of
    ``n_layers`` keep each later pass's cache layers after the model's own)."""
    offset = int(kwargs.get("cache_offset") or 0)
    if offset == 0:
        return 0
    return (offset - n_layers + start) // (end - start) + 1


def install(hf: nn.Module, handle: Any) -> None:
    """For each looped MoE block: a pre-hook on its decoder layer binding the running pass's state."""
    by_block: dict[str, dict[int, hooks.BlockState]] = {}
    for state in handle.states.values():
        if state.layer.loop_passes > 1:
            by_block.setdefault(state.layer.module_path, {})[state.layer.loop_pass] = state
    config = hf.config.get_text_config()
    for path, passes in by_block.items():
        first = passes[0]
        start, end, _ = first.adapter.loop(config)
        n_layers = int(config.num_hidden_layers)
        carriers = [m for m in first.block.modules() if m.__dict__.get(hooks._STATE) is first]
        decoder_layer = hooks.unwrap(hf.get_submodule(path.rsplit(".", 1)[0]))

        def bind(module, args, kwargs, passes=passes, carriers=carriers, path=path, loop=(n_layers, start, end)):
            p = pass_of(kwargs, *loop)
            if p not in passes:
                raise RuntimeError(f"{path}: a call of pass {p}, but the layout has passes {sorted(passes)}")
            me = threading.get_ident()
            busy = next((s._thread for s in passes.values() if s._thread not in (None, me)), None)
            if busy is not None:  # rebinding now would switch another thread's forward to this pass's state
                raise hooks.ConcurrentForwardError(
                    f"{path}: this attached model is already running a forward in another thread (id {busy}); "
                    "use one model per thread (copy.deepcopy) or run the forwards one at a time")
            for carrier in carriers:
                carrier.__dict__[hooks._STATE] = passes[p]

        handle._handles[first.layer.index].append(decoder_layer.register_forward_pre_hook(bind, with_kwargs=True))

        def undo(passes=passes):  # the containers go with the hook points (detach runs this first)
            for p, state in passes.items():
                if p:
                    state.block._modules.pop(state.layer.path.rsplit(".", 1)[-1], None)

        handle.on_detach(undo)
