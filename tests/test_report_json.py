"""results.json is strict JSON: undefined values are null, never NaN / Infinity."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from nnsight_moe.recipes.head_expert import CausalResult
from nnsight_moe.report import Section, json_value, write


def strict_loads(text: str):
    """json.loads that rejects the NaN / Infinity / -Infinity extensions of Python's json module."""
    def reject(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=reject)


def test_strict_loads_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        strict_loads('{"a": NaN}')


def test_json_value_maps_undefined_to_null():
    value = {"a": float("nan"), "b": [1.5, float("inf"), -math.inf], "c": np.float32("nan"), "d": np.arange(3),
             "e": torch.tensor([0.5, float("nan")]), "f": (np.int64(4), np.bool_(True)), 7: "key"}
    assert json_value(value) == {"a": None, "b": [1.5, None, None], "c": None, "d": [0, 1, 2], "e": [0.5, None],
                                 "f": [4, True], "7": "key"}
    with pytest.raises(TypeError, match="object"):
        json_value({"x": object()})


def _causal(recovered):
    rows = [{"condition": "top-K heads", "seed": 0, "mrr_drop": 0.5, "recovered_pct": 80.0}]
    rows += [{"condition": "random heads", "seed": s, "mrr_drop": 0.0 if math.isnan(r) else 0.1, "recovered_pct": r}
             for s, r in enumerate(recovered)]
    return CausalResult(pd.DataFrame(rows), [(0, 1)])


def test_causal_summary_counts_the_defined_seeds():
    effects = _causal([10.0, float("nan"), 30.0, float("nan"), float("nan")])
    summary = effects.summary_json()
    assert summary["random heads"]["recovered_pct"] == {"mean": 20.0, "std": pytest.approx(math.sqrt(200)), "n": 2,
                                                        "of": 5}
    assert summary["top-K heads"]["recovered_pct"]["n"] == 1
    table = effects.summary_table()
    assert table.loc["recovered pct", "random heads"] == "20 ± 14 (2/5)"
    assert table.loc["recovered pct", "top-K heads"] == "80 (1/1)"
    assert _causal([float("nan")]).summary_table().loc["recovered pct", "random heads"] == "undefined (0/1)"


def test_write_produces_strict_json(tmp_path):
    effects = _causal([float("nan"), 5.0])
    header = {"model": {k: 0 for k in ("name", "family", "model_type", "n_layers", "moe_layers", "n_experts",
                                       "top_k", "has_shared")},
              "data": {"source": "x", "n_facts": 0, "relations": [], "skipped": []}}
    header["model"].update(name="m", family="f")
    section = Section("head_expert", "t", data={"causal": {**effects.to_json(), "summary": effects.summary_json()}})
    write(tmp_path, header, [section], 0.0)
    results = strict_loads((tmp_path / "results.json").read_text())
    rows = results["sections"]["head_expert"]["causal"]["rows"]
    assert [r["recovered_pct"] for r in rows] == [80.0, None, 5.0]
    assert results["sections"]["head_expert"]["causal"]["summary"]["random heads"]["recovered_pct"]["n"] == 1


def test_rerun_into_the_same_out_removes_stale_plots(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header = {"model": {k: 0 for k in ("name", "family", "model_type", "n_layers", "moe_layers", "n_experts",
                                       "top_k", "has_shared")},
              "data": {"source": "x", "n_facts": 0, "relations": [], "skipped": []}}
    first = Section("a", "A", figures={"one": ("one", plt.figure()), "two": ("two", plt.figure())})
    write(tmp_path, header, [first], 0.0)
    (tmp_path / "mine.png").write_bytes(b"not the job's")
    assert {p.name for p in tmp_path.glob("*.png")} == {"a_one.png", "a_two.png", "mine.png"}
    write(tmp_path, header, [Section("a", "A", figures={"one": ("one", plt.figure())})], 0.0)
    assert {p.name for p in tmp_path.glob("*.png")} == {"a_one.png", "mine.png"}  # only the job's own stale plot
