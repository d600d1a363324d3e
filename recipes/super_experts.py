"""Super experts and massive activations, after Su et al., "Unveiling Super Experts in MoE LLMs" (2025).

    maxima = activation_maxima(model, prompts, tokenizer=tok)     # per layer and expert: max |acts|, max |out|
    maxima.flagged                                                 # the outliers (criterion below)
    effect = blocking_effect(model, facts, maxima.flagged, seeds=5)   # flagged vs random experts blocked
    maxima.plot()

or ``python -m nnsight_moe.recipes.super_experts --model demo-moe``.

**Activations** (over every non-pad token that selected the expert): ``max_acts`` = max |input of the
expert's down projection| (``hook_expert_acts``, the neuron activations) and ``max_out`` = max |its
output| (``hook_expert_out``, before the gate weight); the shared expert's are reported as expert
``"shared"`` (``hook_shared_acts`` / ``hook_shared_out``). Experts no token selected have none.

**Criterion** (the paper's, on the down projection's output): with ``A`` the ``max_out`` of every
routed (layer, expert) that was selected, an expert is flagged when ``max_out > quantile(A, q)`` AND
``max_out > ratio * max(A)``, by default ``q = 0.995`` and ``ratio = 0.1``: an extreme value among all
experts that is also within an order of magnitude of the largest. With few experts (a tiny model) the
quantile is close to the maximum, so mostly the single largest expert is flagged.

**Effect**: the flagged experts are blocked (gate weight 0, :func:`nnsight_moe.block_experts` mode
``"zero"``) and the MRR / HIT@10 of the targets (:func:`nnsight_moe.recipes.blocking.evaluate`) and the
mean target log-probability, and locally the attention sink (mean attention weight on the first token,
:func:`attention_sink`), are compared with blocking as many random routed experts (drawn uniformly
among the others), over ``seeds`` draws. Everything also runs with ``remote=`` inside ``model.trace`` on
the unmodified model (:func:`nnsight_moe.remote.MoEView`), except the attention sink.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["BlockingEffect", "Maxima", "activation_maxima", "attention_sink", "blocking_effect", "figures_from_json", "flag", "section"]


@dataclass
class Maxima:
    """``rows``: ``{"layer", "expert" (int or "shared"), "tokens", "max_acts", "max_out", "flagged"}``;
    ``criterion``: ``{"quantile", "ratio", "threshold"}`` (threshold: the value max_out had to exceed)."""

    rows: list[dict]
    criterion: dict

    @property
    def flagged(self) -> list[tuple[int, int]]:
        """The flagged (layer, expert) pairs."""
        return [(r["layer"], r["expert"]) for r in self.rows if r["flagged"]]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def to_json(self) -> dict:
        return {"rows": self.rows, "criterion": self.criterion}

    @classmethod
    def from_json(cls, data: dict) -> "Maxima":
        return cls(list(data["rows"]), dict(data["criterion"]))

    def plot(self):
        """Scatter of max |down_proj output| (log scale) per MoE layer; flagged experts in red and named."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.6))
        routed = [r for r in self.rows if r["expert"] != "shared"]
        shared = [r for r in self.rows if r["expert"] == "shared"]
        jitter = lambda r: r["layer"] + (hash(str(r["expert"])) % 7 - 3) * 0.04  # noqa: E731
        ax.scatter([jitter(r) for r in routed], [r["max_out"] for r in routed], s=12, color="0.5", label="routed expert")
        if shared:
            ax.scatter([r["layer"] for r in shared], [r["max_out"] for r in shared], marker="s", s=18,
                       color="tab:blue", label="shared expert")
        hot = [r for r in routed if r["flagged"]]
        ax.scatter([jitter(r) for r in hot], [r["max_out"] for r in hot], s=30, color="tab:red", label="flagged")
        for r in hot:
            ax.annotate(f"L{r['layer']}E{r['expert']}", (jitter(r), r["max_out"]), fontsize=8)
        if self.criterion.get("threshold") is not None:
            ax.axhline(self.criterion["threshold"], color="tab:red", lw=0.8, ls="--")
        ax.set_yscale("log"), ax.set_xlabel("MoE layer"), ax.set_ylabel("max |down_proj output|")
        ax.set_title("Super-expert candidates: max output activation per expert"), ax.legend(fontsize=8)
        return fig


