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

**Modules.** :mod:`~nnsight_moe.recipes.blocking_data` (dataset forms, batches, pairs),
:mod:`~nnsight_moe.recipes.blocking_ranking` (:func:`rank_experts`),
:mod:`~nnsight_moe.recipes.blocking_conditions` (:func:`evaluate`: stacked, naive and remote runs),
:mod:`~nnsight_moe.recipes.blocking_sweep` (:func:`sweep`, :func:`random_pairs`),
:mod:`~nnsight_moe.recipes.blocking_configurations` (:func:`configurations`),
:mod:`~nnsight_moe.recipes.blocking_results` (the result classes), :mod:`~nnsight_moe.recipes.blocking_remote`
(the ``remote=`` traces) and :mod:`~nnsight_moe.recipes.blocking_section` (the main job's section).
Everything public is importable from here.
"""

from __future__ import annotations

from nnsight_moe.recipes.blocking_conditions import evaluate
from nnsight_moe.recipes.blocking_configurations import configurations
# _chunks, _Data, _dataset: for super_experts and tests that build blocking's inputs
from nnsight_moe.recipes.blocking_data import ALL, _chunks, _Data, _dataset  # noqa: F401
from nnsight_moe.recipes.blocking_ranking import RANK_BY, Ranking, rank_experts
from nnsight_moe.recipes.blocking_results import BlockingResult, ConfigurationResult
from nnsight_moe.recipes.blocking_section import section
from nnsight_moe.recipes.blocking_sweep import BASELINES, random_pairs, sweep

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
