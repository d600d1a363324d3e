"""Routing fidelity check: do the hooks reproduce THIS model, in THIS dtype, on THIS device?

    report = nnsight_moe.check_routing(model, tokenizer=tokenizer)     # or input_ids=...
    print(report.format())
    report.ok                                                          # False when an identity fails

or from the shell: ``nnsight-moe check --model <name or dir> [--dtype bfloat16] [--device cuda]`` (exit
code 1 when an identity fails). The tests check every supported family on tiny models; this is how a
user checks a real checkpoint the tests never saw. Per MoE layer it measures:

* **router**: the hooks' ``hook_topk_indices`` / ``hook_topk_weights`` (re-derived from the router
  logits by the adapter's routing rule) against what the model's own router returned in the same
  forward: same experts, same dtype, weights within one unit in the last place of that dtype;
* **routed**: ``hook_routed_out = sum_k hook_topk_weights * hook_expert_out``, and **moe**:
  ``hook_moe_out = hook_routed_out + hook_shared_gate * hook_shared_out`` (``= hook_routed_out``
  without shared experts), each within the rounding of the model's dtype (with the contract's extension:
  ``routed_scale * hook_routed_out``, ``hook_latent_out`` for a latent MoE, ``hook_moe_sum`` on the left
  for a post-processed block; a shared expert beside the block counts in the block output);
* **block**: the attached block output against the unattached model's, on the same prompts;
* **top-k flips**: the share of (non-pad) tokens whose selected expert SET differs between this dtype and float32
  (a float32 copy of the model, end to end), and between transformers' experts implementations
  (``eager`` / ``batched_mm`` / ``grouped_mm``, on the unattached model; each against the model's
  configured one). These are facts about the model, not failures of the hooks: they say how much
  routing itself depends on the precision and the kernels.

Model level: attached-vs-unattached max |Δlogit|, with the run-to-run noise of the unattached model
and the spread between experts implementations for scale. The attached model must agree with the
unattached one within max(noise, spread) (0.0 on a deterministic CPU run).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

__all__ = ["IMPLEMENTATIONS", "LayerCheck", "RoutingCheck", "check_routing", "flip_share", "router_indices",
           "topk_set_changed"]

#: transformers' experts implementations compared by the check (those the model cannot run are reported)
IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")

#: prompts used when the caller gives a tokenizer but no inputs
DEFAULT_PROMPTS = (
    "The capital of France is",
    "In 1969, the first humans walked on the",
    "def fibonacci(n):\n    return",
    "Water boils at a temperature of one hundred degrees",
    "The quick brown fox jumps over the lazy dog because",
    "Photosynthesis converts light energy into",
)


@dataclass
class LayerCheck:
    """One MoE layer's measurements. Deviations are max |a - b| over tokens (and features); ``*_tol`` the
    tolerance each must stay within; ``flips`` maps a comparison name to its share of tokens whose
    top-k set differs (None: not run)."""

    layer: int
    router_indices_equal: bool
    router_dtype: str
    hook_dtype: str
    router_weights_dev: float
    router_weights_tol: float
    routed_dev: float
    routed_tol: float
    moe_dev: float
    moe_tol: float
    block_dev: float
    flips: dict[str, float | None] = field(default_factory=dict)

    def failures(self, block_tol: float) -> list[str]:
        """The identities this layer fails, each as one line naming the measured and allowed values."""
        out = []
        if not self.router_indices_equal:
            out.append(f"layer {self.layer}: hook_topk_indices differ from the router's own selection")
        if self.hook_dtype != self.router_dtype:
            out.append(f"layer {self.layer}: hook_topk_weights are {self.hook_dtype}, the model multiplies {self.router_dtype}")
        if not self.router_weights_dev <= self.router_weights_tol:
            out.append(f"layer {self.layer}: hook_topk_weights differ from the router's by {self.router_weights_dev:.3g} "
                       f"(allowed {self.router_weights_tol:.3g})")
        if not self.routed_dev <= self.routed_tol:
            out.append(f"layer {self.layer}: routed_out != sum_k weight * expert_out by {self.routed_dev:.3g} "
                       f"(allowed {self.routed_tol:.3g})")
        if not self.moe_dev <= self.moe_tol:
            out.append(f"layer {self.layer}: moe_out != routed_out + gate * shared_out by {self.moe_dev:.3g} "
                       f"(allowed {self.moe_tol:.3g})")
        if not self.block_dev <= block_tol:
            out.append(f"layer {self.layer}: attached block output differs from the unattached model's by "
                       f"{self.block_dev:.3g} (allowed {block_tol:.3g})")
        return out


@dataclass
class RoutingCheck:
    """What :func:`check_routing` measured; ``ok`` is False when any identity fails (see :meth:`failures`)."""

    family: str
    dtype: str
    device: str
    n_tokens: int
    max_dlogit: float
    noise: float
    implementation_dlogit: dict[str, float | str]
    configured: str
    layers: list[LayerCheck]
    block_tolerance: float = 0.0  # allowed block-output deviation: noise / implementation spread of the blocks

    @property
    def tolerance(self) -> float:
        """Allowed attached-vs-unattached deviation: the larger of run-to-run noise and the spread
        between transformers' experts implementations (0.0 when both are 0)."""
        spread = [v for v in self.implementation_dlogit.values() if isinstance(v, float)]
        return max([self.noise] + spread)

    def failures(self) -> list[str]:
        """Every failed identity, one line each (empty when the check passes)."""
        out = []
        if not self.max_dlogit <= self.tolerance:
            out.append(f"attached logits differ from the unattached model's by {self.max_dlogit:.3g} "
                       f"(allowed {self.tolerance:.3g}: run-to-run noise / experts-implementation spread)")
        for layer in self.layers:
            out.extend(layer.failures(self.block_tolerance))
        return out

    @property
    def ok(self) -> bool:
        return not self.failures()

    def to_frame(self):
        """One row per MoE layer (pandas DataFrame)."""
        import pandas as pd

        rows = []
        for layer in self.layers:
            row = {k: v for k, v in vars(layer).items() if k != "flips"}
            row.update({f"flips_{name}": share for name, share in layer.flips.items()})
            rows.append(row)
        return pd.DataFrame(rows)

    def format(self) -> str:
        """The report as printed by ``nnsight-moe check``."""
        flips = list(self.layers[0].flips) if self.layers else []
        lines = [
            f"routing check: {self.family}, {self.dtype} on {self.device}, {self.n_tokens} tokens; "
            f"experts implementation when unattached: {self.configured}",
            f"attached vs unattached: max |dlogit| = {self.max_dlogit:.3g} (run-to-run noise {self.noise:.3g})",
        ]
        for name, value in self.implementation_dlogit.items():
            shown = f"{value:.3g}" if isinstance(value, float) else value
            lines.append(f"  unattached {name} vs {self.configured}: max |dlogit| = {shown}")
        head = ["layer", "router idx", "router w dev", "routed=Σw·out", "moe=routed+g·shared", "block dev"]
        head += [f"top-k≠ {name}" for name in flips]
        table = [head]
        for layer in self.layers:
            table.append([
                str(layer.layer),
                "same" if layer.router_indices_equal else "DIFFER",
                f"{layer.router_weights_dev:.2g}/{layer.router_weights_tol:.2g} {layer.hook_dtype}",
                f"{layer.routed_dev:.2g}/{layer.routed_tol:.2g}",
                f"{layer.moe_dev:.2g}/{layer.moe_tol:.2g}",
                f"{layer.block_dev:.2g}",
            ] + [("-" if layer.flips[n] is None else f"{100 * layer.flips[n]:.1f}%") for n in flips])
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        lines.append("per MoE layer (measured/allowed):")
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table]
        failures = self.failures()
        lines.append("PASS: every identity holds" if not failures else f"FAIL: {len(failures)} identities fail")
        lines += [f"  {line}" for line in failures]
        return "\n".join(lines)


