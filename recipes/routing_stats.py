"""Routing statistics over a prompt set: load, entropy, imbalance, co-activation, transitions.

    trace = collect_routing(model, prompts, tokenizer=tok)          # per-token routing, pads dropped
    stats = routing_stats(trace)                                     # pure tensor maths on the trace
    stats.to_frame()                                                 # one row per MoE layer
    stats.plot_load(); stats.plot_coactivation(); stats.plot_transitions()
    gen = generation_routing(model, prompts, tokenizer=tok, max_new_tokens=16)   # tokens `generate` produced

or ``python -m nnsight_moe.recipes.routing_stats --model demo-moe --prompt "..."``.

What is measured (N non-pad tokens, E experts, k the top-k; every count over non-pad tokens only):

* **load** ``[L, E]``: share of routed slots that went to each expert (``count / (N k)``, rows sum to 1);
* **load entropy**: ``H(load) / log E`` (1 = perfectly balanced, 0 = one expert takes everything);
* **imbalance**: ``max(load) / mean(load) = E · max(load)`` (1 = balanced);
* **router entropy**: per token, the entropy (nats) of the router's distribution ``p`` over experts,
  averaged over tokens; ``p`` is the family's selection scores normalised to sum 1 (the softmax for
  softmax routers; sigmoid scores divided by their sum), or ``softmax(router_logits)`` when a family's
  scores can be negative;
* **top-k mass**: per token, the share of ``p`` that the selected experts hold, averaged;
* **dead** experts never selected; **cold** experts with ``load < cold / E`` (default a tenth of uniform);
* **co-activation** ``[L, E, E]``: tokens that selected both i and j (the diagonal: tokens that selected
  i), and **lift** ``P(i, j) / (P(i) P(j))`` with ``P`` shares of tokens (1 = independent; undefined,
  NaN, when i or j is never selected);
* **transitions** ``[L-1, E, E]``: tokens whose top-1 expert (largest gate weight) is i at a MoE layer
  and j at the next MoE layer.

* **gate sum**: per token, the sum of the top-k gate weights the model multiplies in (``hook_topk_weights``),
  averaged (1 for families that renormalise; a scaling factor for those that scale).

The per-token routing (local, or ``remote=`` inside ``model.trace``) is collected by
:mod:`nnsight_moe.recipes.routing_trace`, re-exported here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from nnsight_moe.recipes.routing_trace import (RoutingTrace, collect_routing, generation_routing, token_stats,
                                               trace_from_json, trace_to_json)

__all__ = ["RoutingStats", "RoutingTrace", "collect_routing", "figures_from_json", "generation_routing", "routing_stats",
           "section", "token_stats"]


# ------------------------------------------------------------------------------------ statistics
@dataclass
class RoutingStats:
    """Routing statistics of one :class:`RoutingTrace` (see the module docstring for every definition).

    Tensors: ``counts`` [L, E] tokens that selected each expert, ``load`` [L, E], ``load_entropy`` /
    ``imbalance`` / ``router_entropy`` / ``topk_mass`` / ``gate_sum`` [L], ``coactivation`` [L, E, E] (int),
    ``lift`` [L, E, E] (NaN: undefined), ``transitions`` [L-1, E, E] (int). ``dead`` / ``cold``: per
    layer the list of expert ids.
    """

    layers: list[int]
    n_experts: int
    top_k: int
    n_tokens: int
    counts: Tensor
    load: Tensor
    load_entropy: Tensor
    imbalance: Tensor
    router_entropy: Tensor
    topk_mass: Tensor
    gate_sum: Tensor
    coactivation: Tensor
    lift: Tensor
    transitions: Tensor
    dead: list[list[int]]
    cold: list[list[int]]
    cold_threshold: float = 0.1
    meta: dict = field(default_factory=dict)

    _TENSORS = ("counts", "load", "load_entropy", "imbalance", "router_entropy", "topk_mass", "gate_sum", "coactivation",
                "lift", "transitions")

    def to_json(self) -> dict:
        """Plain JSON data (NaN kept as float NaN; ``report.json_value`` writes it as null)."""
        out = {name: getattr(self, name).tolist() for name in self._TENSORS}
        out.update(layers=self.layers, n_experts=self.n_experts, top_k=self.top_k, n_tokens=self.n_tokens,
                   dead=self.dead, cold=self.cold, cold_threshold=self.cold_threshold, meta=self.meta)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "RoutingStats":
        """Inverse of :meth:`to_json` (also from results.json, where NaN was written as null)."""
        def tensor(name):
            value = _nulls_to_nan(data[name])
            kind = torch.long if name in ("counts", "coactivation", "transitions") else torch.float32
            return torch.tensor(value, dtype=kind)

        return cls(data["layers"], data["n_experts"], data["top_k"], data["n_tokens"],
                   **{name: tensor(name) for name in cls._TENSORS}, dead=data["dead"], cold=data["cold"],
                   cold_threshold=data["cold_threshold"], meta=data.get("meta", {}))

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` (strict JSON, atomically); read back with :meth:`from_file`."""
        from nnsight_moe.files import atomic_write
        from nnsight_moe.report import json_value

        atomic_write(Path(path), json.dumps(json_value(self.to_json())))
        return Path(path)

    @classmethod
    def from_file(cls, path: str | Path) -> "RoutingStats":
        """Read a file written by :meth:`save`."""
        return cls.from_json(json.loads(Path(path).read_text()))

    def to_frame(self):
        """One row per MoE layer: tokens, load entropy, imbalance, router entropy, top-k mass, gate sum, dead, cold."""
        import pandas as pd

        return pd.DataFrame({
            "layer": self.layers, "tokens": self.n_tokens, "load_entropy": self.load_entropy.tolist(),
            "imbalance": self.imbalance.tolist(), "router_entropy": self.router_entropy.tolist(),
            "topk_mass": self.topk_mass.tolist(), "gate_sum": self.gate_sum.tolist(), "dead": [len(d) for d in self.dead],
            "cold": [len(c) for c in self.cold],
        }).set_index("layer")

    def plot_load(self):
        """Load heatmap (layer x expert) next to load entropy / router entropy / imbalance per layer."""
        import matplotlib.pyplot as plt

        fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 1.5 + 0.4 * len(self.layers)),
                                     gridspec_kw={"width_ratios": [2, 1]})
        image = ax.imshow(self.load.numpy(), aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(self.layers)), self.layers)
        ax.set_xlabel("expert"), ax.set_ylabel("MoE layer"), ax.set_title("load (share of routed slots)")
        fig.colorbar(image, ax=ax)
        bx.plot(self.load_entropy.numpy(), self.layers, "o-", label="load entropy / log E")
        bx.plot((self.router_entropy / math.log(self.n_experts)).numpy(), self.layers, "s-",
                label="router entropy / log E")
        bx.plot(self.topk_mass.numpy(), self.layers, "^-", label="top-k mass")
        bx.set_yticks(self.layers), bx.invert_yaxis(), bx.set_xlim(0, 1.05), bx.set_xlabel("value"), bx.legend(fontsize=7, loc="lower left")
        twin = bx.twiny()
        twin.plot(self.imbalance.numpy(), self.layers, "x--", color="tab:red")
        twin.set_xlabel("imbalance max/mean (red)", color="tab:red")
        fig.tight_layout()
        return fig

    def plot_coactivation(self, layers: Sequence[int] | None = None):
        """log2 lift heatmaps of within-layer co-activation (up to 4 layers; default the first 4)."""
        import matplotlib.pyplot as plt

        chosen = list(layers) if layers is not None else self.layers[:4]
        fig, axes = plt.subplots(1, len(chosen), figsize=(3.4 * len(chosen) + 1, 3.2), squeeze=False)
        for ax, layer in zip(axes[0], chosen):
            lift = self.lift[self.layers.index(layer)].clone()
            lift.fill_diagonal_(float("nan"))
            image = ax.imshow(torch.log2(lift).numpy(), cmap="RdBu_r", vmin=-3, vmax=3)
            ax.set_title(f"layer {layer}: log2 lift"), ax.set_xlabel("expert"), ax.set_ylabel("expert")
        fig.colorbar(image, ax=list(axes[0]), shrink=0.8)
        return fig

    def plot_transitions(self, pairs: Sequence[int] | None = None):
        """Top-1 transition heatmaps (rows: expert at a MoE layer, columns: at the next), row-normalised."""
        import matplotlib.pyplot as plt

        if not len(self.transitions):
            fig, ax = plt.subplots(figsize=(4, 1))
            ax.text(0.5, 0.5, "one MoE layer: no transitions", ha="center"), ax.axis("off")
            return fig
        chosen = list(pairs) if pairs is not None else list(range(min(4, len(self.transitions))))
        fig, axes = plt.subplots(1, len(chosen), figsize=(3.4 * len(chosen) + 1, 3.2), squeeze=False)
        for ax, t in zip(axes[0], chosen):
            counts = self.transitions[t].float()
            image = ax.imshow((counts / counts.sum(-1, keepdim=True).clamp(min=1)).numpy(), cmap="magma", vmin=0, vmax=1)
            ax.set_title(f"top-1: layer {self.layers[t]} -> {self.layers[t + 1]}", fontsize=9)
            ax.set_xlabel(f"expert at {self.layers[t + 1]}"), ax.set_ylabel(f"expert at {self.layers[t]}")
        fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="P(next | this)")
        return fig


