"""Hook points inside a MoE block, fired from the frameworks' own extension points.

Nothing of the family's modeling code is copied or replaced. ``attach`` leaves every block's
``forward`` as it is and adds:

* a forward pre-hook on the block, to learn the [batch, pos] shape of its input;
* a forward hook on the router, which re-derives scores, selection and gate weights from the
  router's logits with the family's :class:`~nnsight_moe.routing.Routing` rule, passing each through
  its hook point (so an edit re-routes), and returns them in the router's own output format;
* the ``"nnsight_moe"`` experts implementation, registered in transformers' ``ExpertsInterface``,
  which computes every selected expert's activations and output per slot through hook points;
* forward hooks on the shared expert (acts, output, gate) and on the block (``hook_moe_out``).

Every hook point is a TransformerLens :class:`~transformer_lens.hook_points.HookPoint` registered as a
submodule of the MoE block, so TransformerLens and nnsight see it like any other module.

Threads: a block's per-forward state (its input shape) and its interventions live on the block, like
torch hooks and weights, so they are shared by every thread using the model. A forward of an attached
block that starts while another thread is inside a forward of the same block raises
:class:`ConcurrentForwardError` instead of silently mixing the two (use one model copy per thread, or
a lock). Interventions are model-wide by design (a ``block_experts`` context applies to every forward
while it is open), which is why the state is not made per-thread.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward
from transformers.integrations.moe import _grouped_linear as _hf_grouped_linear

from nnsight_moe.layout import LayerLayout
from nnsight_moe.routing import expert_order_sum, keep_top_weights, ordered_sum, zero_weights

EXPERTS_IMPLEMENTATION = "nnsight_moe"
_STATE = "_nnsight_moe"


class ConcurrentForwardError(RuntimeError):
    """Two threads ran forwards of the same attached MoE block at the same time."""


def unwrap(module: nn.Module) -> nn.Module:
    """The module doing the work behind wrapper modules, else ``module`` itself.

    A TransformerBridge replaces the HF modules it maps (MoE block, router, experts, shared expert,
    linears) by components that call the original, kept as ``original_component``. Hooks go on the
    originals, so the wrappers' own hooks (e.g. ``mlp.gate.hook_out``) see and compose with ours.
    """
    while isinstance(inner := getattr(module, "original_component", None), nn.Module):
        module = inner
    return module


class BlockState:
    """Per-block bookkeeping: the hook points, the current input shape and active interventions.

    Interventions (set by :mod:`nnsight_moe.interventions`) are applied to the gate weights before
    ``hook_topk_weights`` fires, so hooks see the weights actually multiplied into expert outputs:

    * ``zero``: bool [E] (or [batch, E], one row per batch row), experts whose gate weight is set to 0;
    * ``renorm``: after zeroing, rescale the remaining weights to the original per-token sum;
    * ``exclude``: bool [E] or [batch, E], experts removed before selection (``reroute``);
    * ``keep_top``: keep only the n largest routed gate weights per token (0 = routed experts off;
      ``keep_top_renorm``: rescale the kept ones to the original per-token sum);
    * ``shared_scale``: multiplies the shared expert gate (0 = shared expert ablated);
    * ``steer``: active :mod:`nnsight_moe.steering` plans: router-logit edits before ``hook_router_logits``
      fires, gate scaling after blocking.
    """

    def __init__(self, block: nn.Module, layer: LayerLayout, adapter: Any, config: Any, shared: nn.Module | None = None,
                 points: nn.Module | None = None):
        self.block, self.layer, self.adapter, self.config = block, layer, adapter, config
        #: the module holding this layer's hook points: the block, or for a later pass of a looped layer its
        #: pass container (nnsight_moe.looped)
        self.points = block if points is None else points
        self.router = unwrap(block.get_submodule(adapter.router))
        self.experts = unwrap(block.get_submodule(adapter.experts))
        #: the shared expert MLP (given for one outside the block, a sibling on the decoder layer), and the
        #: module its caller calls (a TransformerBridge wrapper of it may recompute it from its linears)
        self.shared_called = (shared if shared is not None else block.get_submodule(adapter.shared)) if layer.has_shared else None
        self.shared = unwrap(self.shared_called) if layer.has_shared else None
        self.block_out: Tensor | None = None  # the block's output, while a sibling shared expert is pending
        self.shape: tuple[int, int] = (1, 0)
        self.input_dtype: torch.dtype | None = None  # the block input's dtype (for routers called by keyword)
        self.zero: Tensor | None = None
        self.renorm = False
        self.exclude: Tensor | None = None
        self.keep_top: int | None = None
        self.keep_top_renorm = False  # keep_top: rescale the kept weights to the original sum
        self.shared_scale: float | None = None
        self.steer: list = []  # active nnsight_moe.steering plans: .logits(state, logits), .weights(state, i, w)
        self._lock = threading.Lock()
        self._thread: int | None = None  # the thread inside a forward of this block, if any
        self._depth = 0

    def hook(self, name: str, value: Tensor) -> Tensor:
        """Pass ``value`` through the block's hook point ``name``."""
        return self.points._modules[name](value)

    def rule(self):
        """The routing rule, rebuilt from the live router (its buffers may have moved device)."""
        return self.adapter.routing(self.block, self.router, self.config)

    def bp(self, n_tokens: int) -> tuple[int, int]:
        """[batch, pos] for ``n_tokens`` flattened tokens (falls back to [1, n] for unusual callers)."""
        b, p = self.shape
        return (b, p) if b * p == n_tokens else (1, n_tokens)

    def row_mask(self, mask: Tensor | None, batch: int, device) -> Tensor | None:
        """An expert mask [E] or [batch, E] as [1 or batch, 1, E], ready to broadcast over [b, p, E]."""
        if mask is None:
            return None
        mask = mask.to(device)
        if mask.ndim == 1:
            return mask[None, None, :]
        if mask.shape[0] != batch:
            raise ValueError(
                f"layer {self.layer.index}: a per-row expert mask has {mask.shape[0]} rows but the batch has {batch}"
            )
        return mask[:, None, :]

    def edit_weights(self, indices: Int[Tensor, "b p k"], weights: Float[Tensor, "b p k"]) -> Tensor:
        """Apply blocking / renormalisation / top-n restriction to the gate weights."""
        if self.zero is not None:
            mask = self.row_mask(self.zero, indices.shape[0], indices.device)[:, 0, :]
            weights = zero_weights(weights, indices, mask, self.renorm)
        for steering in self.steer:
            weights = steering.weights(self, indices, weights)
        if self.keep_top is not None:
            weights = keep_top_weights(weights, self.keep_top, self.keep_top_renorm)
        return weights