def check_routing(model: Any, input_ids: Tensor | None = None, *, tokenizer=None, prompts: Sequence[str] | None = None,
                  attention_mask: Tensor | None = None, compare_float32: bool = True,
                  implementations: Sequence[str] = IMPLEMENTATIONS) -> RoutingCheck:
    """Check the hooks against ``model`` itself (an HF model, TransformerBridge or nnsight model).

    Args:
        model: a supported MoE model, in the dtype and on the device to check, not attached (the check
            attaches and detaches it itself, to compare both).
        input_ids: [batch, pos] token ids; else ``prompts`` (default: a few English / code prompts)
            encoded with ``tokenizer`` (default: the model's own, for nnsight / bridge models).
        attention_mask: for padded ``input_ids``.
        compare_float32: also run a float32 copy of the model (needs the memory of a float32 copy)
            and report per layer the share of tokens whose top-k set differs from it.
        implementations: transformers experts implementations to compare on the unattached model.

    Returns a :class:`RoutingCheck`; ``.ok`` is False and ``.failures()`` lists what failed when an
    identity does not hold. Raises ``UnsupportedModelError`` for dense models and unknown families.
    """
    import nnsight_moe
    from nnsight_moe.precision import eps

    hf = nnsight_moe.hf_model(model)
    layout = nnsight_moe.layout(hf)
    if any(info.loop_passes > 1 for info in layout.layers) or len(nnsight_moe.adapters.adapter_for(hf).stacks) > 1:
        raise nnsight_moe.UnsupportedModelError(
            f"check_routing does not run on {layout.family} models yet: it reads one call per MoE block and "
            "[batch, pos] router outputs of the prompt, and this family runs blocks several times per forward "
            "(loop passes) or over a second sequence (a canvas); the core tests (tests/test_core.py, "
            "test_precision.py) verify the family on tiny models")
    device = next(hf.parameters()).device
    batch = _inputs(hf, model, input_ids, attention_mask, tokenizer, prompts, device)
    if nnsight_moe.handle_of(hf) is not None:
        raise ValueError("check_routing compares the model attached and unattached: detach it first (handle.detach())")
    configured, previous = _configured(hf), hf.get_experts_implementation()
    with torch.no_grad():
        ref_logits, blocks, ref_indices = _run_unattached(hf, layout, batch)
        again, again_blocks, _ = _run_unattached(hf, layout, batch)
        noise = _dev(ref_logits, again)
        block_noise = max([0.0] + [_dev(again_blocks[i], blocks[i]) for i in layout.moe_layers])
        with nnsight_moe.attached(hf) as handle:
            logits, values, routers = _run_attached(hf, handle, batch)
        impl_dlogit, impl_indices, block_spread = {}, {}, 0.0
        for name in implementations:
            if name == configured:
                continue
            try:
                hf.set_experts_implementation(name)
                other, other_blocks, indices = _run_unattached(hf, layout, batch)
            except Exception as err:  # noqa: BLE001 - an implementation this model / device cannot run
                impl_dlogit[name] = f"unavailable ({type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''})"
                continue
            finally:
                hf.set_experts_implementation(previous)
            impl_dlogit[name] = _dev(other, ref_logits)
            impl_indices[name] = indices
            block_spread = max([block_spread] + [_dev(other_blocks[i], blocks[i]) for i in layout.moe_layers])
        f32_indices = _float32_indices(hf, layout, batch) if compare_float32 and hf.dtype != torch.float32 else None
    layers = []
    for index in layout.moe_layers:
        info = layout.layer(index)
        get = lambda name: values[f"{info.path}.{name}"]  # noqa: E731
        hf_weights, hf_indices = routers[index]
        weights, indices = get("hook_topk_weights"), get("hook_topk_indices")
        w_dtype = hf_weights.dtype
        same_idx = indices.shape == hf_indices.shape and torch.equal(indices, hf_indices)
        w_dev = _dev(weights, hf_weights) if weights.shape == hf_weights.shape else float("inf")
        w_tol = eps(w_dtype) * float(hf_weights.float().abs().max())
        act = _dtype_of(get("hook_expert_out"))
        terms = get("hook_expert_out").float()  # Llama 4: the weights scaled the experts' inputs, already inside
        terms = terms if info.gate_on_input else get("hook_topk_weights").float()[..., None] * terms
        routed_tol = (eps(act) + 4 * eps(torch.float32)) * float(terms.abs().sum(-2).max())
        routed_dev = _dev(get("hook_routed_out"), terms.sum(-2))
        moe = info.routed_scale * get("hook_routed_out").float()
        if info.d_latent:  # a latent MoE: the routed sum projected back to d_model (contract extension)
            moe = get("hook_latent_out").float()
        magnitude = moe.abs()
        if info.has_shared:
            shared = get("hook_shared_gate").float() * get("hook_shared_out").float()
            moe, magnitude = moe + shared, magnitude + shared.abs()
        moe_tol = (eps(act) + 4 * eps(torch.float32)) * float(magnitude.max())
        moe_hook = get("hook_moe_sum") if info.post else get("hook_moe_out")  # a post-processed block: its input
        flips, real = {}, batch["attention_mask"]  # padding positions are not counted
        if compare_float32 and hf.dtype != torch.float32:
            flips["float32"] = flip_share(ref_indices[index], f32_indices[index], real) if f32_indices else None
        for name in implementations:
            if name != configured:
                flips[name] = flip_share(ref_indices[index], impl_indices[name][index], real) if name in impl_indices else None
        layers.append(LayerCheck(
            layer=index, router_indices_equal=same_idx, router_dtype=_name(w_dtype), hook_dtype=_name(weights.dtype),
            router_weights_dev=w_dev, router_weights_tol=w_tol, routed_dev=routed_dev, routed_tol=routed_tol,
            moe_dev=_dev(moe_hook, moe), moe_tol=moe_tol,
            block_dev=_dev(get("hook_moe_out"), blocks[index].reshape(get("hook_moe_out").shape)), flips=flips,
        ))
    report = RoutingCheck(family=layout.family, dtype=_name(hf.dtype), device=str(device),
                          n_tokens=int(batch["input_ids"].numel()), max_dlogit=_dev(logits, ref_logits), noise=noise,
                          implementation_dlogit=impl_dlogit, configured=configured, layers=layers,
                          block_tolerance=max(block_spread, block_noise))
    return report


