"""The blocking sweep: top-N ranked experts blocked vs random baselines, MRR / HIT@k per relation.

:func:`sweep` blocks each relation's own top-N experts (from a :class:`~nnsight_moe.recipes.blocking_ranking.Ranking`)
and, per seed, N random experts: ``uniform`` over every routed expert or ``matched`` to the top-N's
per-layer counts (:func:`random_pairs`), all conditions of a relation stacked through
:mod:`nnsight_moe.recipes.blocking_conditions`; pooled rows (:data:`ALL`) weigh the relations by prompts.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import nnsight_moe
from nnsight_moe.attach import hf_model
from nnsight_moe.interventions import BLOCK_MODES
from nnsight_moe.layout import MoELayout
from nnsight_moe.progress import label
from nnsight_moe.recipes.blocking_conditions import _run, _run_remote
from nnsight_moe.recipes.blocking_data import (ALL, Pair, _all_pairs, _check_pairs, _chunks, _Data, _dataset, _metrics,
                                               _positive)
from nnsight_moe.recipes.blocking_ranking import Ranking, rank_experts
from nnsight_moe.recipes.blocking_results import BlockingResult
from nnsight_moe.recipes.prompts import model_tokenizer

#: Random baselines: N pairs uniform over all routed experts; N pairs with the top-N's per-layer counts.
BASELINES = ("uniform", "matched")


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
