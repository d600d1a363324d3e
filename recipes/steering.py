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

**Modules.** :mod:`~nnsight_moe.recipes.steering_data` (prompt sets, batching, units),
:mod:`~nnsight_moe.recipes.steering_discovery` (:func:`discover` and its tests),
:mod:`~nnsight_moe.recipes.steering_directions` (:func:`hook_means`, :func:`mean_difference`),
:mod:`~nnsight_moe.recipes.steering_evaluation` (:func:`evaluate`, :func:`evaluate_direction`),
:mod:`~nnsight_moe.recipes.steering_relations` (:func:`relation_steering`),
:mod:`~nnsight_moe.recipes.steering_results` (the result classes) and
:mod:`~nnsight_moe.recipes.steering_job` (``nnsight-moe steer`` and the main job's section).
Everything public is importable from here.
"""

from __future__ import annotations

from nnsight_moe.recipes.steering_directions import hook_means, mean_difference
from nnsight_moe.recipes.steering_discovery import bh_qvalues, discover, permutation_p
from nnsight_moe.recipes.steering_evaluation import (EDITS, _expert_plan, evaluate,  # noqa: F401  (_expert_plan: tests)
                                                     evaluate_direction, random_matched)
from nnsight_moe.recipes.steering_job import run_steer, section
from nnsight_moe.recipes.steering_relations import paired_targets, relation_steering
from nnsight_moe.recipes.steering_results import BY, GOALS, Discovery, RelationSteering, SteeringResult

__all__ = ["BY", "EDITS", "GOALS", "Discovery", "RelationSteering", "SteeringResult", "bh_qvalues", "discover",
           "evaluate", "evaluate_direction", "hook_means", "mean_difference", "paired_targets", "permutation_p", "random_matched",
           "relation_steering", "run_steer", "section"]
