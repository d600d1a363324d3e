"""What this run does and does not reproduce of the study's claims, stated plainly with its numbers.

:func:`section` reads the finished sections of the main job (attribution, blocking, head_expert) and
checks five qualitative claims of "Decoding Knowledge Attribution in Mixture-of-Experts" against the
measured values, with the rule used for each verdict (:data:`RULES`). A claim whose section did not
run (a dense model, a skipped section) is reported as "not measured". The verdicts are mechanical
readings of this run's numbers, not a judgement of the study.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RULES", "assess", "section"]

#: The verdict rule of each claim (also shown in the report).
RULES = {
    "efficiency": "MoE/dense ratio of the FFN share of the total gain > 1.05 (depth-free form; vs the first dense "
                  "model); < 0.95: not reproduced",
    "late": "last third's FFN gain > first third's (as shares of the total gain)",
    "shared": "shared-expert ablation lowers the pooled MRR by >= 0.05",
    "head_expert": "summary r > 0 with permutation p < 0.05 (the study reports r = +0.68)",
    "blocking": "pooled top-N (largest N) vs uniform random p < 0.05 and at least half the relations with p < 0.05",
}


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("reproduced" if ok else "not reproduced")


def assess(data: dict[str, dict]) -> list[dict[str, Any]]:
    """Rows ``{"claim", "measured", "verdict", "rule"}`` from section data ``{name: section.data}``."""
    rows = []
    attribution = data.get("attribution") or {}
    eff = attribution.get("efficiency") or {}
    ratios = eff.get("ratios") or {}
    if ratios:
        share = ratios["FFN share"]
        ok = True if share > 1.05 else False if share < 0.95 else None
        verdict = _verdict(ok) if ok is not None else "inconclusive (within 5%)"
        measured = (f"FFN gain / L ratio {ratios['FFN gain / L']:.3f}, FFN-share ratio {share:.3f}, depth ratio "
                    f"{ratios['depth ratio (L_dense / L_moe)']:.2f}")
        by_dense = ratios.get("by dense model") or {}
        if by_dense:  # several dense models: the verdict reads the first; every one is listed
            measured = "; ".join(
                f"vs {name}: FFN gain / L ratio {e['FFN gain / L']:.3f}, FFN-share ratio {e['FFN share']:.3f}, depth "
                f"ratio {e['depth ratio (L_dense / L_moe)']:.2f}" for name, e in by_dense.items())
            measured += f" (verdict on {next(iter(by_dense))})"
    else:
        verdict, measured = "not measured", "no dense model in this run (--dense)"
    rows.append({"claim": "MoE layers carry more of the gain per layer than dense layers", "measured": measured,
                 "verdict": verdict, "rule": RULES["efficiency"]})
    profile = eff.get("profile") or []
    if profile:
        n = len(profile)
        share = [row["moe / total"] for row in profile]
        early, late = sum(share[: round(n / 3)]), sum(share[round(2 * n / 3):])
        p_layers = (eff.get("telescoping") or {}).get("p_by_layer_mean")
        entry = f"; mean p(target) entering the last third {p_layers[round(2 * n / 3)]:.3f}" if p_layers else ""
        rows.append({"claim": "knowledge is amplified in late layers", "measured":
                     f"FFN share of the total gain: first third {early:.3f}, last third {late:.3f}{entry}",
                     "verdict": _verdict(late > early), "rule": RULES["late"]})
    else:
        rows.append({"claim": "knowledge is amplified in late layers", "measured": "no attribution section",
                     "verdict": "not measured", "rule": RULES["late"]})
    blocking = data.get("blocking") or {}
    configs = (blocking.get("configurations") or {}).get("rows") or []
    pooled = {r["configuration"]: r["mrr"] for r in configs if r["relation"] == "all"}
    ablation = next((v for k, v in pooled.items() if k.startswith("shared ablation")), None)
    default = next((v for k, v in pooled.items() if "(default)" in k), None)
    if ablation is not None and default is not None:
        rows.append({"claim": "the shared expert is needed (ablating it hurts)", "measured":
                     f"pooled MRR {default:.3f} -> {ablation:.3f} with the shared expert off",
                     "verdict": _verdict(default - ablation >= 0.05), "rule": RULES["shared"]})
    else:
        rows.append({"claim": "the shared expert is needed (ablating it hurts)", "measured": "no shared expert or "
                     "no blocking section", "verdict": "not measured", "rule": RULES["shared"]})
    corr = (data.get("head_expert") or {}).get("correlation") or {}
    r, p = corr.get("summary_r"), corr.get("summary_p")
    if r is not None and p is not None:
        rows.append({"claim": "attention heads and experts correlate positively", "measured":
                     f"summary r {r:+.3f} (permutation p {p:.3g})", "verdict": _verdict(r > 0 and p < 0.05),
                     "rule": RULES["head_expert"]})
    else:
        rows.append({"claim": "attention heads and experts correlate positively", "measured": "not computed",
                     "verdict": "not measured", "rule": RULES["head_expert"]})
    significance = blocking.get("significance") or []
    if significance:
        n_max = max(row["n"] for row in significance)
        last = [row for row in significance if row["n"] == n_max and "uniform_p_signflip" in row]
        per = [row for row in last if row["relation"] != "all"]
        hit = [row["relation"] for row in per if row["uniform_p_signflip"] < 0.05]
        pooled_row = next((row for row in last if row["relation"] == "all"), None)
        pooled_p = pooled_row["uniform_p_signflip"] if pooled_row else (last[0]["uniform_p_signflip"] if last else 1.0)
        held = "held out" if blocking.get("split") else "in-sample"
        rows.append({"claim": "blocking the top-ranked experts hurts more than blocking random ones", "measured":
                     f"top-{n_max} vs uniform ({held}): pooled p {pooled_p:.3g}; relations with p < 0.05: "
                     f"{len(hit)}/{len(per)} ({', '.join(hit) or 'none'})",
                     "verdict": _verdict(pooled_p < 0.05 and len(hit) * 2 >= max(1, len(per))),
                     "rule": RULES["blocking"]})
    else:
        rows.append({"claim": "blocking the top-ranked experts hurts more than blocking random ones",
                     "measured": "no blocking section", "verdict": "not measured", "rule": RULES["blocking"]})
    return rows


def section(sections: list) -> Any:
    """The ``claims`` section: :func:`assess` on the job's finished sections (a list of ``Section``)."""
    import pandas as pd

    from nnsight_moe.report import Section

    rows = assess({s.name: s.data for s in sections})
    table = pd.DataFrame(rows).set_index("claim")
    n = sum(r["verdict"] == "reproduced" for r in rows)
    text = (f"This run reproduces {n} of {len(rows)} of the study's qualitative claims, by the rules in the table "
            "(mechanical readings of the numbers above; the definitions marked as our reconstructions apply).")
    return Section("claims", "What this run does and does not reproduce", text, data={"claims": rows},
                   tables={"Study claims vs this run": table})