# ------------------------------------------------------------------------------------ runs
def _inputs(hf, model, input_ids, attention_mask, tokenizer, prompts, device) -> dict:
    if input_ids is not None:
        ids = torch.as_tensor(input_ids, device=device)
        if ids.ndim == 1:
            ids = ids[None]
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask, device=device)
        return {"input_ids": ids, "attention_mask": mask}
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("check_routing needs input_ids, or prompts with a tokenizer (the model has none)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(list(prompts or DEFAULT_PROMPTS), return_tensors="pt", padding=True)
    vocab = hf.get_input_embeddings().weight.shape[0]
    if int(encoded["input_ids"].max()) >= vocab:
        raise ValueError(f"the tokenizer produced id {int(encoded['input_ids'].max())} but the model's vocabulary "
                         f"has {vocab} entries: tokenizer and checkpoint do not match")
    return {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}


def _configured(hf) -> str:
    impl = hf.get_experts_implementation().get("")
    return impl or "eager"


def _forward_hooks(hf, layout, paths, record) -> list:
    handles = []
    for index in layout.moe_layers:
        module = _inner(hf.get_submodule(paths(layout.layer(index))))
        handles.append(module.register_forward_hook(lambda m, a, o, index=index: record(index, o), prepend=True))
    return handles


def _selection_hooks(hf, layout, record) -> list:
    """Hooks calling ``record(layer, weights, indices)`` with the selection the MODEL computes (flat [tokens, k]),
    ahead of any attach hook: the router's (weights, indices) outputs; DBRX's are the experts' arguments (its
    router gives logits only, the block routes); Llama 4's its own top-k of the logits, weights read off its dense
    sigmoid scores; Zaya's with its skip slots given the skip expert's id (:func:`_selection`)."""
    from nnsight_moe.adapters import adapter_for

    adapter = adapter_for(hf)
    if adapter.routing_in_block:
        handles = []
        for index in layout.moe_layers:
            experts = _inner(hf.get_submodule(layout.layer(index).experts))
            handles.append(experts.register_forward_pre_hook(
                lambda m, a, index=index: record(index, a[2].detach(), a[1].detach()), prepend=True))
        return handles
    if adapter.gate_on_input:
        def dense(i, o):
            chosen = torch.topk(o[1].detach(), layout.layer(i).top_k, dim=-1).indices
            record(i, o[0].detach().gather(-1, chosen), chosen)
        return _forward_hooks(hf, layout, lambda info: info.router, dense)
    return _forward_hooks(hf, layout, lambda info: info.router, lambda i, o: record(
        i, *(t.detach() for t in _selection(hf, layout, i, o))))


def _inner(module: nn.Module) -> nn.Module:
    from nnsight_moe.hooks import unwrap

    return unwrap(module)


def _run_unattached(hf, layout, batch) -> tuple[Tensor, dict, dict]:
    """(logits, {layer: block output}, {layer: router's top-k indices [b, p, k]}) of the unattached model."""
    blocks, indices = {}, {}
    b, p = batch["input_ids"].shape
    handles = _forward_hooks(hf, layout, lambda info: info.path,
                             lambda i, o: blocks.__setitem__(i, (o[0] if isinstance(o, tuple) else o).detach().clone()))
    handles += _selection_hooks(hf, layout, lambda i, weights, chosen: indices.__setitem__(
        i, chosen.reshape(b, p, -1).clone()))
    beside = {}  # a shared expert beside the block (Granite): the layer adds its output to the block's
    for index in layout.moe_layers:
        if layout.layer(index).shared_outside:
            module = _inner(hf.get_submodule(layout.layer(index).shared))
            handles.append(module.register_forward_hook(
                lambda m, a, o, index=index: beside.__setitem__(index, o.detach().clone()), prepend=True))
    try:
        logits = hf(**batch).logits
    finally:
        for h in handles:
            h.remove()
    for index, shared in beside.items():
        blocks[index] = blocks[index] + shared.reshape(blocks[index].shape)
    return logits, blocks, indices


def _run_attached(hf, handle, batch) -> tuple[Tensor, dict, dict]:
    """(logits, {hook path: value}, {layer: (router's own weights, indices)}) of the attached model.

    The router capture is a forward hook registered ahead of the attach hook (``prepend``), so it sees
    what the model's router itself returned, before the hooks re-derive it.
    """
    layout = handle.layout
    b, p = batch["input_ids"].shape
    routers, values = {}, {}
    handles = _selection_hooks(hf, layout, lambda i, weights, chosen: routers.__setitem__(
        i, (weights.reshape(b, p, -1).clone(), chosen.reshape(b, p, -1).clone())))
    points = handle.hook_points()
    for name, point in points.items():
        point.add_hook(lambda tensor, hook, name=name: values.__setitem__(name, tensor.detach().clone()))
    try:
        logits = hf(**batch).logits
    finally:
        for h in handles:
            h.remove()
        for point in points.values():
            point.remove_hooks()
    return logits, values, routers


def _selection(hf, layout, index: int, output) -> tuple[Tensor, Tensor]:
    """(weights, indices) a router returned. Zaya's router hands a slot routed to its skip expert on as
    (expert 0, weight 0): those slots are given the skip expert's id back, as ``hook_topk_indices`` holds it."""
    weights, indices = output[1], output[2]
    router = _inner(hf.get_submodule(layout.layer(index).router))
    if hasattr(router, "num_router_classes"):  # Zaya: classes = experts + the skip expert
        indices = indices.masked_fill((weights == 0) & (indices == 0), router.num_experts)
    return weights, indices


def _float32_indices(hf, layout, batch) -> dict | None:
    """Top-k indices of a float32 copy of ``hf`` (None when the copy does not fit in memory)."""
    try:
        copy32 = copy.deepcopy(hf).float()
    except (RuntimeError, MemoryError):
        return None
    try:
        _, _, indices = _run_unattached(copy32, layout, batch)
    finally:
        del copy32
    return indices


# ------------------------------------------------------------------------------------ small helpers
def topk_set_changed(a: Tensor, b: Tensor) -> Tensor:
    """Bool [..., ] per token: whether the top-k expert SET differs between indices ``a`` and ``b`` [..., k]."""
    a, b = a.sort(-1).values, b.to(a.device).sort(-1).values
    return (a != b).any(-1)


def flip_share(a: Tensor, b: Tensor, mask: Tensor | None = None) -> float:
    """Share of tokens whose top-k expert SET differs between indices ``a`` and ``b`` [b, p, k], over the
    tokens where ``mask`` [b, p] holds (all tokens without a mask; NaN when the mask holds nowhere).

    The core of the check's top-k flips and of :mod:`nnsight_moe.recipes.fidelity`.
    """
    changed = topk_set_changed(a, b)
    if mask is not None:
        changed = changed[mask.to(changed.device).bool()]
    return float(changed.float().mean()) if changed.numel() else float("nan")


def router_indices(hf: nn.Module, layout: Any, batch: dict) -> dict[int, Tensor]:
    """{MoE layer: top-k indices [b, p, k] the UNATTACHED model's routers return} for one forward on ``batch``."""
    return _run_unattached(hf, layout, batch)[2]


def _dev(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float().to(a.device)).abs().max()) if a.numel() else 0.0


def _dtype_of(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
