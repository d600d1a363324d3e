"""Steering between two relations, held out: :func:`relation_steering` and :func:`paired_targets`.

The experts linked to one relation against another (discovered on half of each relation's facts) are forced
ON in the other relation's held-out prompts (``toward``: scored on the first relation's answers for the same
subjects) and OFF in the first relation's held-out prompts (``suppress``), against random experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from nnsight_moe.recipes.prompts import model_tokenizer
from nnsight_moe.recipes.steering_discovery import discover
from nnsight_moe.recipes.steering_evaluation import evaluate
from nnsight_moe.recipes.steering_results import GOALS, RelationSteering


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


def _split(indices: list[int]) -> tuple[list[int], list[int]]:
    """Even positions for discovery, odd ones held out (deterministic)."""
    return indices[0::2], indices[1::2]
