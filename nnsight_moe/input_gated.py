"""Input-gated experts (Llama 4): the gate weight scales the expert's INPUT, and every expert runs densely.

Llama 4's router returns a dense score matrix ``[tokens, E]`` (``sigmoid`` of the top-k logits, 0 for the
others) and the block feeds every expert the whole batch, scaled by its score::

    routed_in  = x.repeat(E, 1) * scores.T.reshape(-1, 1)        # [E * n, d]: expert e sees s_e * x
    routed_out = experts(routed_in).reshape(E, n, d).sum(dim=0)  # experts: two torch.bmm over all E

An expert is a bias-free gated MLP, so an expert with score 0 sees 0 and gives exactly 0: only the k
selected experts contribute. The contract's hook points keep their names and shapes, with one documented
change of meaning (``LayerLayout.gate_on_input``): ``hook_topk_weights`` are the factors the selected
experts' INPUTS are multiplied by, ``hook_expert_acts`` / ``hook_expert_out`` are the selected experts'
activations and outputs on that scaled input ``w * x``, and the decomposition identity is

    hook_routed_out = sum over slots of hook_expert_out           (no weights: they are inside)

Blocking with ``zero`` (weight 0) is then exactly zeroing the expert (input 0 gives output 0), ``renorm``
rescales the other experts' inputs, ``reroute`` re-selects.

To stay bit-identical to the model, the attached experts run the model's own dense computation (the same
two ``torch.bmm`` on the same tensors) and read the selected slots out of it; edits are written back into
the dense tensors. So the hooked model costs what the model costs: it skips the original experts forward
(a forward pre-hook hands it an empty batch) and computes it once, through the hook points, in a forward
hook. The trace-side :func:`dense_experts` is shipped by value to NDIF (it reads only ``torch``).
"""

from __future__ import annotations

import sys

import cloudpickle
import torch
from torch import Tensor

__all__ = ["dense_experts", "dense_scores", "install"]


def dense_scores(weights: Tensor, indices: Tensor, n_experts: int, dtype: torch.dtype) -> Tensor:
    """The router's dense score matrix [n, E] (``dtype``): ``weights`` [n, k] at ``indices`` [n, k], 0 elsewhere."""
    return torch.zeros(weights.shape[0], n_experts, dtype=dtype, device=weights.device).scatter(
        1, indices, weights.to(dtype))


def dense_experts(experts, routed_in: Tensor, act_fn=None):
    """Llama-4 experts on ``routed_in`` [E, n, d] as the model computes them: (acts [E, n, I], out [E, n, d]).

    ``act_fn`` replaces ``experts.act_fn`` (the remote view passes the envoy's). ``acts`` is
    ``up * act(gate)``, the input of each expert's down projection.
    """
    gate, up = torch.bmm(routed_in, experts.gate_up_proj).chunk(2, dim=-1)
    acts = up * (act_fn or experts.act_fn)(gate)
    return acts, torch.bmm(acts, experts.down_proj)


def _slots(dense: Tensor, indices: Tensor) -> Tensor:
    """[E, n, f] dense values -> [n, k, f] at the selected experts ``indices`` [n, k]."""
    tokens = torch.arange(indices.shape[0], device=indices.device)[:, None].expand_as(indices)
    return dense[indices, tokens]


def _write_slots(dense: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """A copy of ``dense`` [E, n, f] with the selected slots set to ``values`` [n, k, f]."""
    tokens = torch.arange(indices.shape[0], device=indices.device)[:, None].expand_as(indices)
    dense = dense.clone()
    dense[indices, tokens] = values.to(dense.dtype)
    return dense


# ------------------------------------------------------------------ attached hooks
def install(state) -> list:
    """Hooks on the experts module of a Llama-4 block (``state``: its :class:`~nnsight_moe.hooks.BlockState`);
    returns the removable handles."""
    experts = state.experts
    return [experts.register_forward_pre_hook(_take_input), experts.register_forward_hook(_hooked_forward)]


def _state(module):
    from nnsight_moe.hooks import _STATE

    return module.__dict__[_STATE]


def _take_input(experts, args):
    """Keep the routed input and hand the original forward an empty batch (it is computed in the forward hook)."""
    _state(experts).routed_in = args[0]
    return (args[0][:0], *args[1:])


def _through(state, name: str, value: Tensor):
    """``value`` through hook point ``name``: (result, whether a hook replaced or edited it in place)."""
    version = value._version
    result = state.hook(name, value)
    return result, result is not value or value._version != version


def _hooked_forward(experts, args, output):
    state = _state(experts)
    state.experts_pending = False
    routed_in = state.__dict__.pop("routed_in")
    indices = state.__dict__.pop("indices")  # [n, k], set by the router hook
    n_experts, d = experts.gate_up_proj.shape[0], routed_in.shape[-1]
    n, k = indices.shape
    b, p = state.bp(n)
    acts_dense, _ = dense_experts(experts, routed_in.view(n_experts, n, d))
    acts, edited = _through(state, "hook_expert_acts", _slots(acts_dense, indices).view(b, p, k, -1))
    if edited:
        acts_dense = _write_slots(acts_dense, indices, acts.reshape(n, k, -1))
    out_dense = torch.bmm(acts_dense, experts.down_proj)
    out, edited = _through(state, "hook_expert_out", _slots(out_dense, indices).view(b, p, k, d))
    if edited:
        out_dense = _write_slots(out_dense, indices, out.reshape(n, k, d))
    routed, edited = _through(state, "hook_routed_out", out_dense.sum(dim=0).view(b, p, d))  # as the block sums
    if edited:  # hand the block a dense output whose sum over the experts is exactly the edited sum
        out_dense = torch.zeros_like(out_dense)
        out_dense[0] = routed.reshape(n, d).to(out_dense.dtype)
    return out_dense.view(-1, d)


# Ship this module's functions by value (as source): nnsight_moe is not installed on NDIF.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
