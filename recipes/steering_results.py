"""The results of :mod:`nnsight_moe.recipes.steering`: tables, plots, text and a JSON round trip.

* :class:`Discovery` (:func:`~nnsight_moe.recipes.steering_discovery.discover`): per-expert contrast scores,
  p- and q-values; ranked with :meth:`Discovery.top`;
* :class:`SteeringResult` (:func:`~nnsight_moe.recipes.steering_evaluation.evaluate`): steered vs none vs
  random per condition, with bootstrap CIs;
* :class:`RelationSteering` (:func:`~nnsight_moe.recipes.steering_relations.relation_steering`): the discovery
  and one SteeringResult per goal.

All three save to / load from strict JSON (:class:`_JSONFile`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nnsight_moe.recipes.steering_data import Pair

#: Discovery scores a ranking can use.
BY = ("risk_difference", "gate_difference", "attribution_difference")
_Q_COLUMN = {"risk_difference": "q_frequency", "gate_difference": "q_gate", "attribution_difference": "q_attribution"}
#: What :func:`relation_steering` evaluates: force the behaviour experts ON in the control relation's prompts,
#: scored with the behaviour relation's answers for the same subjects; or force them OFF in held-out
#: behaviour prompts (suppress the relation).
GOALS = ("toward", "suppress")


class _JSONFile:
    """``save`` / ``load`` of a result through its ``to_json`` / ``from_json`` (strict JSON: no NaN)."""

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path``; returns the path."""
        from nnsight_moe.report import json_value

        path = Path(path)
        path.write_text(json.dumps(json_value(self.to_json()), indent=1, allow_nan=False))
        return path

    @classmethod
    def load(cls, path: str | Path):
        """Read a result written by :meth:`save`."""
        return cls.from_json(json.loads(Path(path).read_text()))


@dataclass
class Discovery(_JSONFile):
    """Per-expert contrast of a behaviour and a control prompt set (:func:`discover`)."""

    meta: dict
    rows: list[dict]

    def to_frame(self, by: str | None = None):
        """One row per (layer, expert), sorted by ``by`` (default the discovery's), largest first."""
        import pandas as pd

        by = by or self.meta["by"]
        if by not in BY or (by == "attribution_difference" and not self.meta["attribution"]):
            raise ValueError(f"by must be one of {BY} (attribution_difference needs attribution=True), got {by!r}")
        frame = pd.DataFrame(self.rows)
        return frame.sort_values([by, "layer", "expert"], ascending=[False, True, True]).reset_index(drop=True)

    def top(self, n: int, by: str | None = None, *, q: float | None = None, sign: int = 1) -> list[Pair]:
        """The ``n`` experts with the largest score ``by`` (``sign=-1``: most control-linked), optionally only
        those with q-value <= ``q``, among experts whose score has that sign (never a zero score)."""
        by = by or self.meta["by"]
        frame = self.to_frame(by)
        if sign not in (1, -1):
            raise ValueError(f"sign must be 1 or -1, got {sign!r}")
        frame = frame[frame[by] * sign > 0]
        if sign == -1:
            frame = frame.iloc[::-1]
        if q is not None:
            frame = frame[frame[_Q_COLUMN[by]] <= q]
        return [(int(r.layer), int(r.expert)) for r in frame.head(n).itertuples()]

    def to_json(self) -> dict:
        return {"meta": self.meta, "rows": self.rows}

    @classmethod
    def from_json(cls, data: dict) -> "Discovery":
        return cls(data["meta"], data["rows"])


@dataclass
class SteeringResult(_JSONFile):
    """What :func:`evaluate` measured: per-condition summary, steered - random, the random draws."""

    meta: dict
    summary: list[dict]
    versus_random: dict
    random_seeds: list[dict]

    def to_frame(self):
        """One row per condition (``none``, ``steered``, ``random``), CIs as [low, high] lists."""
        import pandas as pd

        return pd.DataFrame(self.summary).set_index("condition")

    def table(self):
        """Readable table: means and changes from ``none`` with 95% CIs."""
        import pandas as pd

        k = self.meta["k"]
        cols = ["logprob", "mrr", f"hit_at_{k}"]
        if self.meta["n_control"]:
            cols += ["logprob_control", "text_logprob_control"]
        rows = {}
        for row in self.summary:
            out = {}
            for c in cols:
                out[c] = f"{row[c]:.3f}"
                if row["condition"] != "none":
                    lo, hi = row[f"delta_{c}_ci"]
                    out[f"change {c}"] = f"{row[f'delta_{c}']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            rows[row["condition"]] = out
        return pd.DataFrame(rows).T.fillna("")

    def text(self) -> str:
        m = self.meta
        v = self.versus_random["logprob"]
        baseline = "layer-matched draws" if m.get("experts") else "random directions of the same norm"
        return (f"{m['what']} on {m['n_heldout']} held-out prompts; "
                f"steered - random (mean of {m['seeds']} {baseline}): target log-prob {v['mean']:+.3f} "
                f"[{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]\n" + self.table().to_string())

    def to_json(self) -> dict:
        return {"meta": self.meta, "summary": self.summary, "versus_random": self.versus_random,
                "random_seeds": self.random_seeds}

    @classmethod
    def from_json(cls, data: dict) -> "SteeringResult":
        return cls(data["meta"], data["summary"], data["versus_random"], data["random_seeds"])

    def plot(self):
        """Change of the held-out target log-prob: steered vs random (mean) vs each random draw, with CIs."""
        import matplotlib.pyplot as plt

        rows = {r["condition"]: r for r in self.summary}
        fig, ax = plt.subplots(figsize=(5, 3))
        names = ["steered", "random"]
        means = [rows[n]["delta_logprob"] for n in names]
        errs = [[means[i] - rows[n]["delta_logprob_ci"][0] for i, n in enumerate(names)],
                [rows[n]["delta_logprob_ci"][1] - means[i] for i, n in enumerate(names)]]
        ax.bar(names, means, yerr=errs, capsize=4, color=["tab:red", "tab:gray"])
        for s in self.random_seeds:
            ax.plot([1], [s["delta_logprob"]], "k.", alpha=0.5)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_ylabel("change of target log-prob")
        ax.set_title(f"{self.meta['what']} (held-out)", fontsize=9)
        fig.tight_layout()
        return fig


@dataclass
class RelationSteering(_JSONFile):
    """What :func:`relation_steering` found: the discovery and one :class:`SteeringResult` per goal."""

    meta: dict
    discovery: Discovery
    results: dict

    def to_json(self) -> dict:
        return {"meta": self.meta, "discovery": self.discovery.to_json(),
                "results": {goal: r.to_json() for goal, r in self.results.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "RelationSteering":
        return cls(data["meta"], Discovery.from_json(data["discovery"]),
                   {goal: SteeringResult.from_json(r) for goal, r in data["results"].items()})

    def text(self) -> str:
        m = self.meta
        lines = [f"experts linked to {m['behaviour']} vs {m['control']} ({m['n_discovery']} discovery prompts each "
                 f"at most): {m['experts']}"]
        for goal, result in self.results.items():
            lines.append(f"\n[{goal}] {_GOAL_TEXT[goal].format(**m)}\n{result.text()}")
        lines += [f"\n[{goal}] skipped: {reason}" for goal, reason in m.get("skipped", {}).items()]
        return "\n".join(lines)


_GOAL_TEXT = {
    "toward": "forced ON in held-out {control} prompts, target = the {behaviour} answer for the same subject; "
              "control = the same prompts with their own answers",
    "suppress": "forced OFF in held-out {behaviour} prompts; control = held-out {control} prompts",
}