def _maxima_batch(state: dict, model: Any, batch: dict) -> dict:
    """Per MoE layer: max |acts| and |out| per expert [E] and of the shared expert, over this batch's tokens."""
    from nnsight_moe.recipes.runner import inputs, model_device

    seen, device = state["seen"], model_device(model)
    seen.clear()
    model(**{k: v.to(device) for k, v in inputs(batch).items()}, use_cache=False)
    keep = batch["attention_mask"].bool().to(device)
    out = {}
    for i in state["layers"]:
        idx = seen[(i, "hook_topk_indices")][keep].long().reshape(-1)
        E = state["n_experts"]
        entry = {"count": torch.bincount(idx, minlength=E)}
        for name, key in (("hook_expert_acts", "acts"), ("hook_expert_out", "out")):
            values = seen[(i, name)][keep].float().abs().amax(-1).reshape(-1)  # [n k]
            entry[key] = torch.zeros(E, device=values.device).scatter_reduce(0, idx, values, "amax")
        if (i, "hook_shared_out") in seen:
            entry["shared_acts"] = seen[(i, "hook_shared_acts")][keep].float().abs().max()
            entry["shared_out"] = seen[(i, "hook_shared_out")][keep].float().abs().max()
            entry["shared_count"] = int(keep.sum())
        out[i] = entry
    return out


def _maxima_in_trace(view: Any, model: Any, batch: dict) -> dict:
    """:func:`_maxima_batch` inside ``model.trace`` on the unmodified model (server side), through the view."""
    keep = batch["attention_mask"].bool()
    out = {}
    for layer in view.moe_layers:
        info = view.spec["layers"][layer]
        want = ("topk_indices", "expert_acts", "expert_out") + (("shared_acts", "shared_out") if info["shared"] else ())
        q = view.layer(layer, want=want)
        idx = q["topk_indices"][keep].long().reshape(-1)
        entry = {"count": torch.bincount(idx, minlength=info["n_experts"])}
        for name, key in (("expert_acts", "acts"), ("expert_out", "out")):
            values = q[name][keep].float().abs().amax(-1).reshape(-1)
            entry[key] = values.new_zeros(info["n_experts"]).scatter_reduce(0, idx, values, "amax")
        if info["shared"]:
            entry["shared_acts"] = q["shared_acts"][keep].float().abs().max()
            entry["shared_out"] = q["shared_out"][keep].float().abs().max()
            entry["shared_count"] = keep.sum()
        out[layer] = entry
    return out


def flag(values: Sequence[float], quantile: float = 0.995, ratio: float = 0.1) -> tuple[list[bool], float]:
    """The criterion of the module docstring on ``values``: (flag per value, the threshold to exceed)."""
    if not 0 < quantile < 1 or not 0 <= ratio <= 1:
        raise ValueError(f"quantile must be in (0, 1) and ratio in [0, 1], got {quantile!r}, {ratio!r}")
    if not len(values):
        return [], float("nan")
    a = torch.tensor([float(v) for v in values], dtype=torch.float64)
    threshold = max(float(torch.quantile(a, quantile)), ratio * float(a.max()))  # linear interpolation
    return [float(v) > threshold for v in a], threshold


@torch.no_grad()
def activation_maxima(model: Any, prompts: Sequence, *, tokenizer: Any = None, batch_size: int = 16,
                      padding_side: str | None = None, quantile: float = 0.995, ratio: float = 0.1,
                      remote: Any = None, results_path: Any = None) -> Maxima:
    """Per MoE layer and expert, max |down_proj input| and |output| over ``prompts``, and the flagged
    outliers (module docstring). Locally through the attached hooks (HF, TransformerBridge, nnsight), or
    with ``remote`` (``True``, ``"local"``, a host URL; an nnsight model) inside ``model.trace`` through
    :func:`nnsight_moe.remote.MoEView`, which recomputes each selected expert from its weights."""
    import nnsight_moe
    from nnsight_moe.hooks import TemporaryHooks
    from nnsight_moe.recipes.routing_trace import _batches
    from nnsight_moe.recipes.runner import run_batches

    hf = nnsight_moe.hf_model(model)
    batches = _batches(model, prompts, tokenizer, batch_size, padding_side)
    if remote is not None:
        from nnsight_moe.remote import MoEView

        layout = nnsight_moe.layout(hf)
        results = run_batches(model, batches, functools.partial(_maxima_in_trace, MoEView(model)), remote=remote,
                              results_path=results_path, progress=False, desc="activation maxima")
        return _maxima_of(layout, results, quantile, ratio)
    with nnsight_moe.attached(hf) as handle:
        layout = handle.layout
        state = {"seen": {}, "layers": list(layout.moe_layers), "n_experts": layout.n_experts}
        added = TemporaryHooks()
        for i in layout.moe_layers:
            names = ["hook_topk_indices", "hook_expert_acts", "hook_expert_out"]
            names += ["hook_shared_acts", "hook_shared_out"] if layout.layer(i).has_shared else []
            for name in names:
                added.add(handle.block(i)._modules[name],
                          lambda v, hook, key=(i, name): state["seen"].__setitem__(key, v.detach()))
        try:
            results = run_batches(hf, batches, functools.partial(_maxima_batch, state), desc="activation maxima",
                                  progress=False)
        finally:
            added.remove()
    return _maxima_of(layout, results, quantile, ratio)


