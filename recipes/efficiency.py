"""Honest gain metrics for LPI attribution: what "FFN gain / L" hides, and how to compare models fairly.

LPI telescopes. With the final RMS scale held fixed, the layer rows of one prompt satisfy exactly

    Σ_l [LPI(A^l | h^{l-1}) + LPI(F^l | u^l)] = log p(w | h^L) - log p(w | h^0)

(``h^0`` the embedding output, ``h^L`` the real final residual, so ``log p(w | h^L)`` is the model's own
log-probability). The total gain is therefore fixed by the model's confidence and by how far the
embedding alone is from the target (about ``ln V`` when ``h^0`` says nothing about ``w``), not by its
depth; the FFN gain is a share of that total, and ``FFN gain / L`` falls with depth for the same
share. Each gain saturates too: ``LPI(c | x) <= -log p(w | x)``, so once ``p(w | x)`` is near 1 no later
component can score much. Hence, next to the study's ``FFN gain / L``:

* :func:`telescoping` measures the identity and the saturation bound per prompt, and ``p(w | h^l)``
  by layer (frozen readout of every residual state);
* :func:`honest_summary` gives the FFN share of the total gain (depth-free) and the total itself;
* :func:`layer_profile` the per-layer gains divided by the total gain;
* :func:`depth_matched` resamples each model's normalised FFN profile onto common relative-depth bins,
  so models of different depth are compared at the same fraction of depth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = ["compare_honest", "depth_matched", "honest_summary", "layer_profile", "telescoping"]


def _per_prompt_layers(result) -> pd.DataFrame:
    """[prompts x layers] summed layer-row LPI (attn + moe + mixer + per_layer_input) of each prompt and layer."""
    frame = result.frame[result.frame["level"].isin(("attn", "moe", "mixer", "per_layer_input"))]
    table = frame.pivot_table(index="prompt", columns="layer", values="score", aggfunc="sum")
    return table.reindex(index=range(result.n_prompts), columns=range(result.n_layers)).fillna(0.0)


def honest_summary(result) -> dict[str, float]:
    """Gains of an :class:`~nnsight_moe.recipes.attribution.AttributionResult` in the three forms.

    ``total gain`` = FFN + attention (+ mixer, + Gemma-4's per-layer input) gain (means over prompts, nats);
    ``FFN share`` = FFN gain / total gain; ``FFN gain / L`` (the study's per-layer efficiency); ``FFN share / L`` is NOT given: the
    share is already depth-free. ``late-third share of total`` = Σ of the last third's FFN gain / total.
    """
    gains = result.layer_gains().fillna(0.0)
    ffn, attn = float(gains["moe"].sum()), float(gains["attn"].sum())
    mixer = float(gains["mixer"].sum()) if "mixer" in gains else 0.0
    total = ffn + attn + mixer + (float(gains["per_layer_input"].sum()) if "per_layer_input" in gains else 0.0)
    n = result.n_layers
    lo = int(round(2 * n / 3))
    return {"layers": n, "FFN gain": ffn, "Attn gain": attn, "total gain": total,
            "FFN share": ffn / total if total else math.nan, "FFN gain / L": ffn / n,
            "late-third FFN share of total": float(gains["moe"].iloc[lo:].sum()) / total if total else math.nan}


def layer_profile(result) -> pd.DataFrame:
    """Per layer: ``attn``, ``moe`` mean LPI, both divided by the total gain, and the relative depth."""
    gains = result.layer_gains().fillna(0.0)
    total = honest_summary(result)["total gain"]
    out = pd.DataFrame({"attn": gains["attn"], "moe": gains["moe"]})
    out["attn / total"] = out["attn"] / total if total else math.nan
    out["moe / total"] = out["moe"] / total if total else math.nan
    out["relative depth"] = [(layer + 1) / result.n_layers for layer in out.index]
    return out


def _binned(values: np.ndarray, bins: int) -> np.ndarray:
    """Resample per-layer amounts onto ``bins`` equal relative-depth bins (layer l covers [l/L, (l+1)/L],
    split between bins in proportion to the overlap), preserving the sum."""
    n = len(values)
    out = np.zeros(bins)
    for layer, value in enumerate(values):
        lo, hi = layer / n, (layer + 1) / n
        for b in range(bins):
            overlap = max(0.0, min(hi, (b + 1) / bins) - max(lo, b / bins))
            out[b] += value * overlap * n
    return out


def depth_matched(results: Sequence, bins: int = 4) -> pd.DataFrame:
    """Normalised FFN gain (share of each model's total gain) per relative-depth bin, one column per model.

    Rows ``0-25%``, ``25-50%``, ... (``bins`` equal bins of depth); every column sums to the model's FFN
    share. Models of any depth are compared at the same fraction of depth and on the same scale.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins!r}")
    columns = {}
    for r in results:
        profile = layer_profile(r)
        columns[r.name or r.family] = _binned(profile["moe / total"].to_numpy(), bins)
    index = [f"{round(100 * b / bins)}-{round(100 * (b + 1) / bins)}%" for b in range(bins)]
    return pd.DataFrame(columns, index=index)


def compare_honest(results: Sequence) -> tuple[pd.DataFrame, dict]:
    """The three efficiency forms per model and the MoE / dense ratio of each (first MoE, first dense).

    Returns (table indexed by model, ratios ``{"FFN gain / L", "FFN share", "depth-matched (per bin)",
    "depth ratio (L_dense / L_moe)"}``) where the depth-matched ratio is the per-bin ratio list of
    :func:`depth_matched`. With several dense models, ``ratios["by dense model"]`` holds the same four
    entries of the first MoE against EACH dense model (``{dense name: {...}}``); the top-level entries
    are those of the first dense model.
    """
    table = pd.DataFrame([{"model": r.name or r.family, **honest_summary(r)} for r in results]).set_index("model")
    moe = next((r for r in results if r.family != "dense"), None)
    denses = [r for r in results if r.family == "dense"]
    ratios: dict[str, Any] = {}
    if moe is not None and denses:
        a = honest_summary(moe)
        by_dense = {}
        for dense in denses:
            b, entry = honest_summary(dense), {}
            for key in ("FFN gain / L", "FFN share"):
                entry[key] = a[key] / b[key] if b[key] else math.nan
            matched = depth_matched([moe, dense])
            entry["depth-matched (per bin)"] = [float(x / y) if y else math.nan for x, y in matched.to_numpy()]
            entry["depth ratio (L_dense / L_moe)"] = dense.n_layers / moe.n_layers
            by_dense[dense.name or f"dense {len(by_dense) + 1}"] = entry
        ratios.update(next(iter(by_dense.values())))
        if len(denses) > 1:
            ratios["by dense model"] = by_dense
    return table, ratios


@torch.no_grad()
def telescoping(model: Any, prompts: Sequence, targets: Sequence[int], *, tokenizer=None, batch_size: int = 16,
                result=None) -> dict:
    """Measure the telescoping identity and saturation on ``prompts`` (local models only).

    Per prompt, from one capture per batch with the frozen final projection: ``log p(w | h^l)`` for
    l = 0..L (``h^0`` the embedding output, ``h^L`` the real final residual), hence ``p(target) by
    layer``. With ``result`` (the :class:`AttributionResult` of the same prompts and targets) it also
    checks ``Σ layer rows = log p(w | h^L) - log p(w | h^0)`` (``max identity error``, nats) and the
    saturation bound ``total gain <= -log p(w | h^0)``.

    Returns ``{"logp_by_layer": [P, L+1] list, "p_by_layer_mean": [L+1], "logp_h0_mean", "logp_final_mean",
    "ln_V", "max identity error" (with result), "saturation holds" (with result)}``.
    """
    import functools

    import nnsight_moe
    from nnsight_moe.recipes import attribution, runner

    hf = nnsight_moe.hf_model(model)
    parts = attribution._parts(hf)
    if len(targets) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(targets)} targets")
    rows = runner.run(hf, list(prompts), functools.partial(_logp_by_layer, parts), tokenizer=tokenizer,
                      batch_size=batch_size, per_prompt={"target": torch.tensor(list(targets))}, progress=False)
    logp = torch.cat(rows)
    vocab = hf.get_output_embeddings().weight.shape[0]
    out = {"logp_by_layer": logp.tolist(), "p_by_layer_mean": logp.exp().mean(0).tolist(),
           "logp_h0_mean": float(logp[:, 0].mean()), "logp_final_mean": float(logp[:, -1].mean()), "ln_V": math.log(vocab)}
    if result is not None:
        if result.n_prompts != logp.shape[0]:
            raise ValueError(f"result has {result.n_prompts} prompts but {logp.shape[0]} were given")
        sums = torch.tensor(_per_prompt_layers(result).sum(axis=1).to_numpy(), dtype=torch.float64)
        expected = logp[:, -1] - logp[:, 0]
        out["max identity error"] = float((sums - expected).abs().max())
        out["total gain mean"] = float(sums.mean())
        out["saturation holds"] = bool((sums <= -logp[:, 0] + 1e-4).all())
    return out


def _logp_by_layer(parts, hf, batch) -> torch.Tensor:
    """[b, L+1] log p(target | h^l) of the frozen readout for l = 0..L (one capture; runner batch)."""
    from nnsight_moe.recipes import attribution, runner

    got = attribution.capture(hf, runner.inputs(batch), parts)
    ro = attribution.readout(parts, got, batch["target"].to(got["logits"].device))
    states = torch.cat([got["resid_pre"], got["final"][None]])  # [L+1, P, D]: h^0 .. h^L
    ar = torch.arange(states.shape[1], device=states.device)
    return torch.stack([ro.logprob(s, ar) for s in states], dim=1).double().cpu()


def section_parts(results: Sequence, telescope: dict | None = None) -> tuple[dict, dict, str]:
    """(data, tables, text) the attribution section adds: the three efficiency forms, profiles, identity."""
    table, ratios = compare_honest(results)
    tables = {"Efficiency in three forms (FFN gain / L is the study's; share and depth-matched are ours)": table}
    if len(results) > 1:
        tables["FFN gain by relative depth, as a share of each model's total gain (depth-matched)"] = depth_matched(results)
    profile = layer_profile(results[0])
    tables[f"{results[0].name or results[0].family}: gain by layer, normalised by the total gain"] = profile
    data = {"honest": table.reset_index().to_dict(orient="records"), "ratios": ratios,
            "profile": profile.reset_index().to_dict(orient="records")}
    text = ""
    for name, entry in (ratios.get("by dense model") or ({results[-1].name: ratios} if ratios else {})).items():
        text += (f" Efficiency ratio MoE/{name}: {entry['FFN gain / L']:.3f} as FFN gain / L, {entry['FFN share']:.3f} "
                 f"as FFN share of the total gain (depth-free); depth alone gives "
                 f"{entry['depth ratio (L_dense / L_moe)']:.2f}x to the former.")
    if ratios.get("by dense model"):
        tables["MoE / dense ratio of each efficiency form, per dense model"] = pd.DataFrame(
            {name: {"FFN gain / L": e["FFN gain / L"], "FFN share": e["FFN share"],
                    "depth ratio (L_dense / L_moe)": e["depth ratio (L_dense / L_moe)"],
                    **{f"depth-matched {label}": v for label, v in zip(depth_matched(results).index,
                                                                        e["depth-matched (per bin)"])}}
             for name, e in ratios["by dense model"].items()}).T
    if telescope is not None:
        data["telescoping"] = {k: v for k, v in telescope.items() if k != "logp_by_layer"}
        layers = telescope["p_by_layer_mean"]
        tables["Mean p(target) of the frozen readout of each residual state h^l"] = pd.DataFrame(
            {"p(target)": layers}, index=pd.Index([f"h^{i}" for i in range(len(layers))], name="state"))
        if "max identity error" in telescope:
            text += (f" Telescoping: Σ layer gains = log p(w|h^L) − log p(w|h^0) to {telescope['max identity error']:.1e} "
                     f"nats (mean total {telescope['total gain mean']:.2f}; mean −log p(w|h^0) "
                     f"{-telescope['logp_h0_mean']:.2f}, ln V {telescope['ln_V']:.2f}).")
    return data, tables, text
