"""Per-token routing of a prompt set: the quantities every routing analysis starts from.

    trace = collect_routing(model, prompts, tokenizer=tok)       # every non-pad token, every MoE layer
    trace.indices, trace.weights, trace.entropy, trace.mass       # [L, N, k], [L, N, k], [L, N], [L, N]
    gen, produced = generation_routing(model, prompts, tokenizer=tok, max_new_tokens=16)

Collection runs the attached model (HF, TransformerBridge or nnsight model) locally, or, with
``remote=`` (``True`` for NDIF, ``"local"``, a host URL), inside ``model.trace`` on the unmodified
model through :func:`nnsight_moe.remote.MoEView`; only the routing of non-pad tokens comes back.
Batching is the recipe runner's (:mod:`nnsight_moe.recipes.runner`). Router entropy and top-k mass are
defined in :mod:`nnsight_moe.recipes.routing_stats`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["RoutingTrace", "collect_routing", "generation_routing", "token_stats", "trace_from_json", "trace_to_json"]


@dataclass
class RoutingTrace:
    """Per-token routing of N non-pad tokens at every MoE layer (layers in ``layers`` order).

    ``indices`` [L, N, k] selected experts (slot order as the model computes it), ``weights`` [L, N, k]
    gate weights (float32), ``entropy`` / ``mass`` [L, N] router entropy and top-k mass (module
    docstring), ``tokens`` [N] token ids, ``prompt`` [N] the prompt each token belongs to, ``position``
    [N] its index among that prompt's non-pad tokens.
    """

    layers: list[int]
    n_experts: int
    indices: Int[Tensor, "L N k"]
    weights: Float[Tensor, "L N k"]
    entropy: Float[Tensor, "L N"]
    mass: Float[Tensor, "L N"]
    tokens: Int[Tensor, " N"]
    prompt: Int[Tensor, " N"]
    position: Int[Tensor, " N"]

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.indices.shape[-1])

    def top1(self) -> Int[Tensor, "L N"]:
        """The expert with the largest gate weight per token and layer (ties: the first slot)."""
        return self.indices.gather(-1, self.weights.argmax(-1, keepdim=True))[..., 0]

    def select(self, keep: Tensor) -> "RoutingTrace":
        """The tokens where the bool mask (or index tensor) ``keep`` [N] holds."""
        return RoutingTrace(self.layers, self.n_experts, self.indices[:, keep], self.weights[:, keep],
                            self.entropy[:, keep], self.mass[:, keep], self.tokens[keep], self.prompt[keep],
                            self.position[keep])

    @classmethod
    def concat(cls, traces: Sequence["RoutingTrace"]) -> "RoutingTrace":
        """Traces of the same model joined along the tokens (prompt numbers are offset to stay distinct)."""
        first, offset, prompts = traces[0], 0, []
        for t in traces:
            prompts.append(t.prompt + offset)
            offset += int(t.prompt.max()) + 1 if t.n_tokens else 0
        cat = lambda name, dim: torch.cat([getattr(t, name) for t in traces], dim)  # noqa: E731
        return cls(first.layers, first.n_experts, cat("indices", 1), cat("weights", 1), cat("entropy", 1),
                   cat("mass", 1), cat("tokens", 0), torch.cat(prompts), cat("position", 0))


def token_stats(scores: Tensor, logits: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """(router entropy in nats, top-k mass) per token from scores / logits [..., E] and indices [..., k].

    Pure torch (also runs inside a remote trace). ``p = scores / sum(scores)`` when every score is >= 0,
    else ``softmax(logits)``.
    """
    scores, logits = scores.float(), logits.float()
    if bool((scores >= 0).all()):
        p = scores / scores.sum(-1, keepdim=True).clamp(min=1e-30)
    else:
        p = logits.softmax(-1)
    entropy = -(p * p.clamp(min=1e-30).log()).sum(-1)
    return entropy, p.gather(-1, indices.long()).sum(-1)


def _layout_of(model: Any):
    import nnsight_moe

    return nnsight_moe.layout(nnsight_moe.hf_model(model))


def _batches(model: Any, prompts: Sequence, tokenizer: Any, batch_size: int, padding_side: str | None) -> list[dict]:
    """Tokenized, padded batches of ``prompts`` on the CPU (:func:`nnsight_moe.recipes.runner.make_batches`)."""
    from nnsight_moe.recipes import runner
    from nnsight_moe.recipes.prompts import model_tokenizer, vocab_size

    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt (a string or a list of token ids)")
    return runner.make_batches(prompts, tokenizer=model_tokenizer(model, tokenizer), batch_size=batch_size,
                               padding_side=padding_side, vocab=vocab_size(model), model=model)


class _Recorder:
    """TransformerLens hooks on the routing hook points of an attached model, recording every firing."""

    NAMES = ("hook_router_logits", "hook_router_scores", "hook_topk_indices", "hook_topk_weights")

    def __init__(self, handle: Any):
        from nnsight_moe.hooks import TemporaryHooks

        self.layers = list(handle.layout.moe_layers)
        self.seen: dict[int, dict[str, list[Tensor]]] = {i: {n: [] for n in self.NAMES} for i in self.layers}
        self.hooks = TemporaryHooks()
        for i in self.layers:
            for name in self.NAMES:
                self.hooks.add(handle.block(i)._modules[name],
                               lambda v, hook, i=i, name=name: self.seen[i][name].append(v.detach().cpu()))

    def take(self) -> dict[int, dict[str, list[Tensor]]]:
        seen = self.seen
        self.seen = {i: {n: [] for n in self.NAMES} for i in self.layers}
        return seen


def _per_token(values: dict[str, Tensor], keep: Tensor) -> dict[str, Tensor]:
    """Routing of the tokens where ``keep`` [b, p] holds, from one layer's hook values [b, p, ...]."""
    entropy, mass = token_stats(values["hook_router_scores"], values["hook_router_logits"], values["hook_topk_indices"])
    return {"indices": values["hook_topk_indices"][keep].long(), "weights": values["hook_topk_weights"][keep].float(),
            "entropy": entropy[keep], "mass": mass[keep]}