def install(block: nn.Module, state: BlockState) -> list:
    """Add the hook points and torch hooks to one MoE block; returns the removable handles."""
    add_hook_points(state)
    for module in (block, state.router, state.experts):
        module.__dict__[_STATE] = state
    moe_out = unwrap(block.get_submodule(state.adapter.moe_out)) if state.adapter.moe_out else block
    handles = [
        block.register_forward_pre_hook(_record_shape, with_kwargs=True),
        moe_out.register_forward_hook(_moe_out),
        block.register_forward_hook(_end_forward, always_call=True),  # also when the forward raises
    ]
    if state.adapter.own_experts:  # an experts forward outside transformers' ExpertsInterface (Step-3.7)
        handles.append(state.experts.register_forward_pre_hook(_own_experts_in))
        handles.append(state.experts.register_forward_hook(_own_experts_out))
    if state.layer.d_latent:
        latent_out = unwrap(block.get_submodule(state.adapter.latent_out))
        latent_out.__dict__[_STATE] = state
        handles.append(latent_out.register_forward_hook(_latent_out))
    if state.layer.post:
        post = unwrap(block.get_submodule(state.adapter.post))
        post.__dict__[_STATE] = state
        handles.append(post.register_forward_pre_hook(_moe_sum, with_kwargs=True))
    if state.adapter.routing_in_block:  # DBRX: the router gives logits only (nnsight_moe.block_routed)
        from nnsight_moe import block_routed

        handles += block_routed.install(state)
    elif state.adapter.dispatch_router:  # JetMoE: a dispatch plan and parallel experts
        from nnsight_moe import dispatch_experts

        handles += dispatch_experts.install(state)
    else:
        handles.append(state.router.register_forward_hook(_route))
    if state.adapter.identity_experts:  # LongCat-Flash: its own experts loop, zero-compute identity experts
        from nnsight_moe import identity_experts

        handles += identity_experts.install(state)
    if state.adapter.gate_on_input:  # Llama 4: weights scale the experts' inputs (nnsight_moe.input_gated)
        from nnsight_moe import input_gated

        handles += input_gated.install(state)
    if state.adapter.router_logits:  # the router's first output is not its logits: read them where computed
        logits = unwrap(state.router.get_submodule(state.adapter.router_logits))
        logits.__dict__[_STATE] = state
        handles.append(logits.register_forward_hook(_stash_logits))
    if state.layer.shared_gammas:  # Inkling: batched shared experts scaled by the router's gammas
        from nnsight_moe import shared_gammas

        handles += shared_gammas.install(state)
    elif state.layer.has_shared:
        shared = state.shared
        down_proj = unwrap(shared.get_submodule(state.adapter.shared_down))
        handles.append(down_proj.register_forward_pre_hook(_shared_acts))
        # beside the block, the shared output is hooked where the decoder layer calls it: TransformerLens'
        # JointGateUpMLPBridge (Granite-MoE-Hybrid) runs the shared MLP's linears, not its forward
        out_module = state.shared_called if state.layer.shared_outside else shared
        handles.append(out_module.register_forward_hook(_shared_out))
        down_proj.__dict__[_STATE] = state
        shared.__dict__[_STATE] = state
        out_module.__dict__[_STATE] = state
        if state.adapter.shared_gate is not None:
            gate = unwrap(block.get_submodule(state.adapter.shared_gate))
            gate.__dict__[_STATE] = state
            handles.append(gate.register_forward_hook(_shared_gate))
    return handles


