"""Expert blocking scored with MRR / HIT@k, random baselines, and shared-vs-routed configurations.

    from nnsight_moe.recipes import blocking
    ranking = blocking.rank_experts(model, relations, tokenizer=tok, by="frequency")
    result = blocking.sweep(model, relations, tokenizer=tok, ranking=ranking, top_n=(1, 5, 10))
    result.table()          # relation: original -> top-1 / top-5 / top-10 (Table-5 layout, our reconstruction)
    result.plot()           # MRR vs N, top-ranked vs random baselines (mean +- std over seeds)
    configs = blocking.configurations(model, relations, tokenizer=tok)   # Table-2 layout (our reconstruction)

**Datasets.** Every entry point takes ``dataset`` as one of

* a list of :class:`nnsight_moe.data.Relation` (or one Relation) -- needs ``tokenizer``; facts are
  encoded with :func:`nnsight_moe.data.encode_facts` (target = the object's first token after the prompt);
* an :class:`nnsight_moe.data.EncodedFacts`;
* a pair ``(prompts, targets)`` or a triple ``(prompts, targets, relation_names)``: ``prompts`` are
  strings (``tokenizer`` needed) or lists of token ids (padded here on ``padding_side``), ``targets``
  are target token ids; without relation names every prompt belongs to the relation ``"all"``.

**Metrics.** The target's rank among the last-position logits, where the last position is the last
non-pad token of each row (left or right padding); MRR and HIT@k (:mod:`nnsight_moe.recipes.metrics`).

**Batched execution.** A sweep of C blocking conditions over P prompts stacks the conditions along the
batch dimension (per-row expert masks of :class:`nnsight_moe.hooks.BlockState`), at most ``max_rows``
rows per forward, instead of running one forward per condition (``stacked=False`` runs that naive
per-condition loop with :func:`nnsight_moe.block_experts`, for checks and benchmarks).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

import nnsight_moe
from nnsight_moe.progress import bar as progress_bar, label
from nnsight_moe.attach import attached, hf_model
from nnsight_moe.hooks import TemporaryHooks
from nnsight_moe.interventions import BLOCK_MODES, block_experts, restrict_experts
from nnsight_moe.layout import MoELayout
from nnsight_moe.recipes import runner
from nnsight_moe.recipes.blocking_results import BlockingResult, ConfigurationResult, _metric, _Result  # noqa: F401
from nnsight_moe.recipes.metrics import checked_ranks, first_nonfinite, hits_of_ranks, mrr_of_ranks, target_ranks
from nnsight_moe.recipes.prompts import check_vocab, model_tokenizer, vocab_size

__all__ = [
    "ALL",
    "BASELINES",
    "RANK_BY",
    "BlockingResult",
    "ConfigurationResult",
    "Ranking",
    "configurations",
    "evaluate",
    "random_pairs",
    "rank_experts",
    "section",
    "sweep",
]

#: Relation name of the pooled rows (every prompt) and of prompts given without relation names.
ALL = "all"
#: Ways to rank experts: mean gated-LPI attribution, routing frequency, summed gate weight.
RANK_BY = ("attribution", "frequency", "gate")
#: Random baselines: N pairs uniform over all routed experts; N pairs with the top-N's per-layer counts.
BASELINES = ("uniform", "matched")

Pair = tuple[int, int]


# ============================================================================================== data
@dataclass
class _Data:
    """Prompts (str or token-id lists), target ids [P] and one relation name per prompt."""

    prompts: list
    targets: Tensor
    relations: list[str]

    def groups(self) -> dict[str, list[int]]:
        """Prompt indices per relation, in first-seen order."""
        out: dict[str, list[int]] = {}
        for i, name in enumerate(self.relations):
            out.setdefault(name, []).append(i)
        return out


def _dataset(dataset: Any, tokenizer: Any, max_per_relation: int | None = None) -> _Data:
    """Normalise the accepted dataset forms (see the module docstring) into :class:`_Data`."""
    from nnsight_moe.data import EncodedFacts, Relation, encode_facts

    if isinstance(dataset, Relation):
        dataset = [dataset]
    if isinstance(dataset, (list, tuple)) and len(dataset) == 0:
        raise ValueError("dataset is empty: give Relations, an EncodedFacts or (prompts, targets) with >= 1 prompt")
    if isinstance(dataset, EncodedFacts):
        data = _Data(list(dataset.prompts), torch.tensor(dataset.targets, dtype=torch.long),
                     [f.relation for f in dataset.facts])
    elif isinstance(dataset, (list, tuple)) and dataset and all(isinstance(r, Relation) for r in dataset):
        if tokenizer is None:
            raise ValueError("a list of Relations needs tokenizer= to turn facts into prompts and target ids")
        encoded = encode_facts(tokenizer, [f for r in dataset for f in r.facts()])
        return _dataset(encoded, tokenizer, max_per_relation)
    elif isinstance(dataset, (list, tuple)) and len(dataset) in (2, 3) and not isinstance(dataset[0], str):
        prompts, targets = list(dataset[0]), torch.as_tensor(dataset[1]).reshape(-1)
        if targets.numel() and (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool):
            raise TypeError(f"dataset: target ids must be integer token ids, got {targets.dtype} values such as "
                            f"{targets[:3].tolist()}")
        targets = targets.long()
        names = [str(r) for r in dataset[2]] if len(dataset) == 3 else [ALL] * len(prompts)
        if not (len(prompts) == targets.numel() == len(names)):
            raise ValueError(
                f"dataset: got {len(prompts)} prompts, {targets.numel()} targets and {len(names)} relation "
                "names; they must have the same length"
            )
        data = _Data(prompts, targets, names)
    else:
        raise TypeError(
            "dataset must be a list of nnsight_moe.data.Relation, an EncodedFacts, or a pair "
            f"(prompts, targets) / triple (prompts, targets, relation_names); got {type(dataset).__name__}"
            + (" (empty)" if isinstance(dataset, (list, tuple)) and not dataset else "")
        )
    if not data.prompts:
        raise ValueError("dataset is empty: no prompt with a usable target (need at least one fact)")
    if ALL in data.relations and len(set(data.relations)) > 1:
        raise ValueError(f"a relation is named {ALL!r}, the name of the rows that pool every relation; rename it")
    if isinstance(data.prompts[0], str) and tokenizer is None:
        raise ValueError("string prompts need tokenizer= (or a model that carries one); or pass lists of token ids")
    if max_per_relation is not None:
        data = _subsample(data, max_per_relation)
    return data


def _subsample(data: _Data, n: int) -> _Data:
    """At most ``n`` prompts per relation, evenly spaced over the relation's prompts (deterministic)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"max_per_relation must be a positive integer or None, got {n!r}")
    from nnsight_moe.data import evenly_spaced

    keep = sorted(i for idx in data.groups().values() for i in evenly_spaced(idx, n))
    return _Data([data.prompts[i] for i in keep], data.targets[keep], [data.relations[i] for i in keep])