def _routing_local(recorder: "_Recorder", model: Any, batch: dict) -> dict:
    """Per-token routing of one batch through the attached HF ``model`` (``recorder`` holds the hooks)."""
    from nnsight_moe.recipes.runner import inputs, model_device

    device = model_device(model)
    model(**{k: v.to(device) for k, v in inputs(batch).items()}, use_cache=False)
    seen = recorder.take()
    keep = batch["attention_mask"].bool().cpu()
    return {i: _per_token({n: v[-1] for n, v in seen[i].items()}, keep) for i in recorder.layers}


def _collect_local(model: Any, batches: list[dict], progress: bool) -> list[dict]:
    import nnsight_moe
    from nnsight_moe.recipes.runner import run_batches

    hf = nnsight_moe.hf_model(model)
    with nnsight_moe.attached(hf) as handle:
        recorder = _Recorder(handle)
        try:
            return run_batches(hf, batches, functools.partial(_routing_local, recorder), progress=progress,
                               desc="routing")
        finally:
            recorder.hooks.remove()


def _routing_in_trace(view: Any, model: Any, batch: dict) -> dict:
    """Per-token routing of the non-pad tokens at every MoE layer; runs inside ``model.trace`` (server side)."""
    keep = batch["attention_mask"].bool()
    out = {}
    for layer in view.moe_layers:
        q = view.layer(layer, want=("router_logits", "router_scores", "topk_indices", "topk_weights"))
        scores, logits = q["router_scores"].float(), q["router_logits"].float()
        positive = (scores >= 0).all()
        p = torch.where(positive, scores / scores.sum(-1, keepdim=True).clamp(min=1e-30), logits.softmax(-1))
        entropy = -(p * p.clamp(min=1e-30).log()).sum(-1)
        mass = p.gather(-1, q["topk_indices"].long()).sum(-1)
        out[layer] = {"indices": q["topk_indices"][keep].long(), "weights": q["topk_weights"][keep].float(),
                      "entropy": entropy[keep], "mass": mass[keep]}
    return out


