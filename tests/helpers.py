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
    """``{layer: record(args, kwargs, output)}`` from forward hooks on ``path_of(layer info)`` while ``fn()`` runs."""
    seen, handles = {}, []
    for index in layout.moe_layers:
        module = model.get_submodule(path_of(layout.layer(index)))

        def hook(module, args, kwargs, output, index=index):
            seen[index] = record(args, kwargs, output)

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return seen


def capture_blocks(model: nn.Module, layout: MoELayout, fn):
    """Inputs and outputs of every MoE block of an UNATTACHED model: {layer: (input, output)}.

    For a shared expert beside the block (``shared_outside``, Granite) the output is what the decoder
    layer computes from both, ``block output + shared output``."""

    def record(args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        return x.detach().clone(), out.detach().clone()

    outside = [i for i in layout.moe_layers if layout.layer(i).shared_outside]
    shared = {}
    if outside:
        shared_layout = MoELayout(layout.family, layout.model_type, tuple(
            replace(info, path=info.shared) if info.shared_outside else replace(info, kind="dense")
            for info in layout.layers))
        blocks = {}

        def run():
            blocks.update(_capture(model, layout, lambda info: info.path, record, fn))

        shared = _capture(model, shared_layout, lambda info: info.path, record, run)
        return {i: (x, out + shared[i][1] if i in shared else out) for i, (x, out) in blocks.items()}
    return _capture(model, layout, lambda info: info.path, record, fn)


def capture_routers(model: nn.Module, layout: MoELayout, fn):
    """(weights, indices) each router of an UNATTACHED model returns in the real forward: {layer: (w, i)}.

    Read from the forward itself rather than by calling the router again: some families pass the router
    a second argument (a selection bias held by the block) or a 3-D input.
    """
    record = lambda args, kwargs, output: (output[1].detach().clone(), output[2].detach().clone())  # noqa: E731
    return _capture(model, layout, lambda info: info.router, record, fn)


def naive_expert(experts: nn.Module, x: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``e`` applied to tokens ``x`` [n, d] straight from its weights: (acts, out)."""
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


def zero_expert_(model: nn.Module, layout: MoELayout, blocked: dict[int, list[int]]) -> nn.Module:
    """Zero the down projection (and its bias) of each blocked expert, in place."""
    with torch.no_grad():
        for index, experts in blocked.items():
            module = model.get_submodule(layout.layer(index).experts)
            for e in experts:
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
