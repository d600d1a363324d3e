"""Bytes a remote attribution-style request sends back per prompt (target: < 64 KB per prompt).

    python benchmarks/remote_bytes.py [--prompts 8] [--tokens 32]

Builds the medium config of ``benchmarks/overhead.py`` (OLMoE-shaped: d_model 512, 32 experts, top-8,
4 layers), and runs, under nnsight's local simulation of a remote request (``remote="local"``: the
request is serialised and deserialised exactly as for NDIF), a request that computes server-side,
for every MoE layer, each expert's direct contribution to the target token's logit at the last
position (through the frozen final norm and the unembedding) and the router scores there, and saves
only those (checked against the same scores computed from the attached hooks). The response NDIF sends back is ``torch.save`` of the saved values (optionally zstd
compressed, ``nnsight.CONFIG.API.COMPRESS``); its size is measured the same way here. For contrast it
also reports the response size of shipping the full per-slot expert outputs instead.
"""

from __future__ import annotations

import argparse
import io
import warnings

import nnsight
import torch

from nnsight_moe.remote import MoEView
from nnsight_moe.testing import medium_model


def expert_attribution(view, targets, model, batch):
    """Per MoE layer: each expert's direct logit contribution to ``targets`` at the last position [L, b, E],
    and the router scores there [L, b, E]. Runs inside the trace (server-side for a remote run)."""
    slots = {}
    router = []
    for index in view.moe_layers:
        q = view.layer(index, want=("router_scores", "topk_indices", "topk_weights", "expert_out"))
        slots[index] = (q["topk_indices"][:, -1], (q["topk_weights"][..., None] * q["expert_out"])[:, -1])
        router.append(q["router_scores"][:, -1])
    norm = model.model.norm
    final = norm.input[:, -1].float()
    scale = torch.rsqrt(final.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight
    direction = model.lm_head.weight[targets] * scale  # [b, d]
    scores = []
    for index in view.moe_layers:
        indices, contributions = slots[index]  # [b, k], [b, k, d]
        per_slot = (contributions * direction[:, None, :]).sum(-1)
        scores.append(torch.zeros_like(router[0]).scatter_add(-1, indices, per_slot.float()))
    return {"expert_scores": torch.stack(scores).half(), "router_scores": torch.stack(router).half()}


def attribution_from_hooks(model, ids, targets) -> torch.Tensor:
    """The same expert scores [L, b, E] from the attached hooks of a copy of ``model`` (the check)."""
    import copy

    import nnsight_moe

    reference = copy.deepcopy(model)
    handle = nnsight_moe.attach(reference)
    seen = {}
    for index in handle.layout.moe_layers:
        for name in ("hook_topk_indices", "hook_topk_weights", "hook_expert_out"):
            handle.block(index)._modules[name].add_hook(
                lambda t, hook, key=(index, name): seen.__setitem__(key, t[:, -1])
            )
    norm = reference.model.norm
    grab = norm.register_forward_pre_hook(lambda module, args: seen.__setitem__("final", args[0][:, -1]))
    with torch.no_grad():
        reference(ids)
    grab.remove()
    final = seen["final"].float()
    direction = reference.lm_head.weight[targets] * torch.rsqrt(final.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight
    scores = []
    for index in handle.layout.moe_layers:
        per_slot = (seen[index, "hook_topk_weights"][..., None] * seen[index, "hook_expert_out"] * direction[:, None]).sum(-1)
        scores.append(torch.zeros(ids.shape[0], handle.layout.n_experts).scatter_add(-1, seen[index, "hook_topk_indices"], per_slot))
    return torch.stack(scores)


def full_expert_out(view, model, batch):
    """The contrast: every MoE layer's per-slot expert outputs [b, p, k, d] shipped whole."""
    return {index: view.layer(index, want=("expert_out",))["expert_out"] for index in view.moe_layers}


def attribution_response(lm, ids, targets, **options) -> dict:
    """What ``attribute(..., remote="local")`` sends back for ``ids`` in one batch (the saved result)."""
    import os
    import tempfile

    from nnsight_moe.recipes.attribution import LEVELS, attribute

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "results.pt")
        attribute(lm, ids.tolist(), targets.tolist(), levels=LEVELS, remote="local", batch_size=len(ids),
                  results_path=path, progress=False, **options)
        return torch.load(path, weights_only=False)["results"][0]


def response_bytes(saved: dict, compress: bool) -> int:
    """Size of the response NDIF would send for ``saved`` (torch.save bytes, zstd when compressing)."""
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    data = buffer.getvalue()
    if compress:
        import zstandard as zstd

        data = zstd.ZstdCompressor(level=6).compress(data)
    return len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")

    model = medium_model()
    lm = _language_model(model)
    view = MoEView(lm)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 4096, (args.prompts, args.tokens), generator=gen)
    targets = torch.randint(3, 4096, (args.prompts,), generator=gen)

    with torch.no_grad(), lm.trace(ids, remote="local"):
        result = nnsight.save(expert_attribution(view, targets, lm, ids))
    with torch.no_grad(), lm.trace(ids, remote="local"):
        full = nnsight.save(full_expert_out(view, lm, ids))

    neurons = attribution_response(lm, ids, targets, neurons="fast", fast_top=100)

    expected = attribution_from_hooks(model, ids, targets)
    error = (result["expert_scores"].float() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= 2e-3 * scale, f"remote expert scores differ from the attached hooks by {error} (scale {scale})"

    try:
        import zstandard  # noqa: F401

        modes = (False, True)
    except ImportError:
        modes = (False,)
    print(f"medium OLMoE-shaped model: 4 MoE layers x 32 experts, top-8, d_model 512; "
          f"{args.prompts} prompts x {args.tokens} tokens; expert scores match the attached hooks "
          f"(max |diff| {error:.1e}, fp16 rounding, scale {scale:.2f})")
    for compress in modes:
        label = "zstd" if compress else "raw"
        per_prompt = response_bytes({"result": result}, compress) / args.prompts
        full_per_prompt = response_bytes({"full": full}, compress) / args.prompts
        print(f"  [{label}] attribution response: {per_prompt / 1024:8.2f} KB per prompt (target < 64 KB)")
        print(f"  [{label}] full expert_out      : {full_per_prompt / 1024:8.2f} KB per prompt (for contrast)")
        neuron_per_prompt = response_bytes({"result": neurons}, compress) / args.prompts
        print(f"  [{label}] attribute(levels=all, neurons='fast', fast_top=100): "
              f"{neuron_per_prompt / 1024:8.2f} KB per prompt")


def _language_model(model):
    """A LanguageModel over ``model`` with a word-level tokenizer (remote requests need one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(model.config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return nnsight.LanguageModel(model, tokenizer=PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0"))


if __name__ == "__main__":
    main()
