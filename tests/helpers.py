"""Independent oracles for the core tests: run the unmodified HF model and recompute from weights."""

from __future__ import annotations

import torch
from torch import nn

from dataclasses import replace

from nnsight_moe.layout import MoELayout


def capture_hooks(handle, fn):
    """Run ``fn()`` with TransformerLens hooks on every hook point; returns {path: value}."""
    values = {}
    points = handle.hook_points()
    for name, point in points.items():
        point.add_hook(lambda tensor, hook, name=name: values.__setitem__(name, tensor.detach().clone()))
    try:
        fn()
    finally:
        for point in points.values():
            point.remove_hooks()
    return values


def _capture(model: nn.Module, layout: MoELayout, path_of, record, fn) -> dict:
    """``{layer: record(args, kwargs, output)}`` from forward hooks on ``path_of(layer info)`` while ``fn()`` runs.

    Layers sharing a module (the passes of a looped layer, whose later passes' ``path`` is a pass container:
    ``path_of`` sees them with ``path`` = ``module_path``) get its calls in order: of the module's last
    ``len(layers)`` calls, the i-th is the i-th of its layers in execution order."""
    from dataclasses import replace

    calls, handles = {}, []
    for index in layout.moe_layers:
        info = layout.layer(index)
        path = path_of(replace(info, path=info.module_path))
        calls.setdefault(path, ([], []))[0].append(index)
    for path, (indices, seen) in calls.items():
        def hook(module, args, kwargs, output, seen=seen):
            seen.append(record(args, kwargs, output))

        handles.append(model.get_submodule(path).register_forward_hook(hook, with_kwargs=True))
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return {index: value for indices, seen in calls.values() for index, value in zip(indices, seen[-len(indices):])}


def capture_blocks(model: nn.Module, layout: MoELayout, fn):
    """Inputs and outputs of every MoE block of an UNATTACHED model: {layer: (input, output)}.

    For a shared expert beside the block (``shared_outside``, Granite) the output is what the decoder
    layer computes from both, ``block output + shared output``.

    The input is the block's, except where the decoder layer is the block (Gemma-4): there it is the
    experts' input (a normalised copy of the layer's input); the output is the MoE output (``layout.moe_out`` when
    the block is a decoder layer, as Gemma-4's).
    """

    def first(args, kwargs, output):
        return args[0] if args else kwargs["hidden_states"]

    def out(args, kwargs, output):
        return (output[0] if isinstance(output, tuple) else output).detach().clone()

    def blocks(run):  # Gemma-4: the experts' input and the module whose output is hook_moe_out
        inputs = _capture(model, layout, lambda info: info.experts if info.moe_out else info.path,
                          lambda *a: first(*a).detach().clone(), run)
        outputs = _capture(model, layout, lambda info: info.moe_out or info.path, out, run)
        return {index: (inputs[index], outputs[index]) for index in outputs}

    outside = [i for i in layout.moe_layers if layout.layer(i).shared_outside]
    if outside:
        shared_layout = MoELayout(layout.family, layout.model_type, tuple(
            replace(info, path=info.shared) if info.shared_outside else replace(info, kind="dense")
            for info in layout.layers))
        found = {}

        def run():
            found.update(blocks(fn))

        shared = _capture(model, shared_layout, lambda info: info.path, out, run)
        return {i: (x, o + shared[i] if i in shared else o) for i, (x, o) in found.items()}
    return blocks(fn)


def capture_routers(model: nn.Module, layout: MoELayout, fn):
    """(weights, indices) each router of an UNATTACHED model returns in the real forward: {layer: (w, i)}.

    Read from the forward itself rather than by calling the router again: some families pass the router
    a second argument (a selection bias held by the block) or a 3-D input.
    """
    def record(args, kwargs, output):
        if len(output) == 5:  # JetMoE's dispatch plan: slots sorted by expert, their gates; its own topk of the logits
            order, gates, logits = output[0], output[2], output[4]
            n = logits.shape[0]
            weights = torch.empty_like(gates)
            weights[order] = gates
            k = gates.shape[0] // n
            return weights.view(n, k).detach().clone(), torch.topk(logits, k, dim=1).indices.detach().clone()
        if len(output) == 2:  # Llama 4: (dense scores [n, E], logits); its own topk of the logits picks the slots
            indices = torch.topk(output[1], output[0].shape[-1] - (output[0] == 0).sum(-1).min().item(), dim=1).indices
            return output[0].gather(1, indices).detach().clone(), indices.detach().clone()
        return output[1].detach().clone(), output[2].detach().clone()

    def record_experts(args, kwargs, output):  # (hidden_states, top_k_index, top_k_weights)
        return args[2].detach().clone(), args[1].detach().clone()

    if any(isinstance(getattr(model.get_submodule(layout.layer(i).experts), "mlp", None), nn.Module)
           for i in layout.moe_layers):  # DBRX: the router returns logits only; the block hands the experts the rest
        return _capture(model, layout, lambda info: info.experts, record_experts, fn)
    seen = _capture(model, layout, lambda info: info.router, record, fn)
    for index, (weights, indices) in seen.items():
        router = model.get_submodule(layout.layer(index).router)
        if hasattr(router, "num_router_classes"):  # Zaya masks a skip slot to (expert 0, weight 0): the skip id back
            seen[index] = (weights, indices.masked_fill(weights == 0, router.num_experts))
    return seen


