"""Behaviour-linked experts: contrastive discovery, steering, and evaluation against random experts.

    from nnsight_moe.recipes import steering as recipe
    found = recipe.discover(model, behaviour, control, tokenizer=tok)        # ranked (layer, expert) table
    found.to_frame().head()
    experts = found.top(2)                                                   # most behaviour-linked
    result = recipe.evaluate(model, heldout, experts, edit="off", control=heldout_control, tokenizer=tok)
    print(result.text())                 # steered vs layer-matched random experts, bootstrap CIs, fluency guard

**Discovery** (:func:`discover`, after SteerMoE): every routed (layer, expert) is scored on two prompt
sets by the difference (behaviour - control) of

* its activation frequency (the risk difference): share of units where it is selected; a unit is a
  prompt's last position (``positions="last"``) or a non-pad token (``"all"``); two-sided Fisher exact test;
* its mean gate weight (0 where not selected); two-sided permutation test of the difference of means;
* optionally its attribution to the sets' targets (gated LPI, :mod:`nnsight_moe.recipes.attribution`,
  0 where not selected); permutation test.

P-values are BH-adjusted (q-values) over all experts, per score.

**Evaluation** (:func:`evaluate`): on HELD-OUT prompts, the target's log-probability, MRR and HIT@k with
the chosen experts steered (forced ``"off"`` or ``"on"``, or their gate scaled) against no steering and
against the same number of random experts per layer (layer-matched, ``seeds`` draws), with percentile
bootstrap CIs over prompts. The fluency guard is the same for a control set: its targets' log-prob and
the mean next-token log-prob of its prompts' own text.

Everything runs through :mod:`nnsight_moe.recipes.runner` (batched, padding-aware); ``remote=`` runs it
inside ``model.trace(..., remote=remote)`` on the unmodified model (:func:`nnsight_moe.steering.apply_in_trace`).
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import nnsight_moe
from nnsight_moe import steering
from nnsight_moe.attach import attached, handle_of, hf_model
from nnsight_moe.hooks import TemporaryHooks
from nnsight_moe.recipes import runner
from nnsight_moe.recipes.prompts import model_tokenizer

__all__ = ["BY", "EDITS", "GOALS", "Discovery", "RelationSteering", "SteeringResult", "bh_qvalues", "discover",
           "evaluate", "evaluate_direction", "hook_means", "mean_difference", "paired_targets", "permutation_p", "random_matched",
           "relation_steering", "run_steer", "section"]

#: Discovery scores a ranking can use.
BY = ("risk_difference", "gate_difference", "attribution_difference")
#: Expert edits :func:`evaluate` applies.
EDITS = ("off", "on", "scale")

Pair = tuple[int, int]
_Q_COLUMN = {"risk_difference": "q_frequency", "gate_difference": "q_gate", "attribution_difference": "q_attribution"}


# ============================================================================================ inputs
def _prompts_targets(dataset: Any, tokenizer: Any, need_targets: bool) -> tuple[list, Tensor | None]:
    """(prompts, targets or None) from prompts, (prompts, targets), Relations or EncodedFacts."""
    from nnsight_moe.data import EncodedFacts, Relation, encode_facts

    if isinstance(dataset, Relation):
        dataset = [dataset]
    if isinstance(dataset, EncodedFacts):
        return list(dataset.prompts), torch.tensor(dataset.targets, dtype=torch.long)
    if isinstance(dataset, (list, tuple)) and dataset and all(isinstance(r, Relation) for r in dataset):
        if tokenizer is None:
            raise ValueError("Relations need tokenizer= to turn facts into prompts and target ids")
        return _prompts_targets(encode_facts(tokenizer, [f for r in dataset for f in r.facts()]), tokenizer, need_targets)
    if (isinstance(dataset, tuple) and len(dataset) == 2 and not isinstance(dataset[0], str)
            and len(dataset[0]) == len(dataset[1]) and not isinstance(dataset[1], str)):
        targets = torch.as_tensor(dataset[1]).reshape(-1)
        if targets.is_floating_point() or targets.dtype == torch.bool:
            raise TypeError(f"targets must be integer token ids, got {targets.dtype}")
        return list(dataset[0]), targets.long()
    if isinstance(dataset, (list, tuple)):
        if not dataset:
            raise ValueError("a prompt set is empty: give at least one prompt")
        if need_targets:
            raise ValueError("this needs target ids: give (prompts, targets), Relations or an EncodedFacts")
        return list(dataset), None
    raise TypeError("a prompt set must be a list of prompts, a tuple (prompts, targets), Relations or an "
                    f"EncodedFacts; got {type(dataset).__name__}")


def _run(model: Any, prompts: list, local_fn: Any, traced_fn: Any, *, tokenizer: Any, batch_size: int,
         remote: Any, per_prompt: dict | None = None, progress: bool = False, desc: str = "steering") -> list:
    """The one batching call: ``local_fn(hf, batch)`` on the attached HF model, or ``traced_fn(model, batch)``
    inside ``model.trace(..., remote=remote)`` (through :func:`nnsight_moe.recipes.runner.run`)."""
    if remote is None:
        hf = hf_model(model)
        with attached(hf):
            return runner.run(hf, prompts, local_fn, tokenizer=tokenizer, batch_size=batch_size,
                              per_prompt=per_prompt, progress=progress, desc=desc)
    return runner.run(model, prompts, traced_fn, tokenizer=tokenizer, batch_size=batch_size, per_prompt=per_prompt,
                      remote=remote, progress=progress, desc=desc)


def _units(batch: dict, positions: str) -> tuple[Tensor, Tensor]:
    """(rows, positions) of a batch's units: each prompt's last token, or every non-pad token."""
    if positions == "last":
        return torch.arange(batch["last"].shape[0]), batch["last"]
    return batch["attention_mask"].bool().nonzero(as_tuple=True)


# ============================================================================ routing per unit
def _routing_local(layers: list, positions: str, model: Any, batch: dict) -> dict:
    handle = handle_of(model)
    seen: dict = {}
    with TemporaryHooks() as added:
        for i in layers:
            for name in ("hook_topk_indices", "hook_topk_weights"):
                added.add(handle.block(i)._modules[name], lambda t, hook, key=(i, name): seen.__setitem__(key, t))
        model(**runner.inputs(batch))
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


def _pair_offsets(layout) -> dict[int, int]:
    offsets, start = {}, 0
    for i in layout.moe_layers:
        offsets[i] = start
        start += layout.layer(i).n_experts
    return offsets


def _pairs(layout) -> list[Pair]:
    return [(i, e) for i in layout.moe_layers for e in range(layout.layer(i).n_experts)]


# ============================================================================ statistics
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


# ============================================================================ discovery
class _JSONFile:
    """``save`` / ``load`` of a result through its ``to_json`` / ``from_json`` (strict JSON: no NaN)."""

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path``; returns the path."""
        from nnsight_moe.report import json_value

        path = Path(path)
        path.write_text(json.dumps(json_value(self.to_json()), indent=1, allow_nan=False))
        return path

    @classmethod
    def load(cls, path: str | Path):
        """Read a result written by :meth:`save`."""
        return cls.from_json(json.loads(Path(path).read_text()))