def add_hook_points(state: BlockState) -> None:
    """Add the layer's hook points (``HookPoint`` modules named ``<layer path>.<name>``) to ``state.points``."""
    for name in state.layer.hook_names:
        hook_point = HookPoint()
        hook_point.name = f"{state.layer.path}.{name}"
        state.points.add_module(name, hook_point)


def uninstall(block: nn.Module, state: BlockState, handles: list) -> None:
    """Undo :func:`install` exactly."""
    for handle in handles:
        handle.remove()
    for name in state.layer.hook_names:
        del block._modules[name]
    for module in [*block.modules(), *(state.shared_called.modules() if state.shared is not None else ()),
                   *(state.shared.modules() if state.shared is not None else ())]:
        module.__dict__.pop(_STATE, None)
    state.block_out = None


# ---------------------------------------------------------------- torch hooks
def _record_shape(block, args, kwargs):
    state: BlockState = block.__dict__[_STATE]
    me = threading.get_ident()
    with state._lock:
        if state._thread not in (None, me):
            raise ConcurrentForwardError(
                f"layer {state.layer.index}: this attached model is already running a forward in another thread "
                f"(id {state._thread}). An attached MoE block keeps its per-forward state (input shape) and its "
                "interventions on the module, shared by all threads, so concurrent forwards would mix them: use "
                "one model per thread (copy.deepcopy) or run the forwards one at a time (a threading.Lock)"
            )
        state._thread = me
        state._depth += 1
    state.experts_pending = False
    x = args[0] if args else kwargs["hidden_states"]
    state.shape = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])
    state.input_dtype = x.dtype


def _end_forward(block, args, output):
    state: BlockState = block.__dict__[_STATE]
    with state._lock:
        if state._thread == threading.get_ident():
            state._depth -= 1
            if state._depth <= 0:
                state._thread, state._depth = None, 0


def _stash_logits(module, args, output):
    """Keep the raw router logits computed inside the router (``Adapter.router_logits``) for :func:`_route`."""
    module.__dict__[_STATE].logits = output