def _chunks(hf, data: _Data, indices: list[int], tokenizer, batch_size: int | str, padding_side: str) -> list[dict]:
    """Tokenize ``data.prompts[indices]`` once, in runner batches of ``batch_size`` prompts (``rows``: dataset
    indices; ``last``: last non-pad positions), on the model's device (the CPU for a remote model).
    ``batch_size="auto"``: :func:`nnsight_moe.recipes.runner.choose_batch_size` for a blocking sweep (the
    memory planner, :mod:`nnsight_moe.memory`; 16 for a remote model)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    strings = isinstance(data.prompts[indices[0]], str) if indices else False
    if strings and getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before batching")
    vocab = vocab_size(hf)
    chunks = runner.make_batches(data.prompts, rows=indices, tokenizer=tokenizer, batch_size=batch_size,
                                 padding_side=None if strings else padding_side,  # strings: the tokenizer's side
                                 pad_id=hf.config.get_text_config().pad_token_id, device=runner.model_device(hf),
                                 vocab=vocab, model=hf, kind="blocking")
    check_vocab(data.targets[indices], vocab, "the targets", tokenizer)
    return chunks


def _last_logits(hf, ids: Tensor, mask: Tensor, last: Tensor) -> Tensor:
    """Logits at each row's last non-pad position, [rows, V] (only those positions are projected)."""
    logits = hf(input_ids=ids, attention_mask=mask, logits_to_keep=last[:, None]).logits
    return logits[:, 0].float()


# =========================================================================================== ranking
@dataclass
class Ranking:
    """Routed experts ordered from most to least important: ``overall`` and ``per_relation``.

    Each ranking is a list of ``(layer, expert)`` pairs covering every routed expert of the model;
    ``scores`` holds the score of each pair per relation (and under :data:`ALL`) as ``[[layer, expert,
    score], ...]`` in ranking order. :meth:`for_relation` falls back to ``overall`` for unknown names.
    """

    by: str
    overall: list[Pair]
    per_relation: dict[str, list[Pair]]
    scores: dict[str, list[list]]

    def for_relation(self, name: str) -> list[Pair]:
        """The ranking of relation ``name`` (``overall`` for :data:`ALL` or a relation not ranked)."""
        return self.per_relation.get(name, self.overall)

    @classmethod
    def from_json(cls, data: dict) -> "Ranking":
        """The ranking :meth:`to_json` wrote."""
        return cls(data["by"], [tuple(p) for p in data["overall"]],
                   {k: [tuple(p) for p in v] for k, v in data["per_relation"].items()}, data["scores"])

    def to_json(self) -> dict:
        """JSON-ready dict (``{"by", "overall", "per_relation", "scores"}``, pairs as ``[layer, expert]``)."""
        return {"by": self.by, "overall": [list(p) for p in self.overall],
                "per_relation": {k: [list(p) for p in v] for k, v in self.per_relation.items()},
                "scores": self.scores}