def naive_expert(experts: nn.Module, x: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``e`` applied to tokens ``x`` [n, d] straight from its weights: (acts, out)."""
    if type(experts).__name__ == "LongcatFlashExperts":  # ids >= num_routed_experts are identities
        if e >= experts.num_routed_experts:
            return x.new_zeros(x.shape[0], experts.intermediate_size), x
        gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
        acts = experts.act_fn(gate) * up
        return acts, acts @ experts.down_proj[e].T
    if type(experts).__name__ == "ZayaExperts" and e >= experts.num_experts:  # the skip expert computes nothing
        return x.new_zeros(x.shape[0], experts.intermediate_dim), x.new_zeros(x.shape)
    if type(experts).__name__ == "JetMoeMoE":  # parallel experts [E, out, in] (pass the block)
        gate, up = (x @ experts.input_linear.weight[e].T).chunk(2, dim=-1)
        acts = experts.activation(gate) * up
        return acts, acts @ experts.output_linear.weight[e].T
    if type(experts).__name__ == "DbrxExperts":  # 2-D w1 / v1 / w2 [E * d_expert, d]
        from nnsight_moe.block_routed import expert_weights

        w1, v1, w2 = (w[e] for w in expert_weights(experts))
        acts = experts.mlp.activation_fn(x @ w1.T) * (x @ v1.T)
        return acts, acts @ w2
    if type(experts).__name__ == "Llama4TextExperts":  # [E, in, out] weights, gate | up halves, no bias
        gate, up = (x @ experts.gate_up_proj[e]).chunk(2, dim=-1)
        acts = up * experts.act_fn(gate)
        return acts, acts @ experts.down_proj[e]
    transposed = getattr(experts, "is_transposed", False)
    has_gate = getattr(experts, "has_gate", True)
    w_up = (experts.gate_up_proj if has_gate else experts.up_proj)[e]
    h = x @ w_up if transposed else x @ w_up.T
    if getattr(experts, "has_bias", False):
        h = h + (experts.gate_up_proj_bias if has_gate else experts.up_proj_bias)[e]
    acts = experts._apply_gate(h) if has_gate else experts.act_fn(h)
    w_down = experts.down_proj[e]
    out = acts @ w_down if transposed else acts @ w_down.T
    if getattr(experts, "has_bias", False):
        out = out + experts.down_proj_bias[e]
    if getattr(experts, "has_post_expert_norm", False):  # Muse-Spark: a norm after each expert
        out = experts.post_expert_norm(out)
    return acts, out


def down_weights(experts: nn.Module) -> torch.Tensor:
    """The experts' down projections as [E, ...] (zeroing row e zeroes expert e's output): fused ``down_proj``,
    JetMoE's ``output_linear.weight``, DBRX's ``w2`` view."""
    if type(experts).__name__ == "JetMoeParallelExperts":
        return experts.weight
    if type(experts).__name__ == "DbrxExperts":
        from nnsight_moe.block_routed import expert_weights

        return expert_weights(experts)[2]
    return experts.down_proj


def zero_expert_(model: nn.Module, layout: MoELayout, blocked: dict[int, list[int]]) -> nn.Module:
    """Zero the down projection (and its bias) of each blocked expert, in place."""
    with torch.no_grad():
        for index, experts in blocked.items():
            module = model.get_submodule(layout.layer(index).experts)
            if type(module).__name__ == "JetMoeParallelExperts":  # JetMoE's output_linear [E, d, d_expert]
                for e in experts:
                    module.weight[e].zero_()
                continue
            if type(module).__name__ == "DbrxExperts":
                from nnsight_moe.block_routed import expert_weights

                for e in experts:
                    expert_weights(module)[2][e].zero_()
                continue
            for e in experts:
                if type(module).__name__ == "ZayaExperts" and e >= module.num_experts:
                    continue  # the skip expert has no weights: its slots already add nothing
                module.down_proj[e].zero_()
                if getattr(module, "has_bias", False):
                    module.down_proj_bias[e].zero_()
    return model


def word_tokenizer(padding_side: str = "right"):
    """A WordLevel tokenizer over the tiny models' 128 ids: "w5 w9" -> [5, 9] (w0 pads, w3 is unknown)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(128)}, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", unk_token="w3", padding_side=padding_side)


def language_model(hf):
    """``nnsight.LanguageModel`` around a tiny HF model, with :func:`word_tokenizer`."""
    import warnings

    import nnsight

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nnsight.LanguageModel(hf, tokenizer=word_tokenizer())
