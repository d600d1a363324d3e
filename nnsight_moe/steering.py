"""Steering: force routed experts on or off, scale their gates, add or remove a direction, on chosen positions.

    from nnsight_moe import steering
    plan = steering.plan(model, on={3: [5]}, off={2: [1]}, scale={1: {4: 2.0}}, span="generated")
    with steering.steer(model, plan):                     # HF, nnsight (local) or TransformerBridge
        out = model.generate(ids, max_new_tokens=8)
    ids = steering.generate(lm, prompts, plan, max_new_tokens=8, remote="local")   # nnsight, remote=

**Expert edits** are router-logit edits, after which the family's own routing rule re-derives scores,
selection and gate weights (the hook contract's "editing hook_router_logits re-derives ..."):

* ``on``:  the expert's logit becomes ``max(logits) + margin`` (over the token's E logits), SteerMoE's
  activation edit: it is the top logit, so a top-k rule selects it; under a selection-only bias or a
  group limit (DeepSeek-V3, GLM) the family's rule decides, exactly as the router would for those logits;
* ``off``: the expert's logit becomes ``min(logits) - margin``, the bottom logit;
* ``scale``: the expert's gate weight (after selection, as the model multiplies it) times a factor
  (0 = blocked with ``block_experts(mode="zero")``).

**Direction edits** act on ``hook_moe_out``, ``hook_shared_out`` (local and remote) or ``hook_expert_out``
(local: per selected slot): ``mode="remove"`` projects the unit direction out, ``x - (x . u) u``;
``mode="add"`` adds ``alpha * d`` (the direction as given, e.g. a difference of means).
:func:`nnsight_moe.recipes.steering.mean_difference` estimates one per layer from two prompt sets.

**Positions** (``span``): ``None`` (every position), ``"generated"`` (the positions that choose
generated tokens: the last prompt position and every generated one), ``(start, stop)`` (absolute
positions, ``stop`` None = open) or a bool mask ``[batch, width]`` over absolute positions. Absolute
positions count from the first (padded) column of the prompt; during ``generate`` the hooks learn the
cache length from the model's ``past_key_values``.

Everything composes with :func:`nnsight_moe.block_experts` (blocking applies first, then the gate
scaling; a forced-on expert that is blocked keeps a zero gate) and with nested :func:`steer` contexts
(applied in order). The plan is plain data, so the trace-side function :func:`apply_in_trace` ships it
to NDIF (``remote=True``) with the remote view: the same edits on the unmodified model.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import cloudpickle
import torch
from torch import Tensor

__all__ = ["DIRECTION_HOOKS", "DIRECTION_MODES", "apply_in_trace", "generate", "plan", "stack", "steer",
           "steer_direction", "steer_experts"]

#: Hook points a direction edit can act on.
DIRECTION_HOOKS = ("hook_moe_out", "hook_expert_out", "hook_shared_out")
#: What a direction edit does: project it out, or add it.
DIRECTION_MODES = ("remove", "add")


# ============================================================================ the plan (plain data)
def plan(model: Any, on: Mapping | None = None, off: Mapping | None = None, scale: Mapping | None = None, *,
         margin: float = 1.0, directions: Any = None, hook: str = "hook_moe_out", mode: str = "remove",
         alpha: float = 1.0, span: Any = None) -> dict:
    """A validated steering plan for ``model`` (plain data: ints, floats, lists, tensors).

    Args:
        model: HF model, TransformerBridge or nnsight model of a supported MoE family.
        on / off: ``{layer: [expert ids]}`` forced on (logit to the top) / off (logit to the bottom).
        scale: ``{layer: {expert: factor}}`` multiplies those experts' gate weights.
        margin: how far above the max (on) or below the min (off) the edited logit goes (> 0).
        directions: ``{layer: vector [d_model]}`` (or one vector for every MoE layer) for the direction edit.
        hook: ``"hook_moe_out"``, ``"hook_expert_out"`` or ``"hook_shared_out"``.
        mode: ``"remove"`` (project the unit direction out) or ``"add"`` (add ``alpha`` times the vector).
        span: which positions are steered (see the module docstring).

    Returns ``{"layers": {layer: {...}}, "span": span}``. An expert both on and off, an unknown layer,
    hook, mode or expert id raises ``ValueError`` naming it and what is accepted.
    """
    from nnsight_moe import layout as layout_of

    layout = layout_of(model)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not margin > 0:
        raise ValueError(f"margin must be a positive number, got {margin!r}")
    if hook not in DIRECTION_HOOKS:
        raise ValueError(f"hook must be one of {DIRECTION_HOOKS}, got {hook!r}")
    if mode not in DIRECTION_MODES:
        raise ValueError(f"mode must be one of {DIRECTION_MODES}, got {mode!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    layers: dict[int, dict] = {}

    def entry(layer: Any) -> dict:
        info = layout.moe_layer(layer)
        return layers.setdefault(info.index, {"n_experts": info.n_experts, "on": [], "off": [], "scale": None,
                                              "margin": float(margin),
                                              "direction": None, "hook": hook, "mode": mode, "alpha": float(alpha)})

    for name, edits in (("on", on), ("off", off)):
        for layer, ids in _mapping(edits, name).items():
            e = entry(layer)
            ids = [ids] if isinstance(ids, int) else list(ids)
            e[name] = sorted(set(layout.check_experts(layer, ids)))
    for layer, factors in _mapping(scale, "scale").items():
        e = entry(layer)
        if not isinstance(factors, Mapping):
            raise TypeError(f"scale[{layer}] must be a mapping {{expert: factor}}, got {type(factors).__name__}")
        n = layout.layer(layout.moe_layer(layer).index).n_experts
        vector = [1.0] * n
        for expert, factor in factors.items():
            layout.check_experts(layer, [expert])
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
                raise ValueError(f"scale[{layer}][{expert}] must be a finite number, got {factor!r}")
            vector[int(expert)] = float(factor)
        e["scale"] = vector
    for index, e in layers.items():
        both = set(e["on"]) & set(e["off"])
        if both:
            raise ValueError(f"layer {index}: experts {sorted(both)} are both forced on and off")
    if directions is not None:
        if isinstance(directions, Tensor):
            directions = {i: directions for i in layout.moe_layers}
        for layer, vector in _mapping(directions, "directions").items():
            e = entry(layer)
            vector = torch.as_tensor(vector).detach().float().cpu().reshape(-1)
            d_model = layout.layer(_index(layout, layer)).d_model
            if vector.numel() != d_model:
                raise ValueError(f"directions[{layer}] has {vector.numel()} entries; the model's d_model is {d_model}")
            if mode == "remove" and not float(vector.norm()) > 0:
                raise ValueError(f"directions[{layer}] is the zero vector: there is no direction to remove")
            if hook == "hook_shared_out" and not layout.layer(_index(layout, layer)).has_shared:
                raise ValueError(f"layer {layer} has no shared expert: hook_shared_out does not exist there")
            e["direction"] = vector
    return {"layers": layers, "span": _check_span(span)}


def _index(layout: Any, layer: Any) -> int:
    """The layout index of MoE layer ``layer`` (negative indices allowed)."""
    return layout.moe_layer(layer).index


def _mapping(value: Any, name: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping {{layer: ...}}, got {type(value).__name__}")
    return value


def _check_span(span: Any) -> Any:
    if span is None or (isinstance(span, str) and span == "generated"):
        return span
    if isinstance(span, Tensor):
        if span.dtype != torch.bool or span.dim() != 2:
            raise ValueError(f"a span mask must be bool [batch, width], got {span.dtype} {tuple(span.shape)}")
        return span.cpu()
    if isinstance(span, (tuple, list)) and len(span) == 2 and all(s is None or isinstance(s, int) for s in span):
        start, stop = span
        if (start or 0) < 0 or (stop is not None and stop <= (start or 0)):
            raise ValueError(f"span (start, stop) needs 0 <= start < stop, got {tuple(span)}")
        return [start or 0, stop]
    raise ValueError(f"span must be None, 'generated', (start, stop) or a bool mask [batch, width], got {span!r}")


# ============================================================ edits (plain functions, shipped by value)
def positions_mask(span: Any, b: int, p: int, offset: int, prompt_len: int, device: Any) -> Any:
    """Bool [b, p] of the steered positions of a forward over absolute positions ``offset..offset+p-1``
    (``prompt_len``: the prompt's padded width), or None when every position is steered."""
    if span is None:
        return None
    pos = torch.arange(offset, offset + p, device=device)
    if isinstance(span, str):  # "generated"
        return (pos >= prompt_len - 1)[None, :].expand(b, p)
    if isinstance(span, torch.Tensor):
        if span.shape[0] != b:
            raise ValueError(f"the span mask has {span.shape[0]} rows but the batch has {b}")
        mask = torch.zeros(b, p, dtype=torch.bool, device=device)
        width = span.shape[1]
        inside = pos < width
        mask[:, inside] = span.to(device)[:, pos[inside]]
        return mask
    start, stop = span
    keep = (pos >= start) if stop is None else (pos >= start) & (pos < stop)
    return keep[None, :].expand(b, p)


def _mask(spec: Any, n: int, device: Any) -> Any:
    """Experts to edit as a bool mask [1 or rows, 1, E]: from a list of ids, or a per-row mask [rows, E]; None if none."""
    if isinstance(spec, torch.Tensor):
        return spec.to(device)[:, None, :] if bool(spec.any()) else None
    if not spec:
        return None
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[spec] = True
    return mask[None, None, :]


def _any(spec: Any) -> bool:
    """Whether an ``on`` / ``off`` entry (list of ids or per-row mask) names any expert."""
    return bool(spec.any()) if isinstance(spec, torch.Tensor) else bool(spec)


def _per_row(value: Any, like: torch.Tensor) -> Any:
    """A scalar, or a per-row tensor [rows] as [rows, 1, 1] in ``like``'s dtype and device."""
    if isinstance(value, torch.Tensor):
        return value.to(like.device, like.dtype)[:, None, None]
    return value


def edit_logits(edit: dict, active: Any, logits: torch.Tensor) -> torch.Tensor:
    """Router logits [b, p, E] with ``edit["on"]`` raised to max + margin and ``edit["off"]`` lowered to
    min - margin, at the ``active`` positions (bool [b, p], None = all). ``on`` / ``off`` are expert ids or,
    in a :func:`stack`-ed plan, per-row masks [b, E] (``margin`` then per row [b])."""
    n = logits.shape[-1]
    on, off = _mask(edit["on"], n, logits.device), _mask(edit["off"], n, logits.device)
    if on is None and off is None:
        return logits
    margin = _per_row(edit["margin"], logits)
    new = logits
    if on is not None:
        top = logits.max(dim=-1, keepdim=True).values + margin
        new = torch.where(on, top.expand_as(logits), new)
    if off is not None:
        bottom = logits.min(dim=-1, keepdim=True).values - margin
        new = torch.where(off, bottom.expand_as(logits), new)
    if active is None:
        return new
    return torch.where(active.to(logits.device)[..., None], new, logits)


def edit_weights(edit: dict, active: Any, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Gate weights [b, p, k] times ``edit["scale"][expert]`` ([E], or per row [b, E] in a stacked plan)
    at the ``active`` positions."""
    if edit["scale"] is None:
        return weights
    scale = torch.as_tensor(edit["scale"]).to(weights.device, weights.dtype)
    if scale.dim() == 1:
        factors = scale[indices]
    else:
        factors = scale[:, None, :].expand(-1, indices.shape[1], -1).gather(-1, indices)
    if active is not None:
        factors = torch.where(active.to(weights.device)[..., None], factors, torch.ones_like(factors))
    return weights * factors


def edit_direction(edit: dict, active: Any, x: torch.Tensor) -> torch.Tensor:
    """``x`` [b, p, d] or [b, p, k, d] with the direction removed (``x - (x . u) u``) or added
    (``x + alpha * d``) at the ``active`` positions (computed in float32, returned in x's dtype). The
    direction is [d], or per row [b, d] in a stacked plan (a zero row leaves that row unchanged)."""
    d = edit["direction"].to(x.device, torch.float32)
    d = d.reshape(-1 if d.dim() == 2 else 1, *([1] * (x.dim() - 2)), d.shape[-1])
    xf = x.float()
    if edit["mode"] == "remove":
        norm = d.norm(dim=-1, keepdim=True)
        u = d / torch.where(norm > 0, norm, torch.ones_like(norm))
        new = xf - (xf * u).sum(-1, keepdim=True) * u
    else:
        new = xf + edit["alpha"] * d
    if active is not None:
        mask = active.to(x.device)
        while mask.dim() < x.dim():
            mask = mask[..., None]
        new = torch.where(mask, new, xf)
    return new.to(x.dtype)


def _has_experts(edit: dict) -> bool:
    return _any(edit["on"]) or _any(edit["off"]) or edit["scale"] is not None


def stack(plans: list, rows: int) -> dict:
    """One plan applying ``plans[c]`` to batch rows ``c * rows .. (c + 1) * rows - 1`` (condition-major, as
    :func:`nnsight_moe.recipes.runner.repeat` stacks a batch), so C conditions run in one forward.

    The plans must share their span, and per layer their direction hook, mode and alpha. Runs in traces
    too (plain torch): :func:`apply_in_trace` takes the stacked plan.
    """
    spans = [p["span"] for p in plans if p["layers"]] or [None]  # a plan without edits has no span to share
    if any(not _same(s, spans[0]) for s in spans):
        raise ValueError("stacked plans must have the same span")
    n_rows = len(plans) * rows
    layers: dict = {}
    for c, p in enumerate(plans):
        for layer, edit in p["layers"].items():
            layers.setdefault(layer, []).append((c, edit))
    out = {}
    for layer, edits in layers.items():
        n_experts = edits[0][1]["n_experts"]
        on = torch.zeros(n_rows, n_experts, dtype=torch.bool)
        off = torch.zeros(n_rows, n_experts, dtype=torch.bool)
        margin = torch.zeros(n_rows)
        scale = torch.ones(n_rows, n_experts) if any(e["scale"] is not None for _, e in edits) else None
        with_direction = [e for _, e in edits if e["direction"] is not None]
        direction = torch.zeros(n_rows, with_direction[0]["direction"].numel()) if with_direction else None
        for key in ("hook", "mode", "alpha"):
            if len({e[key] for e in with_direction}) > 1:
                raise ValueError(f"layer {layer}: stacked direction edits must share their {key}")
        for c, e in edits:
            span = slice(c * rows, (c + 1) * rows)
            on[span, e["on"]] = True
            off[span, e["off"]] = True
            margin[span] = e["margin"]
            if e["scale"] is not None:
                scale[span] = torch.tensor(e["scale"])
            if e["direction"] is not None:
                direction[span] = e["direction"]
        first = with_direction[0] if with_direction else edits[0][1]
        out[layer] = {"n_experts": n_experts, "on": on, "off": off, "scale": scale, "margin": margin,
                      "direction": direction,
                      "hook": first["hook"], "mode": first["mode"], "alpha": first["alpha"]}
    span = spans[0]
    if isinstance(span, torch.Tensor):  # a mask [rows, width] per plan: one copy per condition
        span = span.repeat(len(plans), 1)
    return {"layers": out, "span": span}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


# ============================================================================ local: hooks on the model
class _Steer:
    """One active plan on an attached model: BlockState calls :meth:`logits` / :meth:`weights`."""

    def __init__(self, plan: dict):
        self.plan = plan
        self.offset, self.prompt_len = 0, 0

    def active(self, b: int, p: int, device: Any) -> Any:
        return positions_mask(self.plan["span"], b, p, self.offset, self.prompt_len or p, device)

    def logits(self, state: Any, logits: Tensor) -> Tensor:
        edit = self.plan["layers"].get(state.layer.index)
        if edit is None or not (_any(edit["on"]) or _any(edit["off"])):
            return logits
        b, p, _ = logits.shape
        return edit_logits(edit, self.active(b, p, logits.device), logits)

    def weights(self, state: Any, indices: Tensor, weights: Tensor) -> Tensor:
        edit = self.plan["layers"].get(state.layer.index)
        if edit is None or edit["scale"] is None:
            return weights
        b, p, _ = indices.shape
        return edit_weights(edit, self.active(b, p, weights.device), indices, weights)

    def track(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the HF model: the absolute offset of this forward's first token.

        From ``cache_position`` when given, else the largest of the cache length (``cache`` in
        transformers 5, ``past_key_values`` before) and the width of a 2-D ``attention_mask`` minus the
        input's (generate may pass the mask of past + new tokens), else 0.
        """
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        p = int(x.shape[1]) if isinstance(x, Tensor) and x.dim() >= 2 else None
        position = kwargs.get("cache_position")
        if isinstance(position, Tensor) and position.numel():
            offset = int(position.reshape(-1)[0])
        else:
            offset = 0
            for name in ("cache", "past_key_values"):
                past = kwargs.get(name)
                if past is not None and hasattr(past, "get_seq_length"):
                    offset = max(offset, int(past.get_seq_length()))
            mask = kwargs.get("attention_mask")
            if isinstance(mask, Tensor) and mask.dim() == 2 and p is not None:
                offset = max(offset, int(mask.shape[1]) - p)
        if offset == 0 and p is not None:
            self.prompt_len = p
        self.offset = offset


@contextmanager
def steer(model: Any, plan: dict) -> Iterator[Any]:
    """Apply a :func:`plan` to every forward of ``model`` (HF, TransformerBridge or nnsight model, local)
    while the context is open; yields the attach handle. ``generate`` inside the context is steered too."""
    from nnsight_moe.attach import attached, hf_model
    from nnsight_moe.hooks import TemporaryHooks

    if not isinstance(plan, dict) or "layers" not in plan:
        raise TypeError(f"plan must come from nnsight_moe.steering.plan(...), got {type(plan).__name__}")
    active = _Steer(plan)
    with attached(model) as handle:
        hf = hf_model(model)
        tracker = hf.register_forward_pre_hook(active.track, with_kwargs=True)
        added = TemporaryHooks()
        touched = []
        try:
            for index, edit in plan["layers"].items():
                state = handle.states[index]
                if _has_experts(edit):
                    state.steer = [*state.steer, active]
                    touched.append(state)
                if edit["direction"] is not None:
                    added.add(state.points._modules[edit["hook"]], _direction_hook(active, edit))
            yield handle
        finally:
            tracker.remove()
            added.remove()
            for state in touched:
                state.steer = [s for s in state.steer if s is not active]


def _direction_hook(active: _Steer, edit: dict):
    def hook(value: Tensor, hook: Any) -> Tensor:
        return edit_direction(edit, active.active(value.shape[0], value.shape[1], value.device), value)
    return hook


def steer_experts(model: Any, on: Mapping | None = None, off: Mapping | None = None, scale: Mapping | None = None, *,
                  margin: float = 1.0, span: Any = None):
    """``steer(model, plan(model, on, off, scale, margin=margin, span=span))``: expert edits only (context)."""
    return steer(model, plan(model, on, off, scale, margin=margin, span=span))


def steer_direction(model: Any, directions: Any, *, hook: str = "hook_moe_out", mode: str = "remove",
                    alpha: float = 1.0, span: Any = None):
    """``steer(model, plan(model, directions=..., ...))``: a direction edit only (context)."""
    return steer(model, plan(model, directions=directions, hook=hook, mode=mode, alpha=alpha, span=span))


# ============================================================================ nnsight traces (remote=)
def apply_in_trace(view: Any, model: Any, plan: dict, *, step: int = 0, width: int | None = None,
                   block: Any = None, mode: str = "zero") -> None:
    """Apply ``plan`` inside ``model.trace`` / ``model.generate`` (local or remote) through the remote view.

    Call it where the edits should happen: once in a trace, or once per step inside
    ``for step in tracer.iter[:]`` of a generation (pass ``step`` and the prompt's padded ``width``;
    step s > 0 is the forward of absolute position ``width + s - 1``). ``block`` (``{layer: [ids]}``)
    and ``mode`` compose blocking as :func:`nnsight_moe.block_experts` does. ``hook_expert_out`` edits
    are not available here (the view recomputes expert outputs; it cannot replace them).
    """
    spec = view.spec["layers"]
    if step and width is None:
        raise ValueError("apply_in_trace at a generation step > 0 needs width= (the prompt's padded length)")
    block = block or {}
    layers = sorted(set(plan["layers"]) | set(block))
    for layer in layers:
        edit = plan["layers"].get(layer)
        x = _envoy(model, spec[layer]["block"]).input
        b, p = x.shape[0], x.shape[1]
        if width is None:
            width = p
        offset = 0 if step == 0 else width + step - 1
        active = positions_mask(plan["span"], b, p, offset, width, x.device)
        direction = edit is not None and edit["direction"] is not None
        if direction and edit["hook"] == "hook_expert_out":
            raise ValueError("hook_expert_out direction edits need the attached model (steering.steer); in an "
                             "nnsight trace use hook_moe_out or hook_shared_out")
        if direction and edit["hook"] == "hook_shared_out" and spec[layer]["shared_first"]:
            _edit_output(_envoy(model, spec[layer]["shared"]), edit, active)
        if layer in block or (edit is not None and _has_experts(edit)):
            options = {}
            if edit is not None and (_any(edit["on"]) or _any(edit["off"])):
                options["edit_logits"] = functools.partial(edit_logits, edit, active)
            if edit is not None and edit["scale"] is not None:
                options["edit_weights"] = functools.partial(edit_weights, edit, active)
            if layer in block:
                options["block"], options["mode"] = block[layer], mode
            view.layer(layer, want=("topk_weights",), **options)
        if direction and edit["hook"] == "hook_shared_out" and not spec[layer]["shared_first"]:
            _edit_output(_envoy(model, spec[layer]["shared"]), edit, active)
        if direction and edit["hook"] == "hook_moe_out" and spec[layer]["shared_outside"]:
            _edit_sum(_envoy(model, spec[layer]["block"]), _envoy(model, spec[layer]["shared"]), edit, active)
        elif direction and edit["hook"] == "hook_moe_out":  # Gemma-4: the experts' output, not the decoder layer's
            _edit_output(_envoy(model, spec[layer]["moe_out"] or spec[layer]["block"]), edit, active)


def _edit_sum(block: Any, shared: Any, edit: dict, active: Any) -> None:
    """A shared MLP beside the block (Granite): ``hook_moe_out`` is the sum the decoder layer makes of both
    outputs, so the shared output is set to ``edited(block + shared) - block`` (as the attached hooks do)."""
    first = block.output
    first = first[0] if isinstance(first, tuple) else first
    out = shared.output
    shared.output = (edit_direction(edit, active, first + out) - first).to(out.dtype)


def _edit_output(envoy: Any, edit: dict, active: Any) -> None:
    """Replace a module's output (a tensor or a tuple led by one) by its direction-edited version."""
    out = envoy.output
    first = out[0] if isinstance(out, tuple) else out
    shape = first.shape
    b = active.shape[0] if active is not None else None
    x = first if first.dim() == 3 else first.reshape(b or 1, -1, shape[-1])
    edited = edit_direction(edit, active, x).reshape(shape)
    envoy.output = (edited, *out[1:]) if isinstance(out, tuple) else edited


def _envoy(model: Any, path: str) -> Any:
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


# ============================================================================ generation, either path
def generate(model: Any, inputs: Any, plan: dict | None = None, *, max_new_tokens: int = 8, remote: Any = None,
             tokenizer: Any = None, block: Mapping | None = None, mode: str = "zero", **kwargs: Any) -> Tensor:
    """Greedy generation under ``plan`` (None: unsteered); returns the token ids [b, width + new].

    ``inputs``: a list of strings (``tokenizer`` or the model's own) or ``{"input_ids", "attention_mask"}``.
    Local (``remote=None``): ``model.generate`` (an HF model, or nnsight's through its HF model) inside
    :func:`steer` (and ``block_experts`` for ``block``). ``remote`` (``True``, ``"local"``, a host): nnsight
    ``model.generate(..., remote=remote)`` with :func:`apply_in_trace` at every step, on the unmodified model.
    """
    from nnsight_moe.attach import hf_model
    from nnsight_moe.interventions import block_experts
    from nnsight_moe.recipes.prompts import encode_prompts, model_tokenizer

    tokenizer = model_tokenizer(model, tokenizer)
    hf = hf_model(model)
    if isinstance(inputs, Mapping):
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask")}
        if batch["attention_mask"] is None:
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    else:
        batch = encode_prompts(tokenizer, list(inputs), "cpu")
    plan = plan or {"layers": {}, "span": None}
    options = {"max_new_tokens": max_new_tokens, "do_sample": False, **kwargs}
    pad = getattr(hf.generation_config, "pad_token_id", None) or hf.config.get_text_config().pad_token_id
    options.setdefault("pad_token_id", pad if pad is not None else 0)
    if remote is None:
        device = next(hf.parameters()).device
        local = {k: v.to(device) for k, v in batch.items()}
        with steer(hf, plan), (block_experts(hf, block, mode=mode) if block else _nothing()), torch.no_grad():
            return hf.generate(**local, **options).cpu()
    import nnsight

    from nnsight_moe.remote import MoEView, _check_remote, _ship_by_value

    _check_remote(remote)
    view = MoEView(model)
    _ship_by_value(apply_in_trace)
    width = int(batch["input_ids"].shape[1])
    block = {model_layer: list(ids) for model_layer, ids in (block or {}).items()}
    with warnings.catch_warnings(), model.generate(remote=remote, **options) as tracer:
        warnings.filterwarnings("ignore", message=".*was never reached")  # the open loop's normal end
        with tracer.invoke(dict(batch)):
            for step in tracer.iter[:]:  # every step; the open loop ends with the generation
                apply_in_trace(view, model, plan, step=step, width=width, block=block, mode=mode)
        with tracer.invoke():  # the whole batch, after the loop
            ids = nnsight.save(tracer.result)
    return ids.cpu()


@contextmanager
def _nothing():
    yield


# Ship this module's functions by value (as source): nnsight_moe is not installed on NDIF.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