def _nulls_to_nan(value):
    if value is None:
        return float("nan")
    if isinstance(value, list):
        return [_nulls_to_nan(v) for v in value]
    return value


def routing_stats(trace: RoutingTrace, *, cold: float = 0.1) -> RoutingStats:
    """The statistics of the module docstring for ``trace`` (pure tensor maths, any device)."""
    if not 0 <= cold <= 1:
        raise ValueError(f"cold must be a share of the uniform load in [0, 1], got {cold!r}")
    if trace.n_tokens == 0:
        raise ValueError("the routing trace holds no token (every position was padding)")
    E, n, k = trace.n_experts, trace.n_tokens, trace.top_k
    chosen = torch.zeros(len(trace.layers), n, E)
    chosen.scatter_(-1, trace.indices.long().cpu(), 1.0)  # [L, N, E]: token selected expert
    counts = chosen.sum(1)
    load = counts / (n * k)
    logs = torch.where(load > 0, load.clamp(min=1e-30).log(), torch.zeros_like(load))
    load_entropy = -(load * logs).sum(-1) / math.log(E)
    co = torch.einsum("lni,lnj->lij", chosen, chosen)
    share = counts / n
    lift = (co / n) / (share[:, :, None] * share[:, None, :])
    lift = torch.where((share[:, :, None] > 0) & (share[:, None, :] > 0), lift, torch.full_like(lift, float("nan")))
    top1 = trace.top1().long().cpu()
    hot = torch.nn.functional.one_hot(top1, E).float()  # [L, N, E]
    transitions = torch.einsum("lni,lnj->lij", hot[:-1], hot[1:]) if len(trace.layers) > 1 else torch.zeros(0, E, E)
    return RoutingStats(
        layers=list(trace.layers), n_experts=E, top_k=k, n_tokens=n, counts=counts.long(), load=load,
        load_entropy=load_entropy, imbalance=load.max(-1).values * E, router_entropy=trace.entropy.float().mean(-1).cpu(),
        topk_mass=trace.mass.float().mean(-1).cpu(), gate_sum=trace.weights.float().sum(-1).mean(-1).cpu(), coactivation=co.long(), lift=lift, transitions=transitions.long(),
        dead=[(c == 0).nonzero().reshape(-1).tolist() for c in counts],
        cold=[(row < cold / E).nonzero().reshape(-1).tolist() for row in load], cold_threshold=cold,
    )