def _collect_remote(model: Any, batches: list[dict], remote: Any, results_path: Any, progress: bool) -> list[dict]:
    from nnsight_moe.recipes.runner import run_batches
    from nnsight_moe.remote import MoEView

    return run_batches(model, batches, functools.partial(_routing_in_trace, MoEView(model)), remote=remote,
                       results_path=results_path, progress=progress, desc="routing")


def _trace_of(layers: list[int], n_experts: int, batches: list[dict], results: list[dict]) -> RoutingTrace:
    parts: dict[str, list] = {"indices": [], "weights": [], "entropy": [], "mass": []}
    tokens, prompt, position = [], [], []
    offset = 0
    for batch, result in zip(batches, results):
        keep = batch["attention_mask"].bool().cpu()
        tokens.append(batch["input_ids"].cpu()[keep])
        rows = torch.arange(keep.shape[0])[:, None].expand_as(keep)
        prompt.append(rows[keep] + offset)
        position.append((keep.long().cumsum(-1) - 1)[keep])
        offset += keep.shape[0]
        for name in parts:
            parts[name].append(torch.stack([result[i][name] for i in layers]))
    cat = {name: torch.cat(v, 1) for name, v in parts.items()}
    return RoutingTrace(layers, n_experts, cat["indices"], cat["weights"], cat["entropy"], cat["mass"],
                        torch.cat(tokens).long(), torch.cat(prompt), torch.cat(position))


def collect_routing(model: Any, prompts: Sequence, *, tokenizer: Any = None, batch_size: int = 16,
                    padding_side: str | None = None, remote: Any = None, results_path: Any = None,
                    progress: bool = False) -> RoutingTrace:
    """Per-token routing of every non-pad token of ``prompts`` at every MoE layer.

    Args:
        model: HF model, TransformerBridge or nnsight model of a supported MoE family (an nnsight model
            for ``remote``).
        prompts: strings (encoded with ``tokenizer``, default the model's own) or lists of token ids.
        batch_size: prompts per forward; padding_side: ``"left"`` / ``"right"`` (default: the tokenizer's
            own; token-id lists: left). Padding never enters a statistic.
        remote: None (local, attached hooks) or ``True`` / ``"local"`` / a host URL (inside
            ``model.trace`` on the unmodified model); results_path: remote only, resume file.

    Returns a :class:`RoutingTrace`.
    """
    layout = _layout_of(model)
    batches = _batches(model, prompts, tokenizer, batch_size, padding_side)
    if remote is None:
        results = _collect_local(model, batches, progress)
    else:
        results = _collect_remote(model, batches, remote, results_path, progress)
    return _trace_of(list(layout.moe_layers), layout.n_experts, batches, results)


