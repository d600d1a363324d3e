"""Ranking experts for blocking: :class:`Ranking` and :func:`rank_experts`.

Every routed (layer, expert) pair is scored per relation and overall, by mean gated-LPI attribution
(:mod:`nnsight_moe.recipes.attribution`), by how often it is selected at the last (prediction) position,
or by its summed gate weight there (locally from attached hooks, remotely in ``model.trace``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import nnsight_moe
from nnsight_moe.attach import attached, hf_model
from nnsight_moe.hooks import TemporaryHooks
from nnsight_moe.progress import label
from nnsight_moe.recipes import runner
from nnsight_moe.recipes.blocking_data import ALL, Pair, _all_pairs, _chunks, _dataset
from nnsight_moe.recipes.prompts import model_tokenizer

#: Ways to rank experts: mean gated-LPI attribution, routing frequency, summed gate weight.
RANK_BY = ("attribution", "frequency", "gate")


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
        dataset: Relations, EncodedFacts or ``(prompts, targets[, relation_names])``
            (:mod:`nnsight_moe.recipes.blocking`).
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
