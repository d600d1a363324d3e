"""Held-out evaluation of a steering edit against random baselines: :func:`evaluate`, :func:`evaluate_direction`.

On held-out prompts, the conditions ``none``, ``steered`` and each random baseline (layer-matched random
experts, or random directions of the same norm) run stacked along the batch (:func:`nnsight_moe.steering.stack`);
per condition the target's log-prob, MRR and HIT@k, their change from ``none`` with percentile bootstrap CIs
over prompts, ``steered - random``, and a control set's fluency guard (its targets and its own text).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

import nnsight_moe
from nnsight_moe import steering
from nnsight_moe.attach import attached, hf_model
from nnsight_moe.recipes import runner
from nnsight_moe.recipes.prompts import model_tokenizer
from nnsight_moe.recipes.steering_data import Pair, _prompts_targets
from nnsight_moe.recipes.steering_results import SteeringResult

#: Expert edits :func:`evaluate` applies.
EDITS = ("off", "on", "scale")


def _scores(logits: Tensor, batch: dict) -> dict:
    """Per row: target log-prob and rank at the last position; summed next-token log-prob of the prompt's
    own text and the number of scored tokens (pairs of consecutive non-pad tokens)."""
    logp = logits.float().log_softmax(-1)
    rows = torch.arange(batch["last"].shape[0])
    last = logp[rows, batch["last"]]
    target = batch["target"]
    picked = last.gather(1, target[:, None])[:, 0]
    rank = (last > picked[:, None]).sum(-1) + 1
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    nxt = logp[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
    both = mask[:, :-1] & mask[:, 1:]
    return {"logprob": picked, "rank": rank, "text": (nxt * both).sum(-1), "tokens": both.sum(-1)}


def _stacked_local(plans: list, model: Any, batch: dict) -> dict:
    """Scores [C * b] of C plans stacked along the batch (condition-major) in one forward of the attached model."""
    plan = steering.stack(plans, len(batch["rows"]) // len(plans))
    with steering.steer(model, plan):
        logits = model(**runner.inputs(batch)).logits
    return {k: v.cpu() for k, v in _scores(logits, batch).items()}


def _stacked_traced(view: Any, plans: list, model: Any, batch: dict) -> dict:
    """As :func:`_stacked_local`, inside ``model.trace`` on the unmodified model (the plans ship as data)."""
    steering.apply_in_trace(view, model, steering.stack(plans, len(batch["rows"]) // len(plans)))
    return _scores(model.output.logits, batch)


def _condition_scores(model, prompts, targets, plans, *, tokenizer, batch_size, remote, max_rows) -> list[dict]:
    """Per plan, the per-prompt scores of ``prompts``: the plans stacked along the batch, at most ``max_rows``
    rows (plans x prompts) per forward (one forward per batch of prompts when ``max_rows >= len(plans)``)."""
    from nnsight_moe.recipes.prompts import vocab_size

    n = len(plans)
    per = max(1, min(batch_size, max_rows // n))
    device = runner.model_device(model) if remote is None else torch.device("cpu")
    batches = runner.make_batches(prompts, tokenizer=tokenizer, batch_size=per, per_prompt={"target": targets},
                                  device=device, vocab=vocab_size(model), model=model)
    stacked = [runner.repeat(batch, n) for batch in batches]
    if remote is None:
        hf = hf_model(model)
        with attached(hf):
            results = runner.run_batches(hf, stacked, functools.partial(_stacked_local, plans), progress=False)
    else:
        view = nnsight_moe.remote.MoEView(model)
        results = runner.run_batches(model, stacked, functools.partial(_stacked_traced, view, plans), remote=remote,
                                     progress=False)
    out = []
    for c in range(n):
        rows = [{k: v.view(n, -1)[c] for k, v in r.items()} for r in results]
        out.append({k: torch.cat([r[k] for r in rows]) for k in rows[0]})
    return out


def random_matched(model: Any, experts: Sequence[Pair], seed: int) -> list[Pair]:
    """As many random experts per layer as ``experts`` has there, none of ``experts`` (layer-matched)."""
    layout = nnsight_moe.layout(model)
    rng = random.Random(seed)
    chosen = set(experts)
    out = []
    per_layer: dict[int, int] = {}
    for layer, _ in experts:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    for layer, count in sorted(per_layer.items()):
        pool = [e for e in range(layout.layer(layer).n_experts) if (layer, e) not in chosen]
        if len(pool) < count:
            raise ValueError(f"layer {layer}: {count} steered experts leave only {len(pool)} others to draw from")
        out += [(layer, e) for e in sorted(rng.sample(pool, count))]
    return out


def _expert_plan(model, experts, edit, factor, margin, span) -> dict:
    grouped: dict[int, list[int]] = {}
    for layer, expert in experts:
        grouped.setdefault(layer, []).append(expert)
    if edit == "scale":
        return steering.plan(model, scale={l: {e: factor for e in ids} for l, ids in grouped.items()}, span=span)
    return steering.plan(model, **{edit: grouped}, margin=margin, span=span)


def _bootstrap(values: np.ndarray, n: int, rng: np.random.Generator) -> tuple[float, float]:
    """95% percentile bootstrap CI of the mean of ``values`` (resampling its entries)."""
    if len(values) == 0:
        return (float("nan"), float("nan"))
    idx = rng.integers(0, len(values), size=(n, len(values)))
    means = values[idx].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _metric_rows(scores: dict, k: int) -> dict[str, np.ndarray]:
    rank = scores["rank"].double().numpy()
    return {"logprob": scores["logprob"].double().numpy(), "rr": 1.0 / rank, "hit": (rank <= k).astype(np.float64)}


def evaluate(model: Any, heldout: Any, experts: Sequence[Pair], *, edit: str = "off", factor: float = 0.0,
             control: Any = None, seeds: int = 5, margin: float = 1.0, span: Any = None, k: int = 10,
             n_boot: int = 1000, seed: int = 0, tokenizer: Any = None, batch_size: int = 16, max_rows: int = 64,
             remote: Any = None) -> "SteeringResult":
    """Effect of steering ``experts`` on HELD-OUT prompts, against steering layer-matched random experts.

    Args:
        heldout: ``(prompts, targets)``, Relations or EncodedFacts not used to discover ``experts``.
        experts: ``[(layer, expert), ...]`` to steer (e.g. ``Discovery.top(n)``).
        edit: ``"off"`` / ``"on"`` (router-logit edits, :func:`nnsight_moe.steering.plan`) or ``"scale"``
            (gate weight times ``factor``).
        control: a second ``(prompts, targets)`` set for the fluency guard (None: none).
        seeds: random layer-matched expert sets (each steered the same way).
        span, margin: as :func:`nnsight_moe.steering.plan`. k: HIT@k.
        n_boot, seed: bootstrap resamples of prompts for the 95% CIs, and the seed of the random draws.
        batch_size, max_rows: the conditions (none, steered, each random draw) run stacked along the batch
            (per-row plans, :func:`nnsight_moe.steering.stack`), at most ``max_rows`` rows (conditions x
            prompts) and ``batch_size`` prompts per forward; raise ``max_rows`` on a GPU.
        remote: run in ``model.trace(..., remote=remote)`` on the unmodified model.

    Returns a :class:`SteeringResult`: per condition (``none``, ``steered``, ``random`` mean over seeds) the mean
    target log-prob, MRR and HIT@k, their change from ``none`` with CIs, ``steered - random`` with a CI, and
    the control set's target log-prob and text log-prob per token (fluency).
    """
    if edit not in EDITS:
        raise ValueError(f"edit must be one of {EDITS}, got {edit!r}")
    experts = [(int(l), int(e)) for l, e in experts]
    if not experts:
        raise ValueError("experts is empty: give at least one (layer, expert) pair to steer")
    _check_counts(seeds=seeds, max_rows=max_rows)
    tokenizer = model_tokenizer(model, tokenizer)
    prompts, targets = _prompts_targets(heldout, tokenizer, True)
    sets = {"heldout": (prompts, targets)}
    if control is not None:
        sets["control"] = _prompts_targets(control, tokenizer, True)
    randoms = [random_matched(model, experts, seed + s) for s in range(seeds)]
    meta = {"what": f"{edit} {len(experts)} experts {[list(p) for p in experts]}", "experts": [list(p) for p in experts],
            "edit": edit, "factor": factor, "margin": margin, "span": _span_meta(span)}
    return _evaluate(model, sets, _expert_plan(model, experts, edit, factor, margin, span),
                     [_expert_plan(model, pairs, edit, factor, margin, span) for pairs in randoms],
                     [{"experts": [list(p) for p in pairs]} for pairs in randoms], meta, k=k, n_boot=n_boot, seed=seed,
                     tokenizer=tokenizer, batch_size=batch_size, remote=remote, max_rows=max_rows)


def _check_counts(**counts: Any) -> None:
    """Each count (``seeds``, ``max_rows``) must be a positive integer; the first that is not is named."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _span_meta(span: Any) -> Any:
    return span if span is None or isinstance(span, (str, list, tuple)) else "mask"


