"""The ``remote=`` path of :mod:`nnsight_moe.recipes.blocking`: ranks computed inside ``model.trace``.

Everything runs on the UNMODIFIED model (NDIF's copy, or a local one under ``remote="local"``) through
:func:`nnsight_moe.remote.MoEView`: blocking, top-n restriction and shared-expert ablation are edits of
the router / shared expert outputs inside the trace, never client hooks. Batches go through
:func:`nnsight_moe.remote.run_batches` (progress, a failed batch named in the error, resume from
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


def _inputs(chunk: Any, repeat: int = 1) -> dict:
    return {"input_ids": chunk.input_ids.cpu().repeat(repeat, 1),
            "attention_mask": chunk.attention_mask.cpu().repeat(repeat, 1)}


def ranks_remote(model: Any, traces: Sequence[tuple], targets: Tensor, *, remote: Any, results_path: Any = None,
                 progress: bool = True) -> list[Tensor]:
    """Target ranks per trace, each computed in one ``model.trace(..., remote=remote)``.

    A trace is ``(chunk, repeat, edits)``: the tokenized prompt batch ``chunk`` (``blocking._Chunk``)
    repeated ``repeat`` times along the batch (stacked conditions, condition-major) and the view edits
    ``{layer: read_layer options}`` (``{}`` = unedited; a ``block`` mask may be per row). Returns the
    ranks [repeat * b] of each trace. All traces run in one :func:`nnsight_moe.remote.run_batches`
    call, so one ``results_path`` resumes all of them.
    """
    from nnsight_moe.remote import MoEView, run_batches

    batches = [_inputs(chunk, repeat) for chunk, repeat, _ in traces]
    extras = [{"edits": edits, "last": chunk.last.cpu().repeat(repeat), "targets": targets[chunk.rows].cpu().repeat(repeat)}
              for chunk, repeat, edits in traces]
    return run_batches(model, batches, functools.partial(_ranks_in_trace, MoEView(model)), extras=extras,
                       remote=remote, results_path=results_path, progress=progress)


def _ranks_in_trace(view: Any, model: Any, batch: dict, extra: dict) -> Tensor:
    """Target ranks [rows] under ``extra["edits"]``; runs inside ``model.trace`` (on the server)."""
    for layer in sorted(extra["edits"]):
        view.layer(layer, want=("topk_weights",), **extra["edits"][layer])
    last, targets = extra["last"], extra["targets"]
    picked = model.output.logits[torch.arange(last.shape[0]), last].float()
    ranks = (picked > picked.gather(1, targets[:, None])).sum(-1) + 1
    return torch.where(torch.isfinite(picked).all(-1), ranks, 0)  # 0: non-finite logits (checked_ranks)


def routing_remote(model: Any, chunks: Sequence[Any], *, remote: Any, results_path: Any = None,
                   progress: bool = True) -> list[dict]:
    """Per chunk ``{layer: (indices [b, k], weights [b, k])}`` at each prompt's last position, remotely."""
    from nnsight_moe.remote import MoEView, run_batches

    view = MoEView(model)
    batches = [_inputs(chunk) for chunk in chunks]
    extras = [{"last": chunk.last.cpu()} for chunk in chunks]
    return run_batches(model, batches, functools.partial(_routing_in_trace, view), extras=extras,
                       remote=remote, results_path=results_path, progress=progress)


def _routing_in_trace(view: Any, model: Any, batch: dict, extra: dict) -> dict:
    """Top-k indices and weights at the last positions of every MoE layer; runs inside the trace."""
    last = extra["last"]
    rows = torch.arange(last.shape[0])
    out = {}
    for layer in view.moe_layers:
        q = view.layer(layer, want=("topk_indices", "topk_weights"))
        out[layer] = (q["topk_indices"][rows, last], q["topk_weights"][rows, last].float())
    return out
