"""Cross-level knowledge attribution by log-probability increase (LPI), after Li et al. (ACL 2025).

For a component whose output ``c`` is added to a residual state ``x`` at the scored (last) position,

    LPI(c | x) = log p(w | x + c) - log p(w | x),     p(w | x) = softmax(W_U · n(x))_w,

where ``n(x) = γ ⊙ x / rms`` is the final norm with the RMS of the model's REAL final residual held
fixed (logit-lens style) and ``w`` the target token. Levels (``h^{l-1}`` the residual entering layer
l, ``A^l`` its attention output, ``u^l = h^{l-1} + A^l``, ``F^l`` its MLP / MoE output):

* ``attn``   LPI(A^l | h^{l-1});             ``moe`` LPI(F^l | u^l)   (dense MLP layers too)
* ``head``   LPI(z_h · W_O[h] | h^{l-1})     (head h's slice of the o_proj input through W_O)
* ``expert`` LPI(g_e · E_e(x~) | u^l)        (selected routed experts, gate as the model applies it)
* ``shared`` LPI(s · S(x~) | u^l)            (shared expert, s its gate; 1 when ungated)
* ``neuron`` LPI(g · m_k · W_down[:, k] | u^l)  (neuron k of a selected expert; of the shared expert or
  dense MLP with g = s or 1, ``expert = -1``)

The module has two halves: :func:`capture` runs the model once per batch and keeps last-position
tensors; the scoring functions are pure tensor maths on what was captured (so they can run anywhere).
Layers that reach the residual through per-token maps (post-norms, Gemma-4's FFN beside a dense MLP,
layer scalars, DeepSeek-V4's hyper-connections) are read in the final residual's frame with those maps
held at their real values (:mod:`nnsight_moe.recipes.attribution_structure`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch import Tensor, nn

import nnsight_moe
from nnsight_moe.hooks import TemporaryHooks, unwrap
from nnsight_moe.progress import label
from nnsight_moe.precision import activation_dtype, readout_bound, residual_bound
from nnsight_moe.recipes.metrics import hits_of_ranks, mrr_of_ranks, target_ranks
from nnsight_moe.recipes import runner
from nnsight_moe.recipes.attribution_results import BANDS, AttributionResult  # noqa: F401
from nnsight_moe.recipes.prompts import encode_prompts, last_positions

__all__ = ["AttributionResult", "LEVELS", "attribute", "attribute_relations", "capture", "compare", "lpi"]

LEVELS = ("layer", "head", "expert", "shared", "neuron")
COLUMNS = ["prompt", "layer", "level", "head", "expert", "neuron", "score"]


# ------------------------------------------------------------------------------------ pure scoring
@dataclass
class Readout:
    """The frozen final projection of one batch: p(w | x) = softmax(W_U (γ ⊙ (x - μ) · scale + β) + b)_w.

    ``scale`` (1 / RMS for RMSNorm, 1 / std for LayerNorm) and ``mean`` (LayerNorm only) are those of
    the model's REAL final residual at the scored position, held fixed for every x.
    """

    unembed: Tensor  # [V, D]
    gamma: Tensor  # [D]
    scale: Tensor  # [P, 1] 1 / rms (or 1 / std) of the real final residual
    bias: Tensor | None  # [V] unembedding bias
    targets: Tensor  # [P]
    mean: Tensor | None = None  # [P, 1] LayerNorm: mean of the real final residual
    beta: Tensor | None = None  # [D] LayerNorm bias
    softcap: float | None = None  # the model's final logit soft-cap: logits = cap * tanh(logits / cap) (Gemma)
    logit_scale: float | None = None  # a constant the model multiplies its logits by, before any soft-cap (Cohere)

    def logits(self, x: Tensor, rows: Tensor) -> Tensor:
        """Frozen-norm logits [N, V] of states ``x`` [N, D] belonging to prompts ``rows`` [N]."""
        if self.mean is not None:
            x = x - self.mean[rows]
        normed = x * self.gamma * self.scale[rows]
        if self.beta is not None:
            normed = normed + self.beta
        logits = normed @ self.unembed.T
        logits = logits if self.bias is None else logits + self.bias
        logits = logits if self.logit_scale is None else logits * self.logit_scale
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap

    def logprob(self, x: Tensor, rows: Tensor) -> Tensor:
        """log p(target | x) for states ``x`` [N, D] belonging to prompts ``rows`` [N]."""
        return self.logits(x, rows).log_softmax(-1).gather(-1, self.targets[rows, None])[:, 0]


def lpi(readout: Readout, base: Tensor, c: Tensor, rows: Tensor, budget_bytes: int = 2 << 30) -> Tensor:
    """LPI(c | x) = log p(w | x + c) - log p(w | x) with x = ``base[rows]``.

    ``base`` [P, D] holds one residual state per prompt, ``c`` [N, D] the contributions and ``rows``
    [N] the prompt of each; the [chunk, V] logits are computed in chunks under ``budget_bytes``.
    """
    prompts = torch.arange(base.shape[0], device=base.device)
    before = readout.logprob(base, prompts)
    vocab = readout.unembed.shape[0]
    chunk = max(1, int(budget_bytes // max(1, 4 * 4 * vocab)))
    out = []
    for start in range(0, c.shape[0], chunk):
        r = rows[start : start + chunk]
        out.append(readout.logprob(base[r] + c[start : start + chunk], r) - before[r])
    return torch.cat(out) if out else c.new_zeros(0)


# ------------------------------------------------------------------------------------ capture
#: Where decoder layers keep their token mixer (attention, linear attention, SSM) and their MLP / MoE.
MIXER_NAMES = ("self_attn", "attn", "attention", "linear_attn", "mamba", "mixer", "self_attention", "conv")
MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "ffn")
#: Layer types (``config.layer_types``, ``block_type``) whose single ``mixer`` module is the MLP / MoE.
_CHANNEL_TYPES = ("mlp", "moe", "ffn", "dense")


@dataclass
class Parts:
    """Where the pieces of a decoder stack live (the modules the model calls; bridge wrappers included).

    Per layer: ``mixers[i]`` the token mixer (None when the layer has none), ``kinds[i]`` its row name at
    the ``layer`` level (``"attn"`` for softmax attention, ``"mixer"`` for linear attention / Mamba /
    other mixers without attention heads, None), ``o_proj[i]`` the output projection whose input holds
    the heads (attention layers only), ``mlp[i]`` the MLP / MoE block (None when absent); ``*_names`` the
    attribute names on the (unwrapped) decoder layer.
    """

    layers: list[nn.Module]
    mixers: list[nn.Module | None]
    kinds: list[str | None]
    o_proj: list[nn.Module | None]
    mlp: list[nn.Module | None]
    norm: nn.Module
    unembed: nn.Module
    n_heads: int
    mixer_names: list[str | None]
    mlp_names: list[str | None]
    #: Per attention layer, the effective output projection [d_model, H * d_head] (a function of no
    #: arguments, read when scoring) where it is not ``o_proj.weight`` (DeepSeek-V4's grouped low-rank one).
    w_o: dict[int, Any] = field(default_factory=dict)
    #: What puts the layers' outputs on the residual through frozen maps (post-norms, Gemma-4's FFN,
    #: hyper-connections; :mod:`nnsight_moe.recipes.attribution_structure`); None: h + attn + mlp.
    structure: Any = None
    #: The model's final logit soft-cap (``cap * tanh(logits / cap)``, Gemma), None when it has none.
    softcap: float | None = None
    #: The constant the model multiplies its logits by (Cohere's ``logit_scale``), None when none.
    logit_scale: float | None = None

    @property
    def head_layers(self) -> list[int]:
        """Layers with attention heads (head rows)."""
        return [i for i, o in enumerate(self.o_proj) if o is not None]


def _layer_type(layer: nn.Module, config: Any, i: int, n_layers: int) -> str | None:
    found = getattr(layer, "block_type", None) or getattr(layer, "layer_type", None)
    if isinstance(found, str):
        return found
    for key in ("layer_types", "layers_block_type"):
        types = getattr(config, key, None)
        if isinstance(types, (list, tuple)) and len(types) == n_layers and isinstance(types[i], str):
            return types[i]
    return None


def _is_attention(kind: str | None, module: nn.Module) -> bool:
    if kind is not None:
        kind = kind.lower()
        if kind.startswith("hybrid"):  # Zaya's / Inkling's attention layers ("hybrid", "hybrid_sliding")
            return hasattr(unwrap(module), "o_proj")
        return "attention" in kind and "linear" not in kind or kind in ("attn", "global", "local", "sliding", "full")
    # JetMoE's mixture-of-attention-heads: softmax attention whose output projection is routed (no head rows)
    return _o_proj(module) is not None or type(unwrap(module)).__name__ == "JetMoeAttention"


def _o_proj(mixer: nn.Module) -> nn.Module | None:
    """The module whose input holds an attention mixer's heads: ``o_proj``; DBRX's ``out_proj`` (of an attention
    with ``Wqkv``, not a Mamba mixer's); DeepSeek-V4's grouped ``o_a_proj`` (its input [.., groups, d] flattened)."""
    inner = unwrap(mixer)
    if isinstance(getattr(inner, "o_proj", None), nn.Module):
        return inner.o_proj
    if isinstance(getattr(inner, "out_proj", None), nn.Module) and hasattr(inner, "Wqkv"):
        return inner.out_proj
    if isinstance(getattr(inner, "o_a_proj", None), nn.Module) and isinstance(getattr(inner, "o_b_proj", None), nn.Module):
        return inner.o_a_proj
    return None


def _grouped_w_o(mixer: nn.Module) -> Tensor:
    """DeepSeek-V4's output projection as one matrix [d_model, H * d_head]: ``o_b_proj`` after the block-diagonal
    ``o_a_proj`` (group g maps its slice of the heads' output to its ``o_lora_rank`` rows of o_b_proj's input)."""
    inner = unwrap(mixer)
    a, b = unwrap(inner.o_a_proj), _linear(inner.o_b_proj)
    groups = int(a.n_groups)
    w_a = a.weight.float().view(groups, -1, a.weight.shape[-1])  # [G, r, in_g]
    w_b = b.weight.float().view(b.out_features, groups, -1)  # [D, G, r]
    return torch.einsum("dgr,gri->dgi", w_b, w_a).reshape(b.out_features, -1)


def _mixer_name(layer: nn.Module) -> str | None:
    """The token mixer's attribute path on a decoder layer (DBRX's attention sits in ``norm_attn_norm.attn``)."""
    name = next((n for n in MIXER_NAMES if isinstance(getattr(layer, n, None), nn.Module)), None)
    if name is None and isinstance(getattr(getattr(layer, "norm_attn_norm", None), "attn", None), nn.Module):
        return "norm_attn_norm.attn"
    return name


def _parts(hf: nn.Module) -> Parts:
    from nnsight_moe.recipes.runner import _refuse_family

    _refuse_family(hf)  # a MoE family the recipes refuse, with the reason (DiffusionGemma's canvas decoder)
    from nnsight_moe.recipes import attribution_structure

    attribution_structure.refuse_layout(hf)  # LongCat-Flash's two sub-blocks per layer, Qwen4-Exp's gated streams
    config = hf.config.get_text_config()
    n_layers = int(config.num_hidden_layers)
    stack = next((m for name, m in hf.named_modules()  # DBRX: transformer.blocks
                  if isinstance(m, nn.ModuleList) and name.endswith(("layers", "blocks")) and len(m) == n_layers), None)
    if stack is None:
        raise ValueError(f"{type(hf).__name__}: no decoder layer list of length {n_layers} found")
    n_heads = int(getattr(config, "num_attention_heads", 0) or 0)
    mixers, kinds, o_projs, mlps, mixer_names, mlp_names, w_o = [], [], [], [], [], [], {}
    for i, wrapped in enumerate(stack):
        layer = unwrap(wrapped)
        kind = _layer_type(layer, config, i, n_layers)
        mixer_name = _mixer_name(layer)
        mlp_name = next((n for n in MLP_NAMES if isinstance(getattr(layer, n, None), nn.Module)), None)
        if mlp_name is None and mixer_name is not None and kind is not None and kind.lower() in _CHANNEL_TYPES:
            mixer_name, mlp_name = None, mixer_name  # one module per layer (nemotron_h): this one is the MLP / MoE
        mixer = layer.get_submodule(mixer_name) if mixer_name else None
        attention = mixer is not None and _is_attention(kind, mixer)
        o_proj = _o_proj(mixer) if attention else None
        if o_proj is not None and hasattr(unwrap(o_proj), "n_groups"):  # DeepSeek-V4's grouped low-rank projection
            w_o[i] = functools.partial(_grouped_w_o, mixer)
        width = w_o[i]().shape[1] if i in w_o else _linear(o_proj).in_features if _linear(o_proj) is not None else 0
        if o_proj is not None and (not n_heads or not width or width % n_heads):
            o_proj = None
            w_o.pop(i, None)
        mixers.append(mixer), mixer_names.append(mixer_name)
        kinds.append(None if mixer is None else "attn" if attention else "mixer")
        o_projs.append(o_proj)
        mlps.append(getattr(layer, mlp_name) if mlp_name else None), mlp_names.append(mlp_name)
    if all(m is None for m in mixers) and all(m is None for m in mlps):
        raise ValueError(f"{type(hf).__name__}: its decoder layers have none of {MIXER_NAMES + MLP_NAMES}")
    base = hf.base_model
    # a multimodal model's text stack keeps the norm; Llama 4's prefix is not `model`
    # (Nemotron-H-Omni: the language model is a causal LM, its norm on .model; LFM2-MoE names it embedding_norm
    # though it runs after the layers: the readout's self-check would refuse a norm that is not the final one)
    language = getattr(base, "language_model", None)
    owners = (base, language, getattr(language, "model", None), getattr(hf, "model", None) if base is hf else None)
    norm = next((getattr(owner, n) for owner in owners for n in ("norm", "final_layernorm", "norm_f", "ln_f", "embedding_norm")
                 if isinstance(getattr(owner, n, None), nn.Module)), None)
    if norm is None:
        raise ValueError(f"{type(hf).__name__}: no final norm (base_model.norm / final_layernorm / norm_f) found")
    structure = attribution_structure.find(config, [unwrap(layer) for layer in stack], base)
    softcap = getattr(config, "final_logit_softcapping", None)
    logit_scale = getattr(unwrap(hf), "logit_scale", None)  # Cohere: logits * self.logit_scale (a float on the model)
    return Parts(list(stack), mixers, kinds, o_projs, mlps, norm, hf.get_output_embeddings(), n_heads,
                 mixer_names, mlp_names, w_o, structure, float(softcap) if softcap else None,
                 float(logit_scale) if isinstance(logit_scale, (int, float)) and logit_scale != 1 else None)


def _linear(module: nn.Module | None) -> nn.Linear | None:
    """The ``nn.Linear`` behind ``module`` (a TransformerBridge wraps them), else None."""
    inner = unwrap(module) if module is not None else None
    return inner if isinstance(inner, nn.Linear) else None


def _out(o):
    return o[0] if isinstance(o, tuple) else o


@torch.no_grad()
def capture(hf: nn.Module, batch: dict[str, Tensor], parts: Parts, handle=None) -> dict[str, Any]:
    """Run ``hf`` on ``batch`` and keep every quantity attribution needs at the last non-pad position.

    Returns a dict: ``resid_pre`` [L, P, D], ``attn_out`` [L, P, D] (token mixer output: attention,
    linear attention or SSM; 0 where a layer has none), ``z`` {attention layer: [P, H*dh]}, ``mlp_out``
    [L, P, D] (0 where a layer has no MLP), ``mlp_acts`` {dense layer: [P, I]}, ``final`` [P, D],
    ``logits`` [P, V] (last position only) and, with an attach ``handle``, ``moe`` {layer: {hook name
    without "hook_": last-position tensor}}. Nothing of size [P, positions, V] outlives the forward.
    """
    last = last_positions(batch["attention_mask"])
    rows = torch.arange(last.shape[0], device=last.device)
    pick = lambda t: t[rows, last].float()  # noqa: E731
    got: dict[str, Any] = {"resid_pre": {}, "attn_out": {}, "z": {}, "mlp_out": {}, "mlp_acts": {}, "moe": {}}
    moe_layers = set(handle.layout.moe_layers) if handle is not None else set()
    handles = []
    for i, layer in enumerate(parts.layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k, i=i: got["resid_pre"].__setitem__(i, pick(a[0] if a else k["hidden_states"])),
            with_kwargs=True))
        if parts.mixers[i] is not None:
            handles.append(parts.mixers[i].register_forward_hook(
                lambda m, a, o, i=i: got["attn_out"].__setitem__(i, pick(_out(o)))))
        if parts.o_proj[i] is not None:  # flattened: DeepSeek-V4's grouped projection reads [.., groups, d]
            handles.append(parts.o_proj[i].register_forward_pre_hook(
                lambda m, a, i=i: got["z"].__setitem__(i, pick(a[0]).reshape(len(rows), -1))))
        mlp = parts.mlp[i]
        if mlp is not None:
            handles.append(mlp.register_forward_hook(  # Llama 4's MoE returns flattened tokens: view them as its input
                lambda m, a, o, i=i: got["mlp_out"].__setitem__(i, pick(_out(o).view(a[0].shape)))))
            down = getattr(unwrap(mlp), "down_proj", None)
            if i not in moe_layers and _linear(down) is not None:
                handles.append(down.register_forward_pre_hook(lambda m, a, i=i: got["mlp_acts"].__setitem__(i, pick(a[0]))))
    for i in moe_layers:  # a shared expert beside the block (Granite): the layer's MLP output is the sum of both
        if handle.layout.layer(i).shared_outside:
            handles.append(hf.get_submodule(handle.layout.layer(i).shared).register_forward_hook(
                lambda m, a, o, i=i: got["mlp_out"].__setitem__(i, got["mlp_out"][i] + pick(_out(o)))))
    handles.append(parts.norm.register_forward_pre_hook(
        lambda m, a, k: got.__setitem__("final", pick(a[0] if a else k["hidden_states"])), with_kwargs=True))
    if parts.structure is not None:  # post-norms, Gemma-4's FFN, hyper-connections: read their real maps
        from nnsight_moe.recipes import attribution_structure

        handles += attribution_structure.install(parts.structure, got, pick)
    added = TemporaryHooks()
    if handle is not None:
        for i in handle.layout.moe_layers:
            got["moe"][i] = {}
            for name in handle.layout.layer(i).hook_names:
                added.add(handle.block(i)._modules[name],
                          lambda v, hook, i=i, name=name: got["moe"][i].__setitem__(name[5:], v[rows, last]))
    keep = {"logits_to_keep": last[:, None]} if _keeps_logits(hf) else {}
    try:
        logits = hf(**batch, **keep).logits  # [P, 1, V] with logits_to_keep: only the scored positions
    finally:
        for h in handles:
            h.remove()
        added.remove()  # ours only: hooks the user added stay
    got["logits"] = logits[:, 0].float() if keep and logits.shape[1] == 1 else pick(logits)
    del logits
    for key in ("resid_pre", "attn_out", "mlp_out"):  # 0 where a layer has no such part
        zeros = torch.zeros_like(got["resid_pre"][0] if key == "resid_pre" else got["final"])
        got[key] = torch.stack([got[key].get(i, zeros) for i in range(len(parts.layers))])
    if parts.structure is not None:  # every state and output in the frame of the final residual
        from nnsight_moe.recipes import attribution_structure

        attribution_structure.finish(parts.structure, got)
    return got


def _keeps_logits(hf: nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (then only the scored positions are projected)."""
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(unwrap(hf).forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def readout(parts: Parts, captured: dict, targets: Tensor, atol: float = 1e-3) -> Readout:
    """The frozen final projection for a batch, checked against the model's own log-probabilities.

    The check allows ``atol`` (float32 slack for a different order of operations) plus the rounding the
    model's dtype adds to its logits (:func:`nnsight_moe.precision.readout_bound`): bf16 models pass
    with their own rounding, a projection that does not model the logits fails in every dtype.
    """
    norm = unwrap(parts.norm)
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    final = captured["final"]
    unembed = unwrap(parts.unembed)
    bias = None if getattr(unembed, "bias", None) is None else unembed.bias.float()
    if isinstance(norm, nn.LayerNorm) or _subtracts_mean(norm):  # Cohere's LayerNorm is its own class
        mean = final.mean(-1, keepdim=True)
        scale = torch.rsqrt(final.var(-1, unbiased=False, keepdim=True) + eps)
        beta = None if getattr(norm, "bias", None) is None else norm.bias.float()
        out = Readout(unembed.weight.float(), norm.weight.float(), scale, bias, targets, mean, beta, parts.softcap,
                      parts.logit_scale)
    else:
        scale = torch.rsqrt(final.pow(2).mean(-1, keepdim=True) + eps)
        out = Readout(unembed.weight.float(), rms_gamma(norm, eps), scale, bias, targets, softcap=parts.softcap,
                      logit_scale=parts.logit_scale)
    rows = torch.arange(final.shape[0])
    mine = out.logprob(final, rows)
    theirs = captured["logits"].log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    dtype = activation_dtype(parts.norm, parts.unembed, parts.layers[-1])
    normed = (final - (0 if out.mean is None else out.mean)) * out.gamma * out.scale
    tol = atol + readout_bound(dtype, out.unembed, normed if out.beta is None else normed + out.beta, captured["logits"])
    excess = (mine - theirs).abs() - tol
    if excess.max() > 0:
        worst = int(excess.argmax())
        raise ValueError(
            f"the frozen final projection (RMSNorm / LayerNorm then unembedding) does not reproduce this "
            f"{str(dtype).replace('torch.', '')} model's log-probabilities: max deviation "
            f"{(mine - theirs).abs()[worst]:.2e} (prompt {worst}) exceeds the tolerance {tol[worst]:.2e} "
            f"(atol {atol:g} + {str(dtype).replace('torch.', '')} rounding of the logits); the model "
            "post-processes its logits in a way attribution does not model"
        )
    return out


@torch.no_grad()
def _subtracts_mean(norm: nn.Module) -> bool:
    """Whether a final norm that is not an ``nn.LayerNorm`` is one (subtracts the mean: a constant input maps to
    its bias, 0 here: Cohere's ``Cohere2MoeLayerNorm``); RMS norms map it to their scale."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 1 or weight.device.type == "meta" or getattr(norm, "bias", None) is not None:
        return False
    ones = torch.ones(1, weight.shape[0], device=weight.device, dtype=torch.float32)
    return bool(norm(ones).float().abs().max() < 1e-6) and bool(weight.abs().max() > 0)


@torch.no_grad()
def rms_gamma(norm: nn.Module, eps: float) -> Tensor:
    """The per-channel scale γ [D] an RMSNorm-like final norm applies after dividing by the RMS.

    Read off the module itself, ``γ = norm(1) · sqrt(1 + eps)`` (the RMS of a vector of ones is 1), so
    conventions such as Qwen3-Next's / Gemma's ``(1 + weight)`` are covered without knowing them.
    """
    weight = norm.weight
    ones = torch.ones(1, weight.shape[-1], device=weight.device, dtype=torch.float32)
    return (norm(ones).float() * (1.0 + float(eps)) ** 0.5).reshape(-1)


def _rows(**cols) -> pd.DataFrame:
    return pd.DataFrame({k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in cols.items()})


def _block_maps(hf: nn.Module, info: Any, moe: dict) -> tuple[Any, Any]:
    """(routed, shared): the linear maps from a contribution inside the block ([N, ..., d] vectors whose
    rows are prompts ``rows``) to the block's output, by the hook contract's extension: the block-level
    ``routed_scale``, a latent MoE's output projection (its bias is per token, no expert's), and a
    post-MoE RMSNorm with its per-token scale frozen at the actual sum (A.X-K1)."""
    w_out = _linear(hf.get_submodule(info.latent_out)).weight.float() if info.d_latent else None
    factor = None
    if info.post:
        norm = unwrap(hf.get_submodule(info.post))
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        total = moe["moe_sum"].float()  # [P, D]
        factor = rms_gamma(norm, eps) * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps)

    def post(v: Tensor, rows: Tensor) -> Tensor:
        if factor is None:
            return v
        f = factor[rows.to(factor.device)]
        return v * f.reshape(f.shape[0], *([1] * (v.dim() - 2)), f.shape[-1])

    def routed(v: Tensor, rows: Tensor) -> Tensor:
        v = v * info.routed_scale if info.routed_scale != 1.0 else v
        return post(v @ w_out.T if w_out is not None else v, rows)

    return routed, post


def _down_layout(experts: nn.Module) -> tuple[str, bool]:
    """(attribute holding the fused experts' down projection, whether it is [E, d_expert, d_model]) of a 3-D
    layout (else [E, d_model, d_expert]): ``down_proj``, or JetMoE's ``output_linear.weight``; Llama 4 and
    ``is_transposed`` experts hold it [E, in, out]. Shared by the local and the remote path."""
    name = "weight" if type(experts).__name__ == "JetMoeParallelExperts" else "down_proj"
    return name, bool(getattr(experts, "is_transposed", type(experts).__name__ == "Llama4TextExperts"))


def _down_columns(experts: nn.Module, expert_ids: Tensor) -> Tensor:
    """W_down of each expert in ``expert_ids`` [N] as [N, d_expert, d_model] (row k = column k of W_down)."""
    if type(experts).__name__ == "DbrxExperts":  # 2-D w2 [E * d_expert, d_model]: row k of expert e's slice
        from nnsight_moe.block_routed import expert_weights

        return expert_weights(experts)[2][expert_ids].float()
    name, transposed = _down_layout(experts)
    w = getattr(experts, name)[expert_ids].float()
    return w if transposed else w.transpose(-1, -2)


@torch.no_grad()  # the weights require grad: without this every chunk's [rows, V] log-softmax stays saved
def score_batch(hf: nn.Module, parts: Parts, captured: dict, ro: Readout, levels: Sequence[str],
                handle=None, budget_bytes: int = 2 << 30, neurons: str = "exact", fast_top: int = 100) -> pd.DataFrame:
    """All requested levels for one captured batch, as rows (prompt index local to the batch)."""
    n_layers, n_prompts = captured["resid_pre"].shape[:2]
    ar = torch.arange(n_prompts)
    h_prev, attn_out, mlp_out = captured["resid_pre"], captured["attn_out"], captured["mlp_out"]
    if h_prev.shape[1:] != captured["final"].shape:
        raise ValueError(
            f"this model's residual stream is not one d_model vector per position (decoder layers see "
            f"{tuple(h_prev.shape[2:])}, the final norm {tuple(captured['final'].shape[1:])}: parallel residual "
            "streams: hyper-connections of a form attribution_structure does not model); attribution needs h + attn + mlp per layer")
    u = h_prev + attn_out
    _check_residual(captured, u, dtype=activation_dtype(*parts.layers))
    frames = []
    maps = captured.get("maps", {})  # frozen maps from a part's own output space to the final residual

    def mapped(kind, layer, v, rows):  # v [N, ..., D] of prompts rows [N]
        factor = maps.get(kind, {}).get(layer)
        if factor is None:
            return v
        f = factor[rows.to(factor.device)]
        return v * f.reshape(f.shape[0], *([1] * (v.dim() - 2)), f.shape[-1])

    def add(layer, level, rows, score, head=-1, expert=-1, neuron=-1):
        frames.append(_rows(prompt=rows, layer=layer, level=level, head=head, expert=expert, neuron=neuron,
                            score=score))

    for layer in range(n_layers):
        if "layer" in levels:
            if parts.kinds[layer] is not None:  # "attn" (attention) or "mixer" (linear attention, SSM, ...)
                add(layer, parts.kinds[layer], ar, lpi(ro, h_prev[layer], attn_out[layer], ar, budget_bytes))
            if parts.mlp[layer] is not None:
                add(layer, "moe", ar, lpi(ro, u[layer], mlp_out[layer], ar, budget_bytes))
            if "extra_out" in captured and parts.structure.layers[layer].extra is not None:  # Gemma-4's per-layer input
                add(layer, "per_layer_input", ar,
                    lpi(ro, u[layer] + mlp_out[layer], captured["extra_out"][layer], ar, budget_bytes))
        if "head" in levels and layer in captured["z"]:
            w = parts.w_o[layer]() if layer in parts.w_o else _linear(parts.o_proj[layer]).weight.float()
            z = captured["z"][layer].reshape(n_prompts, parts.n_heads, -1)
            w_o = w.reshape(w.shape[0], parts.n_heads, -1)
            heads = torch.einsum("phd,ohd->pho", z, w_o).reshape(-1, w.shape[0])
            rows = ar.repeat_interleave(parts.n_heads)
            add(layer, "head", rows, lpi(ro, h_prev[layer], mapped("head", layer, heads, rows), rows, budget_bytes),
                head=torch.arange(parts.n_heads).repeat(n_prompts))
        moe = captured["moe"].get(layer) if handle is not None else None
        if moe is not None:
            k = moe["topk_indices"].shape[-1]
            rows = ar.repeat_interleave(k)
            ids = moe["topk_indices"].reshape(-1)
            gate = moe["topk_weights"].float().reshape(-1)
            info = handle.layout.layer(layer)
            to_block, shared_to_block = _block_maps(hf, info, moe)
            if handle.layout.layer(layer).gate_on_input:  # Llama 4: the weight scales the input, already inside
                gate = torch.ones_like(gate)
            routed = lambda v, r: mapped("moe", layer, to_block(v, r), r)  # noqa: E731
            shared = lambda v, r: mapped("moe", layer, shared_to_block(v, r), r)  # noqa: E731
            dense = captured.get("dense_out", {}).get(layer)  # Gemma-4: the parallel dense MLP, attributed as shared
            if "expert" in levels:
                contrib = gate[:, None] * moe["expert_out"].float().reshape(len(ids), -1)
                add(layer, "expert", rows, lpi(ro, u[layer], routed(contrib, rows), rows, budget_bytes), expert=ids)
            if "shared" in levels and "shared_out" in moe:
                contrib = moe["shared_gate"].float() * moe["shared_out"].float()
                add(layer, "shared", ar, lpi(ro, u[layer], shared(contrib, ar), ar, budget_bytes))
            if "shared" in levels and dense is not None:
                add(layer, "shared", ar, lpi(ro, u[layer], mapped("dense", layer, dense, ar), ar, budget_bytes))
            if "neuron" in levels:
                experts = unwrap(handle.states[layer].experts)
                acts = moe["expert_acts"].float().reshape(len(ids), -1)  # [P*k, I]
                w_down = routed(_down_columns(experts, ids), rows)  # [P*k, I, D]
                frames.append(_neurons(ro, u[layer], rows, gate[:, None] * acts, w_down, layer, ids,
                                       budget_bytes, neurons, fast_top))
                if "shared_acts" in moe:
                    acts = moe["shared_gate"].float() * moe["shared_acts"].float()
                    w_down = _linear(hf.get_submodule(info.shared_down)).weight.float().T.expand(n_prompts, -1, -1)
                    w_down = shared(w_down, ar)
                    frames.append(_neurons(ro, u[layer], ar, acts, w_down, layer, torch.full((n_prompts,), -1),
                                           budget_bytes, neurons, fast_top))
                if dense is not None:
                    down = _linear(unwrap(parts.structure.layers[layer].dense_mlp).down_proj)
                    w_down = mapped("dense", layer, down.weight.float().T.expand(n_prompts, -1, -1), ar)
                    frames.append(_neurons(ro, u[layer], ar, captured["mlp_acts"][layer], w_down, layer,
                                           torch.full((n_prompts,), -1), budget_bytes, neurons, fast_top))
        elif "neuron" in levels and layer in captured["mlp_acts"]:
            acts = captured["mlp_acts"][layer]
            w_down = _linear(unwrap(parts.mlp[layer]).down_proj).weight.float().T.expand(n_prompts, -1, -1)
            w_down = mapped("dense", layer, w_down, ar)
            frames.append(_neurons(ro, u[layer], ar, acts, w_down, layer, torch.full((n_prompts,), -1),
                                   budget_bytes, neurons, fast_top))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def _check_residual(captured: dict, u: Tensor, atol: float = 1e-3, dtype: torch.dtype = torch.float32) -> None:
    """Attribution assumes h^l = h^{l-1} + A^l + F^l (pre-norm residual stream); check it on the data.

    Allowed per element: ``atol`` relative to the largest residual (float32 slack), plus the two
    roundings the model's ``dtype`` makes in adding attention and MLP outputs to the residual
    (:func:`nnsight_moe.precision.residual_bound`).
    """
    after = torch.cat([captured["resid_pre"][1:], captured["final"][None]])
    err = (u + captured["mlp_out"] + captured.get("extra_out", 0) - after).abs()
    scale = after.abs().max().clamp(min=1.0)
    if "extra_out" in captured:  # Gemma-4: a third addition (per-layer input) and the layer scalar's product round too
        tol = atol * scale + 2 * residual_bound(dtype, captured["resid_pre"], captured["attn_out"],
                                                captured["mlp_out"].abs() + captured["extra_out"].abs())
    else:
        tol = atol * scale + residual_bound(dtype, captured["resid_pre"], captured["attn_out"], captured["mlp_out"])
    excess = err - tol
    if excess.max() > 0:
        worst = int(excess.argmax())
        layer = worst // (err.shape[1] * err.shape[2])
        name = str(dtype).replace("torch.", "")
        raise ValueError(
            f"this {name} model's residual stream is not h + attn + mlp per layer: max deviation "
            f"{err.flatten()[worst]:.2e} (layer {layer}) exceeds the tolerance {tol.flatten()[worst]:.2e} "
            f"(atol {atol:g} x max |h| {scale:.3g} + {name} rounding of the two additions); "
            "LPI attribution as defined here does not apply"
        )


def _neurons(ro: Readout, base: Tensor, rows: Tensor, weighted_acts: Tensor, w_down: Tensor, layer: int,
             experts: Tensor, budget_bytes: int, mode: str, fast_top: int) -> pd.DataFrame:
    """Neuron rows: contribution of neuron k of unit j is ``weighted_acts[j, k] * w_down[j, k]``."""
    n_units, width = weighted_acts.shape
    unit_of = torch.arange(n_units).repeat_interleave(width)
    neuron = torch.arange(width).repeat(n_units)
    if mode == "fast":
        grad = _logprob_gradient(ro, base)  # [P, D]
        approx = (weighted_acts * torch.einsum("jkd,jd->jk", w_down, grad[rows])).reshape(-1)  # first-order LPI
        prompt_of = rows[unit_of]
        keep = []
        for p in prompt_of.unique():
            mine = (prompt_of == p).nonzero()[:, 0]
            keep.append(mine[approx[mine].abs().topk(min(fast_top, len(mine))).indices])
        keep = torch.cat(keep)
        unit_of, neuron = unit_of[keep], neuron[keep]
    elif mode != "exact":
        raise ValueError(f"neurons must be 'exact' or 'fast', got {mode!r}")
    scores = []
    per_chunk = max(1, int(budget_bytes // max(1, 4 * 4 * (ro.unembed.shape[0] + base.shape[-1]))))
    for start in range(0, unit_of.numel(), per_chunk):
        j, k = unit_of[start : start + per_chunk], neuron[start : start + per_chunk]
        contrib = weighted_acts[j, k, None] * w_down[j, k]
        scores.append(lpi(ro, base, contrib, rows[j], budget_bytes))
    return _rows(prompt=rows[unit_of], layer=layer, level="neuron", head=-1, expert=experts[unit_of],
                 neuron=neuron, score=torch.cat(scores) if scores else torch.zeros(0))


def _logprob_gradient(ro: Readout, base: Tensor) -> Tensor:
    """d log p(w | x) / dx at x = base, per prompt: scale · γ ⊙ (W_U[w] - Σ_v p_v W_U[v])."""
    rows = torch.arange(base.shape[0])
    logits = ro.logits(base, rows)
    probs = logits.softmax(-1)
    if ro.softcap is None:
        direction = ro.unembed[ro.targets] - probs @ ro.unembed
    else:  # through cap * tanh(z / cap): dz picks up 1 - tanh^2 = 1 - (logits / cap)^2 per vocabulary entry
        slope = 1 - (logits / ro.softcap).pow(2)
        direction = slope.gather(1, ro.targets[:, None]) * ro.unembed[ro.targets] - (probs * slope) @ ro.unembed
    if ro.logit_scale is not None:
        direction = direction * ro.logit_scale
    return direction * ro.gamma * ro.scale[rows]


# ------------------------------------------------------------------------------------ entry points
TARGETS = ("gold", "prediction")


def _targets(targets, prompts, tokenizer) -> list[int] | None:
    """Target ids: ints as given; strings as the object's first token in the context of its prompt
    (:func:`nnsight_moe.data.target_token`; token-id prompts are decoded for the context); None for
    the model's own prediction."""
    from nnsight_moe.data import _first_tokens

    if targets is None or isinstance(targets, str) and targets in ("predicted", "prediction"):
        return None
    if isinstance(targets, str):
        raise ValueError(f"targets must be a sequence (one per prompt), None or 'prediction', got {targets!r}")
    if len(targets) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(targets)} targets")
    out = [None if isinstance(t, str) else int(t) for t in targets]
    strings = [i for i, t in enumerate(targets) if isinstance(t, str)]
    if strings:
        if tokenizer is None:
            raise ValueError("string targets need a tokenizer= (or a model that carries one)")
        pairs = [(prompts[i] if isinstance(prompts[i], str)
                  else tokenizer.decode(list(prompts[i]), skip_special_tokens=True), targets[i]) for i in strings]
        for i, (tid, reason) in zip(strings, _first_tokens(tokenizer, pairs)):
            if tid is None:
                raise ValueError(f"target {targets[i]!r} of prompt {i} has no usable first token ({reason})")
            out[i] = tid
    return out


