"""Recovery of planted ground truth: do attribution and blocking find the experts that hold a relation?

    from nnsight_moe.recipes import recovery
    out = recovery.measure()        # on nnsight_moe.demo.planted (seconds on a CPU)
    out["precision_at_k"], out["rows"]

On the planted model (:mod:`nnsight_moe.demo.planted`) every relation's facts are, by construction,
held by four routed experts (two in each of layers 1 and 2) and the shared experts carry a step every
relation needs. :func:`measure` splits each relation's subjects in two (:func:`~nnsight_moe.recipes.stats.split_facts`),
ranks experts on one half and scores the other:

* ``precision_at_k``: per relation, |top-k by attribution ∩ planted| / k with k = 4 (also by routing
  frequency), and the mean;
* blocking (gate weight 0) of the relation's planted experts vs N = 4 uniformly random routed experts
  (``seeds`` draws): MRR after blocking, the drop from the original, and ``floor``: the MRR with every
  routed expert off (the fact-free ordering the construction leaves);
* the shared-expert ablation (all layers) per relation.

:data:`THRESHOLDS` states what the tests (``tests/test_planted.py``) require.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

__all__ = ["THRESHOLDS", "measure", "section"]

#: What recovery must reach (asserted in tests/test_planted.py; the measured values are in the report).
THRESHOLDS = {
    "precision_at_k": 0.8,         # mean over relations, attribution ranking on the held-out split's complement
    "drop_ratio": 5.0,             # planted-block MRR drop >= 5x the random-block drop (mean over draws), per relation
    "floor_margin": 0.05,          # planted-block MRR <= floor + 0.05 (floor: every routed expert off)
    "routing_agreement": 0.95,     # the router itself picks the planted pair at the last token
}


def measure(seeds: int = 5, seed: int = 0, batch_size: int = 32) -> dict[str, Any]:
    """Recovery figures on the planted model (module docstring); a dict of plain numbers and tables."""
    from nnsight_moe import data
    from nnsight_moe.demo import planted
    from nnsight_moe.interventions import restrict_experts
    from nnsight_moe.recipes import blocking, stats
    from nnsight_moe.recipes.metrics import mrr_of_ranks

    model, tok = planted.load()
    truth = planted.ground_truth()
    relations = planted.relations()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoded = data.encode_facts(tok, [f for r in relations for f in r.facts()])
    rank_set, eval_set = stats.split_facts(encoded, seed=seed)
    precision = {}
    for by in ("attribution", "frequency"):
        ranking = blocking.rank_experts(model, rank_set, tokenizer=tok, by=by, batch_size=batch_size, progress=False)
        precision[by] = {}
        for r in relations:
            want = {tuple(p) for p in truth["experts"][r.name]}
            top = set(ranking.for_relation(r.name)[: len(want)])
            precision[by][r.name] = len(top & want) / len(want)
    layout_pairs = [(i, e) for i in range(planted.LAYERS) for e in range(planted.EXPERTS)]
    rows = []
    names = [f.relation for f in eval_set.facts]
    for r in relations:
        idx = [i for i, n in enumerate(names) if n == r.name]
        subset = eval_set.subset(idx)
        want = [tuple(p) for p in truth["experts"][r.name]]
        rng = random.Random(f"{seed}:{r.name}")
        draws = [sorted(rng.sample(layout_pairs, len(want))) for _ in range(seeds)]
        ranks = blocking.evaluate(model, subset, [[], want, *draws], tokenizer=tok, batch_size=batch_size,
                                  progress=False)
        with restrict_experts(model, 0):
            floor_ranks = blocking.evaluate(model, subset, [[]], tokenizer=tok, progress=False)[0]
        with restrict_experts(model, shared=False):
            shared_ranks = blocking.evaluate(model, subset, [[]], tokenizer=tok, progress=False)[0]
        original, blocked = mrr_of_ranks(ranks[0]), mrr_of_ranks(ranks[1])
        random_mrr = [mrr_of_ranks(x) for x in ranks[2:]]
        random_mean = sum(random_mrr) / len(random_mrr)
        rows.append({"relation": r.name, "n_prompts": len(idx), "original": original, "planted blocked": blocked,
                     "random blocked (mean)": random_mean, "floor (routed off)": mrr_of_ranks(floor_ranks),
                     "shared ablated": mrr_of_ranks(shared_ranks), "planted drop": original - blocked,
                     "random drop": original - random_mean,
                     "random hits planted": sum(len(set(d) & set(want)) for d in draws) / len(draws)})
    return {"precision_at_k": {by: {**p, "mean": sum(p.values()) / len(p)} for by, p in precision.items()},
            "k": 4, "rows": rows, "routing_agreement": planted.routing_agreement(model, tok),
            "n_rank_facts": len(rank_set), "n_eval_facts": len(eval_set), "seeds": seeds, "thresholds": THRESHOLDS,
            "weights_bytes": truth["weights_bytes"]}


def section(job: Any):
    """The ``recovery`` section of the main job: the planted model's figures (independent of ``job``'s model)."""
    import pandas as pd

    from nnsight_moe.report import Section

    if getattr(job, "quick", False):
        reason = "skipped in --quick runs; recovery.measure() or a full run computes it (about half a minute on a CPU)"
        return Section("recovery", "Validation: recovery of planted experts (skipped)", reason + ".",
                       data={"skipped": reason})
    out = measure()
    table = pd.DataFrame(out["rows"]).set_index("relation")
    precision = pd.DataFrame(out["precision_at_k"]).T
    t = out["thresholds"]
    text = ("A validation of the recipes on planted ground truth (nnsight_moe.demo.planted, independent of the model "
            "of this job): by construction each relation is held by 4 routed experts and the shared experts carry a "
            "step every relation needs. Experts ranked on half the subjects, blocking scored on the other half. "
            f"precision@4 (attribution) {out['precision_at_k']['attribution']['mean']:.2f} "
            f"(threshold {t['precision_at_k']}); router picks the planted pair {out['routing_agreement']:.0%} of the time; "
            f"planted-block MRR drop / random-block drop >= {t['drop_ratio']} and planted-block MRR <= floor + "
            f"{t['floor_margin']} are the tested thresholds.")
    return Section("recovery", "Validation: recovery of planted experts", text, data=out,
                   tables={"precision@k of the expert ranking vs the planted experts (k = 4)": precision,
                           "MRR after blocking planted vs random experts (held-out subjects)": table})
