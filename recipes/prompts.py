"""Prompts to model inputs, and where each prompt ends: the three things every recipe needs first.

* :func:`encode_prompts`: ``input_ids`` / ``attention_mask`` of a batch (strings or token-id lists);
* :func:`last_positions`: the last non-pad position of each row (left or right padding);
* :func:`check_vocab` / :func:`vocab_size`: token ids must exist in the model's vocabulary (a tokenizer
  that belongs to another model gives a clear error instead of an index error deep in the forward);
* :func:`model_tokenizer`: the tokenizer a recipe uses (the one given, else the one the model carries).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["check_vocab", "encode_prompts", "last_positions", "model_tokenizer", "vocab_size"]


def model_tokenizer(model: Any, tokenizer: Any = None) -> Any:
    """``tokenizer`` if given, else the tokenizer ``model`` carries (nnsight ``LanguageModel`` and
    TransformerBridge have ``.tokenizer``), else None."""
    if tokenizer is not None:
        return tokenizer
    try:
        found = getattr(model, "tokenizer", None)
    except Exception:  # noqa: BLE001 - an envoy may raise anything for a missing attribute
        return None
    return found if callable(found) and hasattr(found, "decode") else None


def _affixes(tokenizer) -> tuple[list[int], int] | None:
    """(special ids the tokenizer puts before a text, number it puts after), or None if unclear."""
    found = None
    try:
        full = list(tokenizer("a")["input_ids"])
        bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
        for i in range(len(full) - len(bare) + 1):
            if bare and full[i : i + len(bare)] == bare:
                found = (full[:i], len(full) - i - len(bare))
                break
    except Exception:  # noqa: BLE001 - a tokenizer without these options: use its plain call
        found = None
    return found


def encode_prompts(tokenizer, prompts: Sequence, device, vocab: int | None = None, *,
                   padding_side: str | None = None, pad_id: int | None = None) -> dict[str, Tensor]:
    """``input_ids`` and ``attention_mask`` for a batch of prompts.

    Strings go through ``tokenizer`` (its own padding side unless ``padding_side`` is given) with the
    special tokens it puts BEFORE a text (BOS, [CLS]); tokens it appends (EOS, [SEP]) are left out, so
    the last position is the prompt's last token. Lists of token ids are padded with ``pad_id`` (default
    0) on ``padding_side`` (default ``"left"``). With ``vocab`` (the model's vocabulary size) every id is
    checked (:func:`check_vocab`).
    """
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side must be 'left', 'right' or None (the tokenizer's own), got {padding_side!r}")
    if isinstance(prompts[0], str):
        if tokenizer is None:
            raise ValueError("string prompts need a tokenizer=; or pass lists of token ids")
        affixes = _affixes(tokenizer)
        side = padding_side or getattr(tokenizer, "padding_side", "right")
        if affixes is None or affixes[1] == 0:
            enc = tokenizer(list(prompts), return_tensors="pt", padding=True,
                            **({} if padding_side is None else {"padding_side": padding_side}))
            out = {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}
        else:  # the tokenizer appends EOS / [SEP]: keep only what comes before the text
            pad = getattr(tokenizer, "pad_token_id", None)
            if pad is None:
                raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before batching")
            bodies = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
            out = _pad([affixes[0] + list(b) for b in bodies], pad, side)
            out = {k: v.to(device) for k, v in out.items()}
    else:
        out = {k: v.to(device) for k, v in _pad([list(p) for p in prompts], 0 if pad_id is None else pad_id,
                                                padding_side or "left").items()}
    if vocab is not None:
        check_vocab(out["input_ids"][out["attention_mask"].bool()], vocab, "the prompts", tokenizer)
    return out


def _pad(seqs: list[list[int]], pad_id: int, side: str) -> dict[str, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, span] = torch.as_tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return {"input_ids": ids, "attention_mask": mask}


def vocab_size(model: Any) -> int:
    """Rows of the model's unembedding (its vocabulary size); ``config.vocab_size`` if it has none."""
    from nnsight_moe.attach import hf_model
    from nnsight_moe.hooks import unwrap

    hf = hf_model(model)
    out = hf.get_output_embeddings()
    weight = getattr(unwrap(out), "weight", None) if out is not None else None
    if weight is not None and weight.ndim == 2:
        return int(weight.shape[0])
    return int(hf.config.get_text_config().vocab_size)


def check_vocab(ids: Any, vocab: int, what: str = "the token ids", tokenizer: Any = None) -> None:
    """Raise ``ValueError`` if any id in ``ids`` is outside ``0..vocab - 1`` (names the id, the model's
    vocabulary size and, with ``tokenizer``, the tokenizer's size)."""
    ids = torch.as_tensor(ids).reshape(-1)
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low >= 0 and high < vocab:
        return
    bad = high if high >= vocab else low
    size = f" (the tokenizer has {len(tokenizer)} tokens)" if tokenizer is not None and hasattr(tokenizer, "__len__") else ""
    raise ValueError(
        f"token id {bad} in {what} is outside the model's vocabulary of {vocab} ids (0..{vocab - 1}){size}: "
        "the tokenizer does not belong to this model; use the checkpoint's own tokenizer"
    )


def last_positions(mask: Int[Tensor, "b p"]) -> Int[Tensor, " b"]:
    """Index of the last non-pad token of each row of an attention mask, for left or right padding.

    Raises ``ValueError`` naming the rows that have no token at all (an empty prompt has no last
    position: scoring it would read a pad position).
    """
    empty = (mask.sum(-1) == 0).nonzero().reshape(-1).tolist()
    if empty:
        raise ValueError(f"prompts {empty} of this batch are empty (no token after tokenization); "
                         "every prompt needs at least one token")
    return mask.cumsum(-1).argmax(-1)