def _maxima_of(layout: Any, results: list[dict], quantile: float, ratio: float) -> Maxima:
    """Per-batch maxima combined into :class:`Maxima`, with the criterion applied."""
    rows = []
    for i in layout.moe_layers:
        count = sum(r[i]["count"].cpu() for r in results)
        acts = torch.stack([r[i]["acts"].cpu() for r in results]).amax(0)
        out = torch.stack([r[i]["out"].cpu() for r in results]).amax(0)
        for e in range(layout.n_experts):
            if count[e]:
                rows.append({"layer": i, "expert": e, "tokens": int(count[e]), "max_acts": float(acts[e]),
                             "max_out": float(out[e]), "flagged": False})
        if "shared_out" in results[0][i]:
            rows.append({"layer": i, "expert": "shared", "tokens": sum(int(r[i]["shared_count"]) for r in results),
                         "max_acts": max(float(r[i]["shared_acts"]) for r in results),
                         "max_out": max(float(r[i]["shared_out"]) for r in results), "flagged": False})
    routed = [r for r in rows if r["expert"] != "shared"]
    flags, threshold = flag([r["max_out"] for r in routed], quantile, ratio)
    for r, f in zip(routed, flags):
        r["flagged"] = bool(f)
    return Maxima(rows, {"quantile": quantile, "ratio": ratio, "threshold": threshold})


@dataclass
class BlockingEffect:
    """``rows``: ``{"condition" ("none" / "flagged" / "random"), "seed", "experts", "mrr", "hit_at_10",
    "logprob", "attention_sink"}`` (mean target log-probability; mean attention on the first token, None when
    not measured); ``summary()``: random conditions as mean ± std."""

    rows: list[dict]

    def summary(self) -> dict:
        out = {}
        for condition in ("none", "flagged", "random"):
            rows = [r for r in self.rows if r["condition"] == condition]
            if rows:
                out[condition] = {}
                for m in ("mrr", "hit_at_10", "logprob", "attention_sink"):
                    values = torch.tensor([r[m] for r in rows if r.get(m) is not None], dtype=torch.float64)
                    if len(values):
                        out[condition][m] = {"mean": float(values.mean()), "n": len(values),
                                             "std": float(values.std()) if len(values) > 1 else 0.0}
        return out

    def table(self):
        import pandas as pd

        summary = self.summary()
        return pd.DataFrame({c: {m: (f"{v['mean']:.4g} ± {v['std']:.2g}" if v["n"] > 1 else f"{v['mean']:.4g}")
                                 for m, v in s.items()} for c, s in summary.items()})

    def to_json(self) -> dict:
        return {"rows": self.rows, "summary": self.summary()}

    @classmethod
    def from_json(cls, data: dict) -> "BlockingEffect":
        return cls(list(data["rows"]))


def _logprob_batch(model: Any, batch: dict) -> torch.Tensor:
    """Target log-probabilities at the last position of one batch (HF model, possibly with experts blocked)."""
    from nnsight_moe.recipes.runner import inputs, model_device

    device = model_device(model)
    logits = model(**{k: v.to(device) for k, v in inputs(batch).items()}).logits
    picked = logits[torch.arange(logits.shape[0], device=device), batch["last"].to(device)].float()
    return picked.log_softmax(-1).gather(-1, batch["target"].to(device)[:, None])[:, 0]


