"""Expert lenses: which tokens each expert (routed or shared) and each neuron promotes or suppresses.

    lens = expert_lens(model, prompts, tokenizer=tok)      # on prompts, through the frozen final readout
    lens.table()                                           # one row per (layer, expert, source)
    weights = weight_lens(model, tokenizer=tok)            # weight-only: the experts' output directions
    neurons = neuron_lens(model, layer=1, expert=3, tokenizer=tok, prompts=prompts)

or ``python -m nnsight_moe.recipes.lenses --model demo-moe --prompt "..."``.

**On prompts** (``source="prompts"``): an expert's contribution to the residual at a token is
``c = g · E_e(x)`` (its gate weight times its output; for the shared expert ``s · S(x)``). Through the
final readout with the final norm's scale held at its value on the model's REAL final residual at that
token (as the attribution recipe does), the contribution changes the logits by
``Δ = W_U (γ ⊙ c) / rms`` (``/ std`` for LayerNorm, whose mean is held fixed too), exactly, since
the frozen readout is linear in ``c``. The lens is the mean of ``Δ`` over every non-pad token that
selected the expert: the tokens with the largest mean ``Δ`` are *promoted*, the smallest *suppressed*.

**Weight-only** (``source="weights"``): the expert's output directions are the top right-singular
vectors of its down projection (``W_down`` [d_model, d_expert]); each is projected through
``W_U diag(γ)``. The sign of a singular vector is arbitrary, so "promoted" / "suppressed" are the two
ends of one direction, oriented so that the promoted end holds the largest absolute logit. Families
with a norm after each expert (``post_expert_norm``) are not linear in ``W_down``: their weight-only
lens is that of ``W_down`` alone.

**Neurons**: neuron k of an expert writes ``W_down[:, k]``; :func:`neuron_lens` projects it through
``W_U diag(γ)`` and, given prompts, multiplies it by the neuron's mean coefficient
``g · m_k / rms`` over the tokens that selected the expert (so the signs say what the neuron does on
those prompts).

Local models only (HF, TransformerBridge, nnsight models with local weights).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

__all__ = ["LensResult", "expert_lens", "neuron_lens", "section", "weight_lens"]

SHARED = "shared"


@dataclass
class LensResult:
    """``rows``: one dict per lens: ``layer``, ``expert`` (int, or ``"shared"``), ``neuron`` (int, -1 for a
    whole expert), ``source`` (``"prompts"`` / ``"weights"`` / ``"direction N"``), ``tokens`` (tokens that
    selected it on the prompts; None for weight-only), ``promoted`` / ``suppressed``: ``[[token, Δlogit], ...]``."""

    rows: list[dict]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def table(self, top: int = 5, max_rows: int | None = None):
        """One line per lens with its ``top`` promoted and suppressed tokens as text."""
        import pandas as pd

        show = lambda pairs: " ".join(repr(t)[1:-1] if isinstance(t, str) else str(t) for t, _ in pairs[:top])  # noqa: E731
        rows = [{"layer": r["layer"], "expert": r["expert"], **({"neuron": r["neuron"]} if r["neuron"] >= 0 else {}),
                 "source": r["source"], "tokens": "-" if r["tokens"] is None else r["tokens"], "promoted": show(r["promoted"]),
                 "suppressed": show(r["suppressed"])} for r in self.rows]
        frame = pd.DataFrame(rows)
        return frame if max_rows is None else frame.head(max_rows)

    def to_json(self) -> dict:
        return {"rows": self.rows}

    @classmethod
    def from_json(cls, data: dict) -> "LensResult":
        return cls(list(data["rows"]))


# ------------------------------------------------------------------------------------ readout
@dataclass
class _Readout:
    unembed: Tensor  # [V, D] float32
    gamma: Tensor  # [D]
    norm: nn.Module
    eps: float
    layer_norm: bool

    def scale(self, final: Tensor) -> Tensor:
        """1 / rms (1 / std for LayerNorm) of the real final residual [..., D] -> [...]."""
        final = final.float()
        if self.layer_norm:
            return torch.rsqrt(final.var(-1, unbiased=False) + self.eps)
        return torch.rsqrt(final.pow(2).mean(-1) + self.eps)

    def top(self, vectors: Tensor, top: int, tokenizer: Any, orient: bool = False) -> list[tuple[list, list]]:
        """(promoted, suppressed) ``[[token, Δlogit], ...]`` of each vector [M, D] through ``W_U diag(γ)``."""
        out, vectors = [], vectors.to(self.unembed.device)
        for start in range(0, vectors.shape[0], 64):
            logits = (vectors[start : start + 64].float() * self.gamma) @ self.unembed.T
            for row in logits:
                if orient and row.max() < -row.min():
                    row = -row
                hi, lo = row.topk(min(top, row.numel())), (-row).topk(min(top, row.numel()))
                out.append((_named(hi.indices, hi.values, tokenizer), _named(lo.indices, -lo.values, tokenizer)))
        return out


def _named(ids: Tensor, values: Tensor, tokenizer: Any) -> list:
    return [[tokenizer.decode([int(i)]) if tokenizer is not None else int(i), round(float(v), 5)]
            for i, v in zip(ids, values)]


@torch.no_grad()
def _final_norm(hf: nn.Module) -> nn.Module:
    """The module whose output the unembedding reads: found by one two-token forward, matching the output of
    every norm-like module (class name containing "norm") with the unembedding's input."""
    from nnsight_moe.hooks import unwrap

    unembed = hf.get_output_embeddings()
    if unembed is None:
        raise ValueError(f"{type(hf).__name__} has no unembedding (get_output_embeddings() is None): the lenses "
                         "project through the final readout of a causal LM")
    seen, outputs, handles = {}, [], []
    handles.append(unembed.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0])))
    for module in hf.modules():
        if "norm" in type(unwrap(module)).__name__.lower() and module is not unembed:
            handles.append(module.register_forward_hook(lambda m, a, o: outputs.append((m, o))))
    try:
        device = next(hf.parameters()).device
        hf(input_ids=torch.tensor([[1, 2]], device=device))
    finally:
        for h in handles:
            h.remove()
    x = seen.get("x")
    found = [m for m, o in outputs if isinstance(o, Tensor) and x is not None and o.shape == x.shape
             and (o is x or torch.equal(o, x))]
    if not found:
        raise ValueError(f"{type(hf).__name__}: no norm module's output is the unembedding's input; the lenses need "
                         "the final norm (final norm -> unembedding)")
    return found[-1]


