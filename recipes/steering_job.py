"""Relation steering end to end: ``nnsight-moe steer`` (:func:`run_steer`) and the main job's ``steering`` section."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nnsight_moe.recipes.steering_relations import relation_steering
from nnsight_moe.recipes.steering_results import _GOAL_TEXT, GOALS, RelationSteering


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
