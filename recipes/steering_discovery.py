"""Contrastive discovery (after SteerMoE): which routed experts a behaviour prompt set uses more than a control.

Per routed (layer, expert), on the units of each set (last tokens or every non-pad token): the risk difference
of selection (two-sided Fisher exact test), the difference of mean gate weight and optionally of mean gated-LPI
attribution (two-sided permutation tests); BH q-values over all experts, per score (:func:`discover`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

import nnsight_moe
from nnsight_moe.recipes.prompts import model_tokenizer
from nnsight_moe.recipes.steering_data import _forward_reading, _pair_offsets, _pairs, _prompts_targets, _run, _units
from nnsight_moe.recipes.steering_results import BY, Discovery


def _routing_local(layers: list, positions: str, model: Any, batch: dict) -> dict:
    names = ("hook_topk_indices", "hook_topk_weights")
    seen = _forward_reading(model, batch, [(i, name) for i in layers for name in names])
    rows, pos = _units(batch, positions)
    return {i: (seen[(i, "hook_topk_indices")][rows, pos].cpu(), seen[(i, "hook_topk_weights")][rows, pos].float().cpu())
            for i in layers}


def _routing_traced(view: Any, positions: str, model: Any, batch: dict) -> dict:
    rows, pos = _units(batch, positions)
    out = {}
    for i in view.moe_layers:
        q = view.layer(i, want=("topk_indices", "topk_weights"))
        out[i] = (q["topk_indices"][rows, pos], q["topk_weights"][rows, pos].float())
    return out


def _unit_matrices(model, prompts, layout, *, tokenizer, positions, batch_size, remote, progress):
    """(selected [U, pairs] bool, gate [U, pairs] float64) over the units of ``prompts`` (in prompt order)."""
    layers = layout.moe_layers
    results = _run(model, prompts, functools.partial(_routing_local, layers, positions),
                   functools.partial(_routing_traced, nnsight_moe.remote.MoEView(model) if remote is not None else None,
                                     positions),
                   tokenizer=tokenizer, batch_size=batch_size, remote=remote, progress=progress, desc="routing")
    offsets = _pair_offsets(layout)
    n_pairs = sum(layout.layer(i).n_experts for i in layers)
    selected, gates = [], []
    for batch_result in results:
        first = batch_result[layers[0]][0]
        u = first.shape[0]
        sel = torch.zeros(u, n_pairs, dtype=torch.bool)
        gate = torch.zeros(u, n_pairs, dtype=torch.float64)
        for i in layers:
            idx, w = batch_result[i]
            cols = idx.long() + offsets[i]
            sel.scatter_(1, cols, True)
            gate.scatter_add_(1, cols, w.double())
        selected.append(sel)
        gates.append(gate)
    return torch.cat(selected), torch.cat(gates)


def bh_qvalues(p: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg q-values of p-values ``p`` (NaN stays NaN): q_(i) = min_{j>=i} p_(j) m / j."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return q
    order = np.argsort(p[ok])
    ranked = p[ok][order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    out = np.empty(m)
    out[order] = adjusted
    q[ok] = out
    return q


def _fisher(a_hit: np.ndarray, a_n: int, b_hit: np.ndarray, b_n: int) -> np.ndarray:
    """Two-sided Fisher exact p-values, one per column of counts."""
    from scipy.stats import fisher_exact

    return np.array([fisher_exact([[int(x), a_n - int(x)], [int(y), b_n - int(y)]])[1] for x, y in zip(a_hit, b_hit)])


def permutation_p(a: Tensor, b: Tensor, n: int, seed: int) -> np.ndarray:
    """Two-sided permutation p-values of mean(a) - mean(b) per column (``a`` [A, C], ``b`` [B, C]):
    (1 + #{|permuted difference| >= |observed|}) / (n + 1); permutations ``torch.randperm`` from ``seed``."""
    both = torch.cat([a, b]).double()
    n_a = a.shape[0]
    observed = (both[:n_a].mean(0) - both[n_a:].mean(0)).abs()
    g = torch.Generator().manual_seed(seed)
    hits = torch.zeros(both.shape[1], dtype=torch.float64)
    for _ in range(n):
        perm = torch.randperm(both.shape[0], generator=g)
        shuffled = both[perm]
        diff = (shuffled[:n_a].mean(0) - shuffled[n_a:].mean(0)).abs()
        hits += (diff >= observed - 1e-12).double()
    return ((1 + hits) / (n + 1)).numpy()


def discover(model: Any, behaviour: Any, control: Any, *, tokenizer: Any = None, positions: str = "last",
             attribution: bool = False, by: str = "risk_difference", permutations: int = 1000, seed: int = 0,
             batch_size: int = 16, remote: Any = None, progress: bool = False) -> Discovery:
    """Score every routed expert by how much more the ``behaviour`` set uses it than the ``control`` set.

    Args:
        model: HF model, TransformerBridge or nnsight model (nnsight for ``remote``).
        behaviour, control: prompt sets: lists of prompts (strings or token-id lists), ``(prompts, targets)``,
            Relations (with ``tokenizer``) or an EncodedFacts; targets are needed for ``attribution``.
        positions: ``"last"`` (units = prompts, at their last token) or ``"all"`` (units = non-pad tokens;
            the tests then treat tokens as independent, which they are not: read the p-values as a screen).
        attribution: also score the difference of mean gated-LPI attribution to the targets (last position).
        by: default ranking score (:data:`BY`).
        permutations: permutations for the gate (and attribution) tests; ``seed`` seeds them.
        remote: run inside ``model.trace(..., remote=remote)`` (``True``, ``"local"``, a host URL).

    Returns a :class:`Discovery`; ``to_frame()`` has per expert: ``freq_behaviour``, ``freq_control``,
    ``risk_difference``, ``p_frequency`` (Fisher), ``q_frequency`` (BH); ``gate_behaviour``, ``gate_control``,
    ``gate_difference``, ``p_gate``, ``q_gate`` (permutation); with attribution the same for ``attribution``.
    """
    if positions not in ("last", "all"):
        raise ValueError(f"positions must be 'last' or 'all', got {positions!r}")
    if by not in BY:
        raise ValueError(f"by must be one of {BY}, got {by!r}")
    if by == "attribution_difference" and not attribution:
        raise ValueError("by='attribution_difference' needs attribution=True")
    if attribution and positions != "last":
        raise ValueError("attribution is scored at the last position: use positions='last'")
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise ValueError(f"permutations must be a positive integer, got {permutations!r}")
    tokenizer = model_tokenizer(model, tokenizer)
    layout = nnsight_moe.layout(model)
    sets = [_prompts_targets(s, tokenizer, attribution) for s in (behaviour, control)]
    options = {"tokenizer": tokenizer, "positions": positions, "batch_size": batch_size, "remote": remote,
               "progress": progress}
    (sel_a, gate_a), (sel_b, gate_b) = [_unit_matrices(model, p, layout, **options) for p, _ in sets]
    n_a, n_b = sel_a.shape[0], sel_b.shape[0]
    hit_a, hit_b = sel_a.sum(0).numpy(), sel_b.sum(0).numpy()
    freq_a, freq_b = hit_a / n_a, hit_b / n_b
    p_freq = _fisher(hit_a, n_a, hit_b, n_b)
    mean_a, mean_b = gate_a.mean(0).numpy(), gate_b.mean(0).numpy()
    p_gate = permutation_p(gate_a, gate_b, permutations, seed)
    columns = {"freq_behaviour": freq_a, "freq_control": freq_b, "risk_difference": freq_a - freq_b,
               "p_frequency": p_freq, "q_frequency": bh_qvalues(p_freq),
               "gate_behaviour": mean_a, "gate_control": mean_b, "gate_difference": mean_a - mean_b,
               "p_gate": p_gate, "q_gate": bh_qvalues(p_gate)}
    if attribution:
        att_a, att_b = [_attribution_matrix(model, p, t, layout, tokenizer, batch_size, remote, progress) for p, t in sets]
        ma, mb = att_a.mean(0).numpy(), att_b.mean(0).numpy()
        p_att = permutation_p(att_a, att_b, permutations, seed + 1)
        columns.update({"attribution_behaviour": ma, "attribution_control": mb, "attribution_difference": ma - mb,
                        "p_attribution": p_att, "q_attribution": bh_qvalues(p_att)})
    rows = [{"layer": layer, "expert": expert, **{name: float(values[j]) for name, values in columns.items()}}
            for j, (layer, expert) in enumerate(_pairs(layout))]
    meta = {"by": by, "positions": positions, "attribution": bool(attribution), "n_behaviour": len(sets[0][0]),
            "n_control": len(sets[1][0]), "units_behaviour": int(n_a), "units_control": int(n_b),
            "permutations": permutations, "seed": seed, "remote": remote if isinstance(remote, (str, type(None))) else bool(remote)}
    return Discovery(meta, rows)


def _attribution_matrix(model, prompts, targets, layout, tokenizer, batch_size, remote, progress) -> Tensor:
    """[P, pairs] gated-LPI attribution of each routed expert to the target (0 where not selected)."""
    from nnsight_moe.recipes.attribution import attribute

    result = attribute(model, prompts, targets.tolist(), tokenizer=tokenizer, levels=("expert",),
                       batch_size=batch_size, remote=remote, progress=progress)
    frame = result.to_frame()
    frame = frame[frame["level"] == "expert"]
    offsets = _pair_offsets(layout)
    out = torch.zeros(len(prompts), sum(layout.layer(i).n_experts for i in layout.moe_layers), dtype=torch.float64)
    for row in frame.itertuples():
        out[int(row.prompt), offsets[int(row.layer)] + int(row.expert)] += float(row.score)
    return out
