"""Interventions on routing, as context managers that compose with any other hook.

* :func:`block_experts` -- remove experts, in one of three modes:
    - ``"zero"``: the expert's gate weight is set to 0, other weights unchanged
      (identical to zeroing the expert's ``down_proj``);
    - ``"renorm"``: as ``zero``, then the remaining top-k weights are rescaled to the original sum;
    - ``"reroute"``: the expert is removed before selection (choice score -inf), so the next-best
      expert takes the slot and gets the weight the family's rule gives it.
* :func:`restrict_experts` -- keep only the n largest routed gate weights per token, and/or switch the
  shared expert off: the "shared only", "shared + top-1", "top-2 only", ... configurations.
* :func:`ablate_shared` -- shared expert(s) off.

They work on an HF model, a TransformerBridge or an nnsight model; a model that is not attached is
attached for the duration of the context and detached after it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from nnsight_moe.adapters import detect
from nnsight_moe.attach import AttachHandle, attached, handle_of, hf_model
from nnsight_moe.layout import MoELayout

__all__ = ["BLOCK_MODES", "ablate_shared", "block_experts", "restrict_experts"]

BLOCK_MODES = ("zero", "renorm", "reroute")


@contextmanager
def _edited(model: Any, edits: dict[int, dict[str, Any]]) -> Iterator[AttachHandle]:
    """Set BlockState fields per layer for the duration of the context, restoring them after."""
    with attached(model) as handle:
        saved = {}
        for index, fields in edits.items():
            state = handle.states[index]
            saved[index] = {name: getattr(state, name) for name in fields}
            for name, value in fields.items():
                setattr(state, name, value)
        try:
            yield handle
        finally:
            for index, fields in saved.items():
                for name, value in fields.items():
                    setattr(handle.states[index], name, value)


def _resolve(model: Any) -> MoELayout:
    handle = handle_of(model)
    return handle.layout if handle is not None else detect(hf_model(model))


@contextmanager
def block_experts(
    model: Any, experts: Mapping[int, Iterable[int]], mode: str = "zero"
) -> Iterator[AttachHandle]:
    """Block routed experts, e.g. ``with block_experts(model, {3: [0, 5]}, mode="zero"): model(ids)``.

    Args:
        model: HF model, TransformerBridge or nnsight model of a supported MoE family.
        experts: ``{layer: [expert ids]}``; layers must be MoE layers, ids within 0..E-1.
        mode: ``"zero"``, ``"renorm"`` or ``"reroute"`` (see the module docstring).

    Blocks nest: an inner context adds to the experts blocked by an outer one.
    """
    if mode not in BLOCK_MODES:
        raise ValueError(f"mode must be one of {BLOCK_MODES}, got {mode!r}")
    if not isinstance(experts, Mapping):
        raise TypeError(f"experts must be a mapping {{layer: [expert ids]}}, got {type(experts).__name__}")
    layout = _resolve(model)
    masks = {}
    for layer, ids in experts.items():
        info = layout.moe_layer(layer)
        scalar = isinstance(ids, int) or (hasattr(ids, "__index__") and getattr(ids, "ndim", 0) == 0)
        ids = layout.check_experts(layer, [ids] if scalar else ids)
        if mode == "reroute" and getattr(info.routing, "_kind", "") == "hash":
            raise ValueError(
                f"layer {layer} is hash-routed (its experts are a fixed lookup of the token ids), so mode='reroute' "
                "has no meaning there: use mode='zero' or 'renorm'")
        if mode == "reroute" and len(ids) > info.n_experts - info.top_k:
            raise ValueError(
                f"cannot reroute around {len(ids)} of {info.n_experts} experts in layer {layer}: "
                f"at most {info.n_experts - info.top_k} can be blocked with top-{info.top_k} routing"
            )
        mask = torch.zeros(info.n_experts, dtype=torch.bool)
        mask[ids] = True
        masks[info.index] = mask
    with attached(model) as handle:
        edits = {}
        for index, mask in masks.items():
            state = handle.states[index]
            field = "exclude" if mode == "reroute" else "zero"
            previous = getattr(state, field)
            combined = mask if previous is None else previous.cpu() | mask
            cap = state.layer.n_experts - state.layer.top_k
            if mode == "reroute" and int(combined.reshape(-1, combined.shape[-1]).sum(-1).max()) > cap:
                raise ValueError(
                    f"cannot reroute around {int(combined.reshape(-1, combined.shape[-1]).sum(-1).max())} of "
                    f"{state.layer.n_experts} experts in layer {index} (this block and the enclosing ones together): "
                    f"at most {cap} can be blocked with top-{state.layer.top_k} routing")
            edits[index] = {field: combined.to(next(state.experts.parameters()).device)}
            if mode != "reroute":
                edits[index]["renorm"] = mode == "renorm"
        with _edited(model, edits) as edited:
            yield edited


@contextmanager
def restrict_experts(
    model: Any, top: int | None = None, *, shared: bool = True, layers: Iterable[int] | None = None,
    renorm: bool = False,
) -> Iterator[AttachHandle]:
    """Keep only the ``top`` largest routed gate weights per token and/or switch shared experts off.

    The kept weights are used as the model computed them (no renormalisation), or with ``renorm=True``
    rescaled to the token's original sum of all k weights. Examples:
    ``restrict_experts(m, 0)`` = shared only; ``restrict_experts(m, 1)`` = shared + top-1;
    ``restrict_experts(m, 2, shared=False)`` = routed top-2 only; ``restrict_experts(m, shared=False)``
    = shared expert ablated, routing unchanged.

    Args:
        top: routed experts kept per token, 0..k (None: all k).
        shared: keep the shared expert(s); ``False`` on a model without them is an error.
        layers: MoE layers to restrict (default: all MoE layers).
    """
    layout = _resolve(model)
    indices = layout.moe_layers if layers is None else [layout.moe_layer(i).index for i in layers]
    edits: dict[int, dict[str, Any]] = {}
    for index in indices:
        info = layout.layer(index)
        fields: dict[str, Any] = {}
        if top is not None:
            if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= info.top_k:
                raise ValueError(f"top must be an integer in 0..{info.top_k} (the model's k), got {top!r}")
            fields["keep_top"] = top
            fields["keep_top_renorm"] = bool(renorm)
        if not shared:
            if not info.has_shared:
                raise ValueError(
                    f"layer {index} of this {layout.family} model has no shared expert; "
                    "shared=False applies only to families with shared experts"
                )
            fields["shared_scale"] = 0.0
        edits[index] = fields
    with _edited(model, edits) as handle:
        yield handle


@contextmanager
def ablate_shared(model: Any, layers: Iterable[int] | None = None) -> Iterator[AttachHandle]:
    """Switch the shared expert(s) off (gate 0) in ``layers`` (default all MoE layers)."""
    with restrict_experts(model, shared=False, layers=layers) as handle:
        yield handle
