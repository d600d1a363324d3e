"""Blocking's inputs: the dataset forms every entry point accepts, tokenized batches, (layer, expert) pairs.

* :func:`_dataset` turns Relations, an EncodedFacts or ``(prompts, targets[, relation_names])`` into a
  :class:`_Data` (prompts, target ids, one relation name per prompt; see :mod:`nnsight_moe.recipes.blocking`),
  optionally ``max_per_relation`` evenly spaced prompts per relation;
* :func:`_chunks` tokenizes its prompts once into runner batches (:mod:`nnsight_moe.recipes.runner`);
* :func:`_all_pairs` / :func:`_check_pairs`: every routed (layer, expert) pair of a model, and the check of
  pairs a user gives; :func:`_metrics`: MRR and HIT@k of a rank vector; :func:`_positive`: argument check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nnsight_moe.layout import MoELayout
from nnsight_moe.recipes import runner
from nnsight_moe.recipes.metrics import hits_of_ranks, mrr_of_ranks
from nnsight_moe.recipes.prompts import check_vocab, vocab_size

#: Relation name of the pooled rows (every prompt) and of prompts given without relation names.
ALL = "all"

Pair = tuple[int, int]


@dataclass
class _Data:
    """Prompts (str or token-id lists), target ids [P] and one relation name per prompt."""

    prompts: list
    targets: Tensor
    relations: list[str]

    def groups(self) -> dict[str, list[int]]:
        """Prompt indices per relation, in first-seen order."""
        out: dict[str, list[int]] = {}
        for i, name in enumerate(self.relations):
            out.setdefault(name, []).append(i)
        return out


def _dataset(dataset: Any, tokenizer: Any, max_per_relation: int | None = None) -> _Data:
    """Normalise the accepted dataset forms (:mod:`nnsight_moe.recipes.blocking`) into :class:`_Data`."""
    from nnsight_moe.data import EncodedFacts, Relation, encode_facts

    if isinstance(dataset, Relation):
        dataset = [dataset]
    if isinstance(dataset, (list, tuple)) and len(dataset) == 0:
        raise ValueError("dataset is empty: give Relations, an EncodedFacts or (prompts, targets) with >= 1 prompt")
    if isinstance(dataset, EncodedFacts):
        data = _Data(list(dataset.prompts), torch.tensor(dataset.targets, dtype=torch.long),
                     [f.relation for f in dataset.facts])
    elif isinstance(dataset, (list, tuple)) and dataset and all(isinstance(r, Relation) for r in dataset):
        if tokenizer is None:
            raise ValueError("a list of Relations needs tokenizer= to turn facts into prompts and target ids")
        encoded = encode_facts(tokenizer, [f for r in dataset for f in r.facts()])
        return _dataset(encoded, tokenizer, max_per_relation)
    elif isinstance(dataset, (list, tuple)) and len(dataset) in (2, 3) and not isinstance(dataset[0], str):
        prompts, targets = list(dataset[0]), torch.as_tensor(dataset[1]).reshape(-1)
        if targets.numel() and (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool):
            raise TypeError(f"dataset: target ids must be integer token ids, got {targets.dtype} values such as "
                            f"{targets[:3].tolist()}")
        targets = targets.long()
        names = [str(r) for r in dataset[2]] if len(dataset) == 3 else [ALL] * len(prompts)
        if not (len(prompts) == targets.numel() == len(names)):
            raise ValueError(
                f"dataset: got {len(prompts)} prompts, {targets.numel()} targets and {len(names)} relation "
                "names; they must have the same length"
            )
        data = _Data(prompts, targets, names)
    else:
        raise TypeError(
            "dataset must be a list of nnsight_moe.data.Relation, an EncodedFacts, or a pair "
            f"(prompts, targets) / triple (prompts, targets, relation_names); got {type(dataset).__name__}"
            + (" (empty)" if isinstance(dataset, (list, tuple)) and not dataset else "")
        )
    if not data.prompts:
        raise ValueError("dataset is empty: no prompt with a usable target (need at least one fact)")
    if ALL in data.relations and len(set(data.relations)) > 1:
        raise ValueError(f"a relation is named {ALL!r}, the name of the rows that pool every relation; rename it")
    if isinstance(data.prompts[0], str) and tokenizer is None:
        raise ValueError("string prompts need tokenizer= (or a model that carries one); or pass lists of token ids")
    if max_per_relation is not None:
        data = _subsample(data, max_per_relation)
    return data


def _subsample(data: _Data, n: int) -> _Data:
    """At most ``n`` prompts per relation, evenly spaced over the relation's prompts (deterministic)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"max_per_relation must be a positive integer or None, got {n!r}")
    from nnsight_moe.data import evenly_spaced

    keep = sorted(i for idx in data.groups().values() for i in evenly_spaced(idx, n))
    return _Data([data.prompts[i] for i in keep], data.targets[keep], [data.relations[i] for i in keep])


def _chunks(hf, data: _Data, indices: list[int], tokenizer, batch_size: int | str, padding_side: str) -> list[dict]:
    """Tokenize ``data.prompts[indices]`` once, in runner batches of ``batch_size`` prompts (``rows``: dataset
    indices; ``last``: last non-pad positions), on the model's device (the CPU for a remote model).
    ``batch_size="auto"``: :func:`nnsight_moe.recipes.runner.choose_batch_size` for a blocking sweep (the
    memory planner, :mod:`nnsight_moe.memory`; 16 for a remote model)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    strings = isinstance(data.prompts[indices[0]], str) if indices else False
    if strings and getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before batching")
    vocab = vocab_size(hf)
    chunks = runner.make_batches(data.prompts, rows=indices, tokenizer=tokenizer, batch_size=batch_size,
                                 padding_side=None if strings else padding_side,  # strings: the tokenizer's side
                                 pad_id=hf.config.get_text_config().pad_token_id, device=runner.model_device(hf),
                                 vocab=vocab, model=hf, kind="blocking")
    check_vocab(data.targets[indices], vocab, "the targets", tokenizer)
    return chunks


def _all_pairs(layout: MoELayout) -> list[Pair]:
    return [(i, e) for i in layout.moe_layers for e in range(layout.layer(i).n_experts)]


def _check_pairs(layout: MoELayout, pairs: Sequence, what: str) -> list[Pair]:
    """Validate (layer, expert) pairs: MoE layers only, experts in range, no duplicates."""
    checked = []
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"{what}: expected (layer, expert) pairs, got {pair!r}")
        layer, expert = int(pair[0]), int(pair[1])
        try:
            layout.check_experts(layer, [expert])
        except (ValueError, IndexError) as err:
            raise type(err)(f"{what} names ({layer}, {expert}): {err}") from err
        checked.append((layer, expert))
    if len(set(checked)) != len(checked):
        raise ValueError(f"{what} lists a (layer, expert) pair twice: {checked}")
    return checked


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _metrics(ranks: Tensor, k: int) -> dict[str, float]:
    return {"mrr": mrr_of_ranks(ranks), "hit_at_k": hits_of_ranks(ranks, k)}