def _readout(hf: nn.Module) -> _Readout:
    from nnsight_moe.hooks import unwrap
    from nnsight_moe.recipes.attribution import rms_gamma

    module = _final_norm(hf)
    norm = unwrap(module)
    eps = float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6))
    unembed = unwrap(hf.get_output_embeddings()).weight.detach().float()
    if isinstance(norm, nn.LayerNorm):
        return _Readout(unembed, norm.weight.detach().float(), module, eps, True)
    return _Readout(unembed, rms_gamma(norm, eps).detach(), module, eps, False)


def _down(hf: nn.Module, layout: Any, layer: int, expert: int | str) -> Tensor:
    """The down projection of a routed expert (or the shared expert) as [d_model, d_inner], float32."""
    from nnsight_moe.hooks import unwrap

    info = layout.layer(layer)
    if expert == SHARED:
        if not info.has_shared:
            raise ValueError(f"layer {layer} has no shared expert")
        return unwrap(unwrap(hf.get_submodule(info.shared)).down_proj).weight.detach().float()
    experts = unwrap(hf.get_submodule(info.experts))
    if not isinstance(expert, int) or not 0 <= expert < info.n_experts:
        raise ValueError(f"expert must be an int in 0..{info.n_experts - 1} or 'shared', got {expert!r}")
    from nnsight_moe.recipes.attribution import _down_columns  # fused, [E, in, out] (Llama 4), DBRX's 2-D w2

    return _down_columns(experts, torch.tensor([expert]))[0].detach().T


