"""Uncertainty for the recipes: held-out splits, bootstrap intervals and a permutation-style test.

    from nnsight_moe.recipes import blocking, stats
    rank_set, eval_set = stats.split_facts(encoded, seed=0)          # disjoint subjects per relation
    ranking = blocking.rank_experts(model, rank_set, tokenizer=tok)  # rank on one split ...
    result = blocking.sweep(model, eval_set, ranking=ranking, tokenizer=tok)   # ... block on the other
    table = stats.blocking_significance(result)   # CIs on every row + top-N vs random test

Definitions (all on per-prompt reciprocal ranks ``rr = 1 / rank`` and hits ``rank <= k``):

* **bootstrap CI** (:func:`bootstrap_ci`): percentile interval of a statistic over ``n_boot`` resamples
  of the prompts with replacement. For a baseline with S random draws the values are ``[S, P]`` and
  the statistic is the mean over draws and the resampled prompts (the prompts are resampled, the
  draws are kept), so the interval reflects prompt sampling, not draw-to-draw spread (reported apart).
  The resample indices are ``rng.integers(0, P, size=(n_boot, P))`` with
  ``rng = numpy.random.default_rng(seed)``.
* **paired sign-flip test** (:func:`sign_flip_test`): per prompt ``d_p = rr_random(p) - rr_top(p)``
  (``rr_random`` averaged over draws); the statistic is ``mean(d)``; under the null hypothesis that
  blocking the top-N set harms a prompt no more than blocking a random set, the sign of each ``d_p``
  is exchangeable; ``p = (1 + #{b : mean(s_b * d) >= mean(d)}) / (1 + n_perm)`` with random signs
  ``s_b = 2 * rng.integers(0, 2, size=(n_perm, P)) - 1``. One-sided: small p = the top-N set hurts more.
* **draw rank p** (in :func:`blocking_significance`): ``(1 + #{draws with MRR <= MRR_top}) / (1 + S)``,
  the position of the top-N set among the random sets; it cannot go below ``1 / (1 + S)``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["blocking_significance", "bootstrap_ci", "sign_flip_test", "split_facts", "split_indices"]


def split_indices(groups: Sequence[str], units: Sequence[Any] | None = None, *, fraction: float = 0.5,
                  seed: int = 0) -> tuple[list[int], list[int]]:
    """Two disjoint index lists (rank, evaluate) that split every group by whole units.

    ``groups[i]`` is the group (relation) of item i and ``units[i]`` its unit (subject; default: the
    item itself): all items of one unit go to the same side, so no subject is ranked on and evaluated
    on. Per group the units are shuffled with ``random.Random(f"{seed}:{group}")`` and the first
    ``round(fraction * n_units)`` (at least 1, at most n_units - 1) go to the rank side. A group with
    one unit goes to the evaluation side only (its ranking falls back to the overall one).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    units = list(range(len(groups))) if units is None else list(units)
    if len(units) != len(groups):
        raise ValueError(f"got {len(groups)} groups but {len(units)} units")
    per_group: dict[str, list] = {}
    for group, unit in zip(groups, units):
        seen = per_group.setdefault(group, [])
        if unit not in seen:
            seen.append(unit)
    rank_units = set()
    for group, found in per_group.items():
        if len(found) < 2:
            continue
        order = list(found)
        random.Random(f"{seed}:{group}").shuffle(order)
        n = min(len(order) - 1, max(1, round(fraction * len(order))))
        rank_units.update((group, u) for u in order[:n])
    rank = [i for i, (g, u) in enumerate(zip(groups, units)) if (g, u) in rank_units]
    held = [i for i, (g, u) in enumerate(zip(groups, units)) if (g, u) not in rank_units]
    return rank, held


def split_facts(encoded, *, fraction: float = 0.5, seed: int = 0):
    """(rank set, evaluation set) of an :class:`~nnsight_moe.data.EncodedFacts`, split by subject per relation.

    See :func:`split_indices`; every template of a subject lands on the same side.
    """
    rank, held = split_indices([f.relation for f in encoded.facts], [f.subject for f in encoded.facts],
                               fraction=fraction, seed=seed)
    if not held:
        raise ValueError("the evaluation split is empty: no relation has facts left to evaluate on")
    return encoded.subset(rank), encoded.subset(held)


def _values(values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"values must be [prompts] or [draws, prompts] with >= 1 prompt, got shape {array.shape}")
    return array


