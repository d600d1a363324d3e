"""Routing inside the block, 2-D expert weights (DBRX).

DBRX's router returns only its logits; the block (``DbrxFFN.route_tokens_to_experts``, a method, not a
module) turns them into ``(weights, indices)`` and hands them to the experts, whose weights are 2-D
(``w1`` / ``v1`` / ``w2``: ``[E * d_expert, d_model]``, one slice per expert), so the
``ExpertsInterface`` does not apply. The hook contract is reached with torch hooks only:

* on the router: ``hook_router_logits`` .. ``hook_topk_weights`` fire from its logits, by the family's
  rule (exactly the routing of the block: a softmax in the logits' dtype, top-k, p-norm renormalisation);
* a forward pre-hook on the experts replaces their ``(top_k_index, top_k_weights)`` arguments by the
  hooked ones and hands the original forward an empty batch; a forward hook then runs the experts'
  own eager loop (same per-expert rows, same operations, same ``index_add_`` order) through
  ``hook_expert_acts``, ``hook_expert_out`` and ``hook_routed_out``.

So the attached model computes the experts once and is bit-identical to the unattached one in every dtype.
"""

from __future__ import annotations

import sys

import cloudpickle
import torch
from torch import Tensor

__all__ = ["dbrx_slots", "expert_weights", "install"]


def expert_weights(experts) -> tuple[Tensor, Tensor, Tensor]:
    """DBRX's (w1, v1, w2) as [E, d_expert, d_model] views: gate, up and (transposed) down projections."""
    shape = (experts.num_experts, experts.ffn_hidden_size, experts.hidden_size)
    return experts.mlp.w1.view(shape), experts.mlp.v1.view(shape), experts.mlp.w2.view(shape)


def _state(module):
    from nnsight_moe.hooks import _STATE

    return module.__dict__[_STATE]


def install(state) -> list:
    """Hooks on the router and experts of a DBRX block (``state``: its ``BlockState``); the handles."""
    return [
        state.router.register_forward_hook(_route),
        state.experts.register_forward_pre_hook(_take_input),
        state.experts.register_forward_hook(_hooked_forward),
    ]


def _route(router, args, output):
    """The contract's routing hooks on the router's logits (``hooks._route`` on a one-element output)."""
    from nnsight_moe.hooks import _route as route

    logits, weights, indices = route(router, args, (output,))
    _state(router).routed = (weights, indices)
    return logits.reshape(output.shape)


def _take_input(experts, args):
    """Keep the tokens, hand the original forward an empty batch (the forward hook computes the experts)."""
    state = _state(experts)
    state.expert_input = args[0]
    x = args[0]
    return (x[:, :0] if x.dim() == 3 else x[:0], args[1][:0], args[2][:0])


def _hooked_forward(experts, args, output):
    state = _state(experts)
    state.experts_pending = False
    x = state.__dict__.pop("expert_input")
    weights, indices = state.__dict__.pop("routed")  # [n, k] each, from the router hook
    shape = x.shape
    x = x.reshape(-1, experts.hidden_size)
    n, k = indices.shape
    b, p = state.bp(n)
    w1, v1, w2 = expert_weights(experts)
    act = experts.mlp.activation_fn
    mask = torch.nn.functional.one_hot(indices, num_classes=experts.num_experts).permute(2, 1, 0)
    hit = [int(e) for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0]]
    where = {e: torch.where(mask[e]) for e in hit}  # (slot, token) per expert, in the model's order
    acts = x.new_zeros(n, k, experts.ffn_hidden_size)
    for e in hit:
        slot, token = where[e]
        rows = x[token]
        acts[token, slot] = act(rows.matmul(w1[e].T)) * rows.matmul(v1[e].T)
    acts = state.hook("hook_expert_acts", acts.view(b, p, k, -1)).reshape(n, k, -1)
    out = x.new_zeros(n, k, experts.hidden_size)
    for e in hit:
        slot, token = where[e]
        out[token, slot] = acts[token, slot].matmul(w2[e])
    out = state.hook("hook_expert_out", out.view(b, p, k, -1)).reshape(n, k, -1)
    routed = torch.zeros_like(x)
    for e in hit:
        slot, token = where[e]
        routed.index_add_(0, token, out[token, slot] * weights[token, slot, None])
    routed = state.hook("hook_routed_out", routed.view(b, p, -1))
    return routed.reshape(shape)


# ------------------------------------------------------------------ trace side (shipped by value)
def dbrx_slots(experts, x: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Per-slot (acts [n, k, d_expert], out [n, k, d]) of DBRX experts (or their nnsight envoy) on tokens
    ``x`` [n, d] for the selected ``indices`` [n, k], recomputed from the 2-D weights (the remote view)."""
    n, k = indices.shape
    flat = indices.reshape(-1)
    rows = torch.arange(n, device=x.device).repeat_interleave(k)
    w1, v1, w2 = expert_weights(experts)
    acts = x.new_zeros(n * k, experts.ffn_hidden_size)
    out = x.new_zeros(n * k, x.shape[-1])
    for e in flat.unique().tolist():
        slots = (flat == e).nonzero().squeeze(-1)
        tokens = x[rows[slots]]
        a = experts.mlp.activation_fn(tokens.matmul(w1[e].T)) * tokens.matmul(v1[e].T)
        acts[slots] = a
        out[slots] = a.matmul(w2[e])
    return acts.reshape(n, k, -1), out.reshape(n, k, -1)


# Ship this module's functions by value (as source): nnsight_moe is not installed on NDIF.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
