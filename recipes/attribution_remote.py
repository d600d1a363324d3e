"""The remote path of :func:`nnsight_moe.recipes.attribution.attribute` (``remote=``).

Everything runs inside ``model.trace(batch, remote=remote)`` on the UNMODIFIED model (NDIF's copy,
or a local one under ``remote="local"``): residual states and attention outputs are read through
nnsight envoys, routed / shared expert values through :func:`nnsight_moe.remote.MoEView`, weights
(W_U, γ, W_O, experts' ``down_proj``) from the server's modules, and the LPI scores are computed there.
Only the scores [layers, prompts, ...], the target ranks and two self-check scalars travel back (a few
KB per prompt; for the ``neuron`` level the per-neuron scores, and in fast mode the selected neuron ids).

Levels: all of them (``layer``, ``head``, ``expert``, ``shared``, ``neuron``), on hybrid stacks too
(Mamba / linear-attention layers give a ``mixer`` row, head rows exist for attention layers only). The
``neuron`` level covers the selected routed experts, the shared expert and dense MLP layers (read at
the input of their ``down_proj``, gated or not); exact mode scores every neuron in chunks of at most
``budget_bytes``, fast mode screens on the server and scores the ``fast_top`` best per prompt and layer.
RMSNorm final norms only (``weight`` or ``1 + weight`` conventions: γ is read off a CPU copy of the norm
module, see ``_gamma_rule``). The numbers equal the local path (tested under ``remote="local"``).

Blocks of the hook contract's extension (docs/hooks.md) are mapped to the block output in the trace as the
local ``_block_maps`` maps them (:func:`_block_spec` carries what is needed as plain data): each routed part
times the block-level ``routed_scale`` (Laguna, Step-3.7, MiniMax-M3-VL, Beam), a latent MoE's parts through
its output projection ``latent_out`` (Nemotron-H LatentMoE; an expert's neuron column is ``W_out @ W_down[:, k]``),
routed and shared parts through a post-MoE RMSNorm with its per-token scale frozen at the actual sum
(``hook_moe_sum``: A.X-K1), Llama 4's input-gated experts with gate 1 (the weight is inside the expert's
output), and a shared MLP beside the block (Granite) added to the layer's MLP output, its neurons read at
its ``output_linear``. The fast neuron screen uses the same map (its transpose on the gradient).
"""

from __future__ import annotations

from typing import Any, Sequence

import functools

import numpy as np
import pandas as pd
import torch

import nnsight_moe
from nnsight_moe.precision import activation_dtype, readout_bound, residual_bound

__all__ = ["attribute_remote"]

REMOTE_LEVELS = ("layer", "head", "expert", "shared", "neuron")


def _lp(unembed, gamma, scale, x, target):
    """log p(target | x) through the frozen RMSNorm and the unembedding; runs inside the trace."""
    return ((x * gamma * scale) @ unembed.T).log_softmax(-1).gather(-1, target[:, None])[:, 0]


def _paths(hf) -> dict:
    """Where the parts of ``hf`` live, as names the trace can follow: decoder layer paths, per layer the
    token mixer and MLP attribute names (None when absent), the mixer's row name (``attn`` / ``mixer``),
    the layers with head rows, the final norm and unembedding paths and the head count."""
    from nnsight_moe.recipes.attribution import _parts

    parts = _parts(hf)
    names = {id(m): name for name, m in hf.named_modules()}
    norm = parts.norm
    if not hasattr(norm, "variance_epsilon") and not hasattr(norm, "eps"):
        raise ValueError(f"the remote path supports RMSNorm final norms, not {type(norm).__name__}")
    if getattr(norm, "bias", None) is not None or isinstance(norm, torch.nn.LayerNorm):
        raise ValueError("the remote path supports RMSNorm final norms only; run LayerNorm models locally")
    return {"layers": [names[id(layer)] for layer in parts.layers], "mixer": parts.mixer_names, "kinds": parts.kinds,
            "mlp": parts.mlp_names, "head_layers": parts.head_layers, "norm": names[id(norm)],
            "unembed": names[id(parts.unembed)], "heads": parts.n_heads}