@dataclass
class Discovery(_JSONFile):
    """Per-expert contrast of a behaviour and a control prompt set (:func:`discover`)."""

    meta: dict
    rows: list[dict]

    def to_frame(self, by: str | None = None):
        """One row per (layer, expert), sorted by ``by`` (default the discovery's), largest first."""
        import pandas as pd

        by = by or self.meta["by"]
        if by not in BY or (by == "attribution_difference" and not self.meta["attribution"]):
            raise ValueError(f"by must be one of {BY} (attribution_difference needs attribution=True), got {by!r}")
        frame = pd.DataFrame(self.rows)
        return frame.sort_values([by, "layer", "expert"], ascending=[False, True, True]).reset_index(drop=True)

    def top(self, n: int, by: str | None = None, *, q: float | None = None, sign: int = 1) -> list[Pair]:
        """The ``n`` experts with the largest score ``by`` (``sign=-1``: most control-linked), optionally only
        those with q-value <= ``q``, among experts whose score has that sign (never a zero score)."""
        by = by or self.meta["by"]
        frame = self.to_frame(by)
        if sign not in (1, -1):
            raise ValueError(f"sign must be 1 or -1, got {sign!r}")
        frame = frame[frame[by] * sign > 0]
        if sign == -1:
            frame = frame.iloc[::-1]
        if q is not None:
            frame = frame[frame[_Q_COLUMN[by]] <= q]
        return [(int(r.layer), int(r.expert)) for r in frame.head(n).itertuples()]

    def to_json(self) -> dict:
        return {"meta": self.meta, "rows": self.rows}

    @classmethod
    def from_json(cls, data: dict) -> "Discovery":
        return cls(data["meta"], data["rows"])


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


# ============================================================================ hook means (directions)
def _hook_sums_local(layers: list, hook: str, positions: str, model: Any, batch: dict) -> dict:
    handle = handle_of(model)
    seen: dict = {}
    with TemporaryHooks() as added:
        for i in layers:
            added.add(handle.block(i)._modules[hook], lambda t, hook, i=i: seen.__setitem__(i, t))
        model(**runner.inputs(batch))
    rows, pos = _units(batch, positions)
    return {i: _sum_units(seen[i], rows, pos) for i in layers}


def _hook_sums_traced(view: Any, hook: str, positions: str, model: Any, batch: dict) -> dict:
    rows, pos = _units(batch, positions)
    name = hook[len("hook_"):]
    return {i: _sum_units(view.layer(i, want=(name,))[name], rows, pos) for i in view.moe_layers}


def _sum_units(value: Tensor, rows: Tensor, pos: Tensor) -> tuple:
    picked = value[rows, pos].float()
    picked = picked.reshape(-1, picked.shape[-1])  # expert_out: every selected slot is a unit
    return picked.sum(0), picked.shape[0]


