"""The results of :mod:`nnsight_moe.recipes.blocking`: tables, plots and a JSON round trip.

* :class:`BlockingResult` (what :func:`~nnsight_moe.recipes.blocking.sweep` returns): MRR / HIT@k per
  relation, mode, kind (top-N or a random baseline), N and seed; the study's Table 5 and the MRR-vs-N plot;
* :class:`ConfigurationResult` (what :func:`~nnsight_moe.recipes.blocking.configurations` returns): MRR /
  HIT@k per relation and shared/routed configuration; the study's Table 2 and a grouped bar chart.

Both are importable from :mod:`nnsight_moe.recipes.blocking` too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

__all__ = ["BlockingResult", "ConfigurationResult"]


class _Result:
    """Rows of metrics plus the original (unblocked) metrics per relation; JSON round trip."""

    type = "result"

    def __init__(self, meta: dict, original: dict, rows: list[dict]):
        self.meta, self.original, self.rows = meta, original, rows

    def to_json(self) -> dict:
        """The dict stored in results.json (schema in docs/recipes/blocking.md)."""
        return {"type": self.type, "meta": self.meta, "original": self.original, "rows": self.rows}

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` (JSON); returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path):
        """Read a result written by :meth:`save` (the class must match the file's ``type``)."""
        data = json.loads(Path(path).read_text())
        if data.get("type") != cls.type:
            raise ValueError(f"{path} holds a {data.get('type')!r} result, not {cls.type!r}")
        return cls(data["meta"], data["original"], data["rows"])

    def to_frame(self):
        """One row per condition with ``*_orig``, ``*_drop`` (orig - after) and ``*_rel_drop`` (drop / orig)."""
        import pandas as pd

        frame = pd.DataFrame(self.rows)
        for metric in ("mrr", "hit_at_k"):
            orig = frame["relation"].map(lambda r, m=metric: self.original[r][m])
            frame[f"{metric}_orig"] = orig
            frame[f"{metric}_drop"] = orig - frame[metric]
            frame[f"{metric}_rel_drop"] = (orig - frame[metric]) / orig.where(orig != 0)
        return frame


class BlockingResult(_Result):
    """What :func:`sweep` returns.

    ``rows``: one dict per (relation, mode, kind, n, seed) with ``kind`` in ``"top"``, ``"uniform"``,
    ``"matched"`` (``seed`` None for top), metrics ``mrr`` and ``hit_at_k`` after blocking, ``n_prompts``
    and the blocked ``experts`` (``[[layer, expert], ...]``; None for the pooled :data:`ALL` rows).
    ``original``: ``{relation: {"n_prompts", "mrr", "hit_at_k"}}`` without blocking. ``meta``: options
    and the ranking used per relation.
    """

    type = "blocking_sweep"

    def summary(self):
        """Mean and std over seeds per (relation, mode, kind, n) of metrics and drops (std 0 for one value)."""
        frame = self.to_frame()
        cols = ["mrr", "hit_at_k", "mrr_drop", "hit_at_k_drop", "mrr_rel_drop", "hit_at_k_rel_drop"]
        grouped = frame.groupby(["relation", "mode", "kind", "n"], sort=False)[cols]
        out = grouped.mean().join(grouped.std(ddof=1).fillna(0.0), rsuffix="_std")
        return out.join(grouped.size().rename("count"))

    def table(self, metric: str = "mrr", mode: str | None = None, kind: str = "top"):
        """Table-5 layout (our reconstruction): index relation, columns ``original`` and ``top-N`` (after blocking).

        ``kind="uniform"`` / ``"matched"`` gives the random baselines' means instead.
        """
        import pandas as pd

        mode = self._mode(mode)
        summary = self.summary().reset_index()
        part = summary[(summary["mode"] == mode) & (summary["kind"] == kind)]
        table = part.pivot(index="relation", columns="n", values=_metric(metric))
        table.columns = [f"{kind}-{n}" for n in table.columns]
        table.insert(0, "original", pd.Series({r: o[_metric(metric)] for r, o in self.original.items()}))
        return table.reindex(list(self.original))

    def mode_table(self, metric: str = "mrr", n: int | None = None):
        """Per-mode comparison: index relation, one column per mode (top-``n`` blocked; default largest N)."""
        n = max(self.meta["top_n"]) if n is None else n
        frame = self.to_frame()
        part = frame[(frame["kind"] == "top") & (frame["n"] == n)]
        table = part.pivot(index="relation", columns="mode", values=_metric(metric))
        return table.reindex(index=list(self.original), columns=self.meta["modes"])

    def text(self, metric: str = "mrr", mode: str | None = None) -> str:
        """Table 5 as lines ``relation: original -> top-1 / top-5 / top-10``."""
        table = self.table(metric, mode)
        return "\n".join(f"{rel}: {row['original']:.3f} -> " + " / ".join(f"{v:.3f}" for v in row.iloc[1:])
                         for rel, row in table.iterrows())

    def plot(self, metric: str = "mrr", mode: str | None = None):
        """MRR (or HIT@k) vs N per relation: top-ranked vs random baselines (mean +- std); a Figure."""
        import matplotlib.pyplot as plt

        mode = self._mode(mode)
        summary = self.summary().reset_index()
        name = _metric(metric)
        relations = list(self.original)
        cols = min(4, len(relations))
        nrows = math.ceil(len(relations) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False, sharey=True)
        for ax, rel in zip(axes.flat, relations):
            for kind, style in (("top", "o-"), ("uniform", "s--"), ("matched", "^:")):
                part = summary[(summary["relation"] == rel) & (summary["mode"] == mode) & (summary["kind"] == kind)]
                if len(part):
                    # mean +- std, clipped to the metric's range [0, 1] (MRR and HIT@k cannot leave it)
                    mean, std = part[name].to_numpy(), part[f"{name}_std"].fillna(0.0).to_numpy()
                    yerr = [np.minimum(std, mean), np.minimum(std, 1.0 - mean)]
                    ax.errorbar(part["n"], mean, yerr=yerr, fmt=style, capsize=3, label=kind)
            ax.axhline(self.original[rel][name], color="grey", lw=0.8, label="original")
            ax.set_title(rel, fontsize=9)
            ax.set_xlabel("N experts blocked")
            ax.set_xticks(sorted(self.meta["top_n"]))
            ax.set_ylim(-0.03, 1.05)
        for ax in axes.flat[len(relations):]:
            ax.axis("off")
        for row in axes:
            row[0].set_ylabel("MRR" if name == "mrr" else f"HIT@{self.meta['k']}")
        handles, names = axes[0, 0].get_legend_handles_labels()
        fig.suptitle(f"Blocking the top-N experts ({mode}) vs random baselines (mean ± std over seeds)", fontsize=10)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)  # below the panels
        return fig

    def _mode(self, mode: str | None) -> str:
        if mode is None:
            return self.meta["modes"][0]
        if mode not in self.meta["modes"]:
            raise ValueError(f"mode {mode!r} was not swept; this result has {self.meta['modes']}")
        return mode