@torch.no_grad()
def _gamma_rule(norm) -> tuple[float, float]:
    """(slope, offset) with γ = slope * weight + offset for an RMSNorm-like final norm, read off a CPU copy
    of the module with weight 0 and 1 (works on meta weights: nothing of the real model is needed)."""
    import copy

    probe = copy.deepcopy(norm)
    probe = probe.to_empty(device="cpu") if norm.weight.device.type == "meta" else probe.to("cpu")
    probe = probe.float()
    eps = float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6))
    ones = torch.ones(1, probe.weight.shape[-1])
    found = []
    for value in (0.0, 1.0):
        probe.weight.fill_(value)
        found.append(float(probe(ones).float().mean()) * (1.0 + eps) ** 0.5)
    return round(found[1] - found[0], 6), round(found[0], 6)


def _dense_neuron_layers(hf, moe_layers: list[int]) -> list[int]:
    """Non-MoE layers whose MLP gets neuron rows (an ``nn.Linear`` down_proj, whose input the trace reads)."""
    from nnsight_moe.recipes.attribution import _linear, _parts

    return [i for i, mlp in enumerate(_parts(hf).mlp)
            if mlp is not None and i not in moe_layers and _linear(getattr(mlp, "down_proj", None)) is not None]


def _block_spec(hf, info) -> dict:
    """How a MoE layer's parts map to its block output in the trace, as plain data (the hook contract's
    extension, as the local ``_block_maps``): ``scale`` the block-level ``routed_scale``; ``ones`` whether
    the gate already scaled the experts' input (Llama 4: an expert's contribution is its output);
    ``latent_out`` the path of a latent MoE's output projection (its weight maps an expert's latent output
    to d_model; its bias is per token, no expert's); ``post`` the path of a post-MoE RMSNorm whose
    per-token scale is frozen at the actual sum, with its γ rule and eps; ``outside`` a shared MLP beside
    the block (the layer adds it); ``shared_down`` the shared MLP's down projection; ``transposed`` the
    experts' down projection layout ([E, I, D] when true) and ``down`` its attribute name (both from the local
    path's ``_down_layout``)."""
    from nnsight_moe.hooks import unwrap
    from nnsight_moe.recipes.attribution import _down_layout

    experts = unwrap(hf.get_submodule(info.experts))
    down, transposed = _down_layout(experts)
    post = unwrap(hf.get_submodule(info.post)) if info.post else None
    if post is not None and (getattr(post, "bias", None) is not None or isinstance(post, torch.nn.LayerNorm)):
        raise ValueError(f"the remote path maps parts through an RMSNorm post-MoE norm, not {type(post).__name__}")
    return {"scale": float(info.routed_scale), "ones": bool(info.gate_on_input),
            "latent_out": info.latent_out if info.d_latent else None,
            "post": info.post, "post_gamma": _gamma_rule(post) if post is not None else None,
            "post_eps": float(getattr(post, "variance_epsilon", None) or getattr(post, "eps", 1e-6)) if post is not None else None,
            "outside": bool(info.shared_outside), "shared_down": info.shared_down,
            "down": down, "transposed": transposed}