def _select(got: dict, keep: Tensor) -> dict:
    """The captured quantities of the prompts ``keep`` (indices into the batch) only."""
    out = {key: got[key][:, keep] for key in ("resid_pre", "attn_out", "mlp_out", "extra_out") if key in got}
    out["final"], out["logits"] = got["final"][keep], got["logits"][keep]
    for key in ("z", "mlp_acts", "dense_out"):
        if key in got:
            out[key] = {i: t[keep] for i, t in got[key].items()}
    if "maps" in got:
        out["maps"] = {kind: {i: t[keep] for i, t in m.items()} for kind, m in got["maps"].items()}
    out["moe"] = {i: {name: t[keep] for name, t in q.items()} for i, q in got["moe"].items()}
    return out


def attribute(model: Any, prompts: Sequence, targets: Sequence | str | None = None, *, tokenizer=None,
              levels: Sequence[str] = LEVELS, remote: Any = None, batch_size: int | str = "auto",
              budget_bytes: int = 2 << 30, neurons: str = "exact", fast_top: int = 100,
              progress: bool = True, results_path: Any = None, only_correct: bool = False,
              max_memory: Any = None) -> "AttributionResult":
    """LPI attribution of every component at the last prompt position.

    Args:
        model: HF model, TransformerBridge or nnsight model (MoE of a supported family, or dense; hybrid
            stacks with linear-attention / Mamba layers included).
        prompts: strings (with ``tokenizer``) or lists of token ids.
        targets: token ids; strings (the object's first token in the context of its prompt, see
            :func:`nnsight_moe.data.target_token`); or None / ``"prediction"`` for the model's own top-1
            prediction at the last position (then every rank is 1).
        tokenizer: for string prompts / targets; None uses the model's own (nnsight ``LanguageModel``
            and TransformerBridge carry one).
        levels: any of ``"layer"`` (rows ``attn`` for attention, ``mixer`` for token mixers without
            attention heads (linear attention, Mamba), ``moe`` for the MLP / MoE block), ``"head"``
            (attention layers only), ``"expert"``, ``"shared"``, ``"neuron"``.
        only_correct: keep only the prompts whose target (the gold one; ``targets`` must be given) is
            the model's top-1 prediction; the result's ``prompt_ids`` maps its prompts back to ``prompts``.
            Locally the others are dropped after the forward, before any scoring.
        remote: run inside ``model.trace(..., remote=remote)`` on the unmodified model (``True`` for NDIF,
            ``"local"``, or a host URL; ``model`` must be an nnsight model): every level, RMSNorm models;
            all scores, neuron ones included (``neurons``, ``fast_top`` and ``budget_bytes`` as locally),
            are computed on the server and only they come back (:mod:`nnsight_moe.recipes.attribution_remote`).
        results_path: remote only: partial results file; a failed run resumes from it when rerun.
        budget_bytes: memory budget for the [chunk, vocab] logits of a chunk of contributions.
        batch_size: prompts per forward, or ``"auto"`` (default): the largest batch (at most 16 on CPU, 64 on
            CUDA) whose estimated peak fits ``max_memory`` (:mod:`nnsight_moe.memory`; the chunk budget then
            shrinks to fit too). Remote runs use 16 for ``"auto"`` (the server's memory is not known here).
        max_memory: working-memory budget on top of the loaded model for ``"auto"`` (bytes or ``"8GiB"``);
            None: the device's free memory minus a margin. If even one prompt does not fit,
            :class:`nnsight_moe.memory.MemoryBudgetError` is raised before any forward.
        neurons: ``"exact"`` (every neuron) or ``"fast"``: a first-order (linearised log-sum-exp) screen
            of every neuron, then exact LPI for the ``fast_top`` neurons with the largest |screen score|
            per prompt and layer (routed and shared/dense neurons screened separately); others omitted.

    Memory: per batch, only the last position's logits [batch, V] are projected and kept while the batch
    is scored; afterwards only its rows, targets and ranks remain (O(batch x vocab), not O(prompts x vocab)).
    """
    from nnsight_moe.recipes.prompts import check_vocab, model_tokenizer, vocab_size

    unknown = set(levels) - set(LEVELS)
    if unknown:
        raise ValueError(f"unknown levels {sorted(unknown)}; choose from {LEVELS}")
    if len(prompts) == 0:
        raise ValueError("no prompts to attribute")
    tokenizer = model_tokenizer(model, tokenizer)
    wanted = _targets(targets, prompts, tokenizer)
    if only_correct and wanted is None:
        raise ValueError("only_correct=True compares the model's prediction with the gold targets: pass targets")
    vocab = vocab_size(model)
    if wanted is not None:
        check_vocab(wanted, vocab, "the targets", tokenizer)
    if remote is not None and batch_size == "auto":
        batch_size = 16  # the server's memory is not known here
    if remote is not None:
        from nnsight_moe.recipes.attribution_remote import attribute_remote

        structure = _parts(nnsight_moe.hf_model(model)).structure
        if structure is not None:  # the trace reads h + attn + mlp per layer, not these maps
            raise ValueError(
                f"remote attribution reads each layer as h + attn + mlp; this model's layers reach the residual "
                f"through {structure.describe()}, which only the local path holds fixed per token: run it locally "
                "(remote=None)")

        result = attribute_remote(model, prompts, wanted, tokenizer=tokenizer,
                                  levels=levels, remote=remote, batch_size=batch_size, progress=progress,
                                  results_path=results_path, budget_bytes=budget_bytes, neurons=neurons,
                                  fast_top=fast_top)
        return result.select([p for p, r in enumerate(result.ranks) if r == 1]) if only_correct else result
    hf = nnsight_moe.hf_model(model)
    parts = _parts(hf)
    try:
        layout = nnsight_moe.layout(hf)
    except nnsight_moe.UnsupportedModelError:
        layout = None
    batch_size, budget_bytes = _planned(hf, prompts, tokenizer, levels, batch_size, budget_bytes, max_memory,
                                        neurons, fast_top)
    device = runner.model_device(hf)

    def locate(row: int, start: int = 0):  # the first module with a non-finite output, for NonFiniteError
        from nnsight_moe.recipes.metrics import first_nonfinite

        return first_nonfinite(hf, **encode_prompts(tokenizer, prompts[start + row : start + row + 1], device))

    context = nnsight_moe.attached(hf) if layout is not None else _null()
    with context as handle:
        score = functools.partial(_attribute_batch, parts, handle, levels, budget_bytes, neurons, fast_top,
                                  only_correct, locate)
        results = runner.run(hf, prompts, score, tokenizer=tokenizer, batch_size=batch_size, progress=progress,
                             per_prompt=None if wanted is None else {"target": torch.tensor(wanted)},
                             kind="attribution", desc="attribution batches")
    frames, kept = [], []
    for r in results:
        if r["frame"] is not None:
            r["frame"]["prompt"] += len(kept)  # prompts kept by the batches before (all without only_correct)
            frames.append(r["frame"])
        kept += r["kept"]
    all_targets, all_ranks = [r["targets"] for r in results], [r["ranks"] for r in results]
    frame = pd.concat(frames, ignore_index=True)[COLUMNS] if frames else pd.DataFrame(columns=COLUMNS)
    frame = check_finite_scores(frame, locate)
    result = AttributionResult(frame, torch.cat(all_targets).tolist(), torch.cat(all_ranks).tolist(),
                               n_layers=len(parts.layers), family=layout.family if layout else "dense",
                               model_type=hf.config.model_type)
    if only_correct:
        result.prompt_ids = kept
    return result


