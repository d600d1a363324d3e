"""Prompts to model inputs, and where each prompt ends: the two things every recipe needs first."""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["encode_prompts", "last_positions"]


def encode_prompts(tokenizer, prompts: Sequence, device) -> dict[str, Tensor]:
    """``input_ids`` and ``attention_mask`` for a batch of prompts.

    Strings go through ``tokenizer`` (its own padding side); lists of token ids are left-padded with 0.
    """
    if isinstance(prompts[0], str):
        if tokenizer is None:
            raise ValueError("string prompts need a tokenizer=; or pass lists of token ids")
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p))
        mask[i, width - len(p) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def last_positions(mask: Int[Tensor, "b p"]) -> Int[Tensor, " b"]:
    """Index of the last non-pad token of each row of an attention mask, for left or right padding."""
    return mask.cumsum(-1).argmax(-1)
