"""The ``remote=`` path of :mod:`nnsight_moe.recipes.blocking`: ranks computed inside ``model.trace``.

Everything runs on the UNMODIFIED model (NDIF's copy, or a local one under ``remote="local"``) through
:func:`nnsight_moe.remote.MoEView`: blocking, top-n restriction and shared-expert ablation are edits of
the router / shared expert outputs inside the trace, never client hooks. Batches go through
:func:`nnsight_moe.recipes.runner.run_batches` (progress, a failed batch named in the error, resume from
``results_path``). Only target ranks [rows] and last-position routing [rows, layers, k] come back.

Blocking conditions are stacked along the batch dimension as in the local path (``blocking`` plans the
traces): one trace runs up to ``max_rows`` rows (conditions x prompts), each row with its own expert mask
(``read_layer(block=[rows, E])``).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["ranks_remote", "routing_remote"]


def ranks_remote(model: Any, traces: Sequence[dict], *, remote: Any, results_path: Any = None,
                 progress: bool = True) -> list[Tensor]:
    """Target ranks per trace, each computed in one ``model.trace(..., remote=remote)``.

    A trace is a runner batch (:mod:`nnsight_moe.recipes.runner`) with ``target`` [rows] and ``edits``
    ``{layer: read_layer options}`` (``{}`` = unedited; a ``block`` mask may be per row): a tokenized
    prompt batch, possibly repeated along the batch for stacked conditions (``blocking_conditions._plan``).
    Returns the ranks [rows] of each trace (0 where the logits are not finite). All traces run in one
    :func:`nnsight_moe.recipes.runner.run_batches` call, so one ``results_path`` resumes all of them.
    """
    from nnsight_moe.recipes import runner
    from nnsight_moe.remote import MoEView

    traces = [{**trace, "input_ids": trace["input_ids"].cpu(), "attention_mask": trace["attention_mask"].cpu(),
               "last": trace["last"].cpu(), "target": trace["target"].cpu()} for trace in traces]
    return runner.run_batches(model, traces, functools.partial(_ranks_in_trace, MoEView(model)), remote=remote,
                              results_path=results_path, progress=progress, desc="blocked forwards")


def _ranks_in_trace(view: Any, model: Any, batch: dict) -> Tensor:
    """Target ranks [rows] under ``batch["edits"]``; runs inside ``model.trace`` (on the server)."""
    for layer in sorted(batch["edits"]):
        view.layer(layer, want=("topk_weights",), **batch["edits"][layer])
    last, targets = batch["last"], batch["target"]
    picked = model.output.logits[torch.arange(last.shape[0]), last].float()
    ranks = (picked > picked.gather(1, targets[:, None])).sum(-1) + 1
    return torch.where(torch.isfinite(picked).all(-1), ranks, 0)  # 0: non-finite logits (checked_ranks)


def routing_remote(model: Any, chunks: Sequence[dict], *, remote: Any, results_path: Any = None,
                   progress: bool = True) -> list[dict]:
    """Per chunk (runner batch) ``{layer: (indices [b, k], weights [b, k])}`` at each prompt's last position."""
    from nnsight_moe.recipes import runner
    from nnsight_moe.remote import MoEView

    return runner.run_batches(model, chunks, functools.partial(_routing_in_trace, MoEView(model)), remote=remote,
                              results_path=results_path, progress=progress, desc="routing at the last positions")


def _routing_in_trace(view: Any, model: Any, batch: dict) -> dict:
    """Top-k indices and weights at the last positions of every MoE layer; runs inside the trace."""
    last = batch["last"]
    rows = torch.arange(last.shape[0])
    out = {}
    for layer in view.moe_layers:
        q = view.layer(layer, want=("topk_indices", "topk_weights"))
        out[layer] = (q["topk_indices"][rows, last], q["topk_weights"][rows, last].float())
    return out
