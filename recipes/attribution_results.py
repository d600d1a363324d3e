"""The result of :func:`nnsight_moe.recipes.attribution.attribute`: LPI tables, summaries, plots, files.

:class:`AttributionResult` holds one row per (prompt, component) score and the targets and ranks of the
model's real prediction; it gives the per-layer gains, the study's Table-1 summary quantities, the
(layer, expert) matrix, JSON for results.json, CSV + JSON files and matplotlib figures. Importable from
:mod:`nnsight_moe.recipes.attribution` too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from nnsight_moe.recipes.metrics import hits_of_ranks, mrr_of_ranks

__all__ = ["BANDS", "AttributionResult"]

BANDS = ("early", "middle", "late")


@dataclass
class AttributionResult:
    """LPI scores (``to_frame()``), targets and target ranks of the model's real prediction."""

    frame: pd.DataFrame
    targets: list[int]
    ranks: list[int]
    n_layers: int
    family: str = ""
    model_type: str = ""
    name: str = ""
    relations: list[str] | None = None
    target: str = "gold"
    only_correct: bool = False
    prompt_ids: list[int] | None = None  # with only_correct: index of each kept prompt in the input

    def select(self, keep: Sequence[int]) -> "AttributionResult":
        """The result restricted to prompts ``keep`` (renumbered 0..len(keep)-1, ``prompt_ids`` set)."""
        keep = list(keep)
        new = {old: i for i, old in enumerate(keep)}
        frame = self.frame[self.frame["prompt"].isin(new)].copy()
        frame["prompt"] = frame["prompt"].map(new)
        base = self.prompt_ids if self.prompt_ids is not None else range(self.n_prompts)
        return AttributionResult(frame.reset_index(drop=True), [self.targets[i] for i in keep],
                                 [self.ranks[i] for i in keep], self.n_layers, self.family, self.model_type,
                                 self.name, None if self.relations is None else [self.relations[i] for i in keep],
                                 self.target, True, [base[i] for i in keep])

    def to_frame(self) -> pd.DataFrame:
        """One long table: prompt, [relation,] layer, level, head, expert, neuron, score (LPI, nats)."""
        frame = self.frame.copy()
        if self.relations is not None:
            frame.insert(1, "relation", [self.relations[p] for p in frame["prompt"]])
        return frame

    @property
    def n_prompts(self) -> int:
        return len(self.targets)

    def layer_gains(self) -> pd.DataFrame:
        """Mean Imp(A^l) and Imp(F^l) over prompts, per layer (columns ``attn``, ``moe``; and ``mixer`` for
        token mixers without attention heads, in hybrid stacks; ``per_layer_input`` for Gemma-4's per-layer
        inputs). NaN where a layer has no such part."""
        levels = ["attn", "moe"] + [level for level in ("mixer", "per_layer_input") if (self.frame["level"] == level).any()]
        layer = self.frame[self.frame["level"].isin(levels)]
        table = layer.pivot_table(index="layer", columns="level", values="score", aggfunc="mean")
        return table.reindex(index=range(self.n_layers), columns=levels)

    def summary(self, bands: Sequence[float] = (1 / 3, 2 / 3)) -> dict[str, float]:
        """Table-1 quantities: HIT@10, MRR, FFN gain, Attn gain, peak position (% depth), efficiency, band
        shares; ``Mixer gain`` too when the model has token mixers without attention heads."""
        gains = self.layer_gains()
        ffn, attn = gains["moe"].fillna(0.0), gains["attn"].fillna(0.0)
        ranks = torch.tensor(self.ranks, dtype=torch.float64)
        edges = [0, *[int(round(b * self.n_layers)) for b in bands], self.n_layers]
        total = ffn.sum()
        out = {
            "HIT@10": hits_of_ranks(ranks, 10),
            "MRR": mrr_of_ranks(ranks),
            "FFN gain": float(total),
            "Attn gain": float(attn.sum()),
            "peak position %": float(100.0 * (int(ffn.to_numpy().argmax()) + 1) / self.n_layers),
            "efficiency": float(total / self.n_layers),
        }
        if "mixer" in gains:
            out["Mixer gain"] = float(gains["mixer"].fillna(0.0).sum())
        if "per_layer_input" in gains:
            out["Per-layer-input gain"] = float(gains["per_layer_input"].fillna(0.0).sum())
        for name, lo, hi in zip(BANDS, edges[:-1], edges[1:]):
            out[f"{name} share"] = float(ffn.iloc[lo:hi].sum() / total) if total != 0 else float("nan")
        return out

    def expert_matrix(self) -> pd.DataFrame:
        """Mean gated-LPI per (layer, expert) over prompts; 0 for prompts that did not select the expert."""
        experts = self.frame[self.frame["level"] == "expert"]
        table = experts.groupby(["layer", "expert"])["score"].sum() / self.n_prompts
        return table.unstack("expert").fillna(0.0)

    def to_json(self) -> dict:
        """Summary, per-layer gains and expert matrix for results.json."""
        return {"name": self.name, "family": self.family, "n_prompts": self.n_prompts,
                "target": self.target, "only_correct": self.only_correct,
                "summary": self.summary(),
                "layer_gains": self.layer_gains().reset_index().to_dict(orient="list"),
                "expert_matrix": self.expert_matrix().to_dict() if (self.frame["level"] == "expert").any() else {}}

    def save(self, path: str | Path) -> Path:
        """Save the table (parquet-free: CSV) and metadata next to it (``path`` + ``.json``)."""
        path = Path(path)
        self.to_frame().to_csv(path, index=False)
        meta = {"targets": self.targets, "ranks": self.ranks, "n_layers": self.n_layers, "family": self.family,
                "model_type": self.model_type, "name": self.name, "relations": self.relations,
                "target": self.target, "only_correct": self.only_correct, "prompt_ids": self.prompt_ids}
        path.with_suffix(path.suffix + ".json").write_text(json.dumps(meta))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "AttributionResult":
        """Inverse of :meth:`save`."""
        path = Path(path)
        frame = pd.read_csv(path)
        meta = json.loads(path.with_suffix(path.suffix + ".json").read_text())
        from nnsight_moe.recipes.attribution import COLUMNS

        frame = frame.drop(columns=["relation"], errors="ignore")[COLUMNS]
        return cls(frame, **meta)

    # -------------------------------------------------------------- plots (matplotlib Figures)
    def plot_gains(self):
        """Attention vs MoE/FFN gain by layer."""
        import matplotlib.pyplot as plt

        gains = self.layer_gains().fillna(0.0)
        fig, ax = plt.subplots(figsize=(6, 3))
        x = torch.arange(self.n_layers).numpy()
        ax.bar(x - 0.2, gains["attn"], 0.4, label="attention  Imp(A^l)")
        if "mixer" in gains:  # hybrid stacks: linear attention / Mamba layers in the same slot
            ax.bar(x - 0.2, gains["mixer"], 0.4, label="mixer (no heads)  Imp(M^l)", hatch="//")
        ax.bar(x + 0.2, gains["moe"], 0.4, label="MoE / FFN  Imp(F^l)")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xticks(x)  # whole layers only
        ax.set_xlabel("layer"), ax.set_ylabel("mean LPI (nats)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # beside the bars
        ax.set_title(f"{self.name or self.family}: gain by layer")
        fig.tight_layout()
        return fig

    def plot_experts(self):
        """[layer x expert] heatmap of mean gated-LPI."""
        import matplotlib.pyplot as plt

        matrix = self.expert_matrix()
        fig, ax = plt.subplots(figsize=(min(12, 2 + 0.4 * matrix.shape[1]), 1 + 0.5 * matrix.shape[0]))
        lim = float(matrix.abs().to_numpy().max()) or 1.0
        image = ax.imshow(matrix.to_numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_yticks(range(matrix.shape[0]), matrix.index), ax.set_xticks(range(matrix.shape[1]), matrix.columns)
        ax.set_xlabel("expert"), ax.set_ylabel("layer"), ax.set_title("Mean gated LPI per expert")
        fig.colorbar(image, ax=ax, label="nats")
        return fig

    def plot_shared_routed(self):
        """Per layer: summed routed-expert LPI vs shared-expert LPI (mean over prompts)."""
        import matplotlib.pyplot as plt

        f = self.frame
        routed = f[f["level"] == "expert"].groupby("layer")["score"].sum() / self.n_prompts
        shared = f[f["level"] == "shared"].groupby("layer")["score"].sum() / self.n_prompts
        layers = sorted(set(routed.index) | set(shared.index))
        fig, ax = plt.subplots(figsize=(6, 3))
        x = torch.arange(len(layers)).numpy()
        ax.bar(x - 0.2, [routed.get(l, 0.0) for l in layers], 0.4, label="routed experts (sum)")
        ax.bar(x + 0.2, [shared.get(l, 0.0) for l in layers], 0.4, label="shared expert")
        ax.set_xticks(x, layers), ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xlabel("layer"), ax.set_ylabel("mean LPI (nats)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
        ax.set_title("Shared vs routed contribution by layer")
        fig.tight_layout()
        return fig

    def plot_neurons(self, n: int = 15):
        """The neurons with the largest mean LPI."""
        import matplotlib.pyplot as plt

        f = self.frame[self.frame["level"] == "neuron"]
        top = (f.groupby(["layer", "expert", "neuron"])["score"].sum() / self.n_prompts).nlargest(n)
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(top) + 1))
        labels = [f"L{l} {'shared/MLP' if e < 0 else f'E{e}'} n{k}" for l, e, k in top.index]
        ax.barh(range(len(top))[::-1], top.to_numpy(), color="tab:purple")
        ax.set_yticks(range(len(top))[::-1], labels, fontsize=7)
        ax.set_xlabel("mean LPI (nats)"), ax.set_title("Top neurons")
        fig.tight_layout()
        return fig
