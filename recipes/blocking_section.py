"""The ``blocking`` section of the main job (:mod:`nnsight_moe.job`): ranking, sweep, configurations, tests."""

from __future__ import annotations

from typing import Any

from nnsight_moe.recipes.blocking_configurations import configurations
from nnsight_moe.recipes.blocking_data import _all_pairs
from nnsight_moe.recipes.blocking_ranking import Ranking, rank_experts
from nnsight_moe.recipes.blocking_sweep import sweep


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
