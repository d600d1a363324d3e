"""Head–expert correlation: which attention heads drive which expert choices (correlational and causal).

Correlation (:func:`correlate`), over the prompts of a dataset:

* head signal H[P, L, Hd]: each head's attribution (LPI, ``attribution`` recipe, level ``head``);
* expert signal X[P, L', E]: each routed expert's gated-LPI attribution (0 where the expert is not
  selected at the scored position), or with ``signal="router_prob"`` the expert's router score;
* for every pair (head (l, h), expert (l', e)) with l <= l': the Pearson r across prompts, its
  two-sided p-value (t distribution, P - 2 degrees of freedom) and Benjamini–Hochberg q-value over
  all pairs with a defined r (constant signals have none);
* one summary coefficient, ``summary_r``: the Pearson r, across prompts, between the summed
  attribution of the top-K heads and the summed signal of the top-K experts, where "top" ranks heads
  and experts by their mean attribution over the dataset; its p-value comes from a permutation test
  (expert sums shuffled across prompts). The study reports r = 0.68 without a definition; this one
  is explicit, cheap, and insensitive to how many heads/experts exist.

Causal checks (:func:`causal`):

1. suppress the top-K heads (their slice of the ``o_proj`` input set to 0) and measure the change of
   the router probability of the experts most correlated with them and of the originally selected
   experts, at the scored position, and the MRR drop;
2. recovery: with the heads still suppressed, force every router to the clean run's selection and
   gate weights (router patching through ``hook_topk_indices`` / ``hook_topk_weights``) and report the
   MRR recovered as a percentage of the clean-minus-suppressed gap;
3. control: the same suppression with K random heads, over several seeds (mean ± std).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

import nnsight_moe
from nnsight_moe.hooks import TemporaryHooks
from nnsight_moe.recipes.metrics import checked_ranks, mrr_of_ranks, target_ranks
from nnsight_moe.recipes import runner
from nnsight_moe.recipes.head_expert_results import CausalResult, HeadExpertResult
from nnsight_moe.recipes.prompts import last_positions, model_tokenizer
from nnsight_moe.remote import _envoy as _remote_envoy

__all__ = [
    "CausalResult",
    "HeadExpertResult",
    "causal",
    "correlate",
    "pearson_matrix",
    "suppress_heads",
]


# ----------------------------------------------------------------------------- statistics
def pearson_matrix(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r and two-sided p-values between every column of ``a`` [P, m] and of ``b`` [P, n].

    Columns with zero variance give NaN (no correlation is defined).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"expected [P, m] and [P, n] with the same P, got {a.shape} and {b.shape}")
    n = a.shape[0]
    if n < 3:
        raise ValueError(f"need at least 3 prompts to correlate, got {n}")
    za, zb = a - a.mean(0), b - b.mean(0)
    sa, sb = np.sqrt((za**2).sum(0)), np.sqrt((zb**2).sum(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (za.T @ zb) / np.outer(sa, sb)
        r = np.where(np.outer(sa > 1e-12 * (1 + np.abs(a).max(0)), sb > 1e-12 * (1 + np.abs(b).max(0))), r, np.nan)
        r = np.clip(r, -1.0, 1.0)
        t = r * np.sqrt((n - 2) / np.maximum(1e-300, 1.0 - r**2))
    p = 2.0 * stats.t.sf(np.abs(t), df=n - 2)
    return r, np.where(np.isnan(r), np.nan, p)


def _bh(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg q-values over the finite entries of ``p`` (NaN stays NaN)."""
    q = np.full_like(p, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        q[finite] = stats.false_discovery_control(p[finite], method="bh")
    return q


def _permutation_p(x: np.ndarray, y: np.ndarray, r: float, n: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    if not np.isfinite(r):
        return float("nan")
    hits = sum(abs(np.corrcoef(x, rng.permutation(y))[0, 1]) >= abs(r) - 1e-12 for _ in range(n))
    return (1 + hits) / (1 + n)


# ----------------------------------------------------------------------------- data plumbing
def _prompts_and_targets(model, dataset, tokenizer):
    """(prompts, targets, relations) from Relations (with a tokenizer) or a (prompts, targets) pair."""
    from nnsight_moe.data import Relation, encode_facts

    if isinstance(dataset, tuple) and len(dataset) == 2:
        prompts, targets = list(dataset[0]), list(dataset[1])
        relations = ["-"] * len(prompts)
    else:
        relations_in = [dataset] if isinstance(dataset, Relation) else list(dataset)
        if not all(isinstance(r, Relation) for r in relations_in):
            raise TypeError("dataset must be Relations (nnsight_moe.data) or a (prompts, targets) pair")
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to turn relation facts into prompts and target tokens")
        encoded = encode_facts(tokenizer, [f for r in relations_in for f in r.facts()])
        prompts, targets = encoded.prompts, encoded.targets
        relations = [f.relation for f in encoded.facts]
    if len(prompts) == 0:
        raise ValueError("the dataset is empty: no prompt with a known target token")
    return prompts, targets, relations


def _attention_modules(model: nn.Module) -> dict[int, tuple[nn.Module, int]]:
    """``{layer: (o_proj, n_heads)}`` of every attention layer (as the model calls the o_proj: a bridge's
    wrapper included). Layers without attention heads (Mamba, linear attention, MLP-only) have none."""
    from nnsight_moe.recipes.attribution import _parts

    parts = _parts(nnsight_moe.hf_model(model))
    out = {i: (parts.o_proj[i], parts.n_heads) for i in parts.head_layers}
    if not out:
        raise ValueError("this model has no attention layer with an o_proj (heads are its input slices): "
                         "head-expert analyses need attention heads")
    return out


def _in_features(o_proj: nn.Module) -> int:
    """Width of the heads' concatenated output that ``o_proj`` reads (DeepSeek-V4's grouped ``o_a_proj`` reads it
    as [.., groups, width / groups]: ``in_features`` is one group's)."""
    from nnsight_moe.hooks import unwrap
    from nnsight_moe.recipes.attribution import _linear

    return int(_linear(o_proj).in_features) * int(getattr(unwrap(o_proj), "n_groups", 1))


def _attention_layer(modules: dict, layer: int, n_layers: int) -> int:
    """``layer`` (negative counts from the end) if it has attention heads, else an error naming those that do."""
    index = layer + n_layers if isinstance(layer, int) and layer < 0 else layer
    if index not in modules:
        raise ValueError(f"layer {layer} has no attention heads (a Mamba / linear-attention / MLP-only layer, or "
                         f"out of range); attention layers: {sorted(modules)}")
    return index


@contextmanager
def suppress_heads(model: Any, heads: Sequence[tuple[int, int]]) -> Iterator[None]:
    """Zero the ``o_proj`` input slice of each (layer, head) for the duration of the context.

    Equivalent to zeroing that head's columns of ``W_O`` (and exactly what ``z_h = 0`` means).
    """
    layout = nnsight_moe.layout(model)
    modules = _attention_modules(model)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        layout.layer(layer)  # IndexError for a layer out of range
        index = _attention_layer(modules, layer, layout.n_layers)
        o_proj, n_heads = modules[index]
        if not 0 <= head < n_heads:
            raise IndexError(f"head {head} is out of range for layer {layer}: valid heads are 0..{n_heads - 1}")
        by_layer.setdefault(index, []).append(head)
    handles = []
    for layer, hs in by_layer.items():
        o_proj, n_heads = modules[layer]
        d_head = _in_features(o_proj) // n_heads

        def pre_hook(module, args, hs=tuple(hs), d_head=d_head):
            z = args[0].clone()
            flat = z.view(*z.shape[:2], -1)  # [b, p, H * d_head] (a grouped projection's [b, p, G, d] too)
            for h in hs:
                flat[..., h * d_head : (h + 1) * d_head] = 0
            return (z, *args[1:])

        handles.append(o_proj.register_forward_pre_hook(pre_hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- correlation
def _signals(model, prompts, targets, tokenizer, signal: str, batch_size: int, remote: Any = None):
    """(heads [P, attention layers, H], attention layer indices, experts [P, L', E], expert attributions
    [P, L', E], layout) for the prompts."""
    from nnsight_moe.recipes.attribution import attribute

    layout = nnsight_moe.layout(model)
    frame = attribute(model, prompts, targets, tokenizer=tokenizer, levels=("head", "expert"),
                      batch_size=batch_size, remote=remote, progress=False).to_frame()
    n_prompts = len(prompts)
    heads = frame[frame["level"] == "head"]
    n_heads = int(heads["head"].max()) + 1
    head_layers = sorted(int(layer) for layer in heads["layer"].unique())  # attention layers only
    head_row = {layer: i for i, layer in enumerate(head_layers)}
    head_arr = np.zeros((n_prompts, len(head_layers), n_heads))
    head_arr[heads["prompt"].to_numpy(), heads["layer"].map(head_row).to_numpy(),
             heads["head"].to_numpy()] = heads["score"].to_numpy()
    moe_layers = layout.moe_layers
    expert_arr = np.zeros((n_prompts, len(moe_layers), layout.n_experts))
    experts = frame[frame["level"] == "expert"]
    row_of = {layer: i for i, layer in enumerate(moe_layers)}
    np.add.at(expert_arr, (experts["prompt"].to_numpy(), experts["layer"].map(row_of).to_numpy(),
                           experts["expert"].to_numpy()), experts["score"].to_numpy())
    attribution_experts = expert_arr
    if signal == "router_prob":
        expert_arr = _router_probs(model, prompts, tokenizer, batch_size, remote)
    return head_arr, head_layers, expert_arr, attribution_experts, layout


@torch.no_grad()
def _router_probs(model, prompts, tokenizer, batch_size, remote: Any = None) -> np.ndarray:
    """Router scores of every expert at the last non-pad position, [P, L', E] (hooks, or the remote view)."""
    options = dict(tokenizer=tokenizer, batch_size=batch_size, remote=remote, progress=False)
    if remote is not None:
        from nnsight_moe.remote import MoEView

        return torch.cat(runner.run(model, prompts, functools.partial(_router_probs_in_trace, MoEView(model)),
                                    **options)).numpy()
    hf = nnsight_moe.hf_model(model)
    with nnsight_moe.attached(hf) as handle:
        return torch.cat(runner.run(hf, prompts, functools.partial(_router_probs_local, handle), **options)).numpy()


def _router_probs_local(handle, model, batch):
    """Router scores [b, L', E] at the last positions, from the attached hooks (runner function)."""
    layers = handle.layout.moe_layers
    seen = {}
    with TemporaryHooks() as added:  # removes ours only: hooks the user added stay
        for i in layers:
            added.add(handle.block(i).hook_router_scores, lambda s, hook, i=i: seen.__setitem__(i, s))
        model(**runner.inputs(batch))
    rows = torch.arange(len(batch["rows"]))
    return torch.stack([seen[i][rows, batch["last"]] for i in layers], dim=1).float()


def _router_probs_in_trace(view, model, batch):
    """Router scores [b, L', E] at the last positions; runs inside the trace (on the server)."""
    last = batch["last"]
    rows = torch.arange(last.shape[0])
    scores = [view.layer(i, want=("router_scores",))["router_scores"][rows, last] for i in view.moe_layers]
    return torch.stack(scores, dim=1).float()


def _batch(tokenizer, prompts, hf) -> dict:
    """Model inputs of ``prompts`` as one batch on ``hf``'s device."""
    from nnsight_moe.recipes.prompts import vocab_size

    batch, = runner.make_batches(prompts, tokenizer=tokenizer, batch_size=len(prompts), device=runner.model_device(hf),
                                 vocab=vocab_size(hf))
    return runner.inputs(batch)


def correlate(model: Any, dataset: Any, *, tokenizer=None, signal: str = "attribution", top_k: int = 5,
              permutations: int = 1000, seed: int = 0, batch_size: int = 16, remote: Any = None) -> HeadExpertResult:
    """Correlate head attributions with expert signals over a dataset's prompts.

    Args:
        model: MoE model (HF, TransformerBridge or nnsight).
        dataset: Relations (``nnsight_moe.data``, used with ``tokenizer``) or a ``(prompts, targets)`` pair.
        signal: ``"attribution"`` (gated LPI of the expert) or ``"router_prob"`` (its router score).
        top_k: K heads and K experts for the summary coefficient.
        permutations: permutation-test draws for the summary p-value.
        remote: compute the attributions inside ``model.trace(..., remote=remote)`` on the unmodified
            model (``model`` an nnsight model): the attributions and, for ``signal="router_prob"``, the
            last-position router scores; statistics run locally on the returned scores.
    """
    if signal not in ("attribution", "router_prob"):
        raise ValueError(f"signal must be 'attribution' or 'router_prob', got {signal!r}")
    tokenizer = model_tokenizer(model, tokenizer)
    prompts, targets, _ = _prompts_and_targets(model, dataset, tokenizer)
    heads, head_layers, experts, expert_attr, layout = _signals(model, prompts, targets, tokenizer, signal,
                                                                batch_size, remote)
    n_prompts, n_layers, n_heads = heads.shape  # n_layers: attention layers
    moe_layers = layout.moe_layers
    r, p = pearson_matrix(heads.reshape(n_prompts, -1), experts.reshape(n_prompts, -1))
    head_layer = np.repeat(np.array(head_layers), n_heads)
    expert_layer = np.repeat(np.array(moe_layers), experts.shape[2])
    allowed = head_layer[:, None] <= expert_layer[None, :]
    r, p = np.where(allowed, r, np.nan), np.where(allowed, p, np.nan)
    q = _bh(p.ravel()).reshape(p.shape)
    hl, ee = np.meshgrid(np.arange(n_layers * n_heads), np.arange(experts.shape[1] * experts.shape[2]), indexing="ij")
    pairs = pd.DataFrame({
        "head_layer": head_layer[hl.ravel()], "head": (hl % n_heads).ravel(),
        "expert_layer": expert_layer[ee.ravel()], "expert": (ee % experts.shape[2]).ravel(),
        "r": r.ravel(), "p": p.ravel(), "q": q.ravel(),
    })
    pairs = pairs[allowed.ravel()].reset_index(drop=True)
    k = min(top_k, n_layers * n_heads, expert_attr.shape[1] * expert_attr.shape[2])
    head_order = np.argsort(-heads.reshape(n_prompts, -1).mean(0))[:k]
    expert_order = np.argsort(-expert_attr.reshape(n_prompts, -1).mean(0))[:k]
    x = heads.reshape(n_prompts, -1)[:, head_order].sum(1)
    y = experts.reshape(n_prompts, -1)[:, expert_order].sum(1)
    summary_r = float(pearson_matrix(x[:, None], y[:, None])[0][0, 0])
    summary_p = _permutation_p(x, y, summary_r, permutations, seed)
    top_heads = [(int(head_layers[i // n_heads]), int(i % n_heads)) for i in head_order]
    top_experts = [(int(moe_layers[i // experts.shape[2]]), int(i % experts.shape[2])) for i in expert_order]
    return HeadExpertResult(pairs, summary_r, summary_p, top_heads, top_experts, signal, n_prompts)


# ----------------------------------------------------------------------------- causal checks
@torch.no_grad()
def _run(hf, handle, batch, patch: dict | None = None, capture: bool = False):
    """Forward; optionally patch every router's selection/weights; returns (last logits, routing)."""
    layers = handle.layout.moe_layers
    routing: dict[int, dict[str, torch.Tensor]] = {i: {} for i in layers}
    added = TemporaryHooks()
    for i in layers:
        block = handle.block(i)
        gammas = ("hook_shared_gammas",) if handle.layout.layer(i).shared_gammas else ()  # Inkling: the router's too
        for name in ("hook_router_scores", "hook_topk_indices", "hook_topk_weights") + gammas:
            point = getattr(block, name)
            if patch is not None and name != "hook_router_scores":
                added.add(point, lambda value, hook, i=i, name=name: patch[i][name])
            if capture:
                added.add(point, lambda value, hook, i=i, name=name: routing[i].__setitem__(name, value))
    try:
        logits = hf(**batch).logits
    finally:
        added.remove()  # ours only: hooks the user added stay
    last = last_positions(batch["attention_mask"])
    return logits[torch.arange(logits.shape[0]), last].float(), routing


def _conditions(correlation: HeadExpertResult, head_layers: Sequence[int], n_heads: int, k_heads: int, seeds: int,
                seed: int):
    """(top heads, correlated experts, [(condition, seed, heads)]) of the causal checks; random heads are
    drawn from the attention layers ``head_layers``."""
    top_heads = correlation.top_heads[:k_heads]
    strongest = correlation.strongest(n=50)
    correlated = sorted({(int(r.expert_layer), int(r.expert)) for r in strongest.itertuples()
                         if (int(r.head_layer), int(r.head)) in top_heads}) or correlation.top_experts
    rng = np.random.default_rng(seed)
    all_heads = [(l, h) for l in head_layers for h in range(n_heads)]
    conditions = [("top-K heads", 0, top_heads)] + [
        ("random heads", s, [all_heads[i] for i in rng.choice(len(all_heads), size=len(top_heads), replace=False)])
        for s in range(seeds)
    ]
    return top_heads, correlated, conditions


def _causal_batch(handle, conditions, correlated, hf, batch) -> dict:
    """One batch of the local causal checks (runner function): target ranks of the clean run and, per
    condition, of the suppressed and patched runs, and the router-score changes at the last position."""
    inputs = runner.inputs(batch)

    def ranks(logits):  # [b, V] logits are reduced to ranks here: nothing of size V is kept per condition
        return target_ranks(logits, batch["target"].to(logits.device), prompts=batch["rows"])

    clean, clean_routing = _run(hf, handle, inputs, capture=True)
    out = {"clean": ranks(clean), "suppressed": [], "patched": [], "d_corr": [], "d_sel": []}
    last = batch["last"]
    rows_idx = torch.arange(len(last))
    for _, _, heads in conditions:
        with suppress_heads(hf, heads):
            logits, routing = _run(hf, handle, inputs, capture=True)
            patch = {i: {n: v for n, v in clean_routing[i].items() if n != "hook_router_scores"}
                     for i in handle.layout.moe_layers}
            patched, _ = _run(hf, handle, inputs, patch=patch)
        d_corr, d_sel = [], []
        for layer, expert in correlated:
            before = clean_routing[layer]["hook_router_scores"][rows_idx, last, expert]
            after = routing[layer]["hook_router_scores"][rows_idx, last, expert]
            d_corr.append((after - before).float())
        for layer in handle.layout.moe_layers:
            chosen = clean_routing[layer]["hook_topk_indices"][rows_idx, last]
            before = clean_routing[layer]["hook_router_scores"][rows_idx, last].gather(-1, chosen)
            after = routing[layer]["hook_router_scores"][rows_idx, last].gather(-1, chosen)
            d_sel.append((after - before).float().reshape(-1))
        out["suppressed"].append(ranks(logits)), out["patched"].append(ranks(patched))
        out["d_corr"].append(d_corr), out["d_sel"].append(d_sel)
    return out


def _causal_row(condition: str, s: int, m_clean: float, m_supp: float, m_patch: float,
                d_corr: list, d_sel: list) -> dict:
    """One row of :class:`CausalResult` from the three MRRs and the router-probability changes."""
    gap = m_clean - m_supp
    return {
        "condition": condition, "seed": s, "mrr_clean": m_clean, "mrr_suppressed": m_supp,
        "mrr_drop": gap, "mrr_patched": m_patch,
        "recovered_pct": 100.0 * (m_patch - m_supp) / gap if abs(gap) > 1e-9 else float("nan"),
        "d_prob_correlated": float(torch.cat(d_corr).mean()) if d_corr else float("nan"),
        "d_prob_selected": float(torch.cat(d_sel).mean()),
    }


def causal(model: Any, dataset: Any, *, tokenizer=None, correlation: HeadExpertResult | None = None,
           k_heads: int = 5, seeds: int = 5, batch_size: int = 16, seed: int = 0, remote: Any = None,
           results_path: Any = None, progress: bool = True) -> CausalResult:
    """Suppress the top-K heads (and K random heads as control) and patch routers back.

    Args:
        correlation: a :func:`correlate` result; its ``top_heads`` are suppressed and its strongest
            pairs name the "correlated" experts (computed here when None, with the same ``remote``).
        k_heads: heads to suppress; seeds: random-head control draws.
        remote: run every forward inside ``model.trace(..., remote=remote)`` on the UNMODIFIED model
            (``model`` an nnsight ``LanguageModel``): ``True`` (NDIF), ``"local"`` (nnsight's
            serialise-and-run-here simulation), a host URL, or ``False`` (a plain local trace). One
            trace per prompt batch, with the clean run and every condition's suppressed and patched
            runs stacked along the batch dimension ((1 + 2 * conditions) * batch rows); only target
            ranks and last-position router scores come back. Equal to the local path.
        results_path: with ``remote``, a file keeping finished batches (a rerun after a failure resumes).
        progress: with ``remote``, print one line per batch.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    tokenizer = model_tokenizer(model, tokenizer)
    prompts, targets, _ = _prompts_and_targets(model, dataset, tokenizer)
    if correlation is None:
        correlation = correlate(model, (prompts, targets), tokenizer=tokenizer, top_k=k_heads, batch_size=batch_size,
                                remote=remote)
    if remote is not None:
        return _causal_remote(model, prompts, targets, tokenizer, correlation, k_heads=k_heads, seeds=seeds,
                              batch_size=batch_size, seed=seed, remote=remote, results_path=results_path,
                              progress=progress)
    hf = nnsight_moe.hf_model(model)
    layout = nnsight_moe.layout(hf)
    attention = _attention_modules(hf)
    n_heads = next(iter(attention.values()))[1]
    top_heads, correlated, conditions = _conditions(correlation, sorted(attention), n_heads, k_heads, seeds, seed)
    targets_t = torch.as_tensor(targets)
    rows = []
    with nnsight_moe.attached(hf) as handle:  # per batch: the clean run, then every condition's two runs
        results = runner.run(hf, prompts, functools.partial(_causal_batch, handle, conditions, correlated),
                             tokenizer=tokenizer, batch_size=batch_size, per_prompt={"target": targets_t},
                             desc=f"head suppression: {len(conditions)} conditions (top-K, then random seeds)")
    clean = mrr_of_ranks(torch.cat([r["clean"] for r in results]))
    for c, (condition, s, _) in enumerate(conditions):
        suppressed = mrr_of_ranks(torch.cat([r["suppressed"][c] for r in results]))
        patched = mrr_of_ranks(torch.cat([r["patched"][c] for r in results]))
        d_corr = [t for r in results for t in r["d_corr"][c]]
        d_sel = [t for r in results for t in r["d_sel"][c]]
        rows.append(_causal_row(condition, s, clean, suppressed, patched, d_corr, d_sel))
    return CausalResult(pd.DataFrame(rows), [tuple(h) for h in top_heads])


# ----------------------------------------------------------------------------- causal checks, remote
def _causal_remote(model, prompts, targets, tokenizer, correlation, *, k_heads, seeds, batch_size, seed, remote,
                   results_path, progress) -> CausalResult:
    """:func:`causal` inside ``model.trace`` on the unmodified model, through ``run_batches``.

    Per prompt batch of b rows one trace runs (1 + 2C) * b rows: [clean; suppressed_0; patched_0; ...;
    suppressed_{C-1}; patched_{C-1}] (row group g = 0 clean, 1 + 2c suppressed, 2 + 2c patched). In
    each decoder layer the suppressed and patched rows of the conditions with heads there get their
    ``o_proj`` input slices zeroed; at each MoE router the patched rows' top-k weights and indices are
    replaced by the clean rows' (what setting ``hook_topk_indices`` / ``hook_topk_weights`` does
    locally). Only target ranks, last-position router scores and the clean selection come back.
    """
    from nnsight_moe.remote import MoEView

    hf = nnsight_moe.hf_model(model)
    layout = nnsight_moe.layout(hf)
    attention = _attention_modules(hf)
    n_heads = next(iter(attention.values()))[1]
    top_heads, correlated, conditions = _conditions(correlation, sorted(attention), n_heads, k_heads, seeds, seed)
    names = {id(module): name for name, module in hf.named_modules()}
    suppress: dict[int, list] = {}
    for c, (_, _, heads) in enumerate(conditions):
        by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            layer, head = int(layer), int(head)
            if not 0 <= layer < layout.n_layers:
                raise IndexError(f"layer {layer} is out of range: valid layers are 0..{layout.n_layers - 1}")
            _attention_layer(attention, layer, layout.n_layers)
            if not 0 <= head < n_heads:
                raise IndexError(f"head {head} is out of range for layer {layer}: valid heads are 0..{n_heads - 1}")
            by_layer.setdefault(layer, []).append(head)
        for layer, hs in by_layer.items():
            suppress.setdefault(layer, []).append([c, hs])
    view = MoEView(model)  # the patch goes through the view: every family's router output format
    spec = view.spec
    inside = [index for index, info in spec["layers"].items() if info["experts_input"]]
    if inside:  # Gemma-4: the view reads the decoder layer's input, then its router, after the heads
        raise ValueError(
            f"remote causal() does not support {spec['family']}: its MoE layers {inside} have no block module "
            "(router and experts sit on the decoder layer), so the view reads the decoder layer's input before "
            "the attention heads that a condition suppresses in the same layer, and nnsight serves a trace's "
            "values in execution order; run causal() without remote= on this family")
    settings = {
        "n_layers": layout.n_layers,
        "o_proj": {layer: names[id(o_proj)] for layer, (o_proj, _) in attention.items()},
        "d_head": {layer: _in_features(o_proj) // heads for layer, (o_proj, heads) in attention.items()},
        "suppress": suppress,
        "groups": 1 + 2 * len(conditions),
        "moe": {index: {"router": info["router"], "n_experts": info["n_experts"], "top_k": info["top_k"],
                        "routing": info["routing"], "router_logits": info["router_logits"], "experts": info["experts"],
                        "routing_in_block": info["routing_in_block"], "gate_on_input": info["gate_on_input"]}
                for index, info in spec["layers"].items()},
    }
    groups = settings["groups"]
    batches = [{**batch, "input_ids": batch["input_ids"].repeat(groups, 1),  # the row groups share one trace
                "attention_mask": batch["attention_mask"].repeat(groups, 1)}
               for batch in runner.make_batches(prompts, tokenizer=tokenizer, batch_size=batch_size,
                                                per_prompt={"target": torch.as_tensor(targets)})]
    results = runner.run_batches(model, batches, functools.partial(_causal_in_trace, settings, view),
                                 key=settings,  # resume fingerprint: a results file for other heads is refused
                                 remote=remote, results_path=results_path, progress=progress)

    ranks = checked_ranks(torch.cat([result["rank"] for result in results], dim=1), 0)  # [groups, P]

    rows = []
    for c, (condition, s, _) in enumerate(conditions):
        d_corr, d_sel = [], []
        for result in results:
            scores, chosen = result["scores"], result["chosen"]
            for layer, expert in correlated:
                d_corr.append((scores[layer][1 + c][:, expert] - scores[layer][0][:, expert]).float())
            for layer in layout.moe_layers:
                before = scores[layer][0].gather(-1, chosen[layer])
                after = scores[layer][1 + c].gather(-1, chosen[layer])
                d_sel.append((after - before).float().reshape(-1))
        rows.append(_causal_row(condition, s, mrr_of_ranks(ranks[0]), mrr_of_ranks(ranks[1 + 2 * c]),
                                 mrr_of_ranks(ranks[2 + 2 * c]), d_corr, d_sel))
    return CausalResult(pd.DataFrame(rows), [tuple(h) for h in top_heads])


def _clean_routing(groups: int, routing: dict) -> dict:
    """The patched row groups (2, 4, ...) of ``[groups * b, p, ...]`` routing (indices, weights and, for
    Inkling, the shared gammas) given the clean group's (0)."""
    patched = {}
    for name, value in routing.items():
        v = value.reshape(groups, -1, *value.shape[1:]).clone()
        v[2::2] = v[0]
        patched[name] = v.reshape(value.shape)
    return patched


def _causal_in_trace(settings: dict, view: Any, model: Any, batch: dict) -> dict:
    """One batch of the stacked causal runs; runs inside ``model.trace`` (on the server for remote runs).

    Reads only envoys, torch and the remote view's trace-side functions (all shipped by source); the
    routers are patched through ``view.layer(edit_routing=...)``, which writes the family's own router
    output (Llama 4's dense scores, JetMoE's dispatch plan, Gemma-4's probabilities, ...).
    Returns ``rank`` [groups, b], ``scores`` {MoE layer: [1 + C, b, E]} (router scores at the last
    position of the clean and suppressed row groups) and ``chosen`` {MoE layer: [b, k]} (clean top-k).
    """
    last, target = batch["last"], batch["target"]  # [b]: the ids and mask are [groups * b, p]
    b, groups = last.shape[0], settings["groups"]
    p = batch["input_ids"].shape[1]
    rows = torch.arange(b)
    kept = [0] + list(range(1, groups, 2))  # clean and suppressed row groups
    scores, chosen = {}, {}
    for layer in range(settings["n_layers"]):
        if layer in settings["suppress"]:
            o_proj = _remote_envoy(model, settings["o_proj"][layer])
            z = o_proj.input.clone()
            flat = z.view(*z.shape[:2], -1)  # [rows, p, H * d_head] (DeepSeek-V4's grouped input [rows, p, G, d] too)
            d = settings["d_head"][layer]
            for c, heads in settings["suppress"][layer]:
                for h in heads:
                    flat[(1 + 2 * c) * b : (3 + 2 * c) * b, :, h * d : (h + 1) * d] = 0
            o_proj.input = z
        if layer in settings["moe"]:
            q = view.layer(layer, want=("router_scores", "topk_indices"),
                           edit_routing=functools.partial(_clean_routing, groups))
            scores[layer] = q["router_scores"].reshape(groups, b, p, -1)[kept][:, rows, last]
            chosen[layer] = q["topk_indices"].reshape(groups, b, p, -1)[0][rows, last]
    out = model.output.logits
    logits = out.reshape(groups, b, p, out.shape[-1])[:, rows, last].float()
    picked = logits.gather(-1, target.to(logits.device)[None, :, None].expand(groups, b, 1))
    ranks = torch.where(torch.isfinite(logits).all(-1), (logits > picked).sum(-1) + 1, 0)  # 0: non-finite (checked_ranks)
    return {"rank": ranks, "scores": scores, "chosen": chosen}


# ----------------------------------------------------------------------------- main job
def section(job: Any):
    """The ``head_expert`` section of the main job: correlation on the job's sample, then causal checks."""
    from nnsight_moe.report import Section

    title = "Head–expert correlation"
    if not job.is_moe:
        return None
    sample = job.sample()
    data = (sample.prompts, sample.targets)
    model = job.model  # an nnsight LanguageModel when job.remote is set
    def correlation():
        return correlate(model, data, tokenizer=job.tokenizer, top_k=3, permutations=200 if job.quick else 1000,
                         batch_size=job.batch_size, remote=job.remote)

    corr = (job.stage("head_expert-correlation", correlation, HeadExpertResult.to_dict, HeadExpertResult.from_dict)
            if hasattr(job, "stage") else correlation())
    path = getattr(job, "results_path", lambda stage: None)  # remote batches kept for a resume
    effects = causal(model, data, tokenizer=job.tokenizer, correlation=corr, k_heads=3,
                     seeds=2 if job.quick else 5, batch_size=job.batch_size, remote=job.remote,
                     results_path=path("head_expert-causal"), progress=False)
    summary = effects.summary_table()
    where = "" if job.remote is None else f" Attribution, suppression and patching ran with remote={job.remote!r}."
    text = (f"summary r = {corr.summary_r:.3f} (permutation p = {corr.summary_p:.3g}) over {corr.n_prompts} prompts; "
            f"{corr.definition}. Suppressed heads: {corr.top_heads}.{where}")
    return Section(
        "head_expert", title, text,
        data={"correlation": corr.to_json(), "causal": {**effects.to_json(), "summary": effects.summary_json()}},
        tables={"Strongest head–expert pairs (BH q < 0.05)": corr.strongest(),
                "Causal effects: mean ± std (seeds where defined / seeds)": summary},
        figures={"heatmap": ("Head × expert Pearson r", corr.plot()),
                 "causal": ("Suppressing top heads vs random heads", effects.plot())},
    )