# ------------------------------------------------------------------------------------ capture on prompts
def _lens_batch(state: dict, model: Any, batch: dict) -> dict:
    """Accumulate one batch's scaled contributions per expert (runs the attached HF ``model``)."""
    from nnsight_moe.recipes.runner import inputs, model_device

    seen, device = state["seen"], model_device(model)
    seen.clear()
    model(**{k: v.to(device) for k, v in inputs(batch).items()}, use_cache=False)
    keep = batch["attention_mask"].bool().to(device)
    scale = state["readout"].scale(seen["final"])[keep]  # [n]
    sums = {}
    for i in state["layers"]:
        idx = seen[(i, "hook_topk_indices")][keep].long()  # [n, k]
        w = seen[(i, "hook_topk_weights")][keep].float()
        coef = (w * scale[:, None]).reshape(-1)  # [n k]
        flat = idx.reshape(-1)
        out = seen[(i, "hook_expert_out")][keep].float().reshape(flat.numel(), -1)
        acts = seen[(i, "hook_expert_acts")][keep].float().reshape(flat.numel(), -1)
        E = state["n_experts"]
        entry = {"out": torch.zeros(E, out.shape[-1], device=out.device).index_add_(0, flat, out * coef[:, None]),
                 "acts": torch.zeros(E, acts.shape[-1], device=out.device).index_add_(0, flat, acts * coef[:, None]),
                 "count": torch.bincount(flat, minlength=E)}
        if (i, "hook_shared_out") in seen:
            gate = seen[(i, "hook_shared_gate")][keep].float().reshape(-1) * scale
            entry["shared_out"] = (seen[(i, "hook_shared_out")][keep].float() * gate[:, None]).sum(0)
            entry["shared_acts"] = (seen[(i, "hook_shared_acts")][keep].float() * gate[:, None]).sum(0)
            entry["shared_count"] = int(keep.sum())
        sums[i] = entry
    return sums


def _capture(model: Any, prompts: Sequence, tokenizer: Any, batch_size: int, padding_side: str | None) -> tuple:
    """(readout, {layer: {"out" [E, D], "acts" [E, d_e], "count" [E], shared sums}}) summed over every batch."""
    import nnsight_moe
    from nnsight_moe.hooks import TemporaryHooks
    from nnsight_moe.recipes.routing_trace import _batches
    from nnsight_moe.recipes.runner import run_batches

    hf = nnsight_moe.hf_model(model)
    readout = _readout(hf)
    batches = _batches(model, prompts, tokenizer, batch_size, padding_side)
    with nnsight_moe.attached(hf) as handle:
        layout = handle.layout
        state = {"seen": {}, "readout": readout, "layers": list(layout.moe_layers), "n_experts": layout.n_experts}
        names = ["hook_topk_indices", "hook_topk_weights", "hook_expert_out", "hook_expert_acts"]
        added = TemporaryHooks()
        for i in layout.moe_layers:
            extra = ["hook_shared_out", "hook_shared_gate", "hook_shared_acts"] if layout.layer(i).has_shared else []
            for name in names + extra:
                added.add(handle.block(i)._modules[name],
                          lambda v, hook, key=(i, name): state["seen"].__setitem__(key, v.detach()))
        pre = readout.norm.register_forward_pre_hook(
            lambda m, a, k: state["seen"].__setitem__("final", (a[0] if a else k["hidden_states"]).detach()),
            with_kwargs=True)
        try:
            results = run_batches(hf, batches, functools.partial(_lens_batch, state), desc="expert lens", progress=False)
        finally:
            added.remove()
            pre.remove()
    total = {}
    for i in layout.moe_layers:
        total[i] = {key: sum(r[i][key] for r in results) for key in results[0][i]}
    return readout, layout, total