def _metric(metric: str) -> str:
    aliases = {"mrr": "mrr", "hit": "hit_at_k", "hit_at_k": "hit_at_k", "hit@10": "hit_at_k"}
    if metric not in aliases:
        raise ValueError(f"metric must be 'mrr' or 'hit_at_k', got {metric!r}")
    return aliases[metric]


class ConfigurationResult(_Result):
    """What :func:`configurations` returns.

    ``rows``: one dict per (relation, configuration) with ``keep_top`` (routed experts kept per token;
    None = all k), ``shared`` (shared expert on), ``n_prompts``, ``mrr``, ``hit_at_k``; pooled rows under
    :data:`ALL` when there are several relations. ``original``: the default configuration's metrics.
    """

    type = "blocking_configurations"

    def table(self, metric: str = "mrr"):
        """Index relation, one column per configuration (the study's Table-2 layout; definitions ours)."""
        frame = self.to_frame()
        table = frame.pivot(index="relation", columns="configuration", values=_metric(metric))
        return table.reindex(index=list(self.original), columns=self.meta["configurations"])

    def plot(self, metric: str = "mrr"):
        """Grouped bar chart: one group per relation, one bar per configuration; a Figure."""
        import matplotlib.pyplot as plt

        table = self.table(metric)
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(table)), 3.5))
        width = 0.8 / len(table.columns)
        for j, config in enumerate(table.columns):
            ax.bar([i + j * width for i in range(len(table))], table[config], width, label=config)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(table))], table.index, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("MRR" if _metric(metric) == "mrr" else f"HIT@{self.meta['k']}")
        ax.set_title("Shared vs routed experts", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # beside the bars
        fig.tight_layout()
        return fig
