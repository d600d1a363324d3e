"""Ranking metrics on last-position logits: target rank, MRR and HIT@k.

The rank of the target is 1 + the number of vocabulary entries with a strictly larger logit (ties
count in the target's favour), so a target tied for the top has rank 1.

Non-finite logits (NaN, +-inf: a broken checkpoint, an overflow in float16) have no rank: NaN compares
false with everything, so a NaN row would otherwise rank its target 1 and score a perfect MRR. By
default such rows raise :class:`NonFiniteError` naming the prompt (and, where the caller can rerun
the model, the first module whose output is non-finite, from :func:`first_nonfinite`);
``nonfinite="worst"`` ranks them last (rank = vocabulary size) instead. Ranks computed inside a trace
(the ``remote=`` paths) mark such rows with rank 0, which :func:`checked_ranks` turns into the same
error or the worst rank on the client.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["NONFINITE", "NonFiniteError", "checked_ranks", "first_nonfinite", "hit_at_k", "hits_of_ranks", "mrr",
           "mrr_of_ranks", "target_ranks"]

#: What :func:`target_ranks` can do with rows holding non-finite logits.
NONFINITE = ("raise", "worst")


class NonFiniteError(ValueError):
    """Logits (or scores) are NaN or infinite; ``prompts`` lists the affected prompt numbers."""

    def __init__(self, message: str, prompts: list[int]):
        super().__init__(message)
        self.prompts = prompts


def _nonfinite_option(nonfinite: str) -> str:
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    return nonfinite


def _raise_nonfinite(bad: Tensor, prompts: Any, locate: Any, what: str) -> None:
    rows = bad.nonzero().reshape(-1).tolist()
    numbers = [int(prompts[r]) for r in rows] if prompts is not None else rows
    where = locate(rows[0]) if locate is not None else None
    raise NonFiniteError(
        f"{what} are NaN or infinite for {len(rows)} of {bad.numel()} prompts (first: prompt {numbers[0]}"
        + (f"; the first module with a non-finite output is {where}" if where else "")
        + "): the model's weights or activations hold NaN/inf (a broken checkpoint, or an overflow in this dtype), "
        "so no rank is meaningful. Fix the model, or pass nonfinite='worst' to rank such prompts last",
        numbers,
    )


def first_nonfinite(model: Any, **inputs: Any) -> str | None:
    """Name of the first module (in execution order) whose output holds NaN/inf, for one forward of ``model``.

    ``model`` is a torch module (an HF model); ``inputs`` are its forward's keyword arguments (e.g.
    ``input_ids``, ``attention_mask``). Returns e.g. ``"model.layers.1.mlp.experts"`` or None when every
    output is finite. Used to name the layer in :class:`NonFiniteError` messages.
    """
    found: list[str] = []
    handles = []

    def check(name):
        def hook(module, args, output):
            tensors = output if isinstance(output, (tuple, list)) else (getattr(output, "logits", output),)
            if not found and any(isinstance(t, Tensor) and t.is_floating_point() and not torch.isfinite(t).all()
                                 for t in tensors):
                found.append(name)
        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(check(name)))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _check(logits: Tensor, targets: Tensor) -> Tensor:
    if logits.ndim != 2:
        raise ValueError(f"logits must be last-position logits [prompts, vocab], got shape {tuple(logits.shape)}")
    targets = torch.as_tensor(targets, device=logits.device).reshape(-1)
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(f"got {logits.shape[0]} rows of logits but {targets.shape[0]} targets")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"target ids must be integer token ids, got {targets.dtype} values such as "
                        f"{targets[:3].tolist()}")
    if targets.numel() and (targets.min() < 0 or targets.max() >= logits.shape[1]):
        raise ValueError(f"target ids must be in 0..{logits.shape[1] - 1}")
    return targets.long()


def target_ranks(logits: Float[Tensor, "P V"], targets: Int[Tensor, " P"], *, nonfinite: str = "raise",
                 prompts: Any = None, locate: Any = None) -> Int[Tensor, " P"]:
    """1-based rank of each target among its row of logits.

    Args:
        nonfinite: ``"raise"`` (default): a row with a NaN/inf logit raises :class:`NonFiniteError`;
            ``"worst"``: such rows get the worst rank (the vocabulary size).
        prompts: the prompt number of each row, for the error message (default 0..P-1).
        locate: optional ``locate(row) -> str | None`` naming where non-finite values first appear
            (e.g. :func:`first_nonfinite` on that row's input), for the error message.
    """
    _nonfinite_option(nonfinite)
    targets = _check(logits, targets)
    target_logit = logits.gather(1, targets[:, None])
    ranks = (logits > target_logit).sum(dim=1) + 1
    bad = ~torch.isfinite(logits).all(dim=1)
    if bool(bad.any()):
        if nonfinite == "raise":
            _raise_nonfinite(bad.cpu(), prompts, locate, "the last-position logits")
        ranks = torch.where(bad, logits.shape[1], ranks)
    return ranks


def checked_ranks(ranks: Int[Tensor, "..."], vocab: int, *, nonfinite: str = "raise", prompts: Any = None) -> Tensor:
    """Ranks computed inside a trace, where 0 marks a row with non-finite logits: raise, or make them worst.

    ``vocab`` is the vocabulary size (the worst rank); ``prompts`` numbers the last dimension's rows.
    """
    _nonfinite_option(nonfinite)
    ranks = torch.as_tensor(ranks)
    bad = ranks == 0
    if bool(bad.any()):
        if nonfinite == "raise":
            _raise_nonfinite(bad.reshape(-1, ranks.shape[-1]).any(0) if ranks.ndim else bad.reshape(1), prompts, None,
                             "the last-position logits (computed remotely)")
        ranks = torch.where(bad, vocab, ranks)
    return ranks


def mrr_of_ranks(ranks: Int[Tensor, " P"]) -> float:
    """Mean reciprocal rank of 1-based ranks (nan for none)."""
    ranks = torch.as_tensor(ranks)
    if ranks.numel() and bool((ranks < 1).any()):
        raise ValueError(f"ranks are 1-based; got {int(ranks.min())} (a rank 0 marks non-finite logits: see checked_ranks)")
    return float((1.0 / ranks.double()).mean()) if ranks.numel() else float("nan")


def hits_of_ranks(ranks: Int[Tensor, " P"], k: int = 10) -> float:
    """Fraction of 1-based ranks that are <= ``k`` (nan for none)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ranks = torch.as_tensor(ranks)
    if ranks.numel() and bool((ranks < 1).any()):
        raise ValueError(f"ranks are 1-based; got {int(ranks.min())} (a rank 0 marks non-finite logits: see checked_ranks)")
    return float((ranks <= k).double().mean()) if ranks.numel() else float("nan")


def mrr(logits: Float[Tensor, "P V"], targets: Int[Tensor, " P"], *, nonfinite: str = "raise") -> float:
    """Mean reciprocal rank of the targets (1.0 = every target is the top prediction); ``nonfinite`` as in
    :func:`target_ranks`."""
    return mrr_of_ranks(target_ranks(logits, targets, nonfinite=nonfinite))


def hit_at_k(logits: Float[Tensor, "P V"], targets: Int[Tensor, " P"], k: int = 10, *,
             nonfinite: str = "raise") -> float:
    """Fraction of prompts whose target is among the top ``k`` predictions; ``nonfinite`` as in :func:`target_ranks`."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return hits_of_ranks(target_ranks(logits, targets, nonfinite=nonfinite), k)