def evaluate_direction(model: Any, heldout: Any, directions: dict, *, hook: str = "hook_moe_out", mode: str = "remove",
                       alpha: float = 1.0, control: Any = None, seeds: int = 5, span: Any = None, k: int = 10,
                       n_boot: int = 1000, seed: int = 0, tokenizer: Any = None, batch_size: int = 16,
                       max_rows: int = 64, remote: Any = None) -> "SteeringResult":
    """As :func:`evaluate`, for a direction edit (:func:`nnsight_moe.steering.plan` ``directions=``), against
    random directions: per layer a Gaussian direction with the same norm (``seeds`` draws, seeded by ``seed``)."""
    tokenizer = model_tokenizer(model, tokenizer)
    _check_counts(seeds=seeds, max_rows=max_rows)
    plan = steering.plan(model, directions=directions, hook=hook, mode=mode, alpha=alpha, span=span)
    sets = {"heldout": _prompts_targets(heldout, tokenizer, True)}
    if control is not None:
        sets["control"] = _prompts_targets(control, tokenizer, True)
    baselines = []
    for s in range(seeds):
        g = torch.Generator().manual_seed(seed + s)
        random_dirs = {}
        for layer, edit in sorted(plan["layers"].items()):
            d = edit["direction"]
            r = torch.randn(d.shape, generator=g)
            random_dirs[layer] = r * (d.norm() / r.norm())
        baselines.append(steering.plan(model, directions=random_dirs, hook=hook, mode=mode, alpha=alpha, span=span))
    meta = {"what": f"{mode} a direction at {hook} in layers {sorted(plan['layers'])}", "hook": hook, "mode": mode,
            "alpha": alpha, "span": _span_meta(span), "experts": []}
    return _evaluate(model, sets, plan, baselines, [{} for _ in baselines], meta, k=k, n_boot=n_boot, seed=seed,
                     tokenizer=tokenizer, batch_size=batch_size, remote=remote, max_rows=max_rows)


