"""Routing fidelity: how often the selected top-k SET changes between dtypes or experts implementations.

    result = routing_fidelity(model, prompts, tokenizer=tok, dtypes=("bfloat16",), implementations=("batched_mm",))
    result.to_frame()            # per comparison and MoE layer: tokens, changed, share
    result.plot()

or ``python -m nnsight_moe.recipes.fidelity --model demo-moe --dtype bfloat16 --prompt "..."``.

The reference is ``model`` as it is (its dtype, its configured experts implementation). Each
comparison runs the UNATTACHED model once more on the same padded batches: a copy cast to another
dtype (end to end, like loading the checkpoint in that dtype), or the model itself switched to another
of transformers' experts implementations. Per MoE layer it reports the share of non-pad tokens whose
top-k expert set (order ignored) differs from the reference's, read from the routers' own output;
``layer = "any"`` rows count tokens that changed at at least one layer. Differences at a layer
propagate: a token re-routed early sees different inputs later. The per-token comparison is
:func:`nnsight_moe.check.topk_set_changed`, the same core as ``nnsight-moe check``'s top-k flips.

Local only: a remote model's dtype and kernels are the server's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["FidelityResult", "figures_from_json", "routing_fidelity", "section"]


@dataclass
class FidelityResult:
    """Rows ``{"comparison", "layer", "tokens", "changed", "share"}`` (layer an int, or ``"any"``);
    ``reference`` names the model's own dtype and experts implementation; ``unavailable`` maps a
    comparison the model cannot run to the reason."""

    rows: list[dict]
    reference: dict
    unavailable: dict

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["comparison", "layer", "tokens", "changed", "share"])

    def table(self):
        """Share of tokens with a changed top-k set: comparisons as columns, MoE layers (and "any") as rows."""
        frame = self.to_frame()
        if frame.empty:
            return frame
        return frame.pivot(index="layer", columns="comparison", values="share").reindex(
            list(dict.fromkeys(frame.layer)))

    def to_json(self) -> dict:
        return {"rows": self.rows, "reference": self.reference, "unavailable": self.unavailable}

    @classmethod
    def from_json(cls, data: dict) -> "FidelityResult":
        return cls(list(data["rows"]), dict(data["reference"]), dict(data["unavailable"]))

    def plot(self):
        """Share of tokens with a changed top-k set per MoE layer, one line per comparison."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.2))
        frame = self.to_frame()
        for name, rows in frame[frame.layer != "any"].groupby("comparison", sort=False):
            ax.plot(rows.layer.astype(int), 100 * rows.share, "o-", label=name)
        ax.set_xlabel("MoE layer"), ax.set_ylabel("tokens with a changed top-k set (%)")
        ax.set_title(f"Routing fidelity vs {self.reference['dtype']} / {self.reference['implementation']}")
        if len(frame):
            ax.legend(fontsize=8)
        return fig


def _reference_name(hf) -> str:
    impl = hf.get_experts_implementation().get("")
    return impl or "eager"