def hook_means(model: Any, prompts: Any, *, hook: str = "hook_moe_out", tokenizer: Any = None,
               positions: str = "last", batch_size: int = 16, remote: Any = None) -> dict[int, Tensor]:
    """Mean of ``hook`` (``hook_moe_out``, ``hook_expert_out``, ``hook_shared_out``) per MoE layer over the
    units of ``prompts`` (their last tokens, or every non-pad token with ``positions="all"``), float32."""
    if hook not in steering.DIRECTION_HOOKS:
        raise ValueError(f"hook must be one of {steering.DIRECTION_HOOKS}, got {hook!r}")
    if positions not in ("last", "all"):
        raise ValueError(f"positions must be 'last' or 'all', got {positions!r}")
    tokenizer = model_tokenizer(model, tokenizer)
    layout = nnsight_moe.layout(model)
    if hook == "hook_shared_out" and not layout.has_shared:
        raise ValueError("hook_shared_out: this model has no shared expert")
    layers = [i for i in layout.moe_layers if hook != "hook_shared_out" or layout.layer(i).has_shared]
    prompts, _ = _prompts_targets(prompts, tokenizer, False)
    view = nnsight_moe.remote.MoEView(model) if remote is not None else None
    results = _run(model, prompts, functools.partial(_hook_sums_local, layers, hook, positions),
                   functools.partial(_hook_sums_traced, view, hook, positions), tokenizer=tokenizer,
                   batch_size=batch_size, remote=remote, desc="hook means")
    return {i: (sum(r[i][0].double() for r in results) / sum(int(r[i][1]) for r in results)).float() for i in layers}


def mean_difference(model: Any, behaviour: Any, control: Any, *, hook: str = "hook_moe_out", tokenizer: Any = None,
                    positions: str = "last", batch_size: int = 16, remote: Any = None) -> dict[int, Tensor]:
    """Per MoE layer, the mean of ``hook`` over ``behaviour`` minus its mean over ``control`` (:func:`hook_means`).

    Returns ``{layer: vector [d_model]}`` (float32), ready for ``nnsight_moe.steering.plan(directions=...)``:
    ``mode="remove"`` projects the behaviour-vs-control direction out, ``mode="add"`` with ``alpha=1`` moves
    the control mean onto the behaviour mean (``alpha=-1`` the other way).
    """
    options = {"hook": hook, "tokenizer": tokenizer, "positions": positions, "batch_size": batch_size, "remote": remote}
    a, b = hook_means(model, behaviour, **options), hook_means(model, control, **options)
    return {layer: a[layer] - b[layer] for layer in a}


