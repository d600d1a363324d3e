"""attach / detach: give every MoE block of a model the contract's hook points.

    handle = nnsight_moe.attach(model)      # HF model (TransformerBridge / nnsight: see their pages)
    handle.layout                           # MoELayout
    handle.detach()                         # exact original model again

    with nnsight_moe.attached(model) as handle:
        ...
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from typing import Any, Iterator

from torch import nn
from transformers import PreTrainedModel

from nnsight_moe import hooks
from nnsight_moe.adapters import adapter_for, detect
from nnsight_moe.layout import MoELayout

__all__ = ["FRONTENDS", "AttachHandle", "attach", "attached", "hf_model", "handle_of"]

_HANDLE = "_nnsight_moe_handle"

#: Frontend integrations: ``fn(model, handle)`` is called by every :func:`attach` with the object the
#: user passed (HF model, TransformerBridge, nnsight model). A frontend that recognises ``model``
#: makes the hook points visible there (idempotently) and registers its undo with
#: ``handle.on_detach(undo)``; it ignores objects that are not its own.
FRONTENDS: list = []

#: Modules that append their frontend to :data:`FRONTENDS` when imported; :func:`attach` imports them
#: on its first call (so ``import nnsight_moe`` stays cheap and never misses a frontend).
FRONTEND_MODULES = ("nnsight_moe.nnsight_frontend", "nnsight_moe.tl")


def hf_model(model: Any) -> nn.Module:
    """The Hugging Face model behind ``model`` (an HF model, a TransformerBridge or an nnsight model)."""
    if isinstance(model, PreTrainedModel):
        return model
    for inner in (getattr(model, "original_model", None), getattr(model, "__dict__", {}).get("_module")):
        if isinstance(inner, PreTrainedModel):
            return inner
    raise TypeError(
        f"expected a Hugging Face transformers model, a TransformerBridge or an nnsight model, "
        f"got {type(model).__name__}"
    )


class AttachHandle:
    """What :func:`attach` returns: the model's :class:`MoELayout` and a way back."""

    def __init__(self, model: nn.Module, layout: MoELayout, states: dict[int, hooks.BlockState], previous_impl):
        self.model = model
        self.layout = layout
        self.states = states
        self._previous_impl = previous_impl
        self._handles: dict[int, list] = {}
        self._on_detach: list = []

    def on_detach(self, undo) -> None:
        """Register ``undo()`` to run (last registered first) when the handle detaches."""
        self._on_detach.append(undo)

    @property
    def attached(self) -> bool:
        return self.model.__dict__.get(_HANDLE) is self

    def block(self, layer: int) -> nn.Module:
        """The module holding ``layer``'s hook points: its MoE block (for a later pass of a looped layer, the
        block's pass container, :mod:`nnsight_moe.looped`)."""
        return self.states[self.layout.moe_layer(layer).index].points

    def hook_points(self) -> dict[str, nn.Module]:
        """Every hook point by its full HF path, e.g. ``model.layers.0.mlp.hook_topk_weights``."""
        return {
            f"{state.layer.path}.{name}": state.points._modules[name]
            for state in self.states.values()
            for name in state.layer.hook_names
        }

    def detach(self) -> None:
        """Remove every hook point and hook and restore the experts implementation (idempotent)."""
        if not self.attached:
            return
        while self._on_detach:
            self._on_detach.pop()()
        for index, state in self.states.items():
            hooks.uninstall(state.points, state, self._handles.pop(index, []))
        self.model.set_experts_implementation(self._previous_impl)
        del self.model.__dict__[_HANDLE]

    def __repr__(self) -> str:
        status = "attached" if self.attached else "detached"
        return f"<nnsight_moe {status}: {self.layout.family}, MoE layers {self.layout.moe_layers}>"


def handle_of(model: Any) -> AttachHandle | None:
    """The live :class:`AttachHandle` of ``model``, or None when it is not attached."""
    return hf_model(model).__dict__.get(_HANDLE)


def attach(model: Any) -> AttachHandle:
    """Instrument every MoE block of ``model`` in place with the contract's hook points.

    Raises :class:`~nnsight_moe.layout.UnsupportedModelError` for dense models and unknown families.
    Attaching an attached model is a no-op that returns the existing handle. Frontends in
    :data:`FRONTENDS` (TransformerLens, nnsight) then expose the hook points in their own namespace.
    """
    hf = hf_model(model)
    handle = hf.__dict__.get(_HANDLE) or _attach_hf(hf)
    for module in FRONTEND_MODULES:
        importlib.import_module(module)  # registers its frontend once (a no-op after the first import)
    for frontend in FRONTENDS:
        frontend(model, handle)
    return handle


def _attach_hf(hf: nn.Module) -> AttachHandle:
    adapter = adapter_for(hf)
    layout = detect(hf)
    hooks.register_experts_implementation()
    previous = hf.get_experts_implementation()
    hf.set_experts_implementation(hooks.EXPERTS_IMPLEMENTATION)
    config = hf.config.get_text_config()
    states = {}
    handle = AttachHandle(hf, layout, states, previous)
    for layer in layout.layers:
        if not layer.is_moe:
            continue
        if layer.block_path:  # a later pass of a looped layer: its hook points only (nnsight_moe.looped)
            from nnsight_moe import looped

            states[layer.index] = looped.pass_state(hf, layer, adapter, config)
            continue
        block = hooks.unwrap(hf.get_submodule(layer.path))  # the HF block behind a bridge wrapper
        shared = hf.get_submodule(layer.shared) if layer.shared_outside else None  # a sibling of the block
        state = hooks.BlockState(block, layer, adapter, config, shared=shared)
        states[layer.index] = state
        handle._handles[layer.index] = hooks.install(block, state)
    if adapter.loop is not None:
        from nnsight_moe import looped

        looped.install(hf, handle)
    hf.__dict__[_HANDLE] = handle
    return handle


@contextmanager
def attached(model: Any) -> Iterator[AttachHandle]:
    """Context-manager form of :func:`attach`; detaches on exit only if it attached."""
    was_attached = handle_of(model) is not None
    handle = attach(model)
    try:
        yield handle
    finally:
        if not was_attached:
            handle.detach()