def rank_experts(
    model: Any,
    dataset: Any,
    *,
    tokenizer: Any = None,
    by: str = "attribution",
    batch_size: int | str = "auto",
    padding_side: str = "left",
    max_per_relation: int | None = None,
    remote: Any = None,
    results_path: Any = None,
    progress: bool = True,
) -> Ranking:
    """Rank every routed (layer, expert) pair of ``model`` on ``dataset``, per relation and overall.

    Args:
        model: HF model, TransformerBridge or nnsight model of a supported MoE family.
        dataset: Relations, EncodedFacts or ``(prompts, targets[, relation_names])`` (module docstring).
        tokenizer: needed for string prompts and Relations; None uses the model's own (nnsight
            ``LanguageModel`` and TransformerBridge carry one).
        by: ``"attribution"`` -- mean gated LPI of the expert for the target over the relation's prompts
            (a prompt where the expert is not selected counts 0), from
            :func:`nnsight_moe.recipes.attribution.attribute`; ``"frequency"`` -- how often the expert is
            selected at the last (prediction) position; ``"gate"`` -- its summed gate weight there.
        batch_size: prompts per forward. padding_side: for token-id prompts ("left" or "right").
        max_per_relation: keep at most this many prompts per relation (evenly spaced), or None for all.
        remote: compute inside ``model.trace(..., remote=remote)`` on the unmodified model (``True`` for
            NDIF, ``"local"`` for nnsight's local simulation, or a host URL; ``model`` must be an nnsight
            model): routing at the last positions (frequency / gate) or the remote attribution recipe.
        results_path: remote only: partial results file; a rerun resumes from it (``by="attribution"``
            keeps one file per relation, ``results_path`` + ``.0``, ``.1``, ...).

    Ties are broken by (layer, expert) order. Returns a :class:`Ranking`.
    """
    if by not in RANK_BY:
        raise ValueError(f"by must be one of {RANK_BY}, got {by!r}")
    tokenizer = model_tokenizer(model, tokenizer)  # None: the one the model carries (LanguageModel, bridge)
    hf = hf_model(model)
    layout = nnsight_moe.layout(hf)
    data = _dataset(dataset, tokenizer, max_per_relation)
    pairs = _all_pairs(layout)
    if by == "attribution":
        totals = _attribution_scores(model, data, tokenizer, pairs, batch_size, progress, remote,
                                     results_path if remote is not None else None)
    else:
        totals = _routing_scores(model, layout, data, tokenizer, pairs, by, batch_size, padding_side, progress,
                                 remote, results_path)
    groups = data.groups()
    per_relation, scores = {}, {}
    for name, idx in groups.items():
        per_relation[name], scores[name] = _order(pairs, totals[name] / len(idx))
    overall_total = sum(totals[name] for name in groups)
    overall, scores[ALL] = _order(pairs, overall_total / len(data.prompts))
    return Ranking(by, overall, per_relation, scores)


def _all_pairs(layout: MoELayout) -> list[Pair]:
    return [(i, e) for i in layout.moe_layers for e in range(layout.layer(i).n_experts)]


def _order(pairs: list[Pair], score: Tensor) -> tuple[list[Pair], list[list]]:
    order = sorted(range(len(pairs)), key=lambda j: (-float(score[j]), pairs[j]))
    return [pairs[j] for j in order], [[*pairs[j], float(score[j])] for j in order]


@torch.no_grad()
def _routing_scores(model, layout, data, tokenizer, pairs, by, batch_size, padding_side, progress,
                    remote=None, results_path=None) -> dict[str, Tensor]:
    """Summed per-relation selection counts (``frequency``) or gate weights (``gate``) at the last position."""
    hf = hf_model(model)
    column = {pair: j for j, pair in enumerate(pairs)}
    totals = {name: torch.zeros(len(pairs), dtype=torch.float64) for name in data.groups()}
    chunks = _chunks(hf, data, list(range(len(data.prompts))), tokenizer, batch_size, padding_side)
    if remote is not None:
        from nnsight_moe.recipes.blocking_remote import routing_remote

        routed = routing_remote(model, chunks, remote=remote, results_path=results_path, progress=progress)
    else:
        routed = _routing_local(hf, layout, chunks, by, progress)
    for chunk, per_layer in zip(chunks, routed):
        for i, (indices, weights) in per_layer.items():
            values = torch.ones_like(weights, dtype=torch.float64) if by == "frequency" else weights.double()
            base = column[(i, 0)]
            for r, prompt in enumerate(chunk["rows"]):
                totals[data.relations[prompt]].index_add_(0, base + indices[r].cpu(), values[r].cpu())
    return totals


def _routing_local(hf, layout, chunks, by, progress) -> list[dict]:
    """Per chunk ``{layer: (indices [b, k], weights [b, k])}`` at the last positions, from attached hooks."""
    seen: dict[tuple[int, str], Tensor] = {}

    def routing(model, chunk):
        model(**runner.inputs(chunk), logits_to_keep=1)
        rows = torch.arange(len(chunk["rows"]), device=chunk["last"].device)
        return {i: tuple(seen[(i, f"hook_topk_{name}")][rows, chunk["last"]] for name in ("indices", "weights"))
                for i in layout.moe_layers}

    with attached(hf) as handle, TemporaryHooks() as added:  # removes ours only: hooks the user added stay
        for i in layout.moe_layers:
            block = handle.block(i)
            for point in (block.hook_topk_indices, block.hook_topk_weights):
                added.add(point, lambda t, hook, i=i: seen.__setitem__((i, hook.name.rsplit(".", 1)[-1]), t))
        return runner.run_batches(hf, chunks, routing, progress=progress, desc=f"rank experts by {by}")