def _route(router, args, output):
    state: BlockState = router.__dict__[_STATE]
    gate_on_input = state.adapter.gate_on_input  # Llama 4's router returns (dense scores, logits)
    logits = state.__dict__.pop("logits") if state.adapter.router_logits else output[1 if gate_on_input else 0]
    b, p = state.bp(logits.shape[:-1].numel())
    rule = state.rule()
    n_experts, k = state.layer.n_experts, state.layer.top_k
    logits = logits.reshape(b, p, -1)
    for steering in state.steer:  # steering edits the logits before the hook, so hooks see what is routed
        logits = steering.logits(state, logits)
    logits = _checked(state, "hook_router_logits", state.hook("hook_router_logits", logits),
                      (b, p, n_experts))
    raw = rule.scores(logits)
    version = raw._version  # bumped by an in-place edit
    scores = _checked(state, "hook_router_scores", state.hook("hook_router_scores", raw), (b, p, n_experts))
    unedited = scores is raw and raw._version == version
    exclude = state.row_mask(state.exclude, b, scores.device)
    if rule._kind == "hash":  # chosen by token id: the model's own indices (block_experts refuses reroute)
        selected = output[2].reshape(b, p, k)
    else:
        selected = rule.select(scores, exclude)
    version = selected._version
    indices = state.hook("hook_topk_indices", selected)
    _checked(state, "hook_topk_indices", indices, (b, p, k))
    edited = indices is not selected or selected._version != version  # unedited ids are valid: no host sync
    if edited and (indices.is_floating_point() or (
            indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n_experts))):
        raise ValueError(f"layer {state.layer.index}: hook_topk_indices must hold integer expert ids in "
                         f"0..{n_experts - 1}, got {indices.dtype} values in [{indices.min()}, {indices.max()}]")
    x = args[0] if args and isinstance(args[0], Tensor) else None  # the router's input (hidden states)
    input_dtype = x.dtype if x is not None else state.input_dtype
    if rule._kind == "sink":  # Inkling: normalised jointly with the shared experts' gammas (nnsight_moe.shared_gammas)
        from nnsight_moe.shared_gammas import sink_logits

        weights, gammas = rule.sink_weights(scores, indices, sink_logits(state.router, x, n_experts).reshape(b, p, -1),
                                            input_dtype, logits if unedited else None)
    else:
        weights = rule.weights(scores, indices, exclude, logits_dtype=logits.dtype, input_dtype=input_dtype,
                               logits=logits if unedited else None)
    weights = _checked(state, "hook_topk_weights", state.hook("hook_topk_weights", state.edit_weights(indices, weights)),
                       (b, p, k))
    rest = output[3:]  # further router outputs, handed on unchanged (Zaya's cross-layer router state)
    if rule._kind == "sink":  # the router's fourth output: the gammas the shared experts scale their activations by
        rest = (_checked(state, "hook_shared_gammas", state.hook("hook_shared_gammas", gammas),
                         (b, p, state.layer.shared_gammas)).reshape(b * p, -1),)
    if rule._kind == "skip":  # Zaya: the router hands the experts a skip slot as expert 0 with weight 0
        state.skip = (indices == n_experts - 1).reshape(b * p, k)
        indices = indices.masked_fill(indices == n_experts - 1, 0)
    state.experts_pending = True  # cleared by the "nnsight_moe" experts implementation
    if gate_on_input:
        from nnsight_moe.input_gated import dense_scores

        state.indices = indices.reshape(b * p, k)
        scores_dense = dense_scores(weights.reshape(b * p, k), state.indices, n_experts, output[0].dtype)
        return scores_dense, logits.reshape(b * p, -1)
    first = scores.to(output[0].dtype) if state.adapter.router_logits else logits  # the router's own format
    return (first.reshape(b * p, -1), weights.reshape(b * p, k), indices.reshape(b * p, k), *rest)


def _checked(state: "BlockState", name: str, value: Any, shape: tuple) -> Tensor:
    """``value`` if it is a tensor of ``shape``; else a ``ValueError`` naming the hook point (an edit of the wrong shape)."""
    if not isinstance(value, Tensor) or tuple(value.shape) != shape:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        last = "experts" if name.startswith("hook_router") else "shared experts" if name == "hook_shared_gammas" else "top_k"
        raise ValueError(f"layer {state.layer.index}: {name} must be a tensor of shape {list(shape)} "
                         f"([batch, pos, {last}]), got {got}")
    return value