# ------------------------------------------------------------------------------------ job section
def section(job: Any):
    """The ``routing`` section of the main job: statistics on the recipes' prompts, a per-token view,
    specialisation per relation and generation-time routing (local runs)."""
    from nnsight_moe.recipes import specialisation
    from nnsight_moe.recipes.token_view import token_view
    from nnsight_moe.report import Section

    if not job.is_moe:
        return None
    facts = job.sample()
    prompts = facts.prompts
    trace = job.stage("routing-trace", lambda: collect_routing(
        job.model, prompts, tokenizer=job.tokenizer, batch_size=job.batch_size, remote=job.remote,
        results_path=job.results_path("routing")), trace_to_json, trace_from_json)
    stats = routing_stats(trace)
    relation = [f.relation for f in facts.facts]
    spec = specialisation.enrichment(trace, [relation[p] for p in trace.prompt.tolist()], what="relation")
    data = {"stats": stats.to_json(), "specialisation": spec.to_json(top=None if len(spec.frame) <= 5000 else 5000)}
    tables = {"Routing statistics per MoE layer": stats.to_frame(),
              "Experts enriched for a relation (hypergeometric, BH q < 0.05)": spec.table(top=15)}
    text = (f"{stats.n_tokens} non-pad tokens of {len(prompts)} relation prompts (padding masked). Load: share "
            "of routed slots; lift: P(i, j) / (P(i) P(j)); transitions: top-1 expert at consecutive MoE layers; "
            "specialisation: hypergeometric enrichment of each expert's tokens for each relation, BH-corrected, "
            "with stability across the two halves of the prompts.")
    if job.remote is None:
        gen, _ = generation_routing(job.model, prompts[: 8 if job.quick else 16], tokenizer=job.tokenizer,
                                    max_new_tokens=4 if job.quick else 8, batch_size=job.batch_size)
        if gen.n_tokens:
            gstats = routing_stats(gen)
            data["generation"] = gstats.to_json()
            tables["Generation-time routing (tokens produced by generate)"] = gstats.to_frame()
    else:
        text += " Computed through nnsight with remote={!r}; generation-time routing is local only.".format(job.remote)
    from nnsight_moe.report import json_value

    figures = figures_from_json(json.loads(json.dumps(json_value(data))))  # what re-plotting results.json gives
    html = {"token_view": "<h3>Per-token routing (top-1 expert per MoE layer; hover for weights)</h3>"
                          + token_view(trace, job.tokenizer, max_prompts=12)}
    return Section("routing", "Routing statistics and expert specialisation", text, data=data, tables=tables,
                   figures=figures, html=html)


