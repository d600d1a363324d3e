"""Target ranks under blocking conditions: :func:`evaluate` and the three ways to run it.

A condition is a list of (layer, expert) pairs blocked together, in one of the modes of
:func:`nnsight_moe.block_experts` (``zero``, ``renorm``, ``reroute``). The conditions run

* stacked (default): conditions along the batch dimension, each row with its own expert mask
  (per-row masks of :class:`nnsight_moe.hooks.BlockState`), at most ``max_rows`` rows per forward
  (:func:`_plan` builds the traces, :func:`_place` puts their ranks back);
* naive (``stacked=False``): one condition at a time under :func:`nnsight_moe.block_experts`;
* remote (``remote=``): the same stacked plan inside ``model.trace`` on the unmodified model
  (:mod:`nnsight_moe.recipes.blocking_remote`).

:func:`_ranks` scores one runner batch as the model is now (also used by the configurations).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

import nnsight_moe
from nnsight_moe.attach import attached, hf_model
from nnsight_moe.interventions import BLOCK_MODES, block_experts
from nnsight_moe.layout import MoELayout
from nnsight_moe.progress import bar as progress_bar
from nnsight_moe.recipes import runner
from nnsight_moe.recipes.blocking_data import Pair, _check_pairs, _chunks, _dataset, _positive
from nnsight_moe.recipes.metrics import checked_ranks, first_nonfinite, target_ranks
from nnsight_moe.recipes.prompts import model_tokenizer


def _last_logits(hf, ids: Tensor, mask: Tensor, last: Tensor) -> Tensor:
    """Logits at each row's last non-pad position, [rows, V] (only those positions are projected)."""
    logits = hf(input_ids=ids, attention_mask=mask, logits_to_keep=last[:, None]).logits
    return logits[:, 0].float()


def _masks(layout: MoELayout, conditions: list[list[Pair]], mode: str) -> dict[int, Tensor]:
    """Per-layer bool masks [C, E] of the experts each condition blocks (layers some condition blocks)."""
    masks: dict[int, Tensor] = {}
    for c, pairs in enumerate(conditions):
        for layer, expert in pairs:
            if layer not in masks:
                masks[layer] = torch.zeros(len(conditions), layout.layer(layer).n_experts, dtype=torch.bool)
            masks[layer][c, expert] = True
    if mode == "reroute":
        for layer, mask in masks.items():
            info = layout.layer(layer)
            worst = int(mask.sum(dim=1).max())
            if worst > info.n_experts - info.top_k:
                raise ValueError(
                    f"cannot reroute around {worst} of {info.n_experts} experts in layer {layer}: at most "
                    f"{info.n_experts - info.top_k} can be blocked per layer with top-{info.top_k} routing"
                )
    return masks


def _locate(hf, chunk):
    """``locate(row)`` for :func:`target_ranks`: the first module with a non-finite output on that row."""
    return lambda r: first_nonfinite(hf, **{k: v[r : r + 1] for k, v in runner.inputs(chunk).items()})


def _ranks(hf, chunk) -> Tensor:
    """Target ranks of ``chunk`` (a runner batch with ``target``) as the model is now (runner function)."""
    logits = _last_logits(hf, chunk["input_ids"], chunk["attention_mask"], chunk["last"])
    return target_ranks(logits, chunk["target"].to(logits.device), prompts=chunk["rows"], locate=_locate(hf, chunk))


