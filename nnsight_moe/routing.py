"""Routing rules: how a family turns router logits into scores, a top-k selection and gate weights.

A rule is split in the three steps the hook contract exposes, so that editing any hook re-derives
everything after it and nothing before it:

    logits --scores()--> scores --select()--> indices --weights()--> weights

Every rule works on tensors of shape [..., E] (any leading dims) and returns float32 scores. Gate
weights come back in the dtype the family multiplies them with: a rule records where the family
computes them (``precision``) and what it casts them to (``cast_weights``); :meth:`Routing.weights`
takes the dtypes of the router's logits and input to resolve both (see :func:`weights_dtypes`).
Adapters build a rule from the family's router module; the rules here cover the families in
transformers 5 (softmax / sigmoid scoring, selection-only correction bias, group-limited selection,
top-k renormalisation, scaling factor, softmax over the top-k, PhiMoE's sparsemixer).

The maths live once, in :func:`rule_scores` / :func:`rule_select` / :func:`rule_weights` of a plain-data
rule (:meth:`Routing.rule`): the classes delegate to them and the remote view calls them in a trace,
shipped by value as source (so they read only ``torch`` and each other). The gate-weight edits
(:func:`zero_weights` for blocking, :func:`keep_top_weights` for top-n restriction) are shared the same
way by the attached hooks and the remote view.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import cloudpickle
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["ClampNormRouting", "HashRouting", "Routing", "SigmoidOfLogits", "SoftmaxTopK", "SparseMixer", "keep_top_weights",
           "expert_order_sum", "ordered_sum", "rule_scores", "rule_select", "rule_weights", "weights_dtypes", "zero_weights",
           "SinkRouting", "SkipRouting", "sink_weights"]


@dataclass
class Routing:
    """The common routing rule of transformers 5 MoE families.

    Args:
        n_experts: number of routed experts E.
        top_k: experts selected per token k.
        scoring: ``"softmax"`` (softmax over all E logits), ``"sigmoid"`` or ``"sqrtsoftplus"``
            (``sqrt(softplus(logits))``, DeepSeek-V4).
        normalize: renormalise the k selected weights to sum to one (``norm_topk_prob``).
        scale: multiply the weights by this factor (``routed_scaling_factor``).
        norm_eps: added to the renormalisation denominator (DeepSeek-V3 uses 1e-20).
        bias: selection-only correction bias [E] added to the scores for choosing experts but not
            for the weights (DeepSeek-V3 ``e_score_correction_bias``); None when absent.
        n_group, topk_group: group-limited selection: experts are split into ``n_group`` groups and
            only experts in the ``topk_group`` best groups can be chosen (1, 1 = no grouping).
        group_score: how a group is scored: ``"max"`` (DeepSeek-V2) or ``"top2sum"`` (DeepSeek-V3).
        sorted: slots in descending score order (``torch.topk(sorted=True)``); DeepSeek keeps
            ``sorted=False``, whose slot order is what the model computes.
        cast_weights: the dtype the family casts the gate weights to after computing them:
            ``False`` (or ``"none"``): no cast, they stay in the dtype they are computed in (Mixtral,
            DeepSeek: float32); ``True`` (or ``"logits"``): the router logits' dtype (Qwen-MoE, OLMoE);
            ``"input"``: the router input's (hidden states') dtype, for routers that compute their logits
            in float32 and cast the weights back (ERNIE-4.5, Granite-MoE, Cohere2-MoE).
        precision: where the weight arithmetic after scoring (gather, renormalisation, scaling) runs:
            ``"float32"`` (most families) or ``"logits"``, the logits' dtype (Cohere2-MoE's sigmoid
            renormalises in bf16 on a bf16 model). Scores are float32 either way; with ``"logits"``
            they are rounded to the logits' dtype first, which equals the family's own low-precision
            softmax / sigmoid (torch computes those in float32 and rounds the result).
            ``"scores"``: as ``"logits"``, and the selection scores themselves are rounded to the logits'
            dtype, for routers that also CHOOSE on low-precision scores (LFM2-MoE's bf16 sigmoid plus bias,
            Mistral-4's bf16 softmax), whose near-ties only exist after that rounding. (Not for a router
            that chooses on the logits, like Cohere2-MoE: rounding would create ties it does not have.)
        norm_p: renormalise the k selected weights by their p-norm, ``w / torch.norm(w, p)`` (DBRX's
            ``moe_normalize_expert_weights``; 1 is an L1 norm, computed as torch computes it); None: not.
        expert_scale: a learned per-expert factor [E] the weights are multiplied by last (after
            renormalisation and ``scale``), at the chosen experts (Gemma-4 ``per_expert_scale``); None when absent.
    """

    n_experts: int
    top_k: int
    scoring: str = "softmax"
    normalize: bool = False
    scale: float = 1.0
    norm_eps: float = 0.0
    bias: Tensor | None = None
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    sorted: bool = True
    cast_weights: bool | str = False
    precision: str = "float32"
    expert_scale: Tensor | None = None
    norm_p: float | None = None

    def __post_init__(self):
        cast = {False: "none", True: "logits"}.get(self.cast_weights, self.cast_weights)
        if cast not in _CASTS:
            raise ValueError(f"cast_weights must be one of {_CASTS} (or True / False), got {self.cast_weights!r}")
        self.cast_weights = cast
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {_PRECISIONS}, got {self.precision!r}")
        if self.scoring not in _SCORINGS:
            raise ValueError(f"scoring must be one of {_SCORINGS}, got {self.scoring!r}")
        if self.n_experts % max(self.n_group, 1):
            raise ValueError(f"n_experts={self.n_experts} is not divisible by n_group={self.n_group}")

    _kind: ClassVar[str] = "topk"  # each subclass the rule_* functions implement names its own

    def rule(self) -> dict:
        """The rule as plain data (str, int, float, bool) for the ``rule_*`` functions; bias and k go apart."""
        return {
            "kind": self._kind,
            "scoring": self.scoring,
            "normalize": bool(self.normalize),
            "scale": float(self.scale),
            "norm_eps": float(self.norm_eps),
            "norm_min": float(getattr(self, "norm_min", 0.0)),
            "n_group": int(self.n_group),
            "topk_group": int(self.topk_group),
            "group_score": self.group_score,
            "sorted": bool(self.sorted),
            "cast_weights": self.cast_weights,
            "precision": self.precision,
            "norm_p": None if self.norm_p is None else float(self.norm_p),
        }

    def scores(self, logits: Float[Tensor, "... E"]) -> Float[Tensor, "... E"]:
        """Selection scores from raw logits (float32), without any selection-only bias."""
        return rule_scores(self.rule(), logits)

    def select(
        self, scores: Float[Tensor, "... E"], exclude: Bool[Tensor, "... E"] | None = None
    ) -> Int[Tensor, "... k"]:
        """Top-k expert indices; experts in ``exclude`` (broadcast to scores) are never chosen (score -inf)."""
        return rule_select(self.rule(), scores, exclude, self.bias, self.top_k)

    def weights(
        self,
        scores: Float[Tensor, "... E"],
        indices: Int[Tensor, "... k"],
        exclude: Bool[Tensor, "... E"] | None = None,
        logits_dtype: torch.dtype | None = None,
        input_dtype: torch.dtype | None = None,
        logits: Float[Tensor, "... E"] | None = None,
    ) -> Float[Tensor, "... k"]:
        """Gate weights of the selected experts, as the family multiplies them into expert outputs.

        ``logits_dtype`` / ``input_dtype`` are the dtypes of the router's logits and of its input
        (hidden states); they set the weights' dtype by the family's rule (None: float32). ``logits``
        are the router logits when ``scores`` are exactly ``scores(logits)`` (not edited), else None.
        """
        return rule_weights(self.rule(), scores, indices, logits_dtype, input_dtype, logits, self.expert_scale)

    def describe(self) -> str:
        """One line for layout tables, e.g. ``softmax top-2 of 8, renorm``."""
        parts = [f"{self.scoring} top-{self.top_k} of {self.n_experts}"]
        if self.bias is not None:
            parts.append("selection bias")
        if self.n_group > 1:
            parts.append(f"groups {self.topk_group}/{self.n_group} ({self.group_score})")
        if self.normalize:
            parts.append("renorm")
        if self.norm_p is not None:
            parts.append(f"renorm by {self.norm_p:g}-norm")
        if self.scale != 1.0:
            parts.append(f"x{self.scale:g}")
        if self.expert_scale is not None:
            parts.append("x per-expert scale")
        return ", ".join(parts)


_CASTS = ("none", "logits", "input")
_SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus")
_PRECISIONS = ("float32", "logits", "scores")


def weights_dtypes(rule: dict, logits_dtype: Any = None, input_dtype: Any = None) -> tuple[Any, Any]:
    """(compute dtype, output dtype) of the gate weights by ``rule``, given the router's logits and
    input dtypes (None counts as float32): where the weight arithmetic runs and what it is cast to."""
    logits_dtype = logits_dtype or torch.float32
    compute = logits_dtype if rule.get("precision", "float32") in ("logits", "scores") else torch.float32
    cast = rule.get("cast_weights", "none")
    if cast is True or cast == "logits":
        return compute, logits_dtype
    if cast == "input":
        return compute, input_dtype or torch.float32
    return compute, compute


def rule_scores(rule: dict, logits: torch.Tensor) -> torch.Tensor:
    """Selection scores (float32) from ``logits`` [..., E] by ``rule``, without the selection-only bias.

    With ``precision="scores"`` (a family that scores and chooses in the logits' dtype) the scores are
    rounded to that dtype, so that selection sees the values (and near-ties) the family's own router sees.
    """
    dtype = logits.dtype
    if rule["scoring"] == "sqrtsoftplus":  # two operations: in a low-precision family each rounds, as in the model
        low = rule.get("precision", "float32") == "scores"
        return torch.nn.functional.softplus(logits if low else logits.float()).sqrt().float()
    logits = logits.float()
    if rule["kind"] in ("sparsemixer", "sigmoid_of_logits"):
        return logits
    scores = logits.softmax(dim=-1) if rule["scoring"] == "softmax" else logits.sigmoid()
    if rule.get("precision", "float32") == "scores" and dtype != torch.float32:
        scores = scores.to(dtype).float()
    return scores


def rule_select(rule: dict, scores: torch.Tensor, exclude: Any, bias: Any, k: int) -> torch.Tensor:
    """Top-k indices [..., k] from ``scores`` [..., E]: ``bias`` [E] (or None) counts for the choice only,
    experts in the bool mask ``exclude`` (or None) are never chosen, group-limited choice if ``n_group > 1``."""
    if rule["kind"] == "sparsemixer":
        raise ValueError("rule_select does not implement sparsemixer (phimoe): use SparseMixer.select")
    if rule["kind"] == "hash":
        raise ValueError("a hash-routed layer chooses its experts by token id (a fixed table), not from scores: "
                         "there is no selection to re-derive (its indices are the model's own)")
    choice = scores if bias is None else scores + bias.to(scores.device, scores.dtype)
    if exclude is not None:
        choice = choice.masked_fill(exclude.to(choice.device), float("-inf"))
    if rule["n_group"] > 1:
        choice = _mask_groups(choice, rule["n_group"], rule["topk_group"], rule["group_score"])
    return torch.topk(choice, k, dim=-1, sorted=rule["sorted"]).indices


def rule_weights(rule: dict, scores: torch.Tensor, indices: torch.Tensor, logits_dtype: Any = None,
                 input_dtype: Any = None, logits: Any = None, expert_scale: Any = None) -> torch.Tensor:
    """Gate weights [..., k] of the selected experts ``indices`` by ``rule``, in the dtype the family
    multiplies them with (:func:`weights_dtypes` of the router's ``logits_dtype`` / ``input_dtype``).

    ``logits``: the router logits the (unedited) ``scores`` came from, or None. Only a softmax over the
    selected k (:class:`SoftmaxTopK`) uses them, to compute that softmax as the router does.
    ``expert_scale``: the rule's per-expert factor [E] (:attr:`Routing.expert_scale`), or None; the weights
    are multiplied by it at ``indices`` last, with torch's type promotion (a float32 weight times a bf16
    factor stays float32, as in Gemma-4's router).
    """
    if expert_scale is not None:
        w = rule_weights(rule, scores, indices, logits_dtype, input_dtype, logits)
        return w * expert_scale.to(w.device)[indices]
    if rule["kind"] == "sink":
        raise ValueError("rule_weights does not implement a router normalised with shared experts (inkling): use "
                         "sink_weights, which also needs the shared experts' logits")
    if rule["kind"] == "skip":  # Zaya: the skip expert's slot gets weight 0 (its output is 0: no compute)
        w = rule_weights({**rule, "kind": "topk"}, scores, indices, logits_dtype, input_dtype, logits)
        return w.masked_fill(indices == rule["skip"], 0)
    compute, out = weights_dtypes(rule, logits_dtype, input_dtype)
    if rule["kind"] == "softmax_topk" and logits is not None:
        w = logits.float().gather(-1, indices).to(compute).softmax(dim=-1)
        return (w * rule["scale"] if rule["scale"] != 1.0 else w).to(out)
    return _rule_weights(rule, scores.gather(-1, indices).to(compute)).to(out)


def _rule_weights(rule: dict, w: torch.Tensor) -> torch.Tensor:
    """The weight arithmetic of ``rule`` on the gathered scores ``w`` [..., k], in ``w``'s dtype."""
    kind = rule["kind"]
    if kind == "softmax_topk":
        w = w / w.sum(dim=-1, keepdim=True)
        return w * rule["scale"] if rule["scale"] != 1.0 else w  # OpenAI-Privacy-Filter: / top_k
    if kind == "sparsemixer":
        raise ValueError("rule_weights does not implement sparsemixer (phimoe): use SparseMixer.weights")
    if kind == "sigmoid_of_logits":
        w = w.sigmoid()
        if rule["normalize"]:
            w = w / w.sum(dim=-1, keepdim=True)
    elif kind == "clampnorm":
        w = w / w.sum(dim=-1, keepdim=True).clamp(min=rule["norm_min"])
    elif rule["normalize"]:
        w = w / (w.sum(dim=-1, keepdim=True) + rule["norm_eps"])
    elif rule.get("norm_p") is not None:
        w = w / torch.norm(w, p=rule["norm_p"], dim=-1, keepdim=True)
    if rule["scale"] != 1.0:
        w = w * rule["scale"]
    return w


def zero_weights(weights: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor, renorm: bool) -> torch.Tensor:
    """Blocking: gate weights [b, p, k] of the experts in ``mask`` (bool [1 or b, E]) set to 0; with
    ``renorm`` the others are rescaled to the original per-token sum (a token losing all keeps 0)."""
    b, p, _ = indices.shape
    hit = mask[:, None, :].expand(b, p, -1).gather(-1, indices)
    edited = weights.masked_fill(hit, 0.0)
    if renorm:
        kept = edited.sum(dim=-1, keepdim=True)
        edited = edited * (weights.sum(dim=-1, keepdim=True) / kept.masked_fill(kept == 0, 1.0))
    return edited


def expert_order_sum(out: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``sum over slots of weight * out`` ([b, p, k, d] outputs, [b, p, k] weights and expert ids -> [b, p, d]),
    in float32, added in increasing expert order onto 0: what an eager experts loop over the experts with
    ``index_add_`` into a float32 zero tensor computes (float32 addition is not associative, so the order
    is what makes the sum bit-identical to the family's)."""
    return ordered_sum(out.float() * weights.float()[..., None], indices)


def ordered_sum(terms: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The slots' ``terms`` [..., k, d] added onto 0 in increasing expert id (``indices`` [..., k]; stable
    for equal ids), in the terms' dtype: the summation order of an eager loop over the experts."""
    order = indices.argsort(dim=-1, stable=True)
    terms = terms.gather(-2, order[..., None].expand_as(terms))
    total = torch.zeros_like(terms[..., 0, :])
    for j in range(terms.shape[-2]):
        total = total + terms[..., j, :]
    return total


def keep_top_weights(weights: torch.Tensor, n: int, renorm: bool = False) -> torch.Tensor:
    """Gate weights [..., k] with all but the ``n`` largest per token set to 0 (ties: first slot wins).

    ``renorm=True`` rescales the kept weights to the token's original sum of all k weights (tokens whose
    kept weights sum to 0 keep zeros), as blocking's ``renorm`` mode does.
    """
    rank = weights.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    kept = weights.masked_fill(rank >= n, 0.0)
    if not renorm:
        return kept
    total, kept_sum = weights.sum(dim=-1, keepdim=True), kept.sum(dim=-1, keepdim=True)
    return torch.where(kept_sum != 0, kept * (total / torch.where(kept_sum != 0, kept_sum, 1)), kept)


def _mask_groups(choice: torch.Tensor, n_group: int, topk_group: int, how: str) -> torch.Tensor:
    """Set the choice score of experts outside the ``topk_group`` best groups to -inf."""
    grouped = choice.unflatten(-1, (n_group, -1))
    if how == "top2sum":
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(-1, group_scores.topk(topk_group, dim=-1).indices, True)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(-2)


@dataclass
class SoftmaxTopK(Routing):
    """GPT-OSS, Granite-MoE, Cohere2-MoE: select the top-k logits, gate weights are the softmax over the
    selected k only.

    Scores are the softmax over all E logits (same ranking as the logits). The weights, the
    renormalised selected scores, equal the softmax over the k selected logits; given the (unedited)
    logits, :meth:`weights` computes exactly that, the router's own operation on its own operands, so
    the weights are bit-identical in every dtype (the renormalised scores agree only to float32
    rounding, which a cast to fp16 / bf16 can turn into a one-ulp difference).
    """

    _kind: ClassVar[str] = "softmax_topk"

    def describe(self) -> str:
        scale = f", x{self.scale:g}" if self.scale != 1.0 else ""
        return f"top-{self.top_k} of {self.n_experts} logits, softmax over the top-k{scale}"


@dataclass
class SparseMixer(Routing):
    """PhiMoE's sparsemixer (evaluation mode): two sequential argmax picks with a jitter mask.

    Scores are the raw logits (the mask is defined on logits, not on a softmax). Pick i (of 2)
    takes the best remaining logit; its weight is the softmax, over the logits within
    ``2 * jitter_eps`` (relative) of that best logit, evaluated at the pick.
    """

    jitter_eps: float = 0.01
    _kind: ClassVar[str] = "sparsemixer"

    def select(self, scores, exclude=None):
        if exclude is not None:
            scores = scores.masked_fill(exclude.to(scores.device), float("-inf"))
        first = scores.argmax(dim=-1, keepdim=True)
        second = scores.scatter(-1, first, float("-inf")).argmax(dim=-1, keepdim=True)
        return torch.cat([first, second], dim=-1)

    def weights(self, scores, indices, exclude=None, logits_dtype=None, input_dtype=None, logits=None):
        if exclude is not None:
            scores = scores.masked_fill(exclude.to(scores.device), float("-inf"))
        compute, cast = weights_dtypes(self.rule(), logits_dtype, input_dtype)
        scores = scores.to(compute)
        out, remaining = [], scores
        for j in range(indices.shape[-1]):
            pick = indices[..., j : j + 1]
            best = remaining.max(dim=-1, keepdim=True).values
            factor = scores.abs().clamp(min=best)
            masked = remaining.masked_fill((best - scores) / factor > 2 * self.jitter_eps, float("-inf"))
            out.append(masked.softmax(dim=-1).gather(-1, pick))
            remaining = remaining.scatter(-1, pick, float("-inf"))
        return torch.cat(out, dim=-1).to(cast)

    def describe(self) -> str:
        return f"sparsemixer top-2 of {self.n_experts} (jitter {self.jitter_eps:g})"


@dataclass
class SigmoidOfLogits(Routing):
    """Select on the raw logits (plus a selection-only bias), weight by the sigmoid of the chosen logits.

    Kolibri: ``topk(logits + bias)``, weights ``sigmoid(logit)`` of the chosen experts, renormalised
    when ``normalize``. Scores are the raw logits (float32), since the bias is added to them, not to
    a sigmoid (as in PhiMoE's :class:`SparseMixer`).
    """

    _kind: ClassVar[str] = "sigmoid_of_logits"

    def describe(self) -> str:
        bias = " + selection bias" if self.bias is not None else ""
        renorm = ", renorm" if self.normalize else ""
        return f"top-{self.top_k} of {self.n_experts} logits{bias}, sigmoid weights{renorm}"


@dataclass
class HashRouting(Routing):
    """Hash routing (DeepSeek-V4's first layers): the experts are a fixed table lookup of the token ids
    (``tid2eid[input_ids]``); the learned scores only weight them (renormalised, scaled, as :class:`Routing`).

    The indices are the model's own (the router's output; ``hook_topk_indices`` may still replace them, the
    weights are then re-derived); :meth:`select` raises, and so does ``reroute`` blocking, which has no
    meaning for a selection that does not depend on scores.
    """

    _kind: ClassVar[str] = "hash"

    def describe(self) -> str:
        return super().describe().replace(f"{self.scoring} top-{self.top_k}", f"hash top-{self.top_k} (token ids), "
                                          f"{self.scoring} weights", 1)


@dataclass
class ClampNormRouting(Routing):
    """Renormalise the selected weights by ``max(sum, norm_min)`` instead of ``sum + eps`` (ERNIE-4.5-MoE)."""

    norm_min: float = 1e-12
    _kind: ClassVar[str] = "clampnorm"

    def describe(self) -> str:
        return super().describe().replace(", renorm", "") + f", renorm (sum clamped at {self.norm_min:g})"


@dataclass
class SkipRouting(Routing):
    """A routed *skip expert* (Zaya): the last expert id ``n_experts - 1`` computes nothing.

    Scores, selection-only bias and top-k as :class:`Routing`; a slot that picks the skip expert gets gate
    weight 0 (the router masks it so) and output 0. ``n_experts`` counts the skip expert.
    """

    _kind: ClassVar[str] = "skip"

    def rule(self) -> dict:
        return {**super().rule(), "skip": int(self.n_experts - 1)}

    def describe(self) -> str:
        return super().describe() + f", expert {self.n_experts - 1} skips (zero compute)"


@dataclass
class SinkRouting(Routing):
    """Routed weights normalised jointly with the shared experts' gammas (Inkling's shared-expert sink).

    The router's logits are [E routed | S shared]. Selection: ``topk(sigmoid(routed) + bias, sorted=False)``.
    Weights: ``softmax(logsigmoid([chosen routed logits | shared logits]))`` (i.e. the k + S sigmoids divided
    by their sum) times ``scale`` (``route_scale``) times the router's learned ``global_scale`` [1], cast to
    the hidden states' dtype; the first k are the routed weights, the last S the shared experts' gammas
    (:func:`sink_weights`). The scores are ``sigmoid(routed logits)``.
    """

    n_shared: int = 1
    global_scale: Tensor | None = None
    _kind: ClassVar[str] = "sink"

    def rule(self) -> dict:
        return {**super().rule(), "n_shared": int(self.n_shared)}

    def weights(self, scores, indices, exclude=None, logits_dtype=None, input_dtype=None, logits=None):
        raise ValueError("SinkRouting weights need the shared experts' logits: use SinkRouting.sink_weights")

    def sink_weights(self, scores, indices, shared_logits, input_dtype=None, logits=None) -> tuple[Tensor, Tensor]:
        """(routed weights [..., k], shared gammas [..., S]): :func:`sink_weights` of this rule."""
        return sink_weights(self.rule(), scores, indices, shared_logits, self.global_scale, input_dtype, logits)

    def describe(self) -> str:
        return (f"sigmoid top-{self.top_k} of {self.n_experts} + selection bias, weights normalised with "
                f"{self.n_shared} shared expert gamma(s), x{self.scale:g} x global scale")


def sink_weights(rule: dict, scores: torch.Tensor, indices: torch.Tensor, shared_logits: torch.Tensor,
                 global_scale: Any = None, input_dtype: Any = None, logits: Any = None) -> tuple:
    """Inkling's joint normalisation: (routed weights [..., k], shared gammas [..., S]).

    ``scores`` [..., E] are ``sigmoid(routed logits)``, ``shared_logits`` [..., S] the router's shared-expert
    logits (float32), ``logits`` the routed logits when ``scores`` are unedited (the router's own operations
    on them, bit-identical), else None (the log-sigmoids are then ``log(scores)``). Both outputs are in
    ``input_dtype`` (the router casts to the hidden states' dtype).
    """
    if logits is not None:
        chosen = torch.cat([logits.float().gather(-1, indices), shared_logits.float()], dim=-1)
        log_probs = torch.nn.functional.logsigmoid(chosen)
    else:
        log_probs = torch.cat([scores.float().gather(-1, indices).log(),
                               torch.nn.functional.logsigmoid(shared_logits.float())], dim=-1)
    w = torch.exp(log_probs - torch.logsumexp(log_probs, dim=-1, keepdim=True))
    w = w * rule["scale"]
    if global_scale is not None:
        w = w * global_scale.to(w.device).float()
    w = w.to(input_dtype or torch.float32)
    k = indices.shape[-1]
    return w[..., :k].contiguous(), w[..., k:].contiguous()


# Ship this module's functions by value (as source): nnsight_moe is not installed on NDIF.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
