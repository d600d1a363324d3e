"""Decoder layers that are not ``h + attn(h) + mlp(h + attn)``: what attribution holds fixed to stay exact.

LPI (:mod:`nnsight_moe.recipes.attribution`) needs every component as a vector added to ONE residual
stream that the frozen final projection reads. Three layer shapes reach the residual only through a
per-token map that is fixed once the forward has run; attribution holds each map at its real value, as it
holds the final norm's RMS, so the contributions of the parts still sum exactly to what the model added:

* **post-norms** (Gemma-4, FlexOlmo, AFMoE, ...: ``h + norm(attn(h))``; the norm scales by its own
  input's RMS): a part ``c`` of the norm's input contributes ``γ ⊙ c / rms(real input)``. Heads go
  through the post-attention norm, experts / shared / neurons through the post-FFN norm.
* **Gemma-4's FFN** (no MoE block: router and experts on the decoder layer beside a dense MLP):
  ``F = post_ffn_norm(norm_1(mlp(x)) + norm_2(experts(x', router(u))))``. Routed parts go through
  ``norm_2`` then the post-FFN norm, the dense MLP (attributed like a shared expert: the ``shared`` row,
  neurons with ``expert = -1``) through ``norm_1`` then the post-FFN norm, each norm's scale frozen at
  its real input. Its per-layer input (``h + post_per_layer_input_norm(...)``, added after the FFN) is
  a component of its own (row ``per_layer_input``), and ``layer_scalar`` multiplies the whole residual
  after each layer: every component of layer l reaches the final residual times
  ``S_l = Π_{j >= l} layer_scalar_j``, and the states are read in that final frame (``S_l h``).
* **DeepSeek-V4's hyper-connections** (``hc_mult`` parallel residual streams ``R [N, D]``): a layer's
  attention and MoE block read a weighted collapse of the streams and write ``post ⊗ out + combᵀ R``;
  the model's last step collapses the streams with weights ``pre`` (``hc_head``) before the final norm.
  With ``post``, ``comb`` and ``pre`` held at their real values (they are computed from the streams),
  the final residual is exactly ``Σ_sites α_site · out_site + v_0 · R^0``: each site's output reaches it
  times one scalar ``α`` per token, found by running the mixing backwards from ``pre``
  (``α = v · post``, ``v ← comb · v``). States are read in that frame too: the state entering layer l is
  ``H^{l-1} = v_l · R^{l-1}`` (the real streams, weighted by what reaches the final residual), so
  ``H^l = H^{l-1} + α_A A^l + α_F F^l`` is checked on the data, like the plain residual stream.

:func:`find` says which applies to a model, :func:`install` adds the hooks that read the real values,
:func:`finish` rewrites a capture into the final frame and adds the per-layer maps ``captured["maps"]``
(``head`` / ``moe`` / ``dense``: ``[P, D]`` factors from a part's own output space to the final residual).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from nnsight_moe.hooks import unwrap

__all__ = ["LayerStructure", "Structure", "find", "finish", "install", "refuse_layout"]


@dataclass
class LayerStructure:
    """The modules of one decoder layer that put its outputs on the residual through a frozen map."""

    attn_norm: nn.Module | None = None  # applied to the token mixer's output before the residual add
    ffn_norm: nn.Module | None = None  # applied to the FFN output before the residual add
    dense_norm: nn.Module | None = None  # Gemma-4: the parallel dense MLP's own output norm
    moe_norm: nn.Module | None = None  # Gemma-4: the routed sum's own output norm
    dense_mlp: nn.Module | None = None  # Gemma-4 MoE layer: the parallel dense MLP (the `shared` row)
    extra: nn.Module | None = None  # Gemma-4: the per-layer-input norm, whose output is added after the FFN
    scalar: Tensor | None = None  # Gemma-4: layer_scalar, multiplying the residual after the layer
    attn_hc: nn.Module | None = None  # DeepSeek-V4: hyper-connection around the attention
    ffn_hc: nn.Module | None = None  # DeepSeek-V4: hyper-connection around the MoE block
    #: Beam's depth-scaled residual adds, ``h_out = a * h_in + b * out`` per site: (a, b) for the attention and
    #: the FFN site (constants of the layer's position)
    attn_add: tuple[float, float] | None = None
    ffn_add: tuple[float, float] | None = None

    @property
    def plain(self) -> bool:
        return all(v is None for v in vars(self).values())


@dataclass
class Structure:
    """Per-layer :class:`LayerStructure` plus the final stream collapse (DeepSeek-V4's ``hc_head``)."""

    layers: list[LayerStructure]
    hc_head: nn.Module | None = None
    kinds: set[str] = field(default_factory=set)  # what applies: "post-norm", "gemma4-ffn", "layer-scalar", ...
    #: Why attribution cannot hold this stack's maps fixed (raised by :func:`install`, so that finding the
    #: parts still works for the recipes that only need the heads); None when it can.
    refused: str | None = None

    @property
    def streams(self) -> bool:
        return self.hc_head is not None

    def describe(self) -> str:
        return ", ".join(sorted(self.kinds))


def _rms_norm(module: nn.Module | None, what: str, refused: list) -> nn.Module | None:
    """``module``; a reason appended to ``refused`` unless it is an RMS-type norm (no bias, no mean subtraction)."""
    if module is None:
        return None
    inner = unwrap(module)
    if isinstance(inner, nn.LayerNorm) or getattr(inner, "bias", None) is not None:
        refused.append(f"attribution through the {what} ({type(inner).__name__}) needs an RMS-type norm without "
                       "bias (a LayerNorm's mean and bias are not a scale that can be held fixed per token)")
    return module


def refuse_layout(hf: nn.Module) -> None:
    """Raise a precise ``ValueError`` for decoder layouts LPI's per-layer decomposition cannot describe.

    * LongCat-Flash: each decoder layer runs TWO attention + dense-MLP sub-blocks and a shortcut MoE
      (``h + a0 + m0 + a1 + m1 + moe(post_attention_layernorm[0](h + a0))``); attribution reads one token
      mixer and one MLP per layer, so the second sub-block (and the MoE beside the first MLP) has no row.
    * Qwen4-Exp: ``hc_count`` parallel residual streams with a per-token, per-channel gated injection
      (``R += w ⊗ out``) and a final gated group-RMS collapse (``hyper_connection_mixer``) instead of a final
      norm; this hyper-connection form is not among those :func:`find` models.
    """
    name = type(hf).__name__
    for module in hf.modules():
        if isinstance(getattr(module, "self_attn", None), nn.ModuleList) and isinstance(getattr(module, "mlps", None), nn.ModuleList):
            raise ValueError(
                f"{name}: each decoder layer ({type(module).__name__}) holds {len(module.self_attn)} attention and "
                f"{len(module.mlps)} dense-MLP sub-blocks plus a shortcut MoE (h + attn_0 + mlp_0 + attn_1 + mlp_1 + moe); "
                "local attribution reads one token mixer and one MLP per decoder layer (h + attn + mlp), so the "
                "second sub-block would have no row and the layer rows would not sum to the layer's output.")
        if type(module).__name__.endswith("GatedResidual") and hasattr(module, "block_inject_weight"):
            raise ValueError(
                f"{name}: its decoder layers write {getattr(module, 'hc_count', '?')} parallel residual streams through "
                f"gated hyper-connections ({type(module).__name__}: R += w ⊗ out, w per token from the streams) and the "
                "model reads them through a gated group-RMS collapse (hyper_connection_mixer), not a final norm; "
                f"attribution models only the hyper-connections {sorted(_HC_OUTPUTS)} with a final hc_head of "
                f"{sorted(_HEAD_PRE)}, so it refuses this one rather than score against the wrong readout.")


def find(config: Any, stack: list[nn.Module], base: nn.Module) -> Structure | None:
    """The :class:`Structure` of a decoder stack, or None for the plain pre-norm residual stream."""
    layers, kinds, refused = [], set(), []
    for wrapped in stack:
        layer = unwrap(wrapped)
        found = LayerStructure()
        ffn_norm = _module(layer, "post_feedforward_layernorm", "post_mlp_layernorm")
        if ffn_norm is not None:  # OLMo-2 / Gemma-style post-norms; Kolibri's post_attention_layernorm is its pre-MLP norm
            found.ffn_norm = _rms_norm(ffn_norm, "post-FFN norm", refused)
            attn_norm = _module(layer, "post_self_attn_layernorm", "post_attention_layernorm")
            found.attn_norm = _rms_norm(attn_norm, "post-attention norm", refused)
            kinds.add("post-norms")
        if getattr(layer, "enable_moe_block", False) and isinstance(getattr(layer, "experts", None), nn.Module):
            found.dense_norm = _rms_norm(layer.post_feedforward_layernorm_1, "dense MLP's output norm", refused)
            found.moe_norm = _rms_norm(layer.post_feedforward_layernorm_2, "routed sum's output norm", refused)
            found.dense_mlp = layer.mlp
            kinds.add("parallel dense MLP + MoE (Gemma-4)")
        if getattr(layer, "hidden_size_per_layer_input", 0) and isinstance(
                getattr(layer, "post_per_layer_input_norm", None), nn.Module):
            found.extra = layer.post_per_layer_input_norm
            kinds.add("per-layer inputs")
        if type(layer).__name__ == "BeamDecoderLayer":  # depth_scaled_residual_add: out / sqrt(i) + h sqrt((i - 1) / i)
            found.attn_add, found.ffn_add = (_depth_scaled(layer.attn_residual_add_idx),
                                             _depth_scaled(layer.mlp_residual_add_idx))
            kinds.add("depth-scaled residual adds (Beam)")
        scalar = getattr(layer, "layer_scalar", None)
        if isinstance(scalar, Tensor) and scalar.numel() == 1:
            found.scalar = scalar
            kinds.add("layer scalars")
        if isinstance(getattr(layer, "attn_hc", None), nn.Module) and isinstance(getattr(layer, "ffn_hc", None), nn.Module):
            found.attn_hc, found.ffn_hc = layer.attn_hc, layer.ffn_hc
        layers.append(found)
    hc_head = None
    if any(f.attn_hc is not None for f in layers):
        owners = (base, getattr(base, "language_model", None))
        hc_head = next((getattr(o, "hc_head") for o in owners if isinstance(getattr(o, "hc_head", None), nn.Module)), None)
        if hc_head is None or not all(f.attn_hc is not None for f in layers) or not _deepseek_v4_hc(layers[0].attn_hc, hc_head):
            refused.append(
                "this model's decoder layers mix parallel residual streams (hyper-connections) in a form attribution "
                f"does not model (it models attn_hc / ffn_hc of {sorted(_HC_OUTPUTS)} on every layer and a final "
                f"hc_head of {sorted(_HEAD_PRE)}); attribution needs the streams' mixing weights")
        kinds.add("hyper-connections")
    if not kinds:
        return None
    return Structure(layers, hc_head, kinds, refused[0] if refused else None)


def _depth_scaled(index: int) -> tuple[float, float]:
    """(a, b) of Beam's ``depth_scaled_residual_add(out, h, index) = out / sqrt(index) + h * sqrt((index - 1) / index)``."""
    import math

    return math.sqrt((index - 1) / index), 1.0 / math.sqrt(index)


def _module(layer: nn.Module, *names: str) -> nn.Module | None:
    return next((getattr(layer, n) for n in names if isinstance(getattr(layer, n, None), nn.Module)), None)


#: Hyper-connection modules attribution reverses: returning (post, comb, collapsed) (R_out = post ⊗ out + combᵀ R_in)
#: or (post, collapsed) (HY-V4: comb is the identity, R_out = post ⊗ out + R_in).
_HC_OUTPUTS = {"DeepseekV4HyperConnection": 3, "Glm5NextTextHyperConnection": 3, "HYV4HyperConnection": 2,
               "HYV4VLHyperConnection": 2}


def _deepseek_v4_hc(hc: nn.Module, head: nn.Module) -> bool:
    """Whether the hyper-connection and final-collapse modules are ones whose mixing attribution reverses."""
    return type(unwrap(hc)).__name__ in _HC_OUTPUTS and type(unwrap(head)).__name__ in _HEAD_PRE


def install(structure: Structure, got: dict, pick) -> list:
    """Forward hooks reading what :func:`finish` needs into ``got["structure"]`` (last positions, float32).

    The post-norms' outputs replace the token mixer's / MLP's in ``got["attn_out"]`` / ``got["mlp_out"]``
    (they are what the layer adds to its residual); their inputs are kept to freeze their scales.
    """
    if structure.refused:
        raise ValueError(structure.refused)
    store: dict = got.setdefault("structure", {})
    handles = []

    def keep(module, key, i, what="output", into=None):
        def hook(m, a, o):
            value = a[0] if what == "input" else (o[0] if isinstance(o, tuple) else o)
            (got[into] if into else store)[i if into else (key, i)] = pick(value)
        handles.append(module.register_forward_hook(hook))

    for i, f in enumerate(structure.layers):
        if f.attn_norm is not None:
            keep(f.attn_norm, "attn_raw", i, "input")
            keep(f.attn_norm, None, i, into="attn_out")
        if f.ffn_norm is not None:
            keep(f.ffn_norm, "ffn_raw", i, "input")
            keep(f.ffn_norm, None, i, into="mlp_out")
        if f.dense_norm is not None:
            keep(f.dense_norm, "dense_raw", i, "input")
            keep(f.moe_norm, "moe_raw", i, "input")
            down = unwrap(f.dense_mlp).down_proj
            handles.append(down.register_forward_pre_hook(
                lambda m, a, i=i: store.__setitem__(("dense_acts", i), pick(a[0]))))
        if f.extra is not None:
            keep(f.extra, "extra", i)
        for name in ("attn_hc", "ffn_hc"):
            hc = getattr(f, name)
            if hc is not None:
                handles.append(hc.register_forward_hook(
                    lambda m, a, o, i=i, name=name: store.__setitem__(  # HY-V4's returns no comb: the identity
                    (name, i), (pick(o[0]), pick(o[1]) if len(o) == 3 else None))))
    if structure.hc_head is not None:
        keep(structure.hc_head, "head_in", 0, "input")
    return handles


def _frozen(norm: nn.Module, raw: Tensor) -> Tensor:
    """[P, D] the RMS-type ``norm``'s map with its scale frozen at its real input ``raw`` [P, D]: γ / rms(raw)."""
    inner = unwrap(norm)
    eps = float(getattr(inner, "variance_epsilon", None) or getattr(inner, "eps", 1e-6))
    weight = next(inner.parameters(), raw)  # a norm without a scale (Muse-Spark's) has no parameter: γ = 1
    ones = torch.ones(1, raw.shape[-1], device=weight.device, dtype=torch.float32)
    gamma = (inner(ones).float() * (1.0 + eps) ** 0.5).reshape(-1).to(raw.device)  # γ read off the module, as rms_gamma
    return gamma * torch.rsqrt(raw.pow(2).mean(-1, keepdim=True) + eps)


def _deepseek_v4_pre(head: nn.Module, streams: Tensor) -> Tensor:
    flat = head.input_norm(streams.flatten(1).float())
    mixes = torch.nn.functional.linear(flat, head.hc_fn.float())
    return torch.sigmoid(mixes * head.hc_scale.float() + head.hc_base.float()) + head.eps


def _hy_v4_pre(head: nn.Module, streams: Tensor) -> Tensor:  # the norm multiplies the projection, not its input
    flat = streams.flatten(1).float()
    mixes = torch.nn.functional.linear(flat, head.hc_fn.float()) * head.input_norm(flat)
    return torch.sigmoid(mixes * head.hc_scale.float() + head.hc_base.float()) + head.eps


#: The final collapse weights ``pre`` [P, N] of the real final streams [P, N, D], per hc_head class (GLM-5-Next's
#: is the plain mean).
_HEAD_PRE = {"DeepseekV4HyperHead": _deepseek_v4_pre, "HYV4HyperHead": _hy_v4_pre, "HYV4VLHyperHead": _hy_v4_pre,
             "Glm5NextTextHyperHead": lambda head, streams: streams.new_full(streams.shape[:2], 1.0 / streams.shape[1])}


@torch.no_grad()
def _head_pre(head: nn.Module, streams: Tensor) -> Tensor:
    """[P, N] the final collapse weights ``pre`` of the real final streams [P, N, D] (the model's hc_head)."""
    head = unwrap(head)
    return _HEAD_PRE[type(head).__name__](head, streams)


@torch.no_grad()
def finish(structure: Structure, got: dict) -> None:
    """Rewrite a capture (stacked ``resid_pre`` / ``attn_out`` / ``mlp_out`` [L, P, ...]) into the final frame.

    Adds ``got["extra_out"]`` [L, P, D] (per-layer inputs; 0 where none) and ``got["maps"]``:
    ``{"head" | "moe" | "dense": {layer: [P, D] or [P, 1]}}``, the factors that take a head's slice of the
    mixer output, a part of the MoE block's output (``hook_moe_out`` space) or of the dense MLP's output to
    the final residual. Layers without an entry need none.
    """
    store = got.pop("structure", {})
    n_layers, n_prompts = got["attn_out"].shape[:2]
    one = got["attn_out"].new_ones(n_prompts, 1)
    alpha_attn, alpha_ffn = [one] * n_layers, [one] * n_layers
    if structure.streams:
        v = _head_pre(structure.hc_head, store[("head_in", 0)])  # [P, N]: weight of each final stream
        v_in = [None] * n_layers
        for i in reversed(range(n_layers)):
            for name, alphas in (("ffn_hc", alpha_ffn), ("attn_hc", alpha_attn)):
                post, comb = store[(name, i)]  # [P, N], [P, N, N]: R_out = post ⊗ out + combᵀ R_in
                alphas[i] = (v * post).sum(-1, keepdim=True)
                v = v if comb is None else torch.einsum("pjk,pk->pj", comb, v)  # HY-V4: R_out = post ⊗ out + R_in
            v_in[i] = v
        got["resid_pre"] = torch.stack([(v_in[i][:, :, None] * got["resid_pre"][i]).sum(1) for i in range(n_layers)])
    if any(f.scalar is not None or f.attn_add is not None for f in structure.layers):
        # per site h_out = a * h_in + b * out (Beam's depth-scaled adds; Gemma-4's layer_scalar s multiplies the
        # whole layer output: a = b = s at the FFN site, its per-layer input included): run back from the end
        later = 1.0
        for i in reversed(range(n_layers)):
            f = structure.layers[i]
            a_ffn, b_ffn = f.ffn_add or (1.0, 1.0)
            if f.scalar is not None:
                s = f.scalar.float().reshape(()).to(one.device)
                a_ffn, b_ffn = a_ffn * s, b_ffn * s
            alpha_ffn[i] = alpha_ffn[i] * later * b_ffn
            later = later * a_ffn
            a_attn, b_attn = f.attn_add or (1.0, 1.0)
            alpha_attn[i] = alpha_attn[i] * later * b_attn
            later = later * a_attn
            got["resid_pre"][i] = got["resid_pre"][i] * later
    extra = torch.zeros_like(got["attn_out"])
    maps: dict[str, dict[int, Tensor]] = {"head": {}, "moe": {}, "dense": {}}
    for i, f in enumerate(structure.layers):
        got["attn_out"][i] = got["attn_out"][i] * alpha_attn[i]
        got["mlp_out"][i] = got["mlp_out"][i] * alpha_ffn[i]
        if f.extra is not None:
            extra[i] = store[("extra", i)] * alpha_ffn[i]
        head = alpha_attn[i] if f.attn_norm is None else alpha_attn[i] * _frozen(f.attn_norm, store[("attn_raw", i)])
        ffn = alpha_ffn[i] if f.ffn_norm is None else alpha_ffn[i] * _frozen(f.ffn_norm, store[("ffn_raw", i)])
        maps["head"][i], maps["moe"][i], maps["dense"][i] = head, ffn, ffn
        if f.dense_norm is not None:
            maps["moe"][i] = ffn * _frozen(f.moe_norm, store[("moe_raw", i)])
            maps["dense"][i] = ffn * _frozen(f.dense_norm, store[("dense_raw", i)])
            got["mlp_acts"][i] = store[("dense_acts", i)]
            got.setdefault("dense_out", {})[i] = store[("dense_raw", i)]
    got["maps"] = maps
    if any(f.extra is not None for f in structure.layers):
        got["extra_out"] = extra
