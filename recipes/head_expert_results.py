"""The results of :mod:`nnsight_moe.recipes.head_expert`: tables, plots and a JSON round trip.

* :class:`HeadExpertResult` (what :func:`~nnsight_moe.recipes.head_expert.correlate` returns): Pearson r,
  p and BH q per (head, expert) pair, the summary coefficient and its permutation p-value, a heatmap;
* :class:`CausalResult` (what :func:`~nnsight_moe.recipes.head_expert.causal` returns): MRR drop, recovery
  by router patching and router-probability changes per condition (top-K heads vs random heads).

Both are importable from :mod:`nnsight_moe.recipes.head_expert` too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

__all__ = ["CausalResult", "HeadExpertResult"]


@dataclass
class HeadExpertResult:
    """Head × expert correlation. ``pairs`` has one row per (head layer, head, expert layer, expert)."""

    pairs: pd.DataFrame
    summary_r: float
    summary_p: float
    top_heads: list[tuple[int, int]]
    top_experts: list[tuple[int, int]]
    signal: str
    n_prompts: int
    definition: str = field(default=(
        "summary_r = Pearson r across prompts between the summed attribution of the top-K heads and the "
        "summed expert signal of the top-K experts (heads and experts ranked by mean attribution); "
        "p from a permutation test"))

    def to_frame(self) -> pd.DataFrame:
        """All pairs: head_layer, head, expert_layer, expert, r, p, q (BH)."""
        return self.pairs.copy()

    def strongest(self, n: int = 10, q: float = 0.05) -> pd.DataFrame:
        """The ``n`` pairs with the largest |r| among those with BH q-value below ``q``."""
        sig = self.pairs[self.pairs["q"] < q]
        return sig.reindex(sig["r"].abs().sort_values(ascending=False).index).head(n)

    def to_json(self) -> dict:
        """Compact summary for results.json (strongest pairs, summary coefficient and its definition)."""
        return {
            "signal": self.signal, "n_prompts": self.n_prompts, "summary_r": self.summary_r,
            "summary_p": self.summary_p, "definition": self.definition,
            "top_heads": self.top_heads, "top_experts": self.top_experts,
            "n_pairs": int(self.pairs["r"].notna().sum()),
            "n_significant": int((self.pairs["q"] < 0.05).sum()),
            "strongest": self.strongest().to_dict(orient="records"),
        }

    def to_dict(self) -> dict:
        """Everything, JSON-ready (read back by :meth:`from_dict`)."""
        return {"pairs": self.pairs.to_dict(orient="split"), "summary_r": self.summary_r, "summary_p": self.summary_p,
                "top_heads": [list(h) for h in self.top_heads], "top_experts": [list(e) for e in self.top_experts],
                "signal": self.signal, "n_prompts": self.n_prompts, "definition": self.definition}

    @classmethod
    def from_dict(cls, data: dict) -> "HeadExpertResult":
        """The result :meth:`to_dict` wrote."""
        split = data["pairs"]
        pairs = pd.DataFrame(split["data"], index=split["index"], columns=split["columns"])
        return cls(pairs, data["summary_r"], data["summary_p"], [tuple(h) for h in data["top_heads"]],
                   [tuple(e) for e in data["top_experts"]], data["signal"], data["n_prompts"], data["definition"])

    def save(self, path: str | Path) -> Path:
        """Save as JSON (pairs included)."""
        path = Path(path)
        data = self.to_json() | {"pairs": self.pairs.to_dict(orient="list")}
        path.write_text(json.dumps(data, default=float))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "HeadExpertResult":
        """Inverse of :meth:`save`."""
        data = json.loads(Path(path).read_text())
        return cls(pd.DataFrame(data["pairs"]), data["summary_r"], data["summary_p"],
                   [tuple(h) for h in data["top_heads"]], [tuple(e) for e in data["top_experts"]],
                   data["signal"], data["n_prompts"], data["definition"])

    def plot(self):
        """Heatmap of r: rows heads (layer.head), columns experts (layer.expert)."""
        import matplotlib.pyplot as plt

        grid = self.pairs.pivot_table(index=["head_layer", "head"], columns=["expert_layer", "expert"], values="r")
        fig, ax = plt.subplots(figsize=(min(14, 2 + 0.25 * grid.shape[1]), min(12, 1.5 + 0.22 * grid.shape[0])))
        image = ax.imshow(grid.to_numpy(dtype=float), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ax.set_yticks(range(grid.shape[0]), [f"L{l}.H{h}" for l, h in grid.index], fontsize=6)
        ax.set_xticks(range(grid.shape[1]), [f"L{l}.E{e}" for l, e in grid.columns], fontsize=6, rotation=90)
        ax.set_title(f"Head × expert Pearson r across prompts ({self.signal}); blank: l_head > l_expert or constant")
        fig.colorbar(image, ax=ax, label="Pearson r")
        return fig


@dataclass
class CausalResult:
    """Effects of suppressing heads, and recovery by router patching. ``rows``: one per condition."""

    rows: pd.DataFrame
    heads: list[tuple[int, int]]

    def to_frame(self) -> pd.DataFrame:
        """Columns: condition, seed, mrr_clean, mrr_suppressed, mrr_drop, mrr_patched, recovered_pct,
        d_prob_correlated, d_prob_selected."""
        return self.rows.copy()

    def summary(self) -> pd.DataFrame:
        """Mean, std and ``n`` per condition (top-K heads vs random heads) and metric.

        ``n`` counts the seeds where the metric is defined: ``recovered_pct`` is undefined (NaN, null
        in JSON) for a seed whose suppression did not lower the MRR, and mean / std skip those seeds.
        """
        numeric = self.rows.drop(columns=["seed"]).groupby("condition", sort=False)
        return numeric.agg(["mean", "std", "count"]).rename(columns={"count": "n"}, level=1)

    def summary_json(self) -> dict:
        """``{condition: {metric: {"mean", "std", "n", "of"}}}``: ``n`` of ``of`` seeds defined."""
        table, sizes = self.summary(), self.rows.groupby("condition", sort=False).size()
        return {condition: {metric: {"mean": table.loc[condition, (metric, "mean")],
                                     "std": table.loc[condition, (metric, "std")],
                                     "n": int(table.loc[condition, (metric, "n")]), "of": int(sizes[condition])}
                            for metric in dict.fromkeys(m for m, _ in table.columns)}
                for condition in table.index}

    def summary_table(self) -> pd.DataFrame:
        """Metrics as rows, conditions as columns; cells "mean ± std (n/N seeds)" (for the report)."""
        def cell(entry: dict) -> str:
            if entry["n"] == 0:
                return f"undefined (0/{entry['of']})"
            spread = "" if entry["n"] < 2 else f" ± {entry['std']:.2g}"
            return f"{entry['mean']:.4g}{spread} ({entry['n']}/{entry['of']})"

        data = self.summary_json()
        return pd.DataFrame({condition: {metric.replace("_", " "): cell(entry) for metric, entry in metrics.items()}
                             for condition, metrics in data.items()})

    def to_json(self) -> dict:
        """Rows and the suppressed heads, for results.json."""
        return {"heads": self.heads, "rows": self.rows.to_dict(orient="records")}

    def save(self, path: str | Path) -> Path:
        """Save as JSON."""
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), default=float))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CausalResult":
        """Inverse of :meth:`save`."""
        data = json.loads(Path(path).read_text())
        return cls(pd.DataFrame(data["rows"]), [tuple(h) for h in data["heads"]])

    def plot(self):
        """Bar chart: MRR drop, recovery and gate-probability change, top-K heads vs random heads."""
        import matplotlib.pyplot as plt

        metrics = ["mrr_drop", "recovered_pct", "d_prob_correlated", "d_prob_selected"]
        grouped = self.rows.groupby("condition", sort=False)[metrics]  # top-K heads first (red), random after
        mean, std, count = grouped.mean(), grouped.std().fillna(0.0), grouped.count()
        sizes = self.rows.groupby("condition", sort=False).size()
        colors = ["tab:red" if c == "top-K heads" else "tab:gray" for c in mean.index]
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3))
        for ax, metric in zip(axes, metrics):
            ax.bar(mean.index, mean[metric].fillna(0.0), yerr=std[metric], color=colors, capsize=4)
            ax.set_xticks(range(len(mean)), [f"{c}\n{count.loc[c, metric]}/{sizes[c]} defined" for c in mean.index],
                          fontsize=8)
            ax.set_title(metric.replace("_", " "))
            ax.axhline(0, color="black", linewidth=0.5)
        fig.suptitle("Suppressing heads: effect on MRR and on the experts' router probability")
        fig.tight_layout()
        return fig
