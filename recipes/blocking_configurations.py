"""Shared vs routed experts (the study's Table 2; our reconstruction): :func:`configurations`.

Each configuration keeps the top-n routed gate weights of every token (:func:`nnsight_moe.restrict_experts`,
optionally renormalised) with the shared expert on or off, globally, and scores MRR / HIT@k per relation.
"""

from __future__ import annotations

from typing import Any

import torch

import nnsight_moe
from nnsight_moe.attach import hf_model
from nnsight_moe.interventions import restrict_experts
from nnsight_moe.layout import MoELayout
from nnsight_moe.progress import bar as progress_bar
from nnsight_moe.recipes import runner
from nnsight_moe.recipes.blocking_conditions import _ranks
from nnsight_moe.recipes.blocking_data import ALL, _chunks, _dataset, _metrics
from nnsight_moe.recipes.blocking_results import ConfigurationResult
from nnsight_moe.recipes.metrics import checked_ranks
from nnsight_moe.recipes.prompts import model_tokenizer


def _configurations(layout: MoELayout, renorm: bool = False) -> list[tuple[str, int | None, bool, bool]]:
    """(name, routed experts kept per token or None for all k, shared expert on, kept weights renormalised)
    per configuration; with ``renorm`` every top-n row (0 < n < k) also comes renormalised."""
    k = layout.top_k
    tops = [t for t in (1, 2) if t < k]
    if not layout.has_shared:
        configs = [(f"routed top-{t} only", t, True) for t in tops] + [(f"routed top-{k} (default)", None, True)]
    else:
        configs = ([(f"routed top-{t} only", t, False) for t in tops]
                   + [("shared only", 0, True)]
                   + [(f"shared + top-{t}", t, True) for t in tops]
                   + [(f"shared + top-{k} (default)", None, True), (f"shared ablation (routed top-{k} only)", None, False)])
    out = [(name, top, shared, False) for name, top, shared in configs]
    if renorm:
        out += [(f"{name} (renormalised)", top, shared, True) for name, top, shared in configs if top]
    return out


@torch.no_grad()
def configurations(
    model: Any,
    dataset: Any,
    *,
    tokenizer: Any = None,
    max_per_relation: int | None = None,
    k: int = 10,
    batch_size: int | str = "auto",
    padding_side: str = "left",
    remote: Any = None,
    results_path: Any = None,
    progress: bool = True,
    renorm: bool = False,
) -> ConfigurationResult:
    """Shared vs routed experts (Table-2 layout; our reconstruction): MRR / HIT@k per relation per configuration.

    With shared experts: routed top-1 only (shared off), routed top-2 only, shared only, shared + top-1,
    shared + top-2, shared + default k (the unmodified model) and shared ablation (routing unchanged).
    Without: routed top-1 only, routed top-2 only and the default. "top-n" keeps the n largest routed
    gate weights of each token in every MoE layer as the model computed them (no renormalisation;
    :func:`nnsight_moe.restrict_experts`); top-n rows with n >= k are the default and are left out.
    ``renorm=True`` adds every top-n row (0 < n < k) again, named ``"... (renormalised)"``, with the kept
    weights rescaled to the token's original sum of all k weights (``restrict_experts(renorm=True)``):
    the study does not say which it used, so both are given.

    Args:
        model: HF model, TransformerBridge or nnsight model of a supported MoE family.
        dataset: Relations (with ``tokenizer``), EncodedFacts or ``(prompts, targets[, relation_names])``.
        max_per_relation, k, batch_size, padding_side, remote, results_path, progress: as in :func:`sweep`
            (remotely, top-n and the shared-expert ablation are edits of the router and shared expert
            outputs on the unmodified model: ``read_layer(keep_top=, shared=)``).

    Each configuration is global to the model, so it runs as its own pass (batched over prompts).
    """
    tokenizer = model_tokenizer(model, tokenizer)  # None: the one the model carries (LanguageModel, bridge)
    hf = hf_model(model)
    layout = nnsight_moe.layout(hf)
    data = _dataset(dataset, tokenizer, max_per_relation)
    groups = data.groups()
    chunks = _chunks(hf, data, list(range(len(data.prompts))), tokenizer, batch_size, padding_side)
    rows, original = [], {}
    configs = _configurations(layout, renorm)
    if remote is not None:
        from nnsight_moe.recipes.blocking_remote import ranks_remote

        traces = []  # per configuration and chunk: the same view options in every MoE layer ({}: unmodified)
        for _, top, shared, renormed in configs:
            options = {**({} if top is None else {"keep_top": top}), **({} if shared else {"shared": False}),
                       **({"keep_top_renorm": True} if renormed else {})}
            traces += [{**chunk, "target": data.targets[chunk["rows"]],
                        "edits": {i: options for i in layout.moe_layers} if options else {}} for chunk in chunks]
        found = [checked_ranks(r, 0) for r in
                 ranks_remote(model, traces, remote=remote, results_path=results_path, progress=progress)]
        remote_ranks = torch.cat(found).view(len(configs), -1)  # [configs, P]: chunks cover the prompts in order
    for c, (name, top, shared, renormed) in enumerate(progress_bar(configs, "shared/routed configurations",
                                                         disable=not progress or remote is not None)):
        if remote is not None:
            ranks = remote_ranks[c]
        else:
            ranks = torch.zeros(len(data.prompts), dtype=torch.long)
            with restrict_experts(hf, top, shared=shared, renorm=renormed):
                found = runner.run_batches(hf, [{**chunk, "target": data.targets[chunk["rows"]]} for chunk in chunks],
                                           _ranks, progress=False)
            for chunk, chunk_ranks in zip(chunks, found):
                ranks[chunk["rows"]] = chunk_ranks
        parts = dict(groups, **({ALL: list(range(len(ranks)))} if len(groups) > 1 else {}))
        for rel, idx in parts.items():
            metrics = _metrics(ranks[idx], k)
            rows.append({"relation": rel, "configuration": name, "keep_top": top, "shared": shared,
                         "renorm": renormed, "n_prompts": len(idx), **metrics})
            if top is None and shared:
                original[rel] = {"n_prompts": len(idx), **metrics}
    meta = {"configurations": [c[0] for c in configs], "k": k, "top_k": layout.top_k,
            "has_shared": layout.has_shared, "max_per_relation": max_per_relation, "renorm": bool(renorm)}
    return ConfigurationResult(meta, original, rows)
