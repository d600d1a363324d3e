"""Ranking metrics on last-position logits: target rank, MRR and HIT@k.

The rank of the target is 1 + the number of vocabulary entries with a strictly larger logit (ties
count in the target's favour), so a target tied for the top has rank 1.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["hit_at_k", "hits_of_ranks", "mrr", "mrr_of_ranks", "target_ranks"]


def _check(logits: Tensor, targets: Tensor) -> Tensor:
    if logits.ndim != 2:
        raise ValueError(f"logits must be last-position logits [prompts, vocab], got shape {tuple(logits.shape)}")
    targets = torch.as_tensor(targets, device=logits.device).reshape(-1)
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(f"got {logits.shape[0]} rows of logits but {targets.shape[0]} targets")
    if targets.numel() and (targets.min() < 0 or targets.max() >= logits.shape[1]):
        raise ValueError(f"target ids must be in 0..{logits.shape[1] - 1}")
    return targets.long()


def target_ranks(logits: Float[Tensor, "P V"], targets: Int[Tensor, " P"]) -> Int[Tensor, " P"]:
    """1-based rank of each target among its row of logits."""
    targets = _check(logits, targets)
    target_logit = logits.gather(1, targets[:, None])
    return (logits > target_logit).sum(dim=1) + 1


def mrr_of_ranks(ranks: Int[Tensor, " P"]) -> float:
    """Mean reciprocal rank of 1-based ranks (nan for none)."""
    ranks = torch.as_tensor(ranks)
    return float((1.0 / ranks.double()).mean()) if ranks.numel() else float("nan")


def hits_of_ranks(ranks: Int[Tensor, " P"], k: int = 10) -> float:
    """Fraction of 1-based ranks that are <= ``k`` (nan for none)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ranks = torch.as_tensor(ranks)
    return float((ranks <= k).double().mean()) if ranks.numel() else float("nan")


def mrr(logits: Float[Tensor, "P V"], targets: Int[Tensor, " P"]) -> float:
    """Mean reciprocal rank of the targets (1.0 = every target is the top prediction)."""
    return mrr_of_ranks(target_ranks(logits, targets))


def hit_at_k(logits: Float[Tensor, "P V"], targets: Int[Tensor, " P"], k: int = 10) -> float:
    """Fraction of prompts whose target is among the top ``k`` predictions."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return hits_of_ranks(target_ranks(logits, targets), k)