def attribute_remote(model: Any, prompts: Sequence, targets: list[int] | None, *, tokenizer, levels: Sequence[str],
                     remote: Any, batch_size: int, progress: bool, results_path: Any = None, atol: float = 1e-3,
                     budget_bytes: int = 2 << 30, neurons: str = "exact", fast_top: int = 100):
    """Remote attribution; see the module docstring. Returns an ``AttributionResult``.

    Batches run through :func:`nnsight_moe.recipes.runner.run_batches`: progress per batch, a failed batch raises
    ``RemoteBatchError`` naming it, and with ``results_path`` a rerun resumes from the finished batches.
    """
    from nnsight_moe.recipes.attribution import COLUMNS, AttributionResult, check_finite_scores
    from nnsight_moe.recipes.metrics import checked_ranks
    from nnsight_moe.recipes import runner
    from nnsight_moe.recipes.prompts import vocab_size
    from nnsight_moe.remote import MoEView

    unsupported = set(levels) - set(REMOTE_LEVELS)
    if unsupported:
        raise ValueError(f"levels {sorted(unsupported)} are local only; remote attribution offers {REMOTE_LEVELS}")
    want_neurons = "neuron" in levels
    if want_neurons and neurons not in ("exact", "fast"):
        raise ValueError(f"neurons must be 'exact' or 'fast', got {neurons!r}")
    if want_neurons and neurons == "fast" and (isinstance(fast_top, bool) or not isinstance(fast_top, int) or fast_top < 0):
        raise ValueError(f"fast_top must be an integer >= 0, got {fast_top!r}")
    if want_neurons and int(budget_bytes) <= 0:
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes!r}")
    hf = nnsight_moe.hf_model(model)
    vocab = vocab_size(hf)
    where = _paths(hf)
    layer_paths, n_heads = where["layers"], where["heads"]
    norm = hf.get_submodule(where["norm"])
    try:
        layout = nnsight_moe.layout(hf)
    except nnsight_moe.UnsupportedModelError:
        layout = None
    moe_layers = layout.moe_layers if layout is not None else []
    want_experts = "expert" in levels and layout is not None
    want_shared = "shared" in levels and layout is not None and layout.has_shared
    view = MoEView(model) if layout is not None else None
    shared_layers = [i for i in moe_layers if view.spec["layers"][i]["shared"]]
    blocks = {i: _block_spec(hf, layout.layer(i)) for i in moe_layers}
    dense = _dense_neuron_layers(hf, moe_layers) if want_neurons else []
    settings = {
        "layers": layer_paths, "mixer": where["mixer"], "kinds": where["kinds"], "mlp": where["mlp"],
        "head_layers": where["head_layers"], "norm": where["norm"], "unembed": where["unembed"], "heads": n_heads,
        "eps": float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)),
        "gamma": _gamma_rule(norm),
        "moe_layers": moe_layers, "want_heads": "head" in levels, "want_experts": want_experts,
        "want_shared": want_shared, "view": view,
        "quantities": {i: tuple(q for q, on in (
            ("topk_indices", want_experts or want_neurons), ("topk_weights", want_experts or want_neurons),
            ("expert_acts", want_neurons), ("expert_out", want_experts),
            ("shared_acts", want_neurons and i in shared_layers), ("shared_out", want_shared),
            ("shared_gate", (want_shared or want_neurons) and i in shared_layers),
            # the post-MoE norm's input freezes its per-token scale (A.X-K1)
            ("moe_sum", blocks[i]["post"] is not None and (want_experts or want_shared or want_neurons)),
            # a shared MLP beside the block: the layer's MLP output is block + shared (Granite)
            ("moe_out", blocks[i]["outside"])) if on) for i in moe_layers},
        "blocks": blocks,
        "want_neurons": want_neurons, "dense": dense, "shared_layers": shared_layers,
        "fast_top": int(fast_top) if want_neurons and neurons == "fast" else None, "budget": int(budget_bytes),
        "dtype": str(activation_dtype(hf.get_submodule(where["norm"]), hf.get_submodule(where["unembed"]),
                                      *(hf.get_submodule(p) for p in layer_paths))).replace("torch.", ""),
    }
    batches = runner.make_batches(prompts, tokenizer=tokenizer, batch_size=batch_size, vocab=vocab, model=model,
                                  kind="attribution",
                                  per_prompt=None if targets is None else {"target": torch.tensor(targets)})
    key = {name: value for name, value in settings.items() if name != "view"}  # what is computed, for resume
    results = runner.run_batches(model, batches, functools.partial(_scores_in_trace, settings), key=key,
                                 remote=remote, results_path=results_path, progress=progress,
                                 desc="attribution batches")
    frames, all_targets, all_ranks = [], [], []
    dtype = settings["dtype"]
    for result, batch in zip(results, batches):
        # allowed: atol (float32 slack) + the model dtype's rounding (nnsight_moe.precision), measured in the trace
        if float(result["check_excess"]) > atol:
            raise ValueError(f"the frozen final projection does not reproduce this {dtype} model's log-probabilities: "
                             f"max deviation {float(result['check']):.2e} exceeds the tolerance (atol {atol:g} + "
                             f"{dtype} rounding of the logits) by {float(result['check_excess']):.2e}; attribution "
                             "does not apply to this model")
        if float(result["residual_excess"]) > atol * max(1.0, float(result["scale"])):
            raise ValueError(f"this {dtype} model's residual stream is not h + attn + mlp per layer: max deviation "
                             f"{float(result['residual']):.2e} exceeds the {dtype} rounding of the two additions by "
                             f"{float(result['residual_excess']):.2e} (atol {atol:g} x max |h| "
                             f"{float(result['scale']):.3g}); LPI attribution does not apply")
        frames.append(_frame(result, levels, moe_layers, n_heads, batch["rows"][0], where["kinds"], where["mlp"]))
        all_targets.append(result["target"].cpu())
        all_ranks.append(result["rank"].cpu())
    frame = check_finite_scores(pd.concat(frames, ignore_index=True)[COLUMNS])
    return AttributionResult(frame, torch.cat(all_targets).tolist(), checked_ranks(torch.cat(all_ranks), 0).tolist(),
                             n_layers=len(layer_paths), family=layout.family if layout else "dense",
                             model_type=hf.config.model_type)


