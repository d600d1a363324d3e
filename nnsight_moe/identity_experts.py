"""Zero-compute identity experts (LongCat-Flash).

LongCat-Flash routes each token over ``n_routed_experts`` real experts plus ``zero_expert_num``
*identity* experts (ids ``n_routed_experts ..``): an identity expert returns its input unchanged, so a
token that picks one keeps ``weight * x`` of itself and spends no compute. The experts module predates
the experts interface (its own eager loop), so the contract's expert hook points fire from torch hooks:
a forward pre-hook hands the original forward an empty batch and a forward hook runs the same loop
(same rows, same operations, same ``index_add_`` order) through ``hook_expert_acts``,
``hook_expert_out`` and ``hook_routed_out``: bit-identical in every dtype.

For an identity expert's slot, ``hook_expert_out`` is the token itself and ``hook_expert_acts`` is 0 (it
has no neurons; an edit there has no effect). Blocking one with ``zero`` removes its ``weight * x``
(``renorm``, ``reroute`` as for any expert).
"""

from __future__ import annotations

import sys

import cloudpickle
import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["identity_slots", "install"]


def _state(module):
    from nnsight_moe.hooks import _STATE

    return module.__dict__[_STATE]


def install(state) -> list:
    """Hooks on the experts of a LongCat-Flash block (``state``: its ``BlockState``); the handles."""
    return [state.experts.register_forward_pre_hook(_take_input), state.experts.register_forward_hook(_hooked)]


def _take_input(experts, args):
    """Keep the inputs; hand the original forward an empty selection (the forward hook computes the experts)."""
    _state(experts).expert_args = args
    x, indices, weights = args
    return (x, indices[:0], weights[:0])


def _hooked(experts, args, output):
    state = _state(experts)
    state.experts_pending = False
    x, indices, weights = state.__dict__.pop("expert_args")
    n, k = indices.shape
    b, p = state.bp(n)
    real = experts.num_routed_experts if experts.gate_up_proj is not None else 0
    mask = F.one_hot(indices, num_classes=experts.total_experts).permute(2, 1, 0)
    hit = [int(e) for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero(as_tuple=False)[:, 0]]
    where = {e: torch.where(mask[e]) for e in hit}  # (slot, token) per expert, in the model's order
    acts = x.new_zeros(n, k, experts.intermediate_size)
    for e in hit:
        if e < real:
            slot, token = where[e]
            gate, up = F.linear(x[token], experts.gate_up_proj[e]).chunk(2, dim=-1)
            acts[token, slot] = experts.act_fn(gate) * up
    acts = state.hook("hook_expert_acts", acts.view(b, p, k, -1)).reshape(n, k, -1)
    out = x.new_zeros(n, k, x.shape[-1])
    for e in hit:
        slot, token = where[e]
        out[token, slot] = F.linear(acts[token, slot], experts.down_proj[e]) if e < real else x[token]
    out = state.hook("hook_expert_out", out.view(b, p, k, -1)).reshape(n, k, -1)
    routed = torch.zeros_like(x)
    for e in hit:
        slot, token = where[e]
        routed.index_add_(0, token, (out[token, slot] * weights[token, slot, None]).to(x.dtype))
    return state.hook("hook_routed_out", routed.view(b, p, -1)).reshape(routed.shape)


# ------------------------------------------------------------------ trace side (shipped by value)
def identity_slots(experts, x: Tensor, indices: Tensor, n_real: int) -> tuple[Tensor, Tensor]:
    """Per-slot (acts [n, k, d_expert], out [n, k, d]) of LongCat-Flash experts (or their envoy) on tokens
    ``x`` [n, d]; experts ``>= n_real`` are identities (acts 0, out = the token)."""
    n, k = indices.shape
    flat = indices.reshape(-1)
    rows = torch.arange(n, device=x.device).repeat_interleave(k)
    acts = x.new_zeros(n * k, experts.down_proj.shape[-1])
    out = x.new_zeros(n * k, x.shape[-1])
    for e in flat.unique().tolist():
        slots = (flat == e).nonzero().squeeze(-1)
        tokens = x[rows[slots]]
        if e >= n_real:
            out[slots] = tokens
            continue
        gate, up = F.linear(tokens, experts.gate_up_proj[e]).chunk(2, dim=-1)
        a = experts.act_fn(gate) * up
        acts[slots] = a
        out[slots] = F.linear(a, experts.down_proj[e])
    return acts.reshape(n, k, -1), out.reshape(n, k, -1)


# Ship this module's functions by value (as source): nnsight_moe is not installed on NDIF.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