def _attribute_batch(parts, handle, levels, budget_bytes, neurons, fast_top, only_correct, locate, hf, batch) -> dict:
    """One batch of local attribution (runner function): its score rows (prompt index local to the prompts
    kept in the batch), the kept prompts' input indices, targets and ranks. Nothing of size V is returned."""
    start = batch["rows"][0]
    got = capture(hf, runner.inputs(batch), parts, handle)
    tgt = got["logits"].argmax(-1) if "target" not in batch else batch["target"].to(got["logits"].device)
    ranks = target_ranks(got["logits"], tgt, prompts=batch["rows"], locate=lambda r, s=start: locate(r, s))
    keep = torch.arange(len(tgt), device=tgt.device)
    if only_correct:
        keep = (ranks == 1).nonzero()[:, 0]
        got, tgt, ranks = _select(got, keep), tgt[keep], ranks[keep]
    frame = None
    if len(keep):
        ro = readout(parts, got, tgt)
        frame = score_batch(hf, parts, got, ro, levels, handle, budget_bytes, neurons, fast_top)
    del got  # the batch's logits [b, V] and captured states go here: nothing of size V is kept
    return {"frame": frame, "kept": (keep + start).tolist(), "targets": tgt, "ranks": ranks}


def _planned(hf, prompts, tokenizer, levels, batch_size, budget_bytes, max_memory, neurons, fast_top):
    """(batch size, chunk budget): as given, or chosen by the memory planner for ``batch_size="auto"``."""
    from nnsight_moe import memory

    if batch_size != "auto":
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
        return batch_size, budget_bytes
    chosen = memory.plan(hf, tuple(levels), len(prompts), memory.max_length(prompts, tokenizer), max_memory,
                         neurons=neurons, fast_top=fast_top)
    return chosen.batch_size, min(budget_bytes, chosen.chunk_bytes)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def check_finite_scores(frame: pd.DataFrame, locate: Any = None) -> pd.DataFrame:
    """``frame`` unchanged if every score is finite; else a ``NonFiniteError`` naming the first bad component.

    NaN/inf scores come from NaN/inf activations (a broken checkpoint, an overflow in this dtype); they
    would make every summary statistic meaningless. Every score goes through the final norm, so one
    non-finite activation usually spoils all of them: ``locate(prompt) -> str | None`` (e.g.
    :func:`~nnsight_moe.recipes.metrics.first_nonfinite` on that prompt) names the module where they start.
    """
    import numpy as np

    from nnsight_moe.recipes.metrics import NonFiniteError

    bad = ~np.isfinite(frame["score"].to_numpy(dtype=float))
    if bad.any():
        first = frame[bad].iloc[0]
        origin = locate(int(first["prompt"])) if locate is not None else None
        where = ", ".join(f"{c} {first[c]}" for c in ("layer", "head", "expert", "neuron")
                          if c in frame and not pd.isna(first[c]) and int(first[c]) >= 0)
        raise NonFiniteError(
            f"attribution scores are NaN or infinite for {int(bad.sum())} of {len(frame)} components (first: prompt "
            f"{int(first['prompt'])}, {where}, level {first['level']!r}"
            + (f"; the first module with a non-finite output is {origin}" if origin else "")
            + "): the model's weights or activations hold "
            "NaN/inf (a broken checkpoint, or an overflow in this dtype)",
            sorted({int(p) for p in frame["prompt"][bad]}))
    return frame