def _attribution_scores(model, data, tokenizer, pairs, batch_size, progress, remote=None,
                        results_path=None) -> dict[str, Tensor]:
    """Summed per-relation gated-LPI scores of each routed expert, from the attribution recipe."""
    try:
        from nnsight_moe.recipes.attribution import attribute
    except ImportError as err:
        raise ImportError(
            "by='attribution' needs nnsight_moe.recipes.attribution, which is not available in this "
            f"installation ({err}); use by='frequency' or by='gate'"
        ) from err
    column = {pair: j for j, pair in enumerate(pairs)}
    totals = {}
    groups = data.groups()
    for r, (name, idx) in enumerate(groups.items(), 1):
        with label(f"rank experts: relation {r}/{len(groups)} {name}"):
            result = attribute(model, [data.prompts[i] for i in idx], data.targets[idx].tolist(),
                               tokenizer=tokenizer, levels=("expert",), batch_size=batch_size, progress=progress,
                               remote=remote, results_path=None if results_path is None else f"{results_path}.{r - 1}")
        frame = result.to_frame()
        frame = frame[frame["level"] == "expert"]
        total = torch.zeros(len(pairs), dtype=torch.float64)
        for (layer, expert), score in frame.groupby(["layer", "expert"])["score"].sum().items():
            total[column[(int(layer), int(expert))]] = float(score)
        totals[name] = total
    return totals


# ========================================================================================= execution
def _check_pairs(layout: MoELayout, pairs: Sequence, what: str) -> list[Pair]:
    """Validate (layer, expert) pairs: MoE layers only, experts in range, no duplicates."""
    checked = []
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"{what}: expected (layer, expert) pairs, got {pair!r}")
        layer, expert = int(pair[0]), int(pair[1])
        try:
            layout.check_experts(layer, [expert])
        except (ValueError, IndexError) as err:
            raise type(err)(f"{what} names ({layer}, {expert}): {err}") from err
        checked.append((layer, expert))
    if len(set(checked)) != len(checked):
        raise ValueError(f"{what} lists a (layer, expert) pair twice: {checked}")
    return checked


def _masks(layout: MoELayout, conditions: list[list[Pair]], mode: str) -> dict[int, Tensor]:
    """Per-layer bool masks [C, E] of the experts each condition blocks (layers some condition blocks)."""
    masks: dict[int, Tensor] = {}
    for c, pairs in enumerate(conditions):
        for layer, expert in pairs:
            if layer not in masks:
                masks[layer] = torch.zeros(len(conditions), layout.layer(layer).n_experts, dtype=torch.bool)
            masks[layer][c, expert] = True
    if mode == "reroute":
        for layer, mask in masks.items():
            info = layout.layer(layer)
            worst = int(mask.sum(dim=1).max())
            if worst > info.n_experts - info.top_k:
                raise ValueError(
                    f"cannot reroute around {worst} of {info.n_experts} experts in layer {layer}: at most "
                    f"{info.n_experts - info.top_k} can be blocked per layer with top-{info.top_k} routing"
                )
    return masks


def _locate(hf, chunk):
    """``locate(row)`` for :func:`target_ranks`: the first module with a non-finite output on that row."""
    return lambda r: first_nonfinite(hf, **{k: v[r : r + 1] for k, v in runner.inputs(chunk).items()})


def _ranks(hf, chunk) -> Tensor:
    """Target ranks of ``chunk`` (a runner batch with ``target``) as the model is now (runner function)."""
    logits = _last_logits(hf, chunk["input_ids"], chunk["attention_mask"], chunk["last"])
    return target_ranks(logits, chunk["target"].to(logits.device), prompts=chunk["rows"], locate=_locate(hf, chunk))