# ============================================================================ evaluation
def _scores(logits: Tensor, batch: dict) -> dict:
    """Per row: target log-prob and rank at the last position; summed next-token log-prob of the prompt's
    own text and the number of scored tokens (pairs of consecutive non-pad tokens)."""
    logp = logits.float().log_softmax(-1)
    rows = torch.arange(batch["last"].shape[0])
    last = logp[rows, batch["last"]]
    target = batch["target"]
    picked = last.gather(1, target[:, None])[:, 0]
    rank = (last > picked[:, None]).sum(-1) + 1
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    nxt = logp[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
    both = mask[:, :-1] & mask[:, 1:]
    return {"logprob": picked, "rank": rank, "text": (nxt * both).sum(-1), "tokens": both.sum(-1)}


def _stacked_local(plans: list, model: Any, batch: dict) -> dict:
    """Scores [C * b] of C plans stacked along the batch (condition-major) in one forward of the attached model."""
    plan = steering.stack(plans, len(batch["rows"]) // len(plans))
    with steering.steer(model, plan):
        logits = model(**runner.inputs(batch)).logits
    return {k: v.cpu() for k, v in _scores(logits, batch).items()}


def _stacked_traced(view: Any, plans: list, model: Any, batch: dict) -> dict:
    """As :func:`_stacked_local`, inside ``model.trace`` on the unmodified model (the plans ship as data)."""
    steering.apply_in_trace(view, model, steering.stack(plans, len(batch["rows"]) // len(plans)))
    return _scores(model.output.logits, batch)


def _condition_scores(model, prompts, targets, plans, *, tokenizer, batch_size, remote, max_rows) -> list[dict]:
    """Per plan, the per-prompt scores of ``prompts``: the plans stacked along the batch, at most ``max_rows``
    rows (plans x prompts) per forward (one forward per batch of prompts when ``max_rows >= len(plans)``)."""
    from nnsight_moe.recipes.prompts import vocab_size

    n = len(plans)
    per = max(1, min(batch_size, max_rows // n))
    device = runner.model_device(model) if remote is None else torch.device("cpu")
    batches = runner.make_batches(prompts, tokenizer=tokenizer, batch_size=per, per_prompt={"target": targets},
                                  device=device, vocab=vocab_size(model), model=model)
    stacked = [runner.repeat(batch, n) for batch in batches]
    if remote is None:
        hf = hf_model(model)
        with attached(hf):
            results = runner.run_batches(hf, stacked, functools.partial(_stacked_local, plans), progress=False)
    else:
        view = nnsight_moe.remote.MoEView(model)
        results = runner.run_batches(model, stacked, functools.partial(_stacked_traced, view, plans), remote=remote,
                                     progress=False)
    out = []
    for c in range(n):
        rows = [{k: v.view(n, -1)[c] for k, v in r.items()} for r in results]
        out.append({k: torch.cat([r[k] for r in rows]) for k in rows[0]})
    return out


def random_matched(model: Any, experts: Sequence[Pair], seed: int) -> list[Pair]:
    """As many random experts per layer as ``experts`` has there, none of ``experts`` (layer-matched)."""
    layout = nnsight_moe.layout(model)
    rng = random.Random(seed)
    chosen = set(experts)
    out = []
    per_layer: dict[int, int] = {}
    for layer, _ in experts:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    for layer, count in sorted(per_layer.items()):
        pool = [e for e in range(layout.layer(layer).n_experts) if (layer, e) not in chosen]
        if len(pool) < count:
            raise ValueError(f"layer {layer}: {count} steered experts leave only {len(pool)} others to draw from")
        out += [(layer, e) for e in sorted(rng.sample(pool, count))]
    return out


def _expert_plan(model, experts, edit, factor, margin, span) -> dict:
    grouped: dict[int, list[int]] = {}
    for layer, expert in experts:
        grouped.setdefault(layer, []).append(expert)
    if edit == "scale":
        return steering.plan(model, scale={l: {e: factor for e in ids} for l, ids in grouped.items()}, span=span)
    return steering.plan(model, **{edit: grouped}, margin=margin, span=span)


def _bootstrap(values: np.ndarray, n: int, rng: np.random.Generator) -> tuple[float, float]:
    """95% percentile bootstrap CI of the mean of ``values`` (resampling its entries)."""
    if len(values) == 0:
        return (float("nan"), float("nan"))
    idx = rng.integers(0, len(values), size=(n, len(values)))
    means = values[idx].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _metric_rows(scores: dict, k: int) -> dict[str, np.ndarray]:
    rank = scores["rank"].double().numpy()
    return {"logprob": scores["logprob"].double().numpy(), "rr": 1.0 / rank, "hit": (rank <= k).astype(np.float64)}


def evaluate(model: Any, heldout: Any, experts: Sequence[Pair], *, edit: str = "off", factor: float = 0.0,
             control: Any = None, seeds: int = 5, margin: float = 1.0, span: Any = None, k: int = 10,
             n_boot: int = 1000, seed: int = 0, tokenizer: Any = None, batch_size: int = 16, max_rows: int = 64,
             remote: Any = None) -> "SteeringResult":
    """Effect of steering ``experts`` on HELD-OUT prompts, against steering layer-matched random experts.

    Args:
        heldout: ``(prompts, targets)``, Relations or EncodedFacts not used to discover ``experts``.
        experts: ``[(layer, expert), ...]`` to steer (e.g. ``Discovery.top(n)``).
        edit: ``"off"`` / ``"on"`` (router-logit edits, :func:`nnsight_moe.steering.plan`) or ``"scale"``
            (gate weight times ``factor``).
        control: a second ``(prompts, targets)`` set for the fluency guard (None: none).
        seeds: random layer-matched expert sets (each steered the same way).
        span, margin: as :func:`nnsight_moe.steering.plan`. k: HIT@k.
        n_boot, seed: bootstrap resamples of prompts for the 95% CIs, and the seed of the random draws.
        batch_size, max_rows: the conditions (none, steered, each random draw) run stacked along the batch
            (per-row plans, :func:`nnsight_moe.steering.stack`), at most ``max_rows`` rows (conditions x
            prompts) and ``batch_size`` prompts per forward; raise ``max_rows`` on a GPU.
        remote: run in ``model.trace(..., remote=remote)`` on the unmodified model.

    Returns a :class:`SteeringResult`: per condition (``none``, ``steered``, ``random`` mean over seeds) the mean
    target log-prob, MRR and HIT@k, their change from ``none`` with CIs, ``steered - random`` with a CI, and
    the control set's target log-prob and text log-prob per token (fluency).
    """
    if edit not in EDITS:
        raise ValueError(f"edit must be one of {EDITS}, got {edit!r}")
    experts = [(int(l), int(e)) for l, e in experts]
    if not experts:
        raise ValueError("experts is empty: give at least one (layer, expert) pair to steer")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive integer, got {seeds!r}")
    _check_rows(max_rows)
    tokenizer = model_tokenizer(model, tokenizer)
    prompts, targets = _prompts_targets(heldout, tokenizer, True)
    sets = {"heldout": (prompts, targets)}
    if control is not None:
        sets["control"] = _prompts_targets(control, tokenizer, True)
    randoms = [random_matched(model, experts, seed + s) for s in range(seeds)]
    meta = {"what": f"{edit} {len(experts)} experts {[list(p) for p in experts]}", "experts": [list(p) for p in experts],
            "edit": edit, "factor": factor, "margin": margin, "span": _span_meta(span)}
    return _evaluate(model, sets, _expert_plan(model, experts, edit, factor, margin, span),
                     [_expert_plan(model, pairs, edit, factor, margin, span) for pairs in randoms],
                     [{"experts": [list(p) for p in pairs]} for pairs in randoms], meta, k=k, n_boot=n_boot, seed=seed,
                     tokenizer=tokenizer, batch_size=batch_size, remote=remote, max_rows=max_rows)


def _check_rows(max_rows: Any) -> None:
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")


def _span_meta(span: Any) -> Any:
    return span if span is None or isinstance(span, (str, list, tuple)) else "mask"


def evaluate_direction(model: Any, heldout: Any, directions: dict, *, hook: str = "hook_moe_out", mode: str = "remove",
                       alpha: float = 1.0, control: Any = None, seeds: int = 5, span: Any = None, k: int = 10,
                       n_boot: int = 1000, seed: int = 0, tokenizer: Any = None, batch_size: int = 16,
                       max_rows: int = 64, remote: Any = None) -> "SteeringResult":
    """As :func:`evaluate`, for a direction edit (:func:`nnsight_moe.steering.plan` ``directions=``), against
    random directions: per layer a Gaussian direction with the same norm (``seeds`` draws, seeded by ``seed``)."""
    tokenizer = model_tokenizer(model, tokenizer)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive integer, got {seeds!r}")
    _check_rows(max_rows)
    plan = steering.plan(model, directions=directions, hook=hook, mode=mode, alpha=alpha, span=span)
    sets = {"heldout": _prompts_targets(heldout, tokenizer, True)}
    if control is not None:
        sets["control"] = _prompts_targets(control, tokenizer, True)
    baselines = []
    for s in range(seeds):
        g = torch.Generator().manual_seed(seed + s)
        random_dirs = {}
        for layer, edit in sorted(plan["layers"].items()):
            d = edit["direction"]
            r = torch.randn(d.shape, generator=g)
            random_dirs[layer] = r * (d.norm() / r.norm())
        baselines.append(steering.plan(model, directions=random_dirs, hook=hook, mode=mode, alpha=alpha, span=span))
    meta = {"what": f"{mode} a direction at {hook} in layers {sorted(plan['layers'])}", "hook": hook, "mode": mode,
            "alpha": alpha, "span": _span_meta(span), "experts": []}
    return _evaluate(model, sets, plan, baselines, [{} for _ in baselines], meta, k=k, n_boot=n_boot, seed=seed,
                     tokenizer=tokenizer, batch_size=batch_size, remote=remote, max_rows=max_rows)


def _evaluate(model, sets, steered, baselines, baseline_info, meta, *, k, n_boot, seed, tokenizer, batch_size, remote,
              max_rows):
    """Score ``none``, ``steered`` and each baseline plan on every set; summaries with bootstrap CIs."""
    seeds = len(baselines)
    conditions = {"none": steering.plan(model), "steered": steered}
    for s, plan in enumerate(baselines):
        conditions[f"random{s}"] = plan
    options = {"tokenizer": tokenizer, "batch_size": batch_size, "remote": remote, "max_rows": max_rows}
    names = list(conditions)
    scored = {which: _condition_scores(model, p, t, [conditions[n] for n in names], **options)
              for which, (p, t) in sets.items()}
    raw = {name: {which: scored[which][c] for which in sets} for c, name in enumerate(names)}
    rng = np.random.default_rng(seed)
    base = {which: _metric_rows(raw["none"][which], k) for which in sets}

    def per_prompt(name, which):
        if name == "random":
            rows = [_metric_rows(raw[f"random{s}"][which], k) for s in range(seeds)]
            return {m: np.mean([r[m] for r in rows], axis=0) for m in rows[0]}
        return _metric_rows(raw[name][which], k)

    def fluency(name):
        names = [f"random{s}" for s in range(seeds)] if name == "random" else [name]
        per_token = [raw[n]["control"]["text"].double() / raw[n]["control"]["tokens"].clamp(min=1).double() for n in names]
        return torch.stack(per_token).mean(0).numpy()

    summary = []
    for name in ("none", "steered", "random"):
        row = {"condition": name}
        for which in sets:
            values = per_prompt(name, which)
            for m in ("logprob", "rr", "hit"):
                label = {"logprob": "logprob", "rr": "mrr", "hit": f"hit_at_{k}"}[m] + ("" if which == "heldout" else "_control")
                row[label] = float(values[m].mean())
                delta = values[m] - base[which][m]
                row[f"delta_{label}"] = float(delta.mean())
                row[f"delta_{label}_ci"] = list(_bootstrap(delta, n_boot, rng))
            if which == "control":
                text = fluency(name)
                row["text_logprob_control"] = float(text.mean())
                delta = text - fluency("none")
                row["delta_text_logprob_control"] = float(delta.mean())
                row["delta_text_logprob_control_ci"] = list(_bootstrap(delta, n_boot, rng))
        summary.append(row)
    steered_rows, rand = per_prompt("steered", "heldout"), per_prompt("random", "heldout")
    versus = {m: {"mean": float((steered_rows[m] - rand[m]).mean()),
                  "ci": list(_bootstrap(steered_rows[m] - rand[m], n_boot, rng))} for m in ("logprob", "rr", "hit")}
    per_seed = [{"seed": seed + s, **baseline_info[s],
                 "delta_logprob": float((_metric_rows(raw[f"random{s}"]["heldout"], k)["logprob"]
                                         - base["heldout"]["logprob"]).mean())} for s in range(seeds)]
    meta = {**meta, "k": k, "seeds": seeds, "n_boot": n_boot, "n_heldout": len(sets["heldout"][0]),
            "n_control": len(sets["control"][0]) if "control" in sets else 0}
    return SteeringResult(meta, summary, versus, per_seed)


@dataclass
class SteeringResult(_JSONFile):
    """What :func:`evaluate` measured: per-condition summary, steered - random, the random draws."""

    meta: dict
    summary: list[dict]
    versus_random: dict
    random_seeds: list[dict]

    def to_frame(self):
        """One row per condition (``none``, ``steered``, ``random``), CIs as [low, high] lists."""
        import pandas as pd

        return pd.DataFrame(self.summary).set_index("condition")

    def table(self):
        """Readable table: means and changes from ``none`` with 95% CIs."""
        import pandas as pd

        k = self.meta["k"]
        cols = ["logprob", "mrr", f"hit_at_{k}"]
        if self.meta["n_control"]:
            cols += ["logprob_control", "text_logprob_control"]
        rows = {}
        for row in self.summary:
            out = {}
            for c in cols:
                out[c] = f"{row[c]:.3f}"
                if row["condition"] != "none":
                    lo, hi = row[f"delta_{c}_ci"]
                    out[f"change {c}"] = f"{row[f'delta_{c}']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            rows[row["condition"]] = out
        return pd.DataFrame(rows).T.fillna("")

    def text(self) -> str:
        m = self.meta
        v = self.versus_random["logprob"]
        baseline = "layer-matched draws" if m.get("experts") else "random directions of the same norm"
        return (f"{m['what']} on {m['n_heldout']} held-out prompts; "
                f"steered - random (mean of {m['seeds']} {baseline}): target log-prob {v['mean']:+.3f} "
                f"[{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]\n" + self.table().to_string())

    def to_json(self) -> dict:
        return {"meta": self.meta, "summary": self.summary, "versus_random": self.versus_random,
                "random_seeds": self.random_seeds}

    @classmethod
    def from_json(cls, data: dict) -> "SteeringResult":
        return cls(data["meta"], data["summary"], data["versus_random"], data["random_seeds"])

    def plot(self):
        """Change of the held-out target log-prob: steered vs random (mean) vs each random draw, with CIs."""
        import matplotlib.pyplot as plt

        rows = {r["condition"]: r for r in self.summary}
        fig, ax = plt.subplots(figsize=(5, 3))
        names = ["steered", "random"]
        means = [rows[n]["delta_logprob"] for n in names]
        errs = [[means[i] - rows[n]["delta_logprob_ci"][0] for i, n in enumerate(names)],
                [rows[n]["delta_logprob_ci"][1] - means[i] for i, n in enumerate(names)]]
        ax.bar(names, means, yerr=errs, capsize=4, color=["tab:red", "tab:gray"])
        for s in self.random_seeds:
            ax.plot([1], [s["delta_logprob"]], "k.", alpha=0.5)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_ylabel("change of target log-prob")
        ax.set_title(f"{self.meta['what']} (held-out)", fontsize=9)
        fig.tight_layout()
        return fig


# ============================================================================ two relations
#: What :func:`relation_steering` evaluates: force the behaviour experts ON in the control relation's prompts,
#: scored with the behaviour relation's answers for the same subjects; or force them OFF in held-out
#: behaviour prompts (suppress the relation).
GOALS = ("toward", "suppress")


def paired_targets(tokenizer: Any, facts: Sequence, answers: Any) -> tuple[list[str], Tensor, list[int]]:
    """The prompts of ``facts`` with, as target, the other relation's answer for the same subject.

    ``answers``: a :class:`~nnsight_moe.data.Relation` (its samples) or ``{subject: object}``. Returns
    (prompts, targets, indices into ``facts``); facts whose subject has no answer, or whose answer has no
    usable first token after the prompt (:func:`nnsight_moe.data.target_token`), are left out.
    """
    from nnsight_moe.data import target_token

    lookup = dict(answers.samples) if hasattr(answers, "samples") else dict(answers)
    prompts, targets, kept = [], [], []
    for j, fact in enumerate(facts):
        if fact.subject not in lookup:
            continue
        token = target_token(tokenizer, lookup[fact.subject], fact.prompt)
        if token is not None:
            prompts.append(fact.prompt)
            targets.append(token)
            kept.append(j)
    return prompts, torch.tensor(targets, dtype=torch.long), kept


@dataclass
class RelationSteering(_JSONFile):
    """What :func:`relation_steering` found: the discovery and one :class:`SteeringResult` per goal."""

    meta: dict
    discovery: Discovery
    results: dict

    def to_json(self) -> dict:
        return {"meta": self.meta, "discovery": self.discovery.to_json(),
                "results": {goal: r.to_json() for goal, r in self.results.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "RelationSteering":
        return cls(data["meta"], Discovery.from_json(data["discovery"]),
                   {goal: SteeringResult.from_json(r) for goal, r in data["results"].items()})

    def text(self) -> str:
        m = self.meta
        lines = [f"experts linked to {m['behaviour']} vs {m['control']} ({m['n_discovery']} discovery prompts each "
                 f"at most): {m['experts']}"]
        for goal, result in self.results.items():
            lines.append(f"\n[{goal}] {_GOAL_TEXT[goal].format(**m)}\n{result.text()}")
        lines += [f"\n[{goal}] skipped: {reason}" for goal, reason in m.get("skipped", {}).items()]
        return "\n".join(lines)


_GOAL_TEXT = {
    "toward": "forced ON in held-out {control} prompts, target = the {behaviour} answer for the same subject; "
              "control = the same prompts with their own answers",
    "suppress": "forced OFF in held-out {behaviour} prompts; control = held-out {control} prompts",
}


def relation_steering(model: Any, facts: Any, behaviour: str, control: str, *, relations: Sequence | None = None,
                      goals: Sequence[str] = GOALS, top: int = 3, seeds: int = 5, margin: float = 1.0,
                      per_relation: int | None = None, permutations: int = 1000, n_boot: int = 1000,
                      tokenizer: Any = None, batch_size: int = 16, remote: Any = None,
                      strict: bool = True) -> RelationSteering:
    """Discover the experts linked to relation ``behaviour`` against ``control`` and steer with them, held out.

    The facts of each relation are split (even positions: discovery, odd: held out). The ``top`` experts by
    risk difference (selected more often in ``behaviour``) are then, per goal (:data:`GOALS`), forced ON in the
    held-out ``control`` prompts and scored on the ``behaviour`` answer of the same subject (``"toward"``;
    needs ``relations`` for the answers), and forced OFF in the held-out ``behaviour`` prompts (``"suppress"``),
    each against ``seeds`` sets of layer-matched random experts, with a fluency guard.

    Args:
        facts: an :class:`~nnsight_moe.data.EncodedFacts` holding both relations (``encode_facts``).
        relations: the :class:`~nnsight_moe.data.Relation` objects (for the ``"toward"`` answers).
        per_relation: at most this many facts per relation (evenly spread) before the split; None: all.
        strict: a goal that cannot run (no behaviour-linked expert, no shared subject for ``"toward"``) raises
            ``ValueError``; with ``strict=False`` it is left out and its reason kept in ``meta["skipped"]``.
    """
    from nnsight_moe.data import evenly_spaced

    unknown = [g for g in goals if g not in GOALS]
    if unknown or not goals:
        raise ValueError(f"goals must be a non-empty subset of {GOALS}, got {list(goals)}")
    tokenizer = model_tokenizer(model, tokenizer)
    groups: dict[str, list[int]] = {}
    for j, fact in enumerate(facts.facts):
        groups.setdefault(fact.relation, []).append(j)
    for name in (behaviour, control):
        if name not in groups:
            raise ValueError(f"relation {name!r} has no facts here; relations: {sorted(groups)}")
    if behaviour == control:
        raise ValueError("behaviour and control must be two different relations")
    chosen = {name: evenly_spaced(groups[name], per_relation) for name in (behaviour, control)}
    split = {name: _split(idx) for name, idx in chosen.items()}

    def subset(idx):
        return [facts.prompts[i] for i in idx], torch.tensor([facts.targets[i] for i in idx], dtype=torch.long)

    options = {"tokenizer": tokenizer, "batch_size": batch_size, "remote": remote}
    found = discover(model, subset(split[behaviour][0]), subset(split[control][0]), permutations=permutations, **options)
    experts = found.top(top)
    results, skipped = {}, {}

    def cannot(goal: str, reason: str) -> None:
        if strict:
            raise ValueError(reason)
        skipped[goal] = reason

    held_b, held_c = split[behaviour][1], split[control][1]
    if not experts:
        for goal in goals:
            cannot(goal, f"no expert is selected more often in {behaviour} than in {control}: nothing to steer")
        goals = ()
    common = {"seeds": seeds, "margin": margin, "n_boot": n_boot, **options}
    if "toward" in goals:
        if relations is None:
            raise ValueError("goal 'toward' needs relations= (the behaviour relation's answers)")
        answers = next((r for r in relations if r.name == behaviour), None)
        if answers is None:
            raise ValueError(f"relations has no relation named {behaviour!r}")
        prompts, targets, kept = paired_targets(tokenizer, [facts.facts[i] for i in held_c], answers)
        if prompts:
            own = subset([held_c[j] for j in kept])
            results["toward"] = evaluate(model, (prompts, targets), experts, edit="on", control=own, **common)
        else:
            cannot("toward", f"no held-out {control} prompt has a subject of {behaviour}: goal 'toward' needs "
                             "shared subjects")
    if "suppress" in goals:
        results["suppress"] = evaluate(model, subset(held_b), experts, edit="off", control=subset(held_c), **common)
    meta = {"behaviour": behaviour, "control": control, "experts": [list(p) for p in experts], "top": top,
            "n_discovery": max(len(split[behaviour][0]), len(split[control][0])),
            "n_heldout": {behaviour: len(held_b), control: len(held_c)}, "skipped": skipped}
    return RelationSteering(meta, found, results)


def run_steer(model: str = "demo-moe", data: str | None = None, *, behaviour: str = "country_capital_city",
              control: str = "country_language", goals: Sequence[str] = GOALS, top: int = 3, seeds: int = 5,
              margin: float = 1.0, per_relation: int | None = None, remote: Any = None, device: str | None = None,
              dtype: str | None = None, threads: int | None = None, batch_size: int = 16,
              out: str | Path | None = None) -> RelationSteering:
    """``nnsight-moe steer``: load ``model`` and relations (``data``: a relation file or folder, default the
    bundled ones), run :func:`relation_steering`, print its tables, and save it as JSON to ``out`` if given."""
    import warnings

    from nnsight_moe import data as relation_data
    from nnsight_moe import threads as cpu_threads
    from nnsight_moe.models import load_model, load_traced

    cpu_threads.requested(threads)
    if remote is not None:
        from nnsight_moe.remote import _check_remote

        _check_remote(remote)
    relations = relation_data.load_relations(data) if data else relation_data.bundled()
    names = [r.name for r in relations]
    for name in (behaviour, control):
        if name not in names:
            raise ValueError(f"relation {name!r} is not in {data or 'the bundled relations'}; available: {', '.join(names)}")
    relations = [r for r in relations if r.name in (behaviour, control)]
    if out is not None:
        out = Path(out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
    if remote is None:
        lm, tokenizer = load_model(model, device=device, dtype=dtype)
    else:
        lm, tokenizer = load_traced(model, remote, device=device, dtype=dtype)
    cpu_threads.configure(threads, model=lm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        facts = relation_data.encode_facts(tokenizer, [f for r in relations for f in r.facts()])
    result = relation_steering(lm, facts, behaviour, control, relations=relations, goals=goals, top=top, seeds=seeds,
                               margin=margin, per_relation=per_relation or None, tokenizer=tokenizer,
                               batch_size=batch_size, remote=remote)
    print(result.discovery.to_frame().head(10)[["layer", "expert", "freq_behaviour", "freq_control", "risk_difference",
                                                 "q_frequency", "gate_difference", "q_gate"]].to_string(index=False))
    print(result.text())
    if out is not None:
        print(f"saved {result.save(out)}")
    return result


# ============================================================================ main job section
def _split(indices: list[int]) -> tuple[list[int], list[int]]:
    """Even positions for discovery, odd ones held out (deterministic)."""
    return indices[0::2], indices[1::2]


def section(job: Any):
    """The ``steering`` section of the main job: experts linked to one relation against another (the first
    half of each one's facts), then steered on the other half (held out) against random experts.

    The pair is country_capital_city vs country_language when both are there, else the first two relations;
    the ``toward`` goal runs only when they share subjects.
    """
    from nnsight_moe.report import Section

    if not job.is_moe:
        return None
    names = list(job.by_relation())
    if len(names) < 2:
        return None
    behaviour = "country_capital_city" if "country_capital_city" in names else names[0]
    control = "country_language" if "country_language" in names and behaviour != "country_language" else \
        next(n for n in names if n != behaviour)
    cap = job.max_per_relation
    samples = {r.name: {subject for subject, _ in r.samples} for r in job.relations}
    shared = samples.get(behaviour, set()) & samples.get(control, set())
    goals = GOALS if shared else ("suppress",)  # "toward" needs subjects both relations have
    found = relation_steering(job.model, job.encoded, behaviour, control, relations=job.relations, goals=goals,
                              top=2 if job.quick else 3, seeds=3 if job.quick else 5,
                              per_relation=2 * cap if cap else None, permutations=200 if job.quick else 1000,
                              n_boot=500, tokenizer=job.tokenizer, batch_size=job.batch_size, remote=job.remote,
                              strict=False)
    m = found.meta
    frame = found.discovery.to_frame().head(10)
    if not found.results:
        reason = "; ".join(sorted(set(m["skipped"].values())))
        return Section("steering", f"Steering: {behaviour} vs {control} (nothing to steer)", reason + ".",
                       data=found.to_json(), tables={"Most behaviour-linked experts": frame})
    text = (f"Experts linked to {behaviour} against {control}: risk difference of selection at the last position "
            f"(Fisher exact test, BH q-values) on the first half of each relation's facts; the top {len(m['experts'])} "
            f"{m['experts']} are steered on the other half (router logit to the top or bottom, re-routed by the "
            f"family's rule), against {found.results[next(iter(found.results))].meta['seeds']} draws of as many "
            "random experts per layer. 95% bootstrap CIs over prompts. "
            + " ".join(f"[{g}] {_GOAL_TEXT[g].format(**m)}." for g in found.results)
            + "".join(f" [{g}] skipped: {reason}." for g, reason in m["skipped"].items())
            + (f" Computed through nnsight with remote={job.remote!r}." if job.remote is not None else ""))
    tables = {"Most behaviour-linked experts": frame[["layer", "expert", "freq_behaviour", "freq_control",
                                                      "risk_difference", "q_frequency", "gate_difference", "q_gate"]]}
    figures = {}
    for goal, result in found.results.items():
        tables[f"{goal}: held-out effect vs random experts"] = result.table()
        figures[f"steering_{goal}"] = (f"{goal}: change of held-out target log-prob", result.plot())
    return Section("steering", f"Steering: experts linked to {behaviour} (vs {control}) switched on / off",
                   text, data=found.to_json(), tables=tables, figures=figures)