def _scores_in_trace(settings: dict, model: Any, batch: dict) -> dict:
    """One batch's LPI scores; runs inside ``model.trace`` (on the server for remote runs).

    Reads only envoys, the MoE view and torch; returns small tensors (scores, ranks, self-checks).
    """
    last = batch["last"]
    rows = torch.arange(last.shape[0])
    n_heads, moe_layers, view = settings["heads"], settings["moe_layers"], settings["view"]
    states, attn, mlp_out, heads, experts, shared = [], [], [], {}, [], []
    units = {}  # layer -> [(weighted acts [P, n, I], expert ids [P, n] (-1: shared/dense), down, transposed)]
    for i, path in enumerate(settings["layers"]):
        layer = model.get(path)
        hidden = layer.input
        states.append(hidden[rows, last].float())
        mixer_name, mlp_name = settings["mixer"][i], settings["mlp"][i]
        heads_here = settings["want_heads"] and i in settings["head_layers"]
        if mixer_name is not None:  # attention, linear attention or SSM
            mixer = getattr(layer, mixer_name)
            if heads_here:
                z = mixer.o_proj.input[rows, last].float()
            out = mixer.output
            attn.append((out[0] if isinstance(out, tuple) else out)[rows, last].float())
        else:
            attn.append(torch.zeros_like(states[-1]))
        q = {}
        if i in moe_layers and settings["quantities"][i]:
            q = view.layer(i, want=settings["quantities"][i])
            spec = settings["blocks"][i]
            if "topk_weights" in q:  # the gate of each slot (ones where it scaled the expert's input: Llama 4)
                gate = q["topk_weights"][rows, last].float()
                gate = torch.ones_like(gate) if spec["ones"] else gate * spec["scale"]
            w_out = model.get(spec["latent_out"]).weight.float() if spec["latent_out"] else None
            factor = None
            if spec["post"]:  # the post-MoE RMSNorm with its per-token scale frozen at the actual sum
                total = q["moe_sum"][rows, last].float()
                slope, offset = spec["post_gamma"]
                factor = ((model.get(spec["post"]).weight.float() * slope + offset)
                          * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + spec["post_eps"]))
            if settings["want_experts"]:
                contrib = gate[..., None] * q["expert_out"][rows, last].float()
                contrib = contrib @ w_out.T if w_out is not None else contrib
                experts.append((q["topk_indices"][rows, last], contrib if factor is None else contrib * factor[:, None]))
            if settings["want_shared"]:
                contrib = q["shared_gate"][rows, last].float() * q["shared_out"][rows, last].float()
                shared.append(contrib if factor is None else contrib * factor)
            if settings["want_neurons"]:
                info = view.spec["layers"][i]
                box = model.get(info["experts"])
                ids = q["topk_indices"][rows, last]
                units[i] = [(gate[..., None] * q["expert_acts"][rows, last].float(), ids, getattr(box, spec["down"]),
                             spec["transposed"], w_out, factor)]
                if i in settings["shared_layers"]:
                    acts = q["shared_gate"][rows, last].float() * q["shared_acts"][rows, last].float()
                    units[i].append((acts[:, None], torch.full_like(ids[:, :1], -1),
                                     model.get(spec["shared_down"]).weight[None], False, None, factor))
        elif i in settings["dense"]:
            mlp = getattr(layer, mlp_name)
            acts = mlp.down_proj.input[rows, last].float()  # the dense MLP's neuron activations
            units[i] = [(acts[:, None], torch.full((acts.shape[0], 1), -1, dtype=torch.long, device=acts.device),
                         mlp.down_proj.weight[None], False, None, None)]
        if "moe_out" in q:  # the block's output plus the shared MLP beside it, as the layer adds them (Granite)
            mlp_out.append(q["moe_out"][rows, last].float())
        elif mlp_name is not None:
            out = getattr(layer, mlp_name).output
            out = out[0] if isinstance(out, tuple) else out
            # Llama 4's MoE returns flattened tokens: view them as the layer's input
            mlp_out.append(out.reshape(hidden.shape)[rows, last].float())
        else:
            mlp_out.append(torch.zeros_like(states[-1]))
        if heads_here:
            w_o = mixer.o_proj.weight.float()
            heads[i] = torch.einsum("phd,ohd->pho", z.reshape(z.shape[0], n_heads, -1),
                                    w_o.reshape(w_o.shape[0], n_heads, -1))
    final = model.get(settings["norm"]).input[rows, last].float()
    logits = model.output.logits[rows, last].float()
    target = batch["target"] if "target" in batch else logits.argmax(-1)
    slope, offset = settings["gamma"]  # γ = slope * weight + offset (offset 1 for "(1 + weight)" norms)
    unembed = model.get(settings["unembed"]).weight.float()
    gamma = model.get(settings["norm"]).weight.float() * slope + offset
    scale = torch.rsqrt(final.pow(2).mean(-1, keepdim=True) + settings["eps"])
    dtype = getattr(torch, settings["dtype"])
    check = (_lp(unembed, gamma, scale, final, target) - logits.log_softmax(-1).gather(-1, target[:, None])[:, 0]).abs()
    check_excess = (check - readout_bound(dtype, unembed, final * gamma * scale, logits)).max()
    check = check.max()
    after = torch.stack(states[1:] + [final])
    residual = (torch.stack(states) + torch.stack(attn) + torch.stack(mlp_out) - after).abs()
    residual_excess = (residual - residual_bound(dtype, torch.stack(states), torch.stack(attn), torch.stack(mlp_out))).max()
    residual = residual.max()
    layer_scores, head_scores, expert_scores, shared_scores, neuron_scores = [], {}, [], [], {}
    for i in range(len(states)):
        u = states[i] + attn[i]
        base_h, base_u = _lp(unembed, gamma, scale, states[i], target), _lp(unembed, gamma, scale, u, target)
        layer_scores.append(torch.stack([_lp(unembed, gamma, scale, u, target) - base_h,
                                         _lp(unembed, gamma, scale, u + mlp_out[i], target) - base_u]))
        if i in heads:
            per = [_lp(unembed, gamma, scale, states[i] + heads[i][:, h], target) - base_h for h in range(n_heads)]
            head_scores[i] = torch.stack(per, dim=-1)
        if i in moe_layers and settings["want_experts"]:
            ids, contrib = experts[moe_layers.index(i)]
            per = [_lp(unembed, gamma, scale, u + contrib[:, j], target) - base_u for j in range(contrib.shape[1])]
            expert_scores.append((ids, torch.stack(per, dim=-1)))
        if i in moe_layers and settings["want_shared"]:
            shared_scores.append(_lp(unembed, gamma, scale, u + shared[moe_layers.index(i)], target) - base_u)
        if i in units:
            neuron_scores[i] = [_neuron_lpi(unembed, gamma, scale, target, u, base_u, *unit, settings["fast_top"],
                                            settings["budget"]) for unit in units[i]]
    picked = logits.gather(-1, target[:, None])
    return {"layer": torch.stack(layer_scores), "head": head_scores, "expert": expert_scores,
            "shared": shared_scores, "neuron": neuron_scores, "target": target,
            "rank": torch.where(torch.isfinite(logits).all(-1), (logits > picked).sum(-1) + 1, 0),
            "check": check, "residual": residual, "scale": after.abs().max(),
            "check_excess": check_excess, "residual_excess": residual_excess}