def figures_from_json(data: dict) -> dict:
    """The section's figures ``{name: (title, figure)}`` from its results.json data alone (re-plotting)."""
    from nnsight_moe.recipes.specialisation import Enrichment

    stats = RoutingStats.from_json(data["stats"])
    spec = Enrichment.from_json(data["specialisation"])
    return {"routing_load": ("Expert load, load entropy, router entropy and imbalance per MoE layer", stats.plot_load()),
            "routing_coactivation": ("Within-layer co-activation (log2 lift)", stats.plot_coactivation()),
            "routing_transitions": ("Top-1 expert transitions between consecutive MoE layers", stats.plot_transitions()),
            "specialisation_volcano": ("Expert specialisation for relations: nPMI vs -log10 q", spec.plot())}


# ------------------------------------------------------------------------------------ command line
def main(argv: Sequence[str] | None = None) -> None:
    """``python -m nnsight_moe.recipes.routing_stats --model NAME --prompt TEXT [--prompt ...] [--out FILE]``."""
    import argparse

    from nnsight_moe.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo-moe")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for more)")
    parser.add_argument("--generate", type=int, default=0, help="also routing of N generated tokens per prompt")
    parser.add_argument("--out", default=None, help="write the statistics as JSON here")
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model)
    stats = routing_stats(collect_routing(model, args.prompt, tokenizer=tokenizer))
    print(stats.to_frame().to_string())
    if args.generate:
        gen, produced = generation_routing(model, args.prompt, tokenizer=tokenizer, max_new_tokens=args.generate)
        print("generation-time routing:\n" + routing_stats(gen).to_frame().to_string())
    if args.out:
        print(f"wrote {stats.save(args.out)}")


if __name__ == "__main__":
    main()