def _sink_batch(model: Any, batch: dict) -> torch.Tensor:
    """Per attention layer: summed attention weight on each row's first real token over the row's other real
    query positions (mean over heads), and the number of such queries (last entry)."""
    from nnsight_moe.recipes.runner import inputs, model_device

    device = model_device(model)
    out = model(**{k: v.to(device) for k, v in inputs(batch).items()}, output_attentions=True)
    mask = batch["attention_mask"].bool().to(device)
    first = mask.long().argmax(-1)  # first real position of each row (left or right padding)
    queries = mask.clone()
    queries[torch.arange(mask.shape[0], device=device), first] = False
    sums = []
    for attn in out.attentions:
        if attn is None:  # a layer without softmax attention (linear attention, SSM)
            continue
        to_first = attn.float().mean(1)[torch.arange(mask.shape[0], device=device), :, first]  # [b, q]
        sums.append((to_first * queries).sum())
    return torch.stack(sums + [queries.sum().float()]).cpu() if sums else torch.zeros(1)


def attention_sink(model: Any, prompts: Sequence, *, tokenizer: Any = None, batch_size: int = 16) -> float | None:
    """Mean attention weight on the first real token (the usual attention sink), over heads, layers with
    softmax attention and every other real query position of ``prompts``; computed with transformers'
    ``eager`` attention (which returns the weights). None when the model returns no attention weights."""
    import nnsight_moe
    from nnsight_moe.recipes import runner

    hf = nnsight_moe.hf_model(model)
    previous = getattr(hf.config, "_attn_implementation", None)
    try:
        hf.set_attn_implementation("eager")
        parts = runner.run(hf, prompts, _sink_batch, tokenizer=tokenizer, batch_size=batch_size, progress=False)
    except (ValueError, TypeError, AttributeError, NotImplementedError):
        return None  # the family cannot run eager attention / return attention weights
    finally:
        if previous is not None:
            hf.set_attn_implementation(previous)
    total = sum(parts)
    if total.numel() < 2 or float(total[-1]) == 0:
        return None
    return float(total[:-1].sum() / (total[-1] * (total.numel() - 1)))


def _logprob_in_trace(view: Any, blocked: dict, model: Any, batch: dict) -> Any:
    """Target log-probabilities at the last positions with ``blocked`` {layer: [experts]} zeroed, in a trace."""
    for layer in sorted(blocked):
        view.layer(layer, block=blocked[layer], mode="zero", want=("topk_weights",))
    last, target = batch["last"], batch["target"]
    picked = model.output.logits[torch.arange(last.shape[0]), last].float()
    return picked.log_softmax(-1).gather(-1, target[:, None])[:, 0]


def blocking_effect(model: Any, dataset: Any, flagged: Sequence[tuple[int, int]], *, tokenizer: Any = None,
                    seeds: int = 5, batch_size: int = 16, remote: Any = None, sinks: bool = True) -> BlockingEffect:
    """MRR / HIT@10 / mean target log-prob with nothing, the ``flagged`` experts, and ``seeds`` random sets of
    as many other routed experts blocked (mode ``"zero"``). ``dataset``: anything
    :func:`nnsight_moe.recipes.blocking.evaluate` accepts (EncodedFacts, ``(prompts, targets)``, ...).
    ``remote``: run inside ``model.trace`` (an nnsight model), blocking by editing the router's output.
    ``sinks`` (local only): also the mean attention weight on the first token (:func:`attention_sink`) per
    condition, the paper's attention-sink measure (None where not measured)."""
    import nnsight_moe
    from nnsight_moe.recipes import blocking, runner
    from nnsight_moe.recipes.metrics import hits_of_ranks, mrr_of_ranks
    from nnsight_moe.recipes.prompts import model_tokenizer

    tokenizer = model_tokenizer(model, tokenizer)
    hf = nnsight_moe.hf_model(model)
    layout = nnsight_moe.layout(hf)
    flagged = [(int(l), int(e)) for l, e in flagged]
    if not flagged:
        raise ValueError("no flagged experts to block")
    others = [(i, e) for i in layout.moe_layers for e in range(layout.layer(i).n_experts) if (i, e) not in flagged]
    if len(others) < len(flagged):
        raise ValueError(f"{len(flagged)} flagged experts but only {len(others)} others to draw a random baseline from")
    draws = [sorted(random.Random(f"super-experts:{s}").sample(others, len(flagged))) for s in range(seeds)]
    conditions = [[], flagged, *draws]
    ranks = blocking.evaluate(model, dataset, conditions, mode="zero", tokenizer=tokenizer, batch_size=batch_size,
                              progress=False, remote=remote)
    data = blocking._dataset(dataset, tokenizer)
    rows = []
    for c, pairs in enumerate(conditions):
        blocked: dict[int, list[int]] = {}
        for l, e in pairs:
            blocked.setdefault(l, []).append(e)
        options = {"tokenizer": tokenizer, "batch_size": batch_size, "per_prompt": {"target": data.targets},
                   "progress": False}
        if remote is not None:
            from nnsight_moe.remote import MoEView

            fn = functools.partial(_logprob_in_trace, MoEView(model), blocked)
            logprob = torch.cat(runner.run(model, data.prompts, fn, remote=remote, **options))
            sink = None  # attention weights are not read through a trace
        else:
            with nnsight_moe.block_experts(hf, blocked, mode="zero"):
                logprob = torch.cat(runner.run(hf, data.prompts, _logprob_batch, **options))
                sink = attention_sink(hf, data.prompts, tokenizer=tokenizer, batch_size=batch_size) if sinks else None
        condition = "none" if c == 0 else "flagged" if c == 1 else "random"
        rows.append({"condition": condition, "seed": max(c - 2, 0) if c > 1 else None, "experts": [list(p) for p in pairs],
                     "mrr": mrr_of_ranks(ranks[c]), "hit_at_10": hits_of_ranks(ranks[c], 10),
                     "logprob": float(logprob.mean()), "attention_sink": sink})
    return BlockingEffect(rows)