def expert_lens(model: Any, prompts: Sequence, *, tokenizer: Any = None, top: int = 10, batch_size: int = 16,
                padding_side: str | None = None, weights: bool = True, directions: int = 1) -> LensResult:
    """Per MoE layer and expert (routed, and the shared expert), the tokens its contribution promotes and
    suppresses on ``prompts`` through the frozen final readout (module docstring); with ``weights`` also
    the weight-only lens of its top ``directions`` output directions (:func:`weight_lens`).

    Experts no token selected have no prompt lens (their weight-only lens is still given).
    """
    from nnsight_moe.recipes.prompts import model_tokenizer

    _check_top(top)
    tokenizer = model_tokenizer(model, tokenizer)
    readout, layout, total = _capture(model, prompts, tokenizer, batch_size, padding_side)
    rows = []
    for i, sums in total.items():
        count = sums["count"].cpu()
        used = (count > 0).nonzero().reshape(-1).tolist()
        means = sums["out"].cpu()[used] / count[used, None]
        keys = [(e, int(count[e])) for e in used]
        if "shared_out" in sums:
            means = torch.cat([means, (sums["shared_out"].cpu() / sums["shared_count"])[None]])
            keys.append((SHARED, sums["shared_count"]))
        for (expert, tokens), (promoted, suppressed) in zip(keys, readout.top(means, top, tokenizer)):
            rows.append({"layer": i, "expert": expert, "neuron": -1, "source": "prompts", "tokens": tokens,
                         "promoted": promoted, "suppressed": suppressed})
    if weights:
        rows += weight_lens(model, tokenizer=tokenizer, top=top, directions=directions).rows
    return LensResult(rows)


def weight_lens(model: Any, *, tokenizer: Any = None, top: int = 10, directions: int = 1,
                layers: Sequence[int] | None = None, experts: Any = None) -> LensResult:
    """Weight-only lens of every expert's top ``directions`` output directions (module docstring); ``layers``
    or ``experts`` (a collection of ``(layer, expert)`` pairs, ``expert`` an id or ``"shared"``) restrict it."""
    import nnsight_moe
    from nnsight_moe.recipes.prompts import model_tokenizer

    _check_top(top)
    if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
        raise ValueError(f"directions must be an integer >= 1, got {directions!r}")
    tokenizer = model_tokenizer(model, tokenizer)
    hf = nnsight_moe.hf_model(model)
    layout = nnsight_moe.layout(hf)
    readout = _readout(hf)
    rows = []
    for i in _layers(layout, layers):
        ids = list(range(layout.layer(i).n_experts)) + ([SHARED] if layout.layer(i).has_shared else [])
        ids = [e for e in ids if experts is None or (i, e) in experts]
        if not ids:
            continue
        vectors, keys = [], []
        for e in ids:
            u, s, _ = torch.linalg.svd(_down(hf, layout, i, e), full_matrices=False)  # columns of u: output directions
            for d in range(min(directions, u.shape[1])):
                vectors.append(u[:, d]), keys.append((e, d))
        for (e, d), (promoted, suppressed) in zip(keys, readout.top(torch.stack(vectors), top, tokenizer, orient=True)):
            rows.append({"layer": i, "expert": e, "neuron": -1, "source": "weights" if d == 0 else f"direction {d}",
                         "tokens": None, "promoted": promoted, "suppressed": suppressed})
    return LensResult(rows)