def _plan(layout: MoELayout, tasks, targets: Tensor, max_rows: int) -> tuple[list[dict], list[tuple]]:
    """Stacked traces for ``(chunks, conditions, mode)`` tasks, and where each one's ranks go.

    Per chunk of b prompts, groups of ``max_rows // b`` conditions share one forward: a runner batch
    repeated per condition (condition-major: row ``c * b + i``) whose ``edits`` give each row its
    condition's expert mask ``{layer: {"block": [rows, E], "mode": mode}}`` in every layer some condition
    of the task blocks. Returns the traces and ``(task, c0, c1, start, b)`` per trace.
    """
    traces, places = [], []
    for t, (chunks, conditions, mode) in enumerate(tasks):
        if mode not in BLOCK_MODES:
            raise ValueError(f"mode must be one of {BLOCK_MODES}, got {mode!r}")
        masks = _masks(layout, conditions, mode)
        start = 0
        for chunk in chunks:
            b = len(chunk["rows"])
            per = max(1, max_rows // b)
            for c0 in range(0, len(conditions), per):
                c1 = min(c0 + per, len(conditions))
                edits = {layer: {"block": mask[c0:c1].repeat_interleave(b, dim=0), "mode": mode}
                         for layer, mask in masks.items()}
                traces.append(runner.repeat({**chunk, "target": targets[chunk["rows"]]}, c1 - c0, edits=edits))
                places.append((t, c0, c1, start, b))
            start += b
    return traces, places


def _place(tasks, places, found) -> list[Tensor]:
    """Ranks [C, P] per task from the ranks [(c1 - c0) * b] of each planned trace."""
    out = [torch.zeros(len(conditions), sum(len(c["rows"]) for c in chunks), dtype=torch.long)
           for chunks, conditions, _ in tasks]
    for (t, c0, c1, start, b), ranks in zip(places, found):
        out[t][c0:c1, start : start + b] = ranks.view(c1 - c0, b)
    return out


def _stacked_ranks(handle, saved, hf, trace) -> Tensor:
    """Target ranks of one planned trace, its per-row masks set on the attached blocks (runner function)."""
    for layer, edit in trace["edits"].items():
        state, mode = handle.states[layer], edit["mode"]
        rows = edit["block"]
        previous = saved[layer][1 if mode == "reroute" else 0]
        if previous is not None:
            if previous.ndim != 1:
                raise ValueError(f"layer {layer} already has a per-row mask; cannot stack conditions on it")
            rows = rows | previous.cpu()[None, :]
        setattr(state, "exclude" if mode == "reroute" else "zero", rows.to(trace["input_ids"].device))
        if mode != "reroute":
            state.renorm = mode == "renorm"
    logits = _last_logits(hf, trace["input_ids"], trace["attention_mask"], trace["last"])
    return target_ranks(logits, trace["target"].to(logits.device), prompts=trace["rows"])


@torch.no_grad()
def _run(hf, layout, chunks, targets, conditions, mode, max_rows, stacked, progress) -> Tensor:
    """Target ranks [C, P_chunks] of every condition on every prompt of ``chunks``."""
    if mode not in BLOCK_MODES:
        raise ValueError(f"mode must be one of {BLOCK_MODES}, got {mode!r}")
    masks = _masks(layout, conditions, mode)
    if not stacked:
        chunks = [{**chunk, "target": targets[chunk["rows"]]} for chunk in chunks]
        ranks = []
        for c, pairs in enumerate(progress_bar(conditions, f"{mode}: conditions", disable=not progress)):
            blocked: dict[int, list[int]] = {}
            for layer, expert in pairs:
                blocked.setdefault(layer, []).append(expert)
            with block_experts(hf, blocked, mode=mode):
                ranks.append(torch.cat(runner.run_batches(hf, chunks, _ranks, progress=False)))
        return torch.stack(ranks)
    tasks = [(chunks, conditions, mode)]
    traces, places = _plan(layout, tasks, targets, max_rows)
    with attached(hf) as handle:
        saved = {i: (s.zero, s.exclude, s.renorm) for i, s in handle.states.items()}
        try:
            found = runner.run_batches(hf, traces, functools.partial(_stacked_ranks, handle, saved), progress=progress,
                                       desc=f"{mode}: stacked conditions x batches")
        finally:
            for i, (zero, exclude, renorm) in saved.items():
                state = handle.states[i]
                state.zero, state.exclude, state.renorm = zero, exclude, renorm
    return _place(tasks, places, found)[0]


def evaluate(
    model: Any,
    dataset: Any,
    conditions: Sequence[Sequence[Pair]],
    *,
    mode: str = "zero",
    tokenizer: Any = None,
    batch_size: int | str = "auto",
    max_rows: int = 64,
    stacked: bool = True,
    padding_side: str = "left",
    remote: Any = None,
    results_path: Any = None,
    progress: bool = True,
) -> Int[Tensor, "C P"]:
    """Target ranks under each blocking condition: ``ranks[c, p]`` (1 = top prediction).

    Args:
        model: HF model, TransformerBridge or nnsight model of a supported MoE family.
        dataset: Relations, EncodedFacts or ``(prompts, targets[, relation_names])`` (module docstring);
            prompts are returned in dataset order.
        conditions: each a list of ``(layer, expert)`` pairs blocked together (``[]`` = no blocking).
        mode: ``"zero"``, ``"renorm"`` or ``"reroute"`` (:func:`nnsight_moe.block_experts`).
        batch_size: prompts per tokenized batch (``"auto"``: planned, :mod:`nnsight_moe.memory`); max_rows: most batch rows (conditions x prompts) per
            forward when ``stacked`` (64 suits a CPU; raise it to 512-2048 on a GPU); ``stacked=False``
            runs one condition at a time instead (with :func:`nnsight_moe.block_experts`).
        remote: run inside ``model.trace(..., remote=remote)`` on the unmodified model (``True`` for NDIF,
            ``"local"``, or a host URL; ``model`` must be an nnsight model); conditions are stacked
            ``max_rows`` rows per trace as locally, and only the ranks come back.
        results_path: remote only: partial results file; a failed run resumes from it when rerun.
    """
    tokenizer = model_tokenizer(model, tokenizer)  # None: the one the model carries (LanguageModel, bridge)
    hf = hf_model(model)
    layout = nnsight_moe.layout(hf)
    data = _dataset(dataset, tokenizer)
    conditions = [_check_pairs(layout, c, f"condition {j}") for j, c in enumerate(conditions)]
    if not conditions:
        raise ValueError("conditions is empty: give at least one list of (layer, expert) pairs ([] = unblocked)")
    chunks = _chunks(hf, data, list(range(len(data.prompts))), tokenizer, batch_size, padding_side)
    if remote is not None:
        return _run_remote(model, layout, [(chunks, conditions, mode)], data.targets, remote,
                           _positive(max_rows, "max_rows"), results_path, progress)[0]
    return _run(hf, layout, chunks, data.targets, conditions, mode, _positive(max_rows, "max_rows"), stacked, progress)


def _run_remote(model, layout, tasks, targets, remote, max_rows, results_path, progress) -> list[Tensor]:
    """Ranks [C, P] per ``(chunks, conditions, mode)`` task, through nnsight on the unmodified model.

    The same plan as the stacked local path (:func:`_plan`): per chunk, groups of ``max_rows // b``
    conditions share a trace, each row with its condition's mask in every layer some condition of the
    task blocks.
    """
    from nnsight_moe.recipes.blocking_remote import ranks_remote

    traces, places = _plan(layout, tasks, targets, max_rows)
    found = [checked_ranks(r, 0) for r in
             ranks_remote(model, traces, remote=remote, results_path=results_path, progress=progress)]
    return _place(tasks, places, found)


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _metrics(ranks: Tensor, k: int) -> dict[str, float]:
    return {"mrr": mrr_of_ranks(ranks), "hit_at_k": hits_of_ranks(ranks, k)}


# ============================================================================================= sweep
def _normalise_ranking(layout: MoELayout, ranking: Any, groups: Mapping[str, list[int]]) -> dict[str, list[Pair]]:
    """{relation: ranked pairs} from a Ranking, a {relation: pairs} dict or one list of pairs."""
    if isinstance(ranking, Ranking):
        out = {name: ranking.for_relation(name) for name in groups}
    elif isinstance(ranking, Mapping):
        missing = [name for name in groups if name not in ranking and ALL not in ranking]
        if missing:
            raise ValueError(f"ranking has no entry for relations {missing} (and no {ALL!r} entry); it has {list(ranking)}")
        out = {name: ranking.get(name, ranking.get(ALL)) for name in groups}
    elif isinstance(ranking, Sequence) and not isinstance(ranking, str):
        out = {name: ranking for name in groups}
    else:
        raise TypeError(f"ranking must be a Ranking, a {{relation: [(layer, expert), ...]}} dict or a list of pairs, got {type(ranking).__name__}")
    return {name: _check_pairs(layout, pairs, f"ranking for {name!r}") for name, pairs in out.items()}


def _draw(rng: random.Random, layout: MoELayout, kind: str, top: list[Pair], cap: dict[int, int]) -> list[Pair]:
    """A random baseline for ``top``: ``uniform`` over all routed pairs or ``matched`` per-layer counts.

    Uniform draws are redrawn until no layer exceeds ``cap`` (only binding for ``reroute``).
    """
    if kind == "matched":
        counts: dict[int, int] = {}
        for layer, _ in top:
            counts[layer] = counts.get(layer, 0) + 1
        return sorted((layer, e) for layer, n in counts.items()
                      for e in rng.sample(range(layout.layer(layer).n_experts), n))
    pairs = _all_pairs(layout)
    for _ in range(10_000):
        drawn = rng.sample(pairs, len(top))
        per_layer: dict[int, int] = {}
        for layer, _ in drawn:
            per_layer[layer] = per_layer.get(layer, 0) + 1
        if all(per_layer[layer] <= cap[layer] for layer in per_layer):
            return sorted(drawn)
    raise ValueError(f"could not draw {len(top)} random experts with at most {cap} per layer")


def random_pairs(model: Any, top: Sequence[Pair], kind: str = "uniform", *, seed: int = 0,
                 reroute: bool = False) -> list[Pair]:
    """A random baseline for the blocked set ``top``: ``len(top)`` random (layer, expert) pairs, sorted.

    ``kind="uniform"``: uniform over every routed expert of the model; ``"matched"``: the same number
    per layer as ``top``. ``reroute=True`` keeps at most E - k per layer (what ``reroute`` can block).
    The same ``seed`` gives the same draw.
    """
    if kind not in BASELINES:
        raise ValueError(f"kind must be one of {BASELINES}, got {kind!r}")
    layout = nnsight_moe.layout(model)
    top = _check_pairs(layout, top, "top")
    cap = {i: layout.layer(i).n_experts - (layout.layer(i).top_k if reroute else 0) for i in layout.moe_layers}
    return _draw(random.Random(f"{seed}:{kind}"), layout, kind, top, cap)


def sweep(
    model: Any,
    dataset: Any,
    *,
    tokenizer: Any = None,
    top_n: Sequence[int] = (1, 5, 10),
    modes: Sequence[str] = ("zero",),
    seeds: int = 5,
    ranking: Any = None,
    by: str = "attribution",
    baselines: Sequence[str] = BASELINES,
    per_relation: bool = True,
    max_per_relation: int | None = None,
    k: int = 10,
    batch_size: int | str = "auto",
    max_rows: int = 64,
    stacked: bool = True,
    padding_side: str = "left",
    seed: int = 0,
    remote: Any = None,
    results_path: Any = None,
    progress: bool = True,
) -> BlockingResult:
    """Block the top-N ranked experts (and random baselines) and score MRR / HIT@k before and after.

    Args:
        model: HF model, TransformerBridge or nnsight model of a supported MoE family.
        dataset: Relations (with ``tokenizer``), EncodedFacts or ``(prompts, targets[, relation_names])``.
        top_n: numbers of top-ranked experts to block together; each at most the model's routed experts.
        modes: blocking modes among ``"zero"``, ``"renorm"``, ``"reroute"``.
        seeds: random draws per baseline and N (mean and std are reported; use >= 5).
        ranking: a :class:`Ranking`, ``{relation: [(layer, expert), ...]}`` or one list of pairs for every
            relation; None ranks with :func:`rank_experts` ``by=by`` on the same prompts.
        baselines: among :data:`BASELINES`: ``"uniform"`` (N pairs uniform over all routed experts) and
            ``"matched"`` (N pairs with the same number per layer as the top-N).
        per_relation: block each relation's own top-N on its prompts (the study's setting), and add
            pooled rows under :data:`ALL`; False: one overall ranking on all prompts as :data:`ALL`.
        max_per_relation: subsample each relation to this many prompts (evenly spaced).
        k: the k of HIT@k. batch_size / max_rows / stacked: see :func:`evaluate`.
        seed: base seed of the random baselines (draws are the same for every mode).
        remote: run the ranking (when ``ranking`` is None) and the blocked forwards through nnsight on
            the unmodified model (``True`` for NDIF, ``"local"``, or a host URL; ``model`` must be an
            nnsight model); only ranks come back.
        results_path: remote only: partial results file of the blocked forwards (all relations and
            modes in one file); a failed run resumes from it when rerun.

    Random draws for ``reroute`` keep at most E - k blocked experts per layer (for every mode, so the
    modes are compared on the same draws when ``"reroute"`` is among them).
    """
    tokenizer = model_tokenizer(model, tokenizer)  # None: the one the model carries (LanguageModel, bridge)
    hf = hf_model(model)
    layout = nnsight_moe.layout(hf)
    modes = tuple(modes)
    bad = [m for m in modes if m not in BLOCK_MODES]
    if not modes or bad:
        raise ValueError(f"modes must be a non-empty subset of {BLOCK_MODES}, got {modes!r}")
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise ValueError(f"baselines must be a subset of {BASELINES}, got {tuple(baselines)!r}")
    seeds, max_rows = _positive(seeds, "seeds"), _positive(max_rows, "max_rows")
    n_routed = len(_all_pairs(layout))
    top_n = tuple(top_n)
    for n in top_n:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= n_routed:
            raise ValueError(
                f"top_n={n!r} is not possible: N must be an integer in 1..{n_routed}, the number of routed "
                f"experts of this model ({len(layout.moe_layers)} MoE layers x {layout.n_experts})"
            )
    if not top_n:
        raise ValueError("top_n is empty; give at least one N, e.g. (1, 5, 10)")
    data = _dataset(dataset, tokenizer, max_per_relation)
    if not per_relation:
        data = _Data(data.prompts, data.targets, [ALL] * len(data.prompts))
    groups = data.groups()
    if ranking is None:
        ranking = rank_experts(hf if remote is None else model, (data.prompts, data.targets, data.relations),
                               tokenizer=tokenizer, by=by, batch_size=batch_size, padding_side=padding_side,
                               remote=remote, progress=progress)
    ranked = _normalise_ranking(layout, ranking, groups)
    cap = {i: layout.layer(i).n_experts - (layout.layer(i).top_k if "reroute" in modes else 0)
           for i in layout.moe_layers}
    original, rows, tasks = {}, [], []
    for name, idx in groups.items():
        if max(top_n) > len(ranked[name]):
            raise ValueError(f"top_n={max(top_n)} but the ranking for {name!r} lists only {len(ranked[name])} experts")
        labels, conditions = [("original", 0, None)], [[]]
        for n in top_n:
            top = sorted(ranked[name][:n])
            labels.append(("top", n, None)), conditions.append(top)
            for kind in baselines:
                for s in range(seeds):
                    rng = random.Random(f"{seed + s}:{name}:{n}:{kind}")
                    labels.append((kind, n, seed + s)), conditions.append(_draw(rng, layout, kind, top, cap))
        chunks = _chunks(hf, data, idx, tokenizer, batch_size, padding_side)
        for j, mode in enumerate(modes):
            tasks.append((name, idx, labels, conditions, j, (chunks, conditions if j == 0 else conditions[1:], mode)))
    if remote is None:
        names = list(groups)
        results = []
        for name, *_, (chunks, todo, mode) in tasks:
            with label(f"sweep: relation {names.index(name) + 1}/{len(names)} {name}"):
                results.append(_run(hf, layout, chunks, data.targets, todo, mode, max_rows, stacked, progress))
    else:
        results = _run_remote(model, layout, [task[-1] for task in tasks], data.targets, remote, max_rows,
                              results_path, progress)
    for (name, idx, labels, conditions, j, (_, _, mode)), ranks in zip(tasks, results):
        if j == 0:
            original[name] = {"n_prompts": len(idx), **_metrics(ranks[0], k), "ranks": ranks[0].tolist()}
            ranks = ranks[1:]
        for (kind, n, s), pairs, r in zip(labels[1:], conditions[1:], ranks):
            rows.append({"relation": name, "mode": mode, "kind": kind, "n": n, "seed": s,
                         "n_prompts": len(idx), **_metrics(r, k), "experts": [list(p) for p in pairs],
                         "ranks": r.tolist()})  # per prompt: bootstrap CIs and tests (recipes.stats)
    if per_relation and len(groups) > 1:
        original[ALL], rows = _pooled(original, rows)
    meta = {"by": ranking.by if isinstance(ranking, Ranking) else "given", "top_n": list(top_n),
            "modes": list(modes), "seeds": seeds, "seed": seed, "baselines": list(baselines), "k": k,
            "per_relation": per_relation, "max_per_relation": max_per_relation,
            "rankings": {name: [list(p) for p in ranked[name]] for name in groups}}
    return BlockingResult(meta, original, rows)


def _pooled(original: dict, rows: list[dict]) -> tuple[dict, list[dict]]:
    """Rows of relation ALL: every prompt of every relation (each blocked by its own relation's set)."""
    total = sum(o["n_prompts"] for o in original.values())

    def weighted(items, key):
        return sum(item[key] * item["n_prompts"] for item in items) / total

    pooled_original = {"n_prompts": total, "mrr": weighted(original.values(), "mrr"),
                       "hit_at_k": weighted(original.values(), "hit_at_k"),
                       "ranks": [r for o in original.values() for r in o.get("ranks", [])]}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["mode"], row["kind"], row["n"], row["seed"]), []).append(row)
    pooled = [{"relation": ALL, "mode": mode, "kind": kind, "n": n, "seed": s, "n_prompts": total,
               "mrr": weighted(items, "mrr"), "hit_at_k": weighted(items, "hit_at_k"), "experts": None,
               "ranks": [r for item in items for r in item.get("ranks", [])]}
              for (mode, kind, n, s), items in groups.items()]
    return pooled_original, rows + pooled