def _moe_out(block, args, output):
    state: BlockState = block.__dict__[_STATE]
    if getattr(state, "experts_pending", False):
        state.experts_pending = False
        current = getattr(getattr(state.experts, "config", None), "_experts_implementation", None)
        raise RuntimeError(
            f"layer {state.layer.index}: the routed experts ran without the {EXPERTS_IMPLEMENTATION!r} experts "
            f"implementation (now {current!r}: was it switched with set_experts_implementation while attached?), so "
            "hook_expert_acts / hook_expert_out / hook_routed_out did not fire. Switch back with "
            f"model.set_experts_implementation({EXPERTS_IMPLEMENTATION!r}), or detach and attach again")
    if state.layer.shared_outside:  # the decoder layer adds the shared expert after: hook_moe_out fires there
        state.block_out = output[0] if isinstance(output, tuple) else output
        return None
    if isinstance(output, tuple):
        return (_moe_out_of(state, output[0]), *output[1:])
    return _moe_out_of(state, output)


def _moe_out_of(state: "BlockState", out: Tensor) -> Tensor:
    """``out`` through ``hook_moe_out`` as [b, p, d] (flattened [tokens, d] outputs, Llama 4's or Gemma-4's
    experts', are viewed as such and handed back flat)."""
    if out.dim() == 2:
        b, p = state.bp(out.shape[0])
        return state.hook("hook_moe_out", out.reshape(b, p, -1)).reshape(out.shape)
    return state.hook("hook_moe_out", out)


def _own_experts_in(experts, args):
    """Keep the experts' arguments and hand their own forward only the "no expert" id ``num_experts``.

    Step-3.7's experts loop skips that id (it is how transformers masks tokens routed elsewhere), so its
    own forward returns zeros without computing; :func:`_own_experts_out` replaces them by the
    ``"nnsight_moe"`` computation on the kept arguments.
    """
    state: BlockState = experts.__dict__[_STATE]
    if len(args) != 3:
        raise RuntimeError(f"layer {state.layer.index}: expected the experts to be called as experts(hidden_states, "
                           f"top_k_index, top_k_weights), got {len(args)} positional arguments")
    state.experts_args = args
    return (args[0], torch.full_like(args[1], experts.num_experts), args[2])


def _own_experts_out(experts, args, output):
    state: BlockState = experts.__dict__[_STATE]
    kept, state.experts_args = state.experts_args, None
    return hooked_experts_forward(experts, *kept)


