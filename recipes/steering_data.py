"""Steering's inputs: the prompt-set forms, the one batching call, units, and expert columns.

* :func:`_prompts_targets`: ``(prompts, targets or None)`` from prompts, ``(prompts, targets)``, Relations or
  an EncodedFacts;
* :func:`_run`: every batched pass of the steering recipes, locally on the attached model or inside
  ``model.trace(..., remote=remote)`` (:func:`nnsight_moe.recipes.runner.run`);
* :func:`_units`: the (row, position) units of a batch (last tokens or every non-pad token);
* :func:`_forward_reading`: one forward of the attached model, reading some of its hook points;
* :func:`_pairs` / :func:`_pair_offsets`: the routed (layer, expert) pairs in column order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from nnsight_moe.attach import attached, handle_of, hf_model
from nnsight_moe.hooks import TemporaryHooks
from nnsight_moe.recipes import runner

Pair = tuple[int, int]


def _prompts_targets(dataset: Any, tokenizer: Any, need_targets: bool) -> tuple[list, Tensor | None]:
    """(prompts, targets or None) from prompts, (prompts, targets), Relations or EncodedFacts."""
    from nnsight_moe.data import EncodedFacts, Relation, encode_facts

    if isinstance(dataset, Relation):
        dataset = [dataset]
    if isinstance(dataset, EncodedFacts):
        return list(dataset.prompts), torch.tensor(dataset.targets, dtype=torch.long)
    if isinstance(dataset, (list, tuple)) and dataset and all(isinstance(r, Relation) for r in dataset):
        if tokenizer is None:
            raise ValueError("Relations need tokenizer= to turn facts into prompts and target ids")
        return _prompts_targets(encode_facts(tokenizer, [f for r in dataset for f in r.facts()]), tokenizer, need_targets)
    if (isinstance(dataset, tuple) and len(dataset) == 2 and not isinstance(dataset[0], str)
            and len(dataset[0]) == len(dataset[1]) and not isinstance(dataset[1], str)):
        targets = torch.as_tensor(dataset[1]).reshape(-1)
        if targets.is_floating_point() or targets.dtype == torch.bool:
            raise TypeError(f"targets must be integer token ids, got {targets.dtype}")
        return list(dataset[0]), targets.long()
    if isinstance(dataset, (list, tuple)):
        if not dataset:
            raise ValueError("a prompt set is empty: give at least one prompt")
        if need_targets:
            raise ValueError("this needs target ids: give (prompts, targets), Relations or an EncodedFacts")
        return list(dataset), None
    raise TypeError("a prompt set must be a list of prompts, a tuple (prompts, targets), Relations or an "
                    f"EncodedFacts; got {type(dataset).__name__}")


def _run(model: Any, prompts: list, local_fn: Any, traced_fn: Any, *, tokenizer: Any, batch_size: int,
         remote: Any, per_prompt: dict | None = None, progress: bool = False, desc: str = "steering") -> list:
    """The one batching call: ``local_fn(hf, batch)`` on the attached HF model, or ``traced_fn(model, batch)``
    inside ``model.trace(..., remote=remote)`` (through :func:`nnsight_moe.recipes.runner.run`)."""
    if remote is None:
        hf = hf_model(model)
        with attached(hf):
            return runner.run(hf, prompts, local_fn, tokenizer=tokenizer, batch_size=batch_size,
                              per_prompt=per_prompt, progress=progress, desc=desc)
    return runner.run(model, prompts, traced_fn, tokenizer=tokenizer, batch_size=batch_size, per_prompt=per_prompt,
                      remote=remote, progress=progress, desc=desc)


def _units(batch: dict, positions: str) -> tuple[Tensor, Tensor]:
    """(rows, positions) of a batch's units: each prompt's last token, or every non-pad token."""
    if positions == "last":
        return torch.arange(batch["last"].shape[0]), batch["last"]
    return batch["attention_mask"].bool().nonzero(as_tuple=True)


def _forward_reading(model: Any, batch: dict, points: list[tuple[int, str]]) -> dict[tuple[int, str], Tensor]:
    """Run the attached ``model`` once on ``batch``; the output of each hook point ``(layer, hook name)`` of
    its MoE blocks, keyed by the point (the hooks are removed afterwards)."""
    handle = handle_of(model)
    seen: dict = {}
    with TemporaryHooks() as added:
        for layer, name in points:
            added.add(handle.block(layer)._modules[name], lambda t, hook, key=(layer, name): seen.__setitem__(key, t))
        model(**runner.inputs(batch))
    return seen


def _pair_offsets(layout) -> dict[int, int]:
    offsets, start = {}, 0
    for i in layout.moe_layers:
        offsets[i] = start
        start += layout.layer(i).n_experts
    return offsets


def _pairs(layout) -> list[Pair]:
    return [(i, e) for i in layout.moe_layers for e in range(layout.layer(i).n_experts)]