# ==================================================================================== configurations
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


# ====================================================================================== main job
def section(job: Any):
    """The ``blocking`` section of the main job (``nnsight_moe.job``): sweep + configurations.

    Ranks experts by attribution when that recipe is installed, else by routing frequency (the section
    text says which) on ``job.max_per_relation`` evenly spread prompts per relation (all when None).
    Returns None for dense models.
    """
    from nnsight_moe.report import Section

    if not job.is_moe:
        return None
    model = job.model  # an nnsight LanguageModel when job.remote is set: everything runs through its traces
    per_relation = getattr(job, "max_per_relation", 16 if job.quick else None)
    options = {"tokenizer": job.tokenizer, "batch_size": job.batch_size, "max_per_relation": per_relation,
               "remote": job.remote}
    path = getattr(job, "results_path", lambda stage: None)  # remote batches kept for a resume

    from nnsight_moe.recipes import stats

    # held out (default in the job): rank on half of each relation's subjects, block on the other half
    split = getattr(job, "split", False)
    rank_set, eval_set = stats.split_facts(job.encoded, seed=0) if split else (job.encoded, job.encoded)

    def rank():
        try:
            return rank_experts(model, rank_set, by="attribution", results_path=path("blocking-ranking"), **options)
        except ImportError:
            return rank_experts(model, rank_set, by="frequency", results_path=path("blocking-ranking"), **options)

    ranking = job.stage("blocking-ranking", rank, Ranking.to_json, Ranking.from_json) if hasattr(job, "stage") else rank()
    n_routed = len(_all_pairs(job.layout))
    top_n = tuple(n for n in (1, 5, 10) if n <= n_routed)
    result = sweep(model, eval_set, ranking=ranking, top_n=top_n, modes=("zero",), seeds=5,
                   results_path=path("blocking-sweep"), **options)
    configs = configurations(model, eval_set, results_path=path("blocking-configurations"), renorm=True, **options)
    significance = stats.blocking_significance(result)
    held = (f"ranked on {len(rank_set)} facts and evaluated on {len(eval_set)} others (disjoint subjects per "
            "relation, stats.split_facts)" if split else "ranked and evaluated on the same facts (in-sample)")
    text = (f"Experts ranked per relation by {ranking.by}, {held}; the top-N blocked (gate weight 0) vs N random "
            "experts (uniform, and with the same per-layer counts), 5 seeds, mean +- std. The significance table "
            "gives 95% bootstrap intervals over prompts for every row and a one-sided paired sign-flip p-value "
            "of top-N vs each random baseline (recipes.stats). The configuration table is our reconstruction "
            "of the study's Table 2; top-n rows come without and with renormalised gate weights."
            + (f" Computed through nnsight with remote={job.remote!r}." if job.remote is not None else ""))
    return Section(
        "blocking", "Expert blocking: MRR / HIT@10 after blocking top-ranked vs random experts", text,
        data={"sweep": result.to_json(), "configurations": configs.to_json(), "split": bool(split),
              "n_rank_facts": len(rank_set), "n_eval_facts": len(eval_set),
              "significance": significance.to_dict(orient="records")},
        tables={"MRR: original -> top-N blocked (Table-5 layout, our reconstruction)": result.table("mrr"),
                "HIT@10: original -> top-N blocked": result.table("hit_at_k"),
                "MRR with random experts blocked (matched per-layer counts, mean)": result.table("mrr", kind="matched"),
                "MRR with 95% CIs and top-N vs random tests": _significance_table(significance),
                "MRR per configuration (Table-2 layout, our reconstruction)": configs.table("mrr")},
        figures={"blocking_mrr": ("MRR vs N blocked experts", result.plot("mrr")),
                 "blocking_configurations": ("Shared vs routed configurations", configs.plot("mrr"))},
    )


def _significance_table(frame):
    """The report's view of :func:`nnsight_moe.recipes.stats.blocking_significance`: value [lo, hi] strings."""
    from nnsight_moe.recipes.stats import format_ci

    out = frame[["relation", "n", "n_prompts"]].copy()
    out["original"] = [format_ci(v, c) for v, c in zip(frame["original"], frame["original_ci"])]
    for col in ("top", "uniform", "matched"):
        if col in frame:
            out[col] = [format_ci(v, c) for v, c in zip(frame[col], frame[f"{col}_ci"])]
    for col in ("uniform", "matched"):
        if f"{col}_p_signflip" in frame:
            out[f"p vs {col}"] = frame[f"{col}_p_signflip"].map(lambda p: f"{p:.3g}")
    return out.set_index(["relation", "n"])