@torch.no_grad()
def routing_fidelity(model: Any, prompts: Sequence, *, tokenizer: Any = None, dtypes: Sequence[str] = ("bfloat16",),
                     implementations: Sequence[str] = (), batch_size: int = 16,
                     padding_side: str | None = None) -> FidelityResult:
    """Per MoE layer, the share of non-pad tokens of ``prompts`` whose top-k set changes (module docstring).

    Args:
        model: an UNATTACHED HF model / TransformerBridge / nnsight model (local weights).
        dtypes: dtypes to compare against (``"float32"``, ``"bfloat16"``, ``"float16"``); the model's own
            dtype is skipped. Each needs the memory of one more copy of the model.
        implementations: transformers experts implementations to compare (``"eager"``, ``"batched_mm"``,
            ``"grouped_mm"``); the configured one is skipped. One this model or device cannot run is listed
            in ``unavailable`` with the reason.
    """
    import nnsight_moe
    from nnsight_moe.check import IMPLEMENTATIONS, router_indices, topk_set_changed
    from nnsight_moe.models import DTYPES
    from nnsight_moe.recipes.routing_trace import _batches
    from nnsight_moe.recipes.runner import inputs

    hf = nnsight_moe.hf_model(model)
    layout = nnsight_moe.layout(hf)
    if nnsight_moe.handle_of(hf) is not None:
        raise ValueError("routing_fidelity compares the routers' own output: detach the model first (handle.detach())")
    bad = [d for d in dtypes if d not in DTYPES] + [i for i in implementations if i not in IMPLEMENTATIONS]
    if bad:
        raise ValueError(f"unknown dtype / experts implementation {bad[0]!r}; dtypes: {DTYPES}, "
                         f"implementations: {IMPLEMENTATIONS}")
    device = next(hf.parameters()).device
    batches = [{k: v.to(device) for k, v in inputs(b).items()}
               for b in _batches(model, prompts, tokenizer, batch_size, padding_side)]
    reference = {"dtype": str(hf.dtype).replace("torch.", ""), "implementation": _reference_name(hf)}
    base = [router_indices(hf, layout, b) for b in batches]
    variants: dict[str, list] = {}
    unavailable: dict[str, str] = {}
    for name in dtypes:
        if name == reference["dtype"]:
            continue
        try:
            other = copy.deepcopy(hf).to(getattr(torch, name))
            variants[name] = [router_indices(other, layout, b) for b in batches]
        except (RuntimeError, MemoryError, NotImplementedError) as err:
            unavailable[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
        finally:
            other = None
    previous = hf.get_experts_implementation()
    for name in implementations:
        if name == reference["implementation"]:
            continue
        try:
            hf.set_experts_implementation(name)
            variants[name] = [router_indices(hf, layout, b) for b in batches]
        except Exception as err:  # noqa: BLE001 - an implementation this model / device cannot run
            unavailable[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
        finally:
            hf.set_experts_implementation(previous)
    rows = []
    for name, runs in variants.items():
        any_changed, total = 0, 0
        per_layer = {i: [0, 0] for i in layout.moe_layers}
        for batch, ref, got in zip(batches, base, runs):
            keep = batch["attention_mask"].bool()
            changed = torch.stack([topk_set_changed(ref[i], got[i])[keep] for i in layout.moe_layers])  # [L, n]
            for row, i in enumerate(layout.moe_layers):
                per_layer[i][0] += int(changed[row].sum())
                per_layer[i][1] += int(keep.sum())
            any_changed += int(changed.any(0).sum())
            total += int(keep.sum())
        for i, (changed, tokens) in per_layer.items():
            rows.append({"comparison": name, "layer": i, "tokens": tokens, "changed": changed, "share": changed / tokens})
        rows.append({"comparison": name, "layer": "any", "tokens": total, "changed": any_changed,
                     "share": any_changed / total})
    return FidelityResult(rows, reference, unavailable)


def section(job: Any):
    """The ``fidelity`` section of the main job: the recipes' prompts in bfloat16 and float16 (a float32 model)
    or float32 (a low-precision one: one extra copy), and in every other experts implementation, against the
    model as loaded (local runs only)."""
    from nnsight_moe.check import IMPLEMENTATIONS
    from nnsight_moe.report import Section

    if not job.is_moe:
        return None
    if job.remote is not None:
        return Section("fidelity", "Routing fidelity across dtypes and experts implementations (skipped)",
                       f"skipped: with remote={job.remote!r} the model's dtype and kernels are the server's.",
                       data={"skipped": "remote run"})
    import nnsight_moe

    prompts = job.sample().prompts
    own = str(nnsight_moe.hf_model(job.model).dtype).replace("torch.", "")
    other = ("bfloat16", "float16") if own == "float32" else ("float32",)  # one extra copy for real checkpoints
    result = routing_fidelity(job.model, prompts, tokenizer=job.tokenizer, dtypes=other,
                              implementations=IMPLEMENTATIONS, batch_size=job.batch_size)
    ref = result.reference
    text = (f"Share of the {result.rows[0]['tokens'] if result.rows else 0} non-pad prompt tokens whose top-k expert "
            f"set changes against the model as loaded ({ref['dtype']}, experts implementation "
            f"{ref['implementation']}); 'any': changed at at least one MoE layer.")
    if result.unavailable:
        text += " Not run: " + "; ".join(f"{k} ({v})" for k, v in result.unavailable.items()) + "."
    return Section("fidelity", "Routing fidelity across dtypes and experts implementations", text,
                   data=result.to_json(), tables={"Tokens with a changed top-k set (share)": result.table()},
                   figures=figures_from_json(result.to_json()))


def figures_from_json(data: dict) -> dict:
    """The section's figures ``{name: (title, figure)}`` from its results.json data alone (re-plotting)."""
    if "rows" not in data:  # a skipped section
        return {}
    return {"fidelity_layers": ("Top-k set changes per MoE layer", FidelityResult.from_json(data).plot())}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m nnsight_moe.recipes.fidelity --model NAME [--dtype D ...] [--implementation I ...] --prompt T``."""
    import argparse

    from nnsight_moe.check import DEFAULT_PROMPTS
    from nnsight_moe.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo-moe")
    parser.add_argument("--dtype", action="append", default=None)
    parser.add_argument("--implementation", action="append", default=[])
    parser.add_argument("--prompt", action="append", default=None)
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model)
    result = routing_fidelity(model, args.prompt or list(DEFAULT_PROMPTS), tokenizer=tokenizer,
                              dtypes=args.dtype or ("bfloat16",), implementations=args.implementation)
    print(result.table().to_string())
    for name, why in result.unavailable.items():
        print(f"{name}: not run ({why})")


if __name__ == "__main__":
    main()