def attribute_relations(model: Any, tokenizer, relations, *, per_relation: int | None = None, target: str = "gold",
                        only_correct: bool = False, **kwargs) -> "AttributionResult":
    """:func:`attribute` over relation facts (``nnsight_moe.data``); adds a ``relation`` column.

    ``per_relation`` keeps at most that many facts per relation (evenly spread) to bound the cost.
    ``target``: ``"gold"`` scores the object's first token (in context); ``"prediction"`` the model's
    own top-1 prediction. ``only_correct`` keeps only the facts whose gold target is the model's top-1
    (then both targets coincide). ``tokenizer`` None uses the model's own. Both are recorded on the
    result (``target``, ``only_correct``; ``to_json``).
    """
    from nnsight_moe.data import Relation, encode_facts, evenly_spaced
    from nnsight_moe.recipes.prompts import model_tokenizer

    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    tokenizer = model_tokenizer(model, tokenizer)
    if tokenizer is None:
        raise ValueError("relation facts need a tokenizer= (the model carries none)")
    relations = [relations] if isinstance(relations, Relation) else list(relations)
    facts = [f for relation in relations for f in evenly_spaced(relation.facts(), per_relation)]
    encoded = encode_facts(tokenizer, facts)
    if not encoded.facts:
        raise ValueError("no fact has a usable target token for this tokenizer")
    gold = encoded.targets if target == "gold" or only_correct else None
    result = attribute(model, encoded.prompts, gold, tokenizer=tokenizer, only_correct=only_correct, **kwargs)
    ids = result.prompt_ids if result.prompt_ids is not None else range(len(encoded.facts))
    result.relations = [encoded.facts[i].relation for i in ids]
    result.target, result.only_correct = target, only_correct
    return result


