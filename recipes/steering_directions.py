"""Steering directions: per-layer means of a hook over a prompt set, and their behaviour - control difference.

:func:`mean_difference` gives ``{layer: vector}`` for ``nnsight_moe.steering.plan(directions=...)``.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor

import nnsight_moe
from nnsight_moe import steering
from nnsight_moe.recipes.prompts import model_tokenizer
from nnsight_moe.recipes.steering_data import _forward_reading, _prompts_targets, _run, _units


def _hook_sums_local(layers: list, hook: str, positions: str, model: Any, batch: dict) -> dict:
    seen = _forward_reading(model, batch, [(i, hook) for i in layers])
    rows, pos = _units(batch, positions)
    return {i: _sum_units(seen[(i, hook)], rows, pos) for i in layers}


def _hook_sums_traced(view: Any, hook: str, positions: str, model: Any, batch: dict) -> dict:
    rows, pos = _units(batch, positions)
    name = hook[len("hook_"):]
    return {i: _sum_units(view.layer(i, want=(name,))[name], rows, pos) for i in view.moe_layers}


def _sum_units(value: Tensor, rows: Tensor, pos: Tensor) -> tuple:
    picked = value[rows, pos].float()
    picked = picked.reshape(-1, picked.shape[-1])  # expert_out: every selected slot is a unit
    return picked.sum(0), picked.shape[0]


def hook_means(model: Any, prompts: Any, *, hook: str = "hook_moe_out", tokenizer: Any = None,
               positions: str = "last", batch_size: int = 16, remote: Any = None) -> dict[int, Tensor]:
    """Mean of ``hook`` (``hook_moe_out``, ``hook_expert_out``, ``hook_shared_out``) per MoE layer over the
    units of ``prompts`` (their last tokens, or every non-pad token with ``positions="all"``), float32."""
    if hook not in steering.DIRECTION_HOOKS:
        raise ValueError(f"hook must be one of {steering.DIRECTION_HOOKS}, got {hook!r}")
    if positions not in ("last", "all"):
        raise ValueError(f"positions must be 'last' or 'all', got {positions!r}")
    tokenizer = model_tokenizer(model, tokenizer)
    layout = nnsight_moe.layout(model)
    if hook == "hook_shared_out" and not layout.has_shared:
        raise ValueError("hook_shared_out: this model has no shared expert")
    layers = [i for i in layout.moe_layers if hook != "hook_shared_out" or layout.layer(i).has_shared]
    prompts, _ = _prompts_targets(prompts, tokenizer, False)
    view = nnsight_moe.remote.MoEView(model) if remote is not None else None
    results = _run(model, prompts, functools.partial(_hook_sums_local, layers, hook, positions),
                   functools.partial(_hook_sums_traced, view, hook, positions), tokenizer=tokenizer,
                   batch_size=batch_size, remote=remote, desc="hook means")
    return {i: (sum(r[i][0].double() for r in results) / sum(int(r[i][1]) for r in results)).float() for i in layers}


def mean_difference(model: Any, behaviour: Any, control: Any, *, hook: str = "hook_moe_out", tokenizer: Any = None,
                    positions: str = "last", batch_size: int = 16, remote: Any = None) -> dict[int, Tensor]:
    """Per MoE layer, the mean of ``hook`` over ``behaviour`` minus its mean over ``control`` (:func:`hook_means`).

    Returns ``{layer: vector [d_model]}`` (float32), ready for ``nnsight_moe.steering.plan(directions=...)``:
    ``mode="remove"`` projects the behaviour-vs-control direction out, ``mode="add"`` with ``alpha=1`` moves
    the control mean onto the behaviour mean (``alpha=-1`` the other way).
    """
    options = {"hook": hook, "tokenizer": tokenizer, "positions": positions, "batch_size": batch_size, "remote": remote}
    a, b = hook_means(model, behaviour, **options), hook_means(model, control, **options)
    return {layer: a[layer] - b[layer] for layer in a}