@torch.no_grad()
def generation_routing(model: Any, prompts: Sequence, *, tokenizer: Any = None, max_new_tokens: int = 16,
                       batch_size: int = 16, padding_side: str | None = "left", progress: bool = False,
                       **generate_kwargs: Any) -> tuple[RoutingTrace, list[list[int]]]:
    """Routing of the tokens ``generate`` produces (greedy unless ``generate_kwargs`` say otherwise).

    Hooks record every forward of ``model.generate``: the prefill (the prompt), then one forward per
    new token, whose input is the token produced at the previous step. The trace holds those decode
    forwards' routing: each produced token as the model reads it, ``position`` its step (0 = the first
    produced token), ``prompt`` the input prompt's number. The last produced token is never read by the
    model and is not in the trace; a row's end-of-sequence token and what follows it are not in the trace
    (the produced ids include the end-of-sequence token). Local models only (HF, TransformerBridge, nnsight:
    their HF model generates); remote generation is not supported.

    Returns ``(trace, produced token ids per prompt)``.
    """
    import nnsight_moe
    from nnsight_moe.progress import bar
    from nnsight_moe.recipes.runner import inputs

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be an integer >= 2 (the first produced token is read on the "
                         f"second step), got {max_new_tokens!r}")
    hf = nnsight_moe.hf_model(model)
    layout = nnsight_moe.layout(hf)
    device = next(hf.parameters()).device
    batches = _batches(model, prompts, tokenizer, batch_size, padding_side)
    eos = hf.generation_config.eos_token_id
    eos = set([] if eos is None else [eos] if isinstance(eos, int) else eos)
    pad = hf.generation_config.pad_token_id
    pad = pad if pad is not None else (next(iter(eos)) if eos else 0)
    fed_batches, results, produced = [], [], []
    k = layout.top_k
    with nnsight_moe.attached(hf) as handle:
        recorder = _Recorder(handle)
        try:
            for batch in bar(batches, f"generation routing of {len(batches)} batches", disable=not progress):
                width = batch["input_ids"].shape[1]
                out = hf.generate(**{k: v.to(device) for k, v in inputs(batch).items()}, max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=pad, **generate_kwargs)
                new = out[:, width:].cpu()
                seen = recorder.take()
                steps = len(seen[layout.moe_layers[0]]["hook_topk_indices"]) - 1  # decode forwards
                ended = torch.zeros(new.shape[0], dtype=torch.bool)
                alive, is_eos = [], []
                for step in range(new.shape[1]):
                    alive.append(~ended)
                    is_eos.append(torch.tensor([int(t) in eos for t in new[:, step]]))
                    ended = ended | is_eos[-1]
                alive, is_eos = torch.stack(alive, 1), torch.stack(is_eos, 1)  # [b, T]: no EOS before it / it is EOS
                for row in range(new.shape[0]):
                    produced.append(new[row][alive[row]].tolist())
                steps = min(steps, new.shape[1] - 1)
                keep = (alive & ~is_eos)[:, : max(steps, 0)]  # read back, and not the end-of-sequence token
                per_layer = {}
                for i in layout.moe_layers:
                    if steps > 0:
                        values = {n: torch.cat([v[1 + s] for s in range(steps)], 1) for n, v in seen[i].items()}
                        per_layer[i] = _per_token(values, keep)
                    else:  # every row ended on its first produced token: nothing was read back
                        per_layer[i] = {"indices": torch.zeros(0, k, dtype=torch.long), "weights": torch.zeros(0, k),
                                        "entropy": torch.zeros(0), "mass": torch.zeros(0)}
                fed_batches.append({"input_ids": new[:, : max(steps, 0)], "attention_mask": keep.long()})
                results.append(per_layer)
        finally:
            recorder.hooks.remove()
    return _trace_of(list(layout.moe_layers), layout.n_experts, fed_batches, results), produced


def trace_to_json(trace: RoutingTrace) -> dict:
    """The trace as plain JSON data (lists); :func:`trace_from_json` reads it back."""
    return {"layers": trace.layers, "n_experts": trace.n_experts,
            **{n: getattr(trace, n).tolist() for n in ("indices", "weights", "entropy", "mass", "tokens", "prompt",
                                                        "position")}}


def trace_from_json(data: dict) -> RoutingTrace:
    """Inverse of :func:`trace_to_json`."""
    long = ("indices", "tokens", "prompt", "position")
    return RoutingTrace(data["layers"], data["n_experts"],
                        **{n: torch.tensor(data[n], dtype=torch.long if n in long else torch.float32)
                           for n in ("indices", "weights", "entropy", "mass", "tokens", "prompt", "position")})