def section(job: Any):
    """The ``super_experts`` section of the main job: maxima on the recipes' prompts, flagged experts blocked
    against random ones (locally, or through ``model.trace`` with the job's ``remote``)."""
    from nnsight_moe.report import Section, json_value

    if not job.is_moe:
        return None
    note = f" Computed through nnsight with remote={job.remote!r}." if job.remote is not None else ""
    facts = job.sample()
    maxima = activation_maxima(job.model, facts.prompts, tokenizer=job.tokenizer, batch_size=job.batch_size,
                               remote=job.remote, results_path=job.results_path("super-experts"))
    data = {"maxima": maxima.to_json()}
    tables = {}
    flagged = maxima.flagged
    crit = maxima.criterion
    text = (f"Max |down_proj input| and |output| per expert over {len(facts)} prompts (non-pad tokens). Flagged: "
            f"max output above the {100 * crit['quantile']:g}th percentile of all routed experts' and above "
            f"{crit['ratio']:g} x the largest ({len(flagged)} flagged: {flagged}).")
    if flagged:
        effect = blocking_effect(job.model, facts, flagged, tokenizer=job.tokenizer, seeds=3 if job.quick else 5,
                                 batch_size=job.batch_size, remote=job.remote)
        data["blocking"] = effect.to_json()
        tables["Blocking the flagged experts vs as many random experts (zero mode)"] = effect.table()
        text += " Blocked (gate weight 0) against as many random routed experts, mean ± std over seeds."
    text += note
    frame = maxima.to_frame().sort_values("max_out", ascending=False).head(12).reset_index(drop=True)
    tables["Largest max |down_proj output| (top 12)"] = frame
    return Section("super_experts", "Super experts: massive down_proj activations", text, data=data, tables=tables,
                   figures=figures_from_json(json.loads(json.dumps(json_value(data)))))


def figures_from_json(data: dict) -> dict:
    """The section's figures ``{name: (title, figure)}`` from its results.json data alone (re-plotting)."""
    if "maxima" not in data:  # a skipped section
        return {}
    return {"super_experts_scatter": ("Max |down_proj output| per expert and layer",
                                      Maxima.from_json(data["maxima"]).plot())}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m nnsight_moe.recipes.super_experts --model NAME [--prompt TEXT ...]`` (default: bundled facts)."""
    import argparse

    from nnsight_moe import data as relation_data
    from nnsight_moe.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo-moe")
    parser.add_argument("--prompt", action="append", default=None)
    parser.add_argument("--quantile", type=float, default=0.995)
    parser.add_argument("--ratio", type=float, default=0.1)
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model)
    if args.prompt:
        prompts = args.prompt
    else:
        prompts = relation_data.encode_facts(tokenizer, [f for r in relation_data.bundled() for f in r.facts()][:200]).prompts
    maxima = activation_maxima(model, prompts, tokenizer=tokenizer, quantile=args.quantile, ratio=args.ratio)
    print(maxima.to_frame().sort_values("max_out", ascending=False).head(15).to_string())
    print(f"flagged: {maxima.flagged} (threshold {maxima.criterion['threshold']:.4g})")


if __name__ == "__main__":
    main()