def compare(results: Sequence[AttributionResult]) -> tuple[pd.DataFrame, float | None]:
    """Table-1-style comparison and the MoE-vs-dense efficiency ratio (first MoE / first dense result)."""
    rows = []
    for r in results:
        s = r.summary()
        rows.append({"model": r.name or r.family, **{k: s[k] for k in
                     ("HIT@10", "MRR", "FFN gain", "Attn gain", "peak position %", "efficiency")}})
    table = pd.DataFrame(rows).set_index("model")
    moe = next((r for r in results if r.family != "dense"), None)
    dense = next((r for r in results if r.family == "dense"), None)
    ratio = None
    if moe is not None and dense is not None and dense.summary()["efficiency"] != 0:
        ratio = moe.summary()["efficiency"] / dense.summary()["efficiency"]
    return table, ratio


# ------------------------------------------------------------------------------------ main job
def section(job: Any):
    """The ``attribution`` section of the main job: all levels on the job's sample of facts.

    Neurons use the fast screen (exact LPI of the top 20 per prompt and layer). With dense models
    (``job.dense``, a list: ``--dense``; by default demo-dense for demo-moe, faithful-dense and
    faithful-dense-12 for faithful-moe) the same prompts also run on each of them for the Table-1-layout
    comparison and the efficiency ratios (MoE vs each dense model; the single ratio is vs the first), in the three forms of
    :mod:`nnsight_moe.recipes.efficiency` (locally also the measured telescoping identity).
    """
    from nnsight_moe.report import Section

    # with job.remote, job.model is an nnsight LanguageModel: every level, neurons included, runs in its traces
    levels, model, remote = LEVELS, job.model, job.remote
    sample = job.sample()
    options = dict(tokenizer=job.tokenizer, batch_size=job.batch_size, neurons="fast", fast_top=20, remote=remote)
    path = getattr(job, "results_path", lambda stage: None)  # remote batches kept for a resume
    dense_names = getattr(job, "dense", None)
    if dense_names is None:  # a job object without the attribute: the demo default
        dense_names = ["demo-dense"] if job.name == "demo-moe" else []
    dense_names = [dense_names] if isinstance(dense_names, str) else list(dense_names)
    n_models = 1 + len(dense_names)
    with label(f"model 1/{n_models} {job.name}"):
        result = attribute(model, sample.prompts, sample.targets, levels=levels, results_path=path("attribution"),
                           **options)
    result.name, result.relations = job.name, [f.relation for f in sample.facts]
    # the job chose the targets (gold or the model's own top-1) and the facts (all or only correct ones)
    result.target, result.only_correct = getattr(job, "target", "gold"), getattr(job, "only_correct", False)
    results = [result]
    for i, dense_name in enumerate(dense_names):
        dense_model, dense_tok = _dense_model(dense_name, remote, job.tokenizer, sample)
        dense_levels = [level for level in ("layer", "head", "neuron") if level in levels]
        with label(f"model {i + 2}/{n_models} {dense_name} (the Table-1 comparison)"):
            dense = attribute(dense_model, sample.prompts, sample.targets, levels=dense_levels,
                              results_path=path("attribution-dense" + (f"-{i + 1}" if i else "")),
                              **dict(options, tokenizer=dense_tok))
        dense.name, dense.family = dense_name, "dense"
        dense.target, dense.only_correct = result.target, result.only_correct
        results.append(dense)
    table, ratio = compare(results)
    figures = {"gains": ("Attention vs MoE/FFN gain by layer", result.plot_gains())}
    if job.is_moe:
        figures["experts"] = ("Mean gated LPI per (layer, expert)", result.plot_experts())
        if job.layout.has_shared:
            figures["shared_routed"] = ("Shared vs routed contribution by layer", result.plot_shared_routed())
    if "neuron" in levels:
        figures["neurons"] = ("Top neurons by mean LPI", result.plot_neurons())
    for i, dense in enumerate(results[1:]):
        figures["dense_gains" + (f"_{i + 1}" if i else "")] = (f"{dense.name}: gain by layer", dense.plot_gains())
    text = (f"LPI of every component at the last position on {result.n_prompts} prompts "
            f"({job.max_per_relation or 'all'} per relation)"
            + (f", computed through nnsight with remote={remote!r}." if remote else "."))
    if ratio is not None:
        text += f" MoE-vs-dense per-layer efficiency ratio (FFN gain / L, the study's form): {ratio:.3f}."
    from nnsight_moe.recipes import efficiency

    telescope = None if remote is not None else efficiency.telescoping(
        model, sample.prompts, result.targets, tokenizer=job.tokenizer, batch_size=job.batch_size, result=result)
    honest, honest_tables, honest_text = efficiency.section_parts(results, telescope)
    data = {"table1": table.reset_index().to_dict(orient="records"), "efficiency_ratio": ratio,
            "models": [r.to_json() for r in results], "efficiency": honest}
    return Section("attribution", "Cross-level knowledge attribution (LPI)", text + honest_text, data=data,
                   tables={"Table-1 layout (our reconstruction of the study's aggregates)": table, **honest_tables},
                   figures=figures)


def _dense_model(name: str, remote: Any, tokenizer, sample):
    """The dense comparison model and its tokenizer; its tokenizer must encode the prompts as the MoE's does."""
    from nnsight_moe import demo
    from nnsight_moe.models import load_model, load_traced

    if name in demo.names():
        model, tok = demo.load(name)
        if remote is not None:
            from nnsight import LanguageModel

            model = LanguageModel(model, tokenizer=tok)
    else:
        model, tok = load_model(name) if remote is None else load_traced(name, remote)
    mine, theirs = tokenizer(list(sample.prompts))["input_ids"], tok(list(sample.prompts))["input_ids"]
    if mine != theirs:
        bad = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
        raise ValueError(f"--dense {name!r}: its tokenizer encodes the prompts differently from the MoE model's "
                         f"(first: prompt {bad}, {sample.prompts[bad]!r}); the comparison needs the same tokens "
                         "and target ids (e.g. Qwen1.5-MoE-A2.7B with Qwen1.5-7B)")
    return model, tok