def _neuron_lpi(unembed, gamma, scale, target, base, before, weighted, ids, down, transposed, w_out, factor,
                fast_top, budget):
    """Neuron LPI of one layer's units; runs inside the trace. Returns ``{"ids", "scores", "picked"}``.

    Unit j of prompt p is a selected routed expert (``ids[p, j]``), the shared expert or a dense MLP
    (``ids`` -1, ``down`` one matrix [1, D, I]); neuron k of it adds ``weighted[p, j, k] * M_p W_down[:, k]``
    to ``base[p]`` (``before`` = log p(target | base)). ``down`` is the experts' [E, D, I] (or [E, I, D]
    when ``transposed``) parameter; its columns are gathered per chunk, never a [P, n, I, D] tensor.
    ``M_p`` maps the experts' output space to the block output (the hook contract's extension): the
    latent MoE's output projection ``w_out`` [D, D_latent] (None: identity), then the frozen post-MoE
    norm's per-prompt factor ``factor`` [P, D] (None: identity).
    ``fast_top`` None scores all n * I neurons per prompt (``scores`` [P, n * I], flat index j * I + k);
    else a first-order screen keeps the ``fast_top`` largest |screen| per prompt (``picked`` [P, m] int32
    flat indices, ``scores`` [P, m]), as the local ``_neurons``. The [chunk, vocab] logits stay under
    ``budget`` bytes.
    """
    with torch.no_grad():
        weighted, ids = weighted.to(base.device), ids.to(base.device)  # a layer may sit on another device
        w_out = w_out.float().to(base.device) if w_out is not None else None
        factor = factor.to(base.device) if factor is not None else None
        n_prompts, n_units, width = weighted.shape
        slot_expert = ids.clamp(min=0)  # -1 (shared / dense) is matrix 0 of a [1, D, I] down
        if fast_top is None:
            picked = torch.arange(n_units * width, device=weighted.device).expand(n_prompts, -1)
        else:
            logits = (base * gamma * scale) @ unembed.T
            direction = unembed[target] - logits.softmax(-1) @ unembed
            grad = direction * gamma * scale  # d log p(target | x) / dx at base
            grad = grad * factor if factor is not None else grad  # ... and at the experts' output (M_p^T grad)
            grad = grad @ w_out if w_out is not None else grad
            screen = torch.empty_like(weighted)
            for e in slot_expert.unique().tolist():
                prompt, slot = (slot_expert == e).nonzero(as_tuple=True)
                w = down[e].float().to(grad.device)
                screen[prompt, slot] = grad[prompt] @ (w.T if transposed else w)
            approx = (weighted * screen).reshape(n_prompts, -1)
            picked = approx.abs().topk(min(fast_top, n_units * width), dim=-1).indices
        m = picked.shape[1]
        flat = picked.reshape(-1)
        prompt_of = torch.arange(n_prompts, device=weighted.device).repeat_interleave(m)
        chunk = max(1, int(budget // max(1, 4 * 4 * (unembed.shape[0] + unembed.shape[1]))))
        scores = []
        for start in range(0, flat.numel(), chunk):
            p, f = prompt_of[start : start + chunk], flat[start : start + chunk]
            j, k = f // width, f % width
            e, kd = slot_expert[p, j].to(down.device), k.to(down.device)
            column = (down[e, kd] if transposed else down[e, :, kd]).float().to(base.device)  # [c, D (latent)]
            column = column @ w_out.T if w_out is not None else column
            column = column * factor[p] if factor is not None else column
            contrib = weighted[p, j, k][:, None] * column
            scores.append(_lp(unembed, gamma, scale[p], base[p] + contrib, target[p]) - before[p])
        scores = torch.cat(scores).reshape(n_prompts, m) if scores else weighted.new_zeros(n_prompts, 0)
    return {"ids": ids, "width": width, "scores": scores,
            "picked": None if fast_top is None else picked.to(torch.int32)}


def _frame(result: dict, levels, moe_layers: list[int], n_heads: int, start: int, kinds: list, mlp: list) -> pd.DataFrame:
    """Rows in the local recipe's order and format from the tensors the trace sent back (``kinds``: the
    token mixer's row name per layer, ``attn`` / ``mixer`` / None; ``mlp``: None where a layer has none)."""
    frames, rows = [], []
    n_layers, _, n_prompts = result["layer"].shape

    def add(prompt, layer, level, score, head=-1, expert=-1):
        rows.append({"prompt": start + prompt, "layer": layer, "level": level, "head": head, "expert": expert,
                     "neuron": -1, "score": float(score)})

    def flush():
        if rows:
            frames.append(pd.DataFrame(rows))
            rows.clear()

    for i in range(n_layers):
        if "layer" in levels:
            for level, scores in zip((kinds[i], "moe" if mlp[i] is not None else None), result["layer"][i]):
                for p in range(n_prompts if level is not None else 0):
                    add(p, i, level, scores[p])
        if i in result["head"]:
            for p in range(n_prompts):
                for h in range(n_heads):
                    add(p, i, "head", result["head"][i][p, h], head=h)
        if i in moe_layers and result["expert"]:
            ids, scores = result["expert"][moe_layers.index(i)]
            for p in range(n_prompts):
                for j in range(ids.shape[1]):
                    add(p, i, "expert", scores[p, j], expert=int(ids[p, j]))
        if i in moe_layers and result["shared"]:
            for p in range(n_prompts):
                add(p, i, "shared", result["shared"][moe_layers.index(i)][p])
        for unit in result.get("neuron", {}).get(i, []):
            flush()
            frames.append(_neuron_rows(unit, i, start))
    flush()
    if not frames:
        from nnsight_moe.recipes.attribution import COLUMNS

        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(frames, ignore_index=True)


def _neuron_rows(unit: dict, layer: int, start: int) -> pd.DataFrame:
    """The neuron rows of one unit group (as :func:`_neuron_lpi` returned it), vectorised."""
    scores, width, ids = unit["scores"], int(unit["width"]), unit["ids"].long()
    n_prompts, m = scores.shape
    flat = (torch.arange(ids.shape[1] * width).expand(n_prompts, -1) if unit["picked"] is None
            else unit["picked"].long()).reshape(-1)
    prompt = torch.arange(n_prompts).repeat_interleave(m)
    expert = ids[prompt, flat // width]
    n = flat.numel()
    return pd.DataFrame({"prompt": (prompt + start).numpy(), "layer": np.full(n, layer, dtype=np.int64),
                         "level": ["neuron"] * n, "head": np.full(n, -1, dtype=np.int64), "expert": expert.numpy(),
                         "neuron": (flat % width).numpy(), "score": scores.reshape(-1).double().numpy()})