def bootstrap_ci(values, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval (lo, hi) of the mean of ``values`` ([P] or [draws, P]) over prompts.

    The prompts (last axis) are resampled ``n_boot`` times (module docstring for the exact draws).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot!r}")
    array = _values(values)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, array.shape[1], size=(n_boot, array.shape[1]))
    means = array.mean(axis=0)[index].mean(axis=1)  # mean over draws first: same as the mean of [S, resampled P]
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def sign_flip_test(top, random_, *, n_perm: int = 2000, seed: int = 0) -> float:
    """One-sided paired sign-flip p-value that ``top`` ([P]) is below ``random_`` ([P] or [draws, P]).

    ``d = mean_draws(random_) - top`` per prompt (module docstring). All-zero differences give p = 1.
    """
    top = _values(top)[0]
    other = _values(random_).mean(axis=0)
    if other.shape != top.shape:
        raise ValueError(f"top has {top.shape[0]} prompts but the baseline {other.shape[0]}")
    d = other - top
    observed = d.mean()
    if not np.any(d):
        return 1.0
    rng = np.random.default_rng(seed)
    signs = 2 * rng.integers(0, 2, size=(n_perm, d.shape[0])) - 1
    flipped = (signs * d).mean(axis=1)
    return float((1 + np.sum(flipped >= observed - 1e-12)) / (1 + n_perm))


def blocking_significance(result, *, metric: str = "mrr", n_boot: int = 1000, n_perm: int = 2000,
                          level: float = 0.95, seed: int = 0):
    """Per (relation, mode, N): top-N and random-baseline metric with bootstrap CIs, and the tests.

    ``result`` is a :class:`~nnsight_moe.recipes.blocking.BlockingResult` with per-prompt ranks in its
    rows (``ranks``). Columns: ``original`` [lo, hi], ``top`` [lo, hi], ``drop`` (original - top) [lo,
    hi], then per baseline kind ``<kind>`` [lo, hi], ``<kind>_drop`` [lo, hi], ``<kind>_draw_std`` (std
    over draws of the metric), ``<kind>_p_signflip`` and ``<kind>_p_draws`` (module docstring). The
    same ``seed`` is used for every row, so rows are comparable and the table is reproducible.
    """
    import pandas as pd

    if metric not in ("mrr", "hit_at_k"):
        raise ValueError(f"metric must be 'mrr' or 'hit_at_k', got {metric!r}")
    k = result.meta["k"]

    def per_prompt(ranks) -> np.ndarray:
        ranks = np.asarray(ranks, dtype=np.float64)
        if np.any(ranks < 1):
            raise ValueError("a rank below 1 (a non-finite forward?) cannot be scored")
        return 1.0 / ranks if metric == "mrr" else (ranks <= k).astype(np.float64)

    missing = [r for r in result.rows if "ranks" not in r] + [o for o in result.original.values() if "ranks" not in o]
    if missing:
        raise ValueError("this blocking result has no per-prompt ranks (rows['ranks']); rerun sweep() with this "
                         "version to get confidence intervals")
    rows, groups = [], {}
    for row in result.rows:
        groups.setdefault((row["relation"], row["mode"], row["n"]), {}).setdefault(row["kind"], []).append(row["ranks"])

    def ci(values):
        return bootstrap_ci(values, n_boot=n_boot, level=level, seed=seed)

    for (relation, mode, n), kinds in groups.items():
        orig = per_prompt(result.original[relation]["ranks"])
        out = {"relation": relation, "mode": mode, "n": n, "n_prompts": len(orig), "original": orig.mean(),
               "original_ci": ci(orig)}
        if "top" in kinds:
            top = per_prompt(kinds["top"][0])
            out.update({"top": top.mean(), "top_ci": ci(top), "drop": (orig - top).mean(), "drop_ci": ci(orig - top)})
        for kind, draws in kinds.items():
            if kind == "top":
                continue
            values = np.stack([per_prompt(d) for d in draws])
            out.update({kind: values.mean(), f"{kind}_ci": ci(values), f"{kind}_drop": (orig - values).mean(),
                        f"{kind}_drop_ci": ci(orig[None, :] - values),
                        f"{kind}_draw_std": float(values.mean(axis=1).std(ddof=1)) if len(values) > 1 else 0.0})
            if "top" in kinds:
                top_metric = top.mean()
                out[f"{kind}_p_signflip"] = sign_flip_test(top, values, n_perm=n_perm, seed=seed)
                out[f"{kind}_p_draws"] = float((1 + np.sum(values.mean(axis=1) <= top_metric + 1e-12))
                                               / (1 + len(values)))
        rows.append(out)
    return pd.DataFrame(rows)


def format_ci(value: float, interval: Sequence[float]) -> str:
    """``0.812 [0.75, 0.87]``."""
    return f"{value:.3f} [{interval[0]:.2f}, {interval[1]:.2f}]"