def _latent_out(projection, args, output):
    """A latent MoE's output projection of the routed sum: ``hook_latent_out`` [b, p, d_model]."""
    state: BlockState = projection.__dict__[_STATE]
    b, p = state.bp(output.numel() // output.shape[-1])
    return state.hook("hook_latent_out", output.reshape(b, p, -1)).reshape(output.shape)


def _moe_sum(post, args, kwargs):
    """The input of the block's post-processing module (A.X-K1's post-MoE norm): ``hook_moe_sum``."""
    state: BlockState = post.__dict__[_STATE]
    x = args[0] if args else kwargs["hidden_states"]
    b, p = state.bp(x.numel() // x.shape[-1])
    edited = state.hook("hook_moe_sum", x.reshape(b, p, -1)).reshape(x.shape)
    return ((edited, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": edited})


def _shared_acts(down_proj, args):
    state: BlockState = down_proj.__dict__[_STATE]
    acts = args[0]
    b, p = state.bp(acts.numel() // acts.shape[-1])
    return (state.hook("hook_shared_acts", acts.reshape(b, p, -1)).reshape(acts.shape), *args[1:])


def _shared_out(shared, args, output):
    state: BlockState = shared.__dict__[_STATE]
    b, p = state.bp(output.numel() // output.shape[-1])
    out = state.hook("hook_shared_out", output.reshape(b, p, -1))
    if state.adapter.shared_gate is None:  # ungated: the gate is ones, applied here so edits take effect
        gate = state.hook("hook_shared_gate", _scaled(out.new_ones(b, p, 1), state.shared_scale))
        out = gate * out
    out = out.reshape(output.shape)
    return _layer_moe_out(state, out) if state.layer.shared_outside else out


def _layer_moe_out(state: "BlockState", shared: Tensor) -> Tensor:
    """A shared expert beside the block (Granite): the decoder layer computes ``block_out + shared``.

    ``hook_moe_out`` fires on exactly that sum (the same operation on the same operands, so unedited it
    is bit-identical to what the layer adds to the residual stream); the shared output is handed back
    unchanged, or, when ``hook_moe_out`` was edited to m, as ``m - block_out``, which the layer adds back
    to ``block_out`` (= m up to one rounding of the addition).
    """
    block_out, state.block_out = state.block_out, None
    if block_out is None:  # the shared MLP was called on its own, not after the block
        return shared
    b, p = state.bp(shared.numel() // shared.shape[-1])
    moe = (block_out + shared).reshape(b, p, -1)
    version = moe._version  # bumped by an in-place edit
    edited = state.hook("hook_moe_out", moe)
    if edited is moe and moe._version == version:
        return shared
    return (edited.reshape(shared.shape) - block_out).to(shared.dtype)


def _shared_gate(gate_linear, args, output):
    """The block computes ``sigmoid(gate(x)) * shared``: expose the sigmoid, hand back its logit.

    Unedited, the original pre-activation is returned untouched (bit-identical); an edited gate g is
    returned as logit(g), which the block's sigmoid maps back to g (exactly for 0 and 1).
    """
    state: BlockState = gate_linear.__dict__[_STATE]
    b, p = state.bp(output.numel() // output.shape[-1])
    gate = _scaled(torch.sigmoid(output.reshape(b, p, 1)), state.shared_scale)
    edited = state.hook("hook_shared_gate", gate)
    if edited is gate and state.shared_scale is None:
        return output
    return torch.logit(edited.to(output.dtype)).reshape(output.shape)


def _scaled(gate: Tensor, scale: float | None) -> Tensor:
    return gate if scale is None else gate * scale


# ------------------------------------------------------ experts implementation
def hooked_experts_forward(
    experts: nn.Module,
    hidden_states: Float[Tensor, "n d"],
    top_k_index: Int[Tensor, "n k"],
    top_k_weights: Float[Tensor, "n k"],
) -> Float[Tensor, "n d"]:
    """The ``"nnsight_moe"`` experts implementation: per-slot acts and outputs through hook points."""
    state: BlockState | None = experts.__dict__.get(_STATE)
    if state is None:  # an experts module of a block that is not attached
        return grouped_mm_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    state.experts_pending = False
    n, d = hidden_states.shape
    b, p = state.bp(n)
    k = top_k_index.shape[-1]
    if state.layer.d_latent:  # a latent MoE: the experts' input, the block input projected (and normed)
        hidden_states = state.hook("hook_latent_in", hidden_states.view(b, p, d)).reshape(n, d)
    slots = _sort_slots(top_k_index, experts.num_experts)
    fp32 = getattr(state.adapter, "experts_float32", False)
    x = hidden_states.float() if fp32 else hidden_states
    skip = state.__dict__.pop("skip", None)  # Zaya: slots routed to the skip expert compute nothing (acts, out 0)
    acts = expert_acts(experts, x, top_k_index, slots).view(b, p, k, -1)
    acts = state.hook("hook_expert_acts", acts if skip is None else acts.masked_fill(skip.view(b, p, k, 1), 0))
    out = expert_down(experts, acts.reshape(n * k, -1), top_k_index, slots).view(b, p, k, d)
    out = state.hook("hook_expert_out", out if skip is None else out.masked_fill(skip.view(b, p, k, 1), 0))
    if state.adapter.own_experts:
        routed = _eager_sum(out, top_k_weights.view(b, p, k), top_k_index.view(b, p, k), hidden_states.dtype)
    elif fp32:
        routed = expert_order_sum(out, top_k_weights.view(b, p, k), top_k_index.view(b, p, k)).to(hidden_states.dtype)
    else:
        routed = (out * top_k_weights.view(b, p, k, 1)).sum(dim=-2).to(hidden_states.dtype)
    return state.hook("hook_routed_out", routed).reshape(n, -1)


def _eager_sum(out: Tensor, weights: Tensor, indices: Tensor, dtype: torch.dtype) -> Tensor:
    """The routed sum as an eager experts loop computes it (Step-3.7's own forward): each slot's
    ``weight * out`` cast to ``dtype``, accumulated in ``dtype`` in increasing expert order."""
    return ordered_sum((out * weights[..., None]).to(dtype), indices)



def _sort_slots(indices: Tensor, n_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Slots grouped by expert: (order, its inverse permutation, slots per expert [E] on the device)."""
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(flat, minlength=n_experts)
    return order, inverse, counts


def _grouped_linear(x: Tensor, weight: Tensor, counts: Tensor, transposed: bool) -> Tensor:
    """Rows of ``x`` sorted by expert, times each expert's matrix ([E, out, in], or [E, in, out] if transposed).

    When ``x`` has the weights' dtype this is transformers' own grouped matmul (the kernel its default
    ``grouped_mm`` experts implementation runs: one call for all experts, no host sync, the same bits);
    otherwise (weights cast to the input's dtype, e.g. lara_mini) one matmul per expert.
    """
    if x.dtype == weight.dtype and x.shape[0]:
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        return _hf_grouped_linear(x, weight, offsets, is_transposed=transposed)
    chunks, start = [], 0
    for e, c in enumerate(counts.tolist()):
        if c:
            w = weight[e] if transposed else weight[e].T
            chunks.append(x[start : start + c] @ w.to(x.dtype))
            start += c
    if not chunks:
        out_dim = weight.shape[2] if transposed else weight.shape[1]
        return x.new_zeros(0, out_dim)
    return torch.cat(chunks)


def expert_acts(experts: nn.Module, x: Tensor, indices: Tensor, slots: tuple | None = None) -> Tensor:
    """Input of each selected expert's down projection, [n * k, d_expert] in slot order.

    ``x`` [n, d] are the block's tokens, ``indices`` [n, k] the selected experts; ``slots`` is
    :func:`_sort_slots` of ``indices`` (computed when omitted).
    """
    k = indices.shape[-1]
    order, inverse, counts = slots or _sort_slots(indices, experts.num_experts)
    has_gate = getattr(experts, "has_gate", True)
    weight = experts.gate_up_proj if has_gate else experts.up_proj
    h = _grouped_linear(x[order // k], weight, counts, getattr(experts, "is_transposed", False))
    if getattr(experts, "has_bias", False):
        bias = experts.gate_up_proj_bias if has_gate else experts.up_proj_bias
        h = h + bias[indices.reshape(-1)[order]]
    acts = experts._apply_gate(h) if has_gate else experts.act_fn(h)
    return acts[inverse]


def expert_down(experts: nn.Module, acts: Tensor, indices: Tensor, slots: tuple | None = None) -> Tensor:
    """Each selected expert's output (before its gate weight), [n * k, d_model] in slot order.

    ``acts`` [n * k, d_expert] in slot order (as :func:`expert_acts` returns them).
    """
    order, inverse, counts = slots or _sort_slots(indices, experts.num_experts)
    out = _grouped_linear(acts[order], experts.down_proj, counts, getattr(experts, "is_transposed", False))
    if getattr(experts, "has_bias", False):
        out = out + experts.down_proj_bias[indices.reshape(-1)[order]]
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    return out[inverse]


def register_experts_implementation() -> None:
    """Register ``"nnsight_moe"`` in transformers' ``ExpertsInterface`` (idempotent)."""
    if EXPERTS_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, hooked_experts_forward)


class TemporaryHooks:
    """Hooks a recipe adds to hook points, removed exactly: hooks the user added stay in place.

    ``HookPoint.remove_hooks()`` removes every (non-permanent) hook of a point, the user's too; this
    keeps the handles :meth:`add` made and removes only those (:meth:`remove`, or on leaving a ``with``).
    """

    def __init__(self) -> None:
        self._added: list[tuple[HookPoint, Any]] = []

    def add(self, point: HookPoint, fn: Any, dir: str = "fwd") -> Any:
        """``point.add_hook(fn, dir=dir)``, remembered for :meth:`remove`; returns the handle."""
        handle = point.add_hook(fn, dir=dir)
        self._added.append((point, handle))
        return handle

    def remove(self) -> None:
        """Remove the hooks added through :meth:`add` (and nothing else)."""
        while self._added:
            point, handle = self._added.pop()
            handle.hook.remove()
            point.fwd_hooks = [h for h in point.fwd_hooks if h is not handle]
            point.bwd_hooks = [h for h in point.bwd_hooks if h is not handle]

    def __enter__(self) -> "TemporaryHooks":
        return self

    def __exit__(self, *exc: Any) -> bool:
        self.remove()
        return False
