"""Shared experts weighted by the router (Inkling).

Inkling's router scores its ``E`` routed experts and its ``S`` shared experts with one matrix
(``[E + S, d]``) and normalises the chosen routed experts and all shared experts together: the k + S
sigmoids divided by their sum, times ``route_scale`` and a learned ``global_scale``
(:class:`~nnsight_moe.routing.SinkRouting`). It returns the first k as the routed weights and the last S
as the shared experts' *gammas*, which ``InklingSharedExperts`` multiplies into each shared expert's
activations before its down projection (the S experts run as one batched ``bmm``; their outputs are
summed in float32).

The contract's hook points keep their meaning and gain one:

* ``hook_topk_weights`` [b, p, k]: the routed weights the experts are multiplied by (after the joint
  normalisation);
* ``hook_shared_gammas`` [b, p, S]: the gammas, fired by the router hook after ``hook_topk_weights``
  (editing them changes what the shared experts are scaled by);
* ``hook_shared_acts`` [b, p, S * d_shared_expert]: each shared expert's ``act(gate) * up``, BEFORE its
  gamma (expert s in columns ``s * d .. (s + 1) * d``);
* ``hook_shared_out`` [b, p, d_model]: the sum over shared experts of ``down(gamma * acts)``, the shared
  experts' contribution (the gammas are inside it);
* ``hook_shared_gate`` [b, p, 1]: ones (the block adds the shared output ungated), 0 under ``ablate_shared``:
  ``hook_moe_out = hook_routed_out + hook_shared_gate * hook_shared_out``.

A forward pre-hook hands the shared experts' own forward an empty batch and a forward hook runs the same
operations (same ``bmm`` shapes, the same float32 sum) through the hook points: bit-identical in every dtype.
"""

from __future__ import annotations

import sys

import cloudpickle
import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["gamma_shared", "install", "sink_logits"]


def _state(module):
    from nnsight_moe.hooks import _STATE

    return module.__dict__[_STATE]


def install(state) -> list:
    """Hooks on the shared experts of an Inkling block (``state``: its ``BlockState``); the handles."""
    from nnsight_moe.hooks import _STATE

    state.shared.__dict__[_STATE] = state
    return [state.shared.register_forward_pre_hook(_take_input, with_kwargs=True),
            state.shared.register_forward_hook(_hooked)]


def _take_input(shared, args, kwargs):
    """Keep ``(hidden_states, gammas)``; hand the original forward no tokens (the forward hook computes)."""
    values = dict(zip(("hidden_states", "gammas"), args)) | kwargs
    x, gammas = values["hidden_states"], values["gammas"]
    _state(shared).shared_args = (x, gammas)
    return (x[..., :0, :], gammas[:0]), {}


def _hooked(shared, args, output):
    from nnsight_moe.hooks import _scaled

    state = _state(shared)
    x, gammas = state.__dict__.pop("shared_args")
    n_shared = shared.n_shared_experts
    b, p = state.bp(x.numel() // x.shape[-1])
    h = x.reshape(1, -1, x.shape[-1]).expand(n_shared, -1, -1)
    g = gammas.reshape(-1, n_shared, 1).transpose(0, 1)
    acts = shared.act_fn(torch.bmm(h, shared.gate_proj.transpose(1, 2))) * torch.bmm(h, shared.up_proj.transpose(1, 2))
    view = acts.transpose(0, 1).reshape(b, p, -1)  # [b, p, S * d]: expert s in columns s * d ..
    edited = state.hook("hook_shared_acts", view)
    if edited is not view:
        acts = edited.reshape(b * p, n_shared, -1).transpose(0, 1).to(acts.dtype)
    down = torch.bmm(acts * g, shared.down_proj.transpose(1, 2))
    out = state.hook("hook_shared_out", down.float().sum(dim=0).to(h.dtype).view(b, p, -1))
    gate = state.hook("hook_shared_gate", _scaled(out.new_ones(b, p, 1), state.shared_scale))
    return (gate * out).view(x.shape)


# ------------------------------------------------------------------ shared by both sides (shipped by value)
def sink_logits(router, x: Tensor, n_experts: int) -> Tensor:
    """The router's shared-expert logits [n, S] (float32) on its input ``x`` [..., d]: its own float32
    ``F.linear`` over all E + S rows (the same operation on the same operands, so the same bits), the last S."""
    if x is None:
        raise ValueError("Inkling's router was called without its hidden states as first positional argument: "
                         "its shared-expert logits cannot be recomputed for the joint normalisation")
    flat = x.reshape(-1, x.shape[-1])
    return F.linear(flat.float(), router.weight.float())[..., n_experts:]


def gamma_shared(shared, x: Tensor, gammas: Tensor) -> tuple[Tensor, Tensor]:
    """(acts [n, S * d], out [n, d_model]) of Inkling's shared experts (or their envoy) on tokens ``x`` [n, d]
    scaled by ``gammas`` [n, S], with the operations of ``InklingSharedExperts.forward``."""
    n_shared = gammas.shape[-1]
    h = x.reshape(1, -1, x.shape[-1]).expand(n_shared, -1, -1)
    g = gammas.reshape(-1, n_shared, 1).transpose(0, 1)
    acts = shared.act_fn(torch.bmm(h, shared.gate_proj.transpose(1, 2))) * torch.bmm(h, shared.up_proj.transpose(1, 2))
    down = torch.bmm(acts * g, shared.down_proj.transpose(1, 2))
    return acts.transpose(0, 1).reshape(x.shape[0], -1), down.float().sum(dim=0).to(h.dtype)


# Ship this module's functions by value (as source): nnsight_moe is not installed on NDIF.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
