"""Re-plot the analysis sections of a results.json, from the JSON alone (no model, no recomputation).

    figures = replot("results/results.json")          # {section: {name: (title, matplotlib figure)}}

or ``python -m nnsight_moe.recipes.replot results/results.json --out plots/`` (one PNG per figure, named
``<section>_<name>.png`` as the main job names them). Sections: :data:`REPLOTTERS`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Sequence

__all__ = ["REPLOTTERS", "replot"]

#: section name -> module whose ``figures_from_json(section data)`` rebuilds the section's figures
REPLOTTERS = {
    "routing": "nnsight_moe.recipes.routing_stats",
    "fidelity": "nnsight_moe.recipes.fidelity",
    "super_experts": "nnsight_moe.recipes.super_experts",
}


def replot(results: str | Path | dict) -> dict[str, dict[str, tuple[str, Any]]]:
    """Figures of every re-plottable section of ``results`` (a results.json path or its parsed dict)."""
    from nnsight_moe.report import validate

    if not isinstance(results, dict):
        results = json.loads(Path(results).read_text(encoding="utf-8"))
    validate(results)
    out = {}
    for name, module in REPLOTTERS.items():
        data = results["sections"].get(name)
        if data is not None and "skipped" not in data:
            out[name] = importlib.import_module(module).figures_from_json(data)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m nnsight_moe.recipes.replot RESULTS_JSON --out DIR``."""
    import argparse

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for section, figures in replot(args.results).items():
        for name, (title, figure) in figures.items():
            figure.savefig(out / f"{section}_{name}.png", dpi=110, bbox_inches="tight")
            plt.close(figure)
            print(f"{out / f'{section}_{name}.png'}: {title}")


if __name__ == "__main__":
    main()
