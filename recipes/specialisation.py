"""Expert specialisation: which experts are enriched for which token ids, relations or user labels.

    trace = routing_stats.collect_routing(model, prompts, tokenizer=tok)
    spec = enrichment(trace, prompt_labels=relation_of_each_prompt)     # or labels=[one per token], or "token"
    spec.table()                      # significant (layer, expert, label) triples, strongest first
    spec.plot()                       # volcano: nPMI vs -log10 q

or ``python -m nnsight_moe.recipes.specialisation --model demo-moe --prompt "..." --label A ...``.

For every MoE layer l, expert e and label c, over the N non-pad tokens of the trace: ``K`` tokens carry
c, ``n`` tokens selected e (e in their top-k) and ``x`` tokens both. Under no association x follows the
hypergeometric distribution (N, K, n); the one-sided **p-value** is ``P(X >= x)``. **q-values** are
Benjamini-Hochberg over every tested triple (labels with at least ``min_support`` tokens, experts
selected at least once), so a q-value < alpha bounds the false discovery rate at alpha. The effect size
is **nPMI** = ``log(P(e, c) / (P(e) P(c))) / -log P(e, c)`` with shares of tokens (1: e only ever sees
c and c only ever goes to e, 0: independent, -1: never together).

**Stability**: the prompts are split into two halves (even and odd prompt numbers, so every token of a
prompt stays in one half) and the test is repeated in each; a significant triple is *replicated* when
its half-wise p-values are both < alpha. ``summary()`` gives the replicated share and the Spearman
correlation of the two halves' nPMI.

Tokens of one prompt are not independent draws; the hypergeometric test treats them as such (as the
peers' analyses do), which is why the half-split replication, by prompt, is reported next to it, and why
``method="permutation"`` with prompt labels shuffles the labels among whole prompts instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["METHODS", "Enrichment", "benjamini_hochberg", "enrichment", "npmi"]

#: The tests :func:`enrichment` can run.
METHODS = ("hypergeometric", "permutation")


def benjamini_hochberg(p: torch.Tensor) -> torch.Tensor:
    """BH q-values of p-values ``p`` (any shape): ``q_(i) = min_{j >= i} p_(j) m / j``, capped at 1."""
    flat = p.reshape(-1).double()
    m = flat.numel()
    if m == 0:
        return p.clone()
    order = flat.argsort()
    ranked = flat[order] * m / torch.arange(1, m + 1, dtype=torch.float64)
    ranked = ranked.flip(0).cummin(0).values.flip(0).clamp(max=1.0)
    q = torch.empty_like(flat)
    q[order] = ranked
    return q.reshape(p.shape).to(p.dtype)


def npmi(both: torch.Tensor, n_expert: torch.Tensor, n_label: torch.Tensor, n: int) -> torch.Tensor:
    """Normalised PMI from counts (broadcasting): -1 where ``both`` is 0, 1 for perfect association."""
    both, n_expert, n_label = both.double(), n_expert.double(), n_label.double()
    p_joint = both / n
    pmi = torch.log(p_joint) - torch.log(n_expert / n) - torch.log(n_label / n)
    value = pmi / -torch.log(p_joint)
    value = torch.where(both == 0, torch.full_like(value, -1.0), value)
    return torch.where(p_joint >= 1, torch.ones_like(value), value).float()  # joint share 1: total association


def _hypergeom_sf(x: torch.Tensor, n_total: int, n_label: torch.Tensor, n_expert: torch.Tensor) -> torch.Tensor:
    """P(X >= x) for X ~ Hypergeometric(N, K, n), elementwise."""
    from scipy.stats import hypergeom

    x, k, n = torch.broadcast_tensors(x, n_label, n_expert)
    return torch.from_numpy(hypergeom.sf(x.numpy() - 1, n_total, k.numpy(), n.numpy())).clamp(0, 1)


def _permutation_p(chosen: torch.Tensor, onehot: torch.Tensor, unit: torch.Tensor, permutations: int,
                   generator: torch.Generator) -> torch.Tensor:
    """P(X >= x) by permuting the labels among units (prompts, or tokens): ``(1 + #{both_perm >= both}) / (1 + P)``.

    ``chosen`` [L, N, E], ``onehot`` [N, C] (a unit's tokens share its label), ``unit`` [N] unit of each token.
    """
    n_units = int(unit.max()) + 1 if unit.numel() else 0
    per_unit = torch.zeros(chosen.shape[0], n_units, chosen.shape[2]).index_add_(1, unit, chosen)  # [L, U, E]
    labels = onehot.new_zeros(n_units, onehot.shape[1])
    labels[unit] = onehot  # every token of a unit carries the unit's label
    observed = torch.einsum("lue,uc->lec", per_unit, labels)
    exceed = torch.zeros_like(observed)
    for start in range(0, permutations, 64):
        size = min(64, permutations - start)
        orders = torch.stack([torch.randperm(n_units, generator=generator) for _ in range(size)])  # [P, U]
        both = torch.einsum("lue,puc->plec", per_unit, labels[orders])
        exceed += (both >= observed - 1e-9).sum(0)
    return (1 + exceed) / (1 + permutations)


def _counts(chosen: torch.Tensor, onehot: torch.Tensor):
    """(both [L, E, C], n_expert [L, E, 1], n_label [1, 1, C], N) from chosen [L, N, E] and labels [N, C]."""
    both = torch.einsum("lne,nc->lec", chosen, onehot)
    return both, chosen.sum(1)[:, :, None], onehot.sum(0)[None, None, :], chosen.shape[1]


@dataclass
class Enrichment:
    """One row per tested (layer, expert, label) triple; see the module docstring. ``frame`` columns:
    layer, expert, label, n_label, n_expert, both, expected, p, q, npmi, p_half1, p_half2, npmi_half1,
    npmi_half2, replicated (bool); ``what`` names the labels (``"token"``, ``"relation"``, ...)."""

    frame: Any  # pandas DataFrame
    what: str
    n_tokens: int
    alpha: float
    stored_summary: dict | None = None  # from results.json, where only the strongest rows may be kept

    def significant(self):
        """Rows with q < alpha and more co-occurrences than expected, strongest (lowest q, highest nPMI) first."""
        f = self.frame
        return f[(f.q < self.alpha) & (f.both > f.expected)].sort_values(["q", "npmi"], ascending=[True, False])

    def summary(self) -> dict:
        """Tested / significant / replicated counts, the replicated share and the halves' nPMI Spearman rho."""
        if self.stored_summary is not None:
            return dict(self.stored_summary)
        sig = self.significant()
        f = self.frame
        defined = f[["npmi_half1", "npmi_half2"]].dropna()
        rho = float(defined.npmi_half1.rank().corr(defined.npmi_half2.rank())) if len(defined) > 2 else float("nan")
        return {"what": self.what, "n_tokens": self.n_tokens, "alpha": self.alpha, "tested": int(len(f)),
                "significant": int(len(sig)), "replicated": int(sig.replicated.sum()),
                "replicated_share": float(sig.replicated.mean()) if len(sig) else float("nan"), "npmi_halves_spearman": rho}

    def table(self, top: int = 20):
        """The ``top`` strongest significant triples (a DataFrame for reports)."""
        cols = ["layer", "expert", "label", "n_label", "n_expert", "both", "expected", "npmi", "q", "replicated"]
        return self.significant()[cols].head(top).reset_index(drop=True)

    def to_json(self, top: int | None = None) -> dict:
        """``{"summary", "rows"}``: rows of every triple, or of the ``top`` with the lowest p (labels as str)."""
        rows = self.frame if top is None else self.frame.sort_values("p").head(top)
        rows = rows.assign(label=rows.label.astype(str))
        return {"summary": self.summary(), "what": self.what, "n_tokens": self.n_tokens, "alpha": self.alpha,
                "complete": top is None, "rows": rows.to_dict(orient="records")}

    @classmethod
    def from_json(cls, data: dict) -> "Enrichment":
        """Inverse of :meth:`to_json` (a ``top`` export keeps its rows and the summary of the full test)."""
        import pandas as pd

        frame = pd.DataFrame(data["rows"], columns=_COLUMNS)
        floats = [c for c in _COLUMNS if c.startswith(("p", "q", "npmi", "expected"))]
        frame[floats] = frame[floats].astype(float)  # null (undefined) -> NaN
        return cls(frame, data["what"], data["n_tokens"], data["alpha"],
                   None if data.get("complete") else data.get("summary"))

    def plot(self):
        """Volcano plot: nPMI (x) against -log10 q (y), significant triples coloured, the top 8 named."""
        import matplotlib.pyplot as plt

        f = self.frame
        fig, ax = plt.subplots(figsize=(7, 4))
        if len(f):
            y = -f.q.clip(lower=1e-300).apply(math.log10)
            sig = (f.q < self.alpha) & (f.both > f.expected)
            ax.scatter(f.npmi[~sig], y[~sig], s=8, color="0.7", label="not significant")
            ax.scatter(f.npmi[sig], y[sig], s=14, color="tab:red", label=f"q < {self.alpha}")
            for _, row in self.significant().head(8).iterrows():
                ax.annotate(f"L{row.layer}E{row.expert}:{str(row.label)[:14]}", (row.npmi, -math.log10(max(row.q, 1e-300))),
                            fontsize=7)
            ax.axhline(-math.log10(self.alpha), color="0.5", lw=0.8, ls="--")
            ax.legend(fontsize=8)
        ax.set_xlabel("nPMI (expert, label)"), ax.set_ylabel("-log10 q (BH)")
        ax.set_title(f"Expert enrichment for {self.what} labels ({self.n_tokens} tokens)")
        return fig


_COLUMNS = ["layer", "expert", "label", "n_label", "n_expert", "both", "expected", "p", "q", "npmi", "p_half1",
            "p_half2", "npmi_half1", "npmi_half2", "replicated"]


def _token_labels(trace: Any, labels: Any, prompt_labels: Any) -> list:
    if (labels is None) == (prompt_labels is None):
        raise ValueError("give exactly one of labels= (one per token of the trace, or 'token') and prompt_labels= "
                         "(one per prompt)")
    if prompt_labels is not None:
        prompt_labels = list(prompt_labels)
        need = int(trace.prompt.max()) + 1 if trace.n_tokens else 0
        if len(prompt_labels) < need:
            raise ValueError(f"prompt_labels has {len(prompt_labels)} entries but the trace has {need} prompts")
        return [prompt_labels[p] for p in trace.prompt.tolist()]
    if isinstance(labels, str):
        if labels != "token":
            raise ValueError(f"labels must be 'token' (the token ids) or a sequence with one label per token, got {labels!r}")
        return trace.tokens.tolist()
    labels = list(labels)
    if len(labels) != trace.n_tokens:
        raise ValueError(f"labels has {len(labels)} entries but the trace has {trace.n_tokens} tokens (one label each)")
    return labels


def enrichment(trace: Any, labels: Any = None, *, prompt_labels: Sequence | None = None, what: str | None = None,
               min_support: int = 5, alpha: float = 0.05, method: str = "hypergeometric", permutations: int = 1000,
               seed: int = 0) -> Enrichment:
    """Test every (MoE layer, expert, label) for enrichment (module docstring) on a routing trace.

    Args:
        trace: a :class:`~nnsight_moe.recipes.routing_stats.RoutingTrace` (pads already dropped).
        labels: one label per token (any hashable), or ``"token"`` for the token ids themselves.
        prompt_labels: instead of ``labels``, one label per prompt (e.g. its relation or domain).
        what: what the labels are, for tables and plots (default ``"token"`` / ``"label"``).
        min_support: labels carried by fewer tokens are not tested (they cannot reach significance).
        alpha: the FDR level for ``significant`` and the nominal level of the half-wise replication.
        method: ``"hypergeometric"`` (exact under independent tokens) or ``"permutation"``: the labels are
            shuffled ``permutations`` times among the PROMPTS when ``prompt_labels`` are given (each prompt's
            tokens move together, so dependence between tokens of a prompt is respected), else among the
            tokens; p = (1 + number of shuffles with at least as many co-occurrences) / (1 + permutations).
        seed: the permutations' random seed.
    """
    import pandas as pd

    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "permutation" and (isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1):
        raise ValueError(f"permutations must be an integer >= 1, got {permutations!r}")
    per_token = _token_labels(trace, labels, prompt_labels)
    what = what or ("token" if isinstance(labels, str) else "label")
    names = sorted(set(per_token), key=lambda v: (str(type(v)), v) if isinstance(v, (int, float, str)) else (str(v),))
    code = {name: i for i, name in enumerate(names)}
    ids = torch.tensor([code[v] for v in per_token], dtype=torch.long)
    onehot = torch.nn.functional.one_hot(ids, len(names)).float() if len(names) else torch.zeros(trace.n_tokens, 0)
    support = onehot.sum(0)
    tested = (support >= min_support).nonzero().reshape(-1)
    onehot, names = onehot[:, tested], [names[i] for i in tested.tolist()]
    chosen = torch.zeros(len(trace.layers), trace.n_tokens, trace.n_experts)
    chosen.scatter_(-1, trace.indices.long().cpu(), 1.0)
    generator = torch.Generator().manual_seed(seed)
    by_prompt = prompt_labels is not None

    def pvalues(chosen, onehot, prompt, counts):
        if method == "hypergeometric":
            both, n_exp, n_lab, n = counts
            return _hypergeom_sf(both, n, n_lab, n_exp)
        unit = torch.unique(prompt, return_inverse=True)[1] if by_prompt else torch.arange(prompt.numel())
        return _permutation_p(chosen, onehot, unit, permutations, generator)

    both, n_exp, n_lab, n = counts = _counts(chosen, onehot)
    p = pvalues(chosen, onehot, trace.prompt, counts)
    halves = []
    for parity in (0, 1):
        keep = (trace.prompt % 2) == parity
        hb, he, hl, hn = half = _counts(chosen[:, keep], onehot[keep])
        halves.append((pvalues(chosen[:, keep], onehot[keep], trace.prompt[keep], half) if hn else torch.ones_like(p),
                       npmi(hb, he, hl, hn) if hn else torch.full_like(p, float("nan"), dtype=torch.float32)))
    valid = (n_exp > 0).expand_as(both)  # experts never selected are not tested
    q = torch.full_like(p, float("nan"))
    q[valid] = benjamini_hochberg(p[valid])
    effect = npmi(both, n_exp, n_lab, n)
    li, ei, ci = valid.nonzero(as_tuple=True)
    half_p = [h[0].expand_as(p)[li, ei, ci] for h in halves]
    frame = pd.DataFrame({
        "layer": [trace.layers[i] for i in li.tolist()], "expert": ei.tolist(), "label": [names[i] for i in ci.tolist()],
        "n_label": n_lab.expand_as(both)[li, ei, ci].long().tolist(), "n_expert": n_exp.expand_as(both)[li, ei, ci].long().tolist(),
        "both": both[li, ei, ci].long().tolist(),
        "expected": (n_exp * n_lab / max(n, 1)).expand_as(both)[li, ei, ci].tolist(),
        "p": p[li, ei, ci].tolist(), "q": q[li, ei, ci].tolist(), "npmi": effect[li, ei, ci].tolist(),
        "p_half1": half_p[0].tolist(), "p_half2": half_p[1].tolist(),
        "npmi_half1": halves[0][1].expand_as(p)[li, ei, ci].tolist(),
        "npmi_half2": halves[1][1].expand_as(p)[li, ei, ci].tolist(),
    })
    frame["replicated"] = (frame.p_half1 < alpha) & (frame.p_half2 < alpha)
    return Enrichment(frame, what, n, alpha)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m nnsight_moe.recipes.specialisation --model NAME --prompt TEXT --label L [...]`` (or --tokens)."""
    import argparse

    from nnsight_moe.models import load_model
    from nnsight_moe.recipes.routing_stats import collect_routing

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo-moe")
    parser.add_argument("--prompt", action="append", required=True)
    parser.add_argument("--label", action="append", help="one label per --prompt (default: test token ids)")
    parser.add_argument("--min-support", type=int, default=5)
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model)
    trace = collect_routing(model, args.prompt, tokenizer=tokenizer)
    if args.label:
        if len(args.label) != len(args.prompt):
            parser.error(f"got {len(args.prompt)} --prompt but {len(args.label)} --label (one label per prompt)")
        result = enrichment(trace, prompt_labels=args.label, what="label", min_support=args.min_support)
    else:
        result = enrichment(trace, "token", min_support=args.min_support)
    print(result.summary())
    print(result.table().to_string())


if __name__ == "__main__":
    main()