def _plan(layout: MoELayout, tasks, targets: Tensor, max_rows: int) -> tuple[list[dict], list[tuple]]:
    """Stacked traces for ``(chunks, conditions, mode)`` tasks, and where each one's ranks go.

    Per chunk of b prompts, groups of ``max_rows // b`` conditions share one forward: a runner batch
    repeated per condition (condition-major: row ``c * b + i``) whose ``edits`` give each row its
    condition's expert mask ``{layer: {"block": [rows, E], "mode": mode}}`` in every layer some condition
    of the task blocks. Returns the traces and ``(task, c0, c1, start, b)`` per trace.
    """
    traces, places = [], []
    for t, (chunks, conditions, mode) in enumerate(tasks):
        if mode not in BLOCK_MODES:
            raise ValueError(f"mode must be one of {BLOCK_MODES}, got {mode!r}")
        masks = _masks(layout, conditions, mode)
        start = 0
        for chunk in chunks:
            b = len(chunk["rows"])
            per = max(1, max_rows // b)
            for c0 in range(0, len(conditions), per):
                c1 = min(c0 + per, len(conditions))
                edits = {layer: {"block": mask[c0:c1].repeat_interleave(b, dim=0), "mode": mode}
                         for layer, mask in masks.items()}
                traces.append(runner.repeat({**chunk, "target": targets[chunk["rows"]]}, c1 - c0, edits=edits))
                places.append((t, c0, c1, start, b))
            start += b
    return traces, places


def _place(tasks, places, found) -> list[Tensor]:
    """Ranks [C, P] per task from the ranks [(c1 - c0) * b] of each planned trace."""
    out = [torch.zeros(len(conditions), sum(len(c["rows"]) for c in chunks), dtype=torch.long)
           for chunks, conditions, _ in tasks]
    for (t, c0, c1, start, b), ranks in zip(places, found):
        out[t][c0:c1, start : start + b] = ranks.view(c1 - c0, b)
    return out


def _stacked_ranks(handle, saved, hf, trace) -> Tensor:
    """Target ranks of one planned trace, its per-row masks set on the attached blocks (runner function)."""
    for layer, edit in trace["edits"].items():
        state, mode = handle.states[layer], edit["mode"]
        rows = edit["block"]
        previous = saved[layer][1 if mode == "reroute" else 0]
        if previous is not None:
            if previous.ndim != 1:
                raise ValueError(f"layer {layer} already has a per-row mask; cannot stack conditions on it")
            rows = rows | previous.cpu()[None, :]
        setattr(state, "exclude" if mode == "reroute" else "zero", rows.to(trace["input_ids"].device))
        if mode != "reroute":
            state.renorm = mode == "renorm"
    logits = _last_logits(hf, trace["input_ids"], trace["attention_mask"], trace["last"])
    return target_ranks(logits, trace["target"].to(logits.device), prompts=trace["rows"])


@torch.no_grad()
def _run(hf, layout, chunks, targets, conditions, mode, max_rows, stacked, progress) -> Tensor:
    """Target ranks [C, P_chunks] of every condition on every prompt of ``chunks``."""
    if mode not in BLOCK_MODES:
        raise ValueError(f"mode must be one of {BLOCK_MODES}, got {mode!r}")
    if not stacked:
        _masks(layout, conditions, mode)  # its checks (reroute's per-layer cap) before any forward, as _plan's
        chunks = [{**chunk, "target": targets[chunk["rows"]]} for chunk in chunks]
        ranks = []
        for pairs in progress_bar(conditions, f"{mode}: conditions", disable=not progress):
            blocked: dict[int, list[int]] = {}
            for layer, expert in pairs:
                blocked.setdefault(layer, []).append(expert)
            with block_experts(hf, blocked, mode=mode):
                ranks.append(torch.cat(runner.run_batches(hf, chunks, _ranks, progress=False)))
        return torch.stack(ranks)
    tasks = [(chunks, conditions, mode)]
    traces, places = _plan(layout, tasks, targets, max_rows)
    with attached(hf) as handle:
        saved = {i: (s.zero, s.exclude, s.renorm) for i, s in handle.states.items()}
        try:
            found = runner.run_batches(hf, traces, functools.partial(_stacked_ranks, handle, saved), progress=progress,
                                       desc=f"{mode}: stacked conditions x batches")
        finally:
            for i, (zero, exclude, renorm) in saved.items():
                state = handle.states[i]
                state.zero, state.exclude, state.renorm = zero, exclude, renorm
    return _place(tasks, places, found)[0]


def evaluate(
    model: Any,
    dataset: Any,
    conditions: Sequence[Sequence[Pair]],
    *,
    mode: str = "zero",
    tokenizer: Any = None,
    batch_size: int | str = "auto",
    max_rows: int = 64,
    stacked: bool = True,
    padding_side: str = "left",
    remote: Any = None,
    results_path: Any = None,
    progress: bool = True,
) -> Int[Tensor, "C P"]:
    """Target ranks under each blocking condition: ``ranks[c, p]`` (1 = top prediction).

    Args:
        model: HF model, TransformerBridge or nnsight model of a supported MoE family.
        dataset: Relations, EncodedFacts or ``(prompts, targets[, relation_names])``
            (:mod:`nnsight_moe.recipes.blocking`); prompts are returned in dataset order.
        conditions: each a list of ``(layer, expert)`` pairs blocked together (``[]`` = no blocking).
        mode: ``"zero"``, ``"renorm"`` or ``"reroute"`` (:func:`nnsight_moe.block_experts`).
        batch_size: prompts per tokenized batch (``"auto"``: planned, :mod:`nnsight_moe.memory`);
            max_rows: most batch rows (conditions x prompts) per forward when ``stacked`` (64 suits a CPU;
            raise it to 512-2048 on a GPU); ``stacked=False`` runs one condition at a time instead (with
            :func:`nnsight_moe.block_experts`).
        remote: run inside ``model.trace(..., remote=remote)`` on the unmodified model (``True`` for NDIF,
            ``"local"``, or a host URL; ``model`` must be an nnsight model); conditions are stacked
            ``max_rows`` rows per trace as locally, and only the ranks come back.
        results_path: remote only: partial results file; a failed run resumes from it when rerun.
    """
    tokenizer = model_tokenizer(model, tokenizer)  # None: the one the model carries (LanguageModel, bridge)
    hf = hf_model(model)
    layout = nnsight_moe.layout(hf)
    data = _dataset(dataset, tokenizer)
    conditions = [_check_pairs(layout, c, f"condition {j}") for j, c in enumerate(conditions)]
    if not conditions:
        raise ValueError("conditions is empty: give at least one list of (layer, expert) pairs ([] = unblocked)")
    chunks = _chunks(hf, data, list(range(len(data.prompts))), tokenizer, batch_size, padding_side)
    if remote is not None:
        return _run_remote(model, layout, [(chunks, conditions, mode)], data.targets, remote,
                           _positive(max_rows, "max_rows"), results_path, progress)[0]
    return _run(hf, layout, chunks, data.targets, conditions, mode, _positive(max_rows, "max_rows"), stacked, progress)


def _run_remote(model, layout, tasks, targets, remote, max_rows, results_path, progress) -> list[Tensor]:
    """Ranks [C, P] per ``(chunks, conditions, mode)`` task, through nnsight on the unmodified model.

    The same plan as the stacked local path (:func:`_plan`): per chunk, groups of ``max_rows // b``
    conditions share a trace, each row with its condition's mask in every layer some condition of the
    task blocks.
    """
    from nnsight_moe.recipes.blocking_remote import ranks_remote

    traces, places = _plan(layout, tasks, targets, max_rows)
    found = [checked_ranks(r, 0) for r in
             ranks_remote(model, traces, remote=remote, results_path=results_path, progress=progress)]
    return _place(tasks, places, found)