def _evaluate(model, sets, steered, baselines, baseline_info, meta, *, k, n_boot, seed, tokenizer, batch_size, remote,
              max_rows):
    """Score ``none``, ``steered`` and each baseline plan on every set; summaries with bootstrap CIs."""
    seeds = len(baselines)
    conditions = {"none": steering.plan(model), "steered": steered}
    for s, plan in enumerate(baselines):
        conditions[f"random{s}"] = plan
    options = {"tokenizer": tokenizer, "batch_size": batch_size, "remote": remote, "max_rows": max_rows}
    names = list(conditions)
    scored = {which: _condition_scores(model, p, t, [conditions[n] for n in names], **options)
              for which, (p, t) in sets.items()}
    raw = {name: {which: scored[which][c] for which in sets} for c, name in enumerate(names)}
    rng = np.random.default_rng(seed)
    base = {which: _metric_rows(raw["none"][which], k) for which in sets}

    def per_prompt(name, which):
        if name == "random":
            rows = [_metric_rows(raw[f"random{s}"][which], k) for s in range(seeds)]
            return {m: np.mean([r[m] for r in rows], axis=0) for m in rows[0]}
        return _metric_rows(raw[name][which], k)

    def fluency(name):
        names = [f"random{s}" for s in range(seeds)] if name == "random" else [name]
        per_token = [raw[n]["control"]["text"].double() / raw[n]["control"]["tokens"].clamp(min=1).double() for n in names]
        return torch.stack(per_token).mean(0).numpy()

    summary = []
    for name in ("none", "steered", "random"):
        row = {"condition": name}
        for which in sets:
            values = per_prompt(name, which)
            for m in ("logprob", "rr", "hit"):
                label = {"logprob": "logprob", "rr": "mrr", "hit": f"hit_at_{k}"}[m] + ("" if which == "heldout" else "_control")
                row[label] = float(values[m].mean())
                delta = values[m] - base[which][m]
                row[f"delta_{label}"] = float(delta.mean())
                row[f"delta_{label}_ci"] = list(_bootstrap(delta, n_boot, rng))
            if which == "control":
                text = fluency(name)
                row["text_logprob_control"] = float(text.mean())
                delta = text - fluency("none")
                row["delta_text_logprob_control"] = float(delta.mean())
                row["delta_text_logprob_control_ci"] = list(_bootstrap(delta, n_boot, rng))
        summary.append(row)
    steered_rows, rand = per_prompt("steered", "heldout"), per_prompt("random", "heldout")
    versus = {m: {"mean": float((steered_rows[m] - rand[m]).mean()),
                  "ci": list(_bootstrap(steered_rows[m] - rand[m], n_boot, rng))} for m in ("logprob", "rr", "hit")}
    per_seed = [{"seed": seed + s, **baseline_info[s],
                 "delta_logprob": float((_metric_rows(raw[f"random{s}"]["heldout"], k)["logprob"]
                                         - base["heldout"]["logprob"]).mean())} for s in range(seeds)]
    meta = {**meta, "k": k, "seeds": seeds, "n_boot": n_boot, "n_heldout": len(sets["heldout"][0]),
            "n_control": len(sets["control"][0]) if "control" in sets else 0}
    return SteeringResult(meta, summary, versus, per_seed)