def neuron_lens(model: Any, layer: int, expert: int | str, *, neurons: Sequence[int] | None = None,
                prompts: Sequence | None = None, tokenizer: Any = None, top: int = 10, batch_size: int = 16,
                padding_side: str | None = None) -> LensResult:
    """Per neuron of one expert (``"shared"`` for the shared expert): the tokens its down-projection column
    promotes / suppresses, weight-only, or, with ``prompts``, times its mean coefficient on them."""
    import nnsight_moe
    from nnsight_moe.recipes.prompts import model_tokenizer

    _check_top(top)
    tokenizer = model_tokenizer(model, tokenizer)
    hf = nnsight_moe.hf_model(model)
    layout = nnsight_moe.layout(hf)
    layout.moe_layer(layer)  # a clear error for a layer that is not a MoE layer
    w = _down(hf, layout, layer, expert)  # [D, d_inner]
    chosen = list(range(w.shape[1])) if neurons is None else [int(n) for n in neurons]
    bad = [n for n in chosen if not 0 <= n < w.shape[1]]
    if bad:
        raise ValueError(f"neuron {bad[0]} is out of range: this expert has {w.shape[1]} neurons")
    readout = _readout(hf)
    columns, tokens, source = w[:, chosen].T, None, "weights"
    if prompts is not None:
        _, _, total = _capture(model, prompts, tokenizer, batch_size, padding_side)
        sums = total[layout.moe_layer(layer).index]
        if expert == SHARED:
            tokens, coef = sums["shared_count"], sums["shared_acts"].cpu() / max(sums["shared_count"], 1)
        else:
            tokens = int(sums["count"][expert])
            coef = sums["acts"].cpu()[expert] / max(tokens, 1)
        columns, source = columns * coef.to(columns.device)[chosen, None], "prompts"
    rows = [{"layer": layer, "expert": expert, "neuron": n, "source": source, "tokens": tokens,
             "promoted": p, "suppressed": s} for n, (p, s) in zip(chosen, readout.top(columns, top, tokenizer))]
    return LensResult(rows)


def _check_top(top: Any) -> None:
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an integer >= 1, got {top!r}")


def _layers(layout: Any, layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(layout.moe_layers)
    return [layout.moe_layer(i).index for i in layers]


def section(job: Any):
    """The ``lenses`` section of the main job: prompt and weight-only lenses of the most used experts."""
    from nnsight_moe.report import Section

    if not job.is_moe:
        return None
    if job.remote is not None:
        return Section("lenses", "Expert lenses (skipped)", f"skipped: the lenses read local weights; remote={job.remote!r}.",
                       data={"skipped": "remote run"})
    prompts = job.sample().prompts
    result = expert_lens(job.model, prompts, tokenizer=job.tokenizer, top=8, batch_size=job.batch_size, weights=False)
    on_prompts = sorted(result.rows, key=lambda r: -r["tokens"])
    kept = {(r["layer"], r["expert"]) for r in on_prompts[:128]}  # results.json: the 128 most used experts
    result = LensResult([r for r in on_prompts[:128]]
                        + weight_lens(job.model, tokenizer=job.tokenizer, top=8, experts=kept).rows)
    busiest = on_prompts[:24]
    table = LensResult(sorted(busiest, key=lambda r: (r["layer"], str(r["expert"])))).table(top=6)
    shown = {(r["layer"], r["expert"]) for r in busiest}
    weights = LensResult([r for r in result.rows if r["source"] == "weights" and (r["layer"], r["expert"]) in shown])
    weights = weights.table(top=6)
    text = (f"Tokens each expert's contribution (gate x output) promotes / suppresses through the final readout "
            f"with the final norm's scale frozen at the real residual's, averaged over the {len(prompts)} prompts' "
            "non-pad tokens that selected the expert (the 24 most used experts shown; results.json keeps the 128 most "
            "used); weight-only: the top output direction of the same experts' down projections through the "
            "unembedding.")
    return Section("lenses", "Expert lenses: promoted and suppressed tokens", text, data=result.to_json(),
                   tables={"On the prompts (most used experts)": table, "Weight-only (top output direction)": weights})


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m nnsight_moe.recipes.lenses --model NAME --prompt TEXT [...] [--layer L --expert E]``."""
    import argparse

    from nnsight_moe.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo-moe")
    parser.add_argument("--prompt", action="append", required=True)
    parser.add_argument("--layer", type=int, default=None, help="with --expert: a neuron lens of that expert")
    parser.add_argument("--expert", default=None, help="an expert id or 'shared'")
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model)
    if args.layer is not None:
        expert = args.expert if args.expert == SHARED else int(args.expert)
        result = neuron_lens(model, args.layer, expert, prompts=args.prompt, tokenizer=tokenizer, top=args.top)
    else:
        result = expert_lens(model, args.prompt, tokenizer=tokenizer, top=args.top)
    import pandas as pd

    with pd.option_context("display.max_colwidth", 80, "display.width", 200):
        print(result.table().to_string())


if __name__ == "__main__":
    main()
