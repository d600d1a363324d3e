"""Dispatch routers and parallel experts (JetMoE's MLP).

JetMoE's router returns a *dispatch plan*, not ``(logits, weights, indices)``::

    (index_sorted_experts, batch_index, batch_gates, expert_size, logits)

(the token slots sorted by expert, their tokens, their gates, the slots per expert), and the block runs
two ``JetMoeParallelExperts`` (``input_linear``, ``output_linear``: ``[E, out, in]`` weights) on the
dispatched rows, multiplies by the gates, ``index_add``\\ s them back to the tokens and adds a learned
bias ``[d_model]``. The contract's hook points fire from torch hooks on those modules:

* on the router: the routing hooks from its logits (top-k of the float32 logits, softmax over the k, cast
  to the hidden states' dtype), then the dispatch plan rebuilt from the hooked ``(indices, weights)`` with
  the router's own operations (unedited: the identical plan);
* on ``output_linear``: its input, permuted from dispatch order to slot order, is ``hook_expert_acts``;
  its output ``hook_expert_out``; their gated ``index_add``, the block's own sum, ``hook_routed_out``;
* on the block: ``hook_moe_out`` is its output, ``hook_routed_out + bias`` (``LayerLayout.moe_bias``).

JetMoE's mixture-of-attention experts (``self_attention.experts``) are attention, not an MoE MLP: they
get no hook points (their router and projections keep their ordinary module hooks).
"""

from __future__ import annotations

import sys

import cloudpickle
import torch
from torch import Tensor

__all__ = ["dispatch_plan", "install", "parallel_slots"]


def dispatch_plan(indices: Tensor, weights: Tensor, n_experts: int) -> tuple:
    """JetMoE's dispatch tuple (without the logits) for ``indices`` / ``weights`` [n, k], as its router builds it."""
    k = indices.shape[-1]
    gates = torch.zeros([weights.shape[0], n_experts], dtype=weights.dtype, device=weights.device)
    expert_size = gates.scatter(1, indices, 1).long().sum(0).tolist()
    _, index_sorted_experts = indices.flatten().sort(0)
    batch_index = index_sorted_experts.div(k, rounding_mode="trunc")
    return index_sorted_experts, batch_index, weights.flatten()[index_sorted_experts], expert_size


def parallel_slots(block, x: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Per-slot (acts [n, k, d_expert], out [n, k, d]) of a JetMoE MLP (or its envoy) on tokens ``x`` [n, d]
    for ``indices`` [n, k], recomputed from the experts' weights (the remote view)."""
    n, k = indices.shape
    flat = indices.reshape(-1)
    rows = torch.arange(n, device=x.device).repeat_interleave(k)
    w_in, w_out = block.input_linear.weight, block.output_linear.weight
    acts = x.new_zeros(n * k, w_out.shape[-1])
    out = x.new_zeros(n * k, w_out.shape[1])
    for e in flat.unique().tolist():
        slots = (flat == e).nonzero().squeeze(-1)
        gate, up = torch.nn.functional.linear(x[rows[slots]], w_in[e]).chunk(2, dim=-1)
        a = block.activation(gate) * up
        acts[slots] = a
        out[slots] = torch.nn.functional.linear(a, w_out[e])
    return acts.reshape(n, k, -1), out.reshape(n, k, -1)


# ------------------------------------------------------------------ attached hooks
def _state(module):
    from nnsight_moe.hooks import _STATE

    return module.__dict__[_STATE]


def install(state) -> list:
    """Hooks on the router and ``output_linear`` of a JetMoE MLP (``state``: its ``BlockState``); the handles."""
    out = state.experts  # the block's output_linear (Adapter.experts)
    return [
        state.router.register_forward_hook(_route),
        out.register_forward_pre_hook(_acts),
        out.register_forward_hook(_out),
        state.block.register_forward_hook(_edited_sum, prepend=True),  # before hook_moe_out fires
    ]


def _edited_sum(block, args, output):
    """An edited ``hook_routed_out`` replaces the block's sum: the block output is then ``edited + bias``."""
    state = _state(block)
    routed = state.__dict__.pop("routed", None)
    if routed is not None:
        return routed.reshape(output.shape).to(output.dtype) + block.bias


def _route(router, args, output):
    from nnsight_moe.hooks import _route as route

    state = _state(router)
    logits, weights, indices = route(router, args, (output[4],))
    plan = dispatch_plan(indices, weights, router.num_experts)
    state.dispatch = plan
    return (*plan, logits)


def _slot_order(plan, n_slots: int) -> Tensor:
    """For each slot (token-major), its row in dispatch order."""
    inverse = torch.empty_like(plan[0])
    inverse[plan[0]] = torch.arange(n_slots, device=plan[0].device)
    return inverse


def _acts(linear, args):
    state = _state(linear)
    plan = state.dispatch
    acts = args[0]  # [n * k, d_expert], dispatch order
    n_slots = acts.shape[0]
    b, p = state.bp(n_slots // state.layer.top_k)
    inverse = _slot_order(plan, n_slots)
    slots = acts[inverse].view(b, p, state.layer.top_k, -1)
    edited = state.hook("hook_expert_acts", slots)
    return (edited.reshape(n_slots, -1)[plan[0]], *args[1:])


def _out(linear, args, output):
    state = _state(linear)
    state.experts_pending = False
    plan = state.__dict__.pop("dispatch")
    n_slots = output.shape[0]
    k = state.layer.top_k
    b, p = state.bp(n_slots // k)
    slots = state.hook("hook_expert_out", output[_slot_order(plan, n_slots)].view(b, p, k, -1))
    output = slots.reshape(n_slots, -1)[plan[0]]
    weighted = output * plan[2][:, None]  # the block's own sum of the gated outputs
    routed = torch.zeros((n_slots // k, output.shape[-1]), dtype=weighted.dtype, device=weighted.device)
    routed = routed.index_add(0, plan[1], weighted).view(b, p, -1)
    hooked = state.hook("hook_routed_out", routed)
    state.routed = None if hooked is routed else hooked  # an edited sum replaces the block's (moe_out hook)
    return output


# Ship this module's functions by value (as source): nnsight_moe is not installed on NDIF.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
