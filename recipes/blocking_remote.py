"""The ``remote=`` path of :mod:`nnsight_moe.recipes.blocking`: ranks computed inside ``model.trace``.

Everything runs on the UNMODIFIED model (NDIF's copy, or a local one under ``remote="local"``) through
:func:`nnsight_moe.remote.MoEView`: blocking, top-n restriction and shared-expert ablation are edits of
the router / shared expert outputs inside the trace, never client hooks. Batches go through
:func:`nnsight_moe.remote.run_batches` (progress, a failed batch named in the error, resume from
``results_path``). Only target ranks [rows] and last-position routing [rows, layers, k] come back.

Blocking conditions are stacked along the batch dimension as in the local path: one trace runs up to
``max_rows`` rows (conditions x prompts), each row with its own expert mask (``read_layer(block=[rows, E])``).
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


def ranks_remote(model: Any, layout: Any, tasks: Sequence[tuple], targets: Tensor, *, remote: Any,
                 max_rows: int = 64, results_path: Any = None, progress: bool = True) -> list[Tensor]:
    """Target ranks [C, P] for each task, computed in ``model.trace(..., remote=remote)``.

    A task is ``(chunks, conditions)``: ``chunks`` the tokenized prompt batches (``blocking._Chunk``),
    ``conditions`` a list of per-condition edits ``{layer: read_layer options}`` (``{}`` = unedited).
    Conditions whose options differ only in ``block`` are stacked on the batch dimension (per-row
    masks, at most ``max_rows`` rows per trace); others run one condition per trace. All tasks run in
    one :func:`nnsight_moe.remote.run_batches` call, so one ``results_path`` resumes all of them.
    """
    from nnsight_moe.remote import MoEView, run_batches

    view = MoEView(model)
    batches, extras, places = [], [], []
    for t, (chunks, conditions) in enumerate(tasks):
        offset = 0
        for chunk in chunks:
            b = len(chunk.rows)
            for group in _groups(conditions, max(1, max_rows // b)):
                edits = _stack([conditions[c] for c in group], b, layout)
                batches.append(_inputs(chunk, len(group)))
                extras.append({"edits": edits, "last": chunk.last.cpu().repeat(len(group)),
                               "targets": targets[chunk.rows].cpu().repeat(len(group))})
                places.append((t, group, offset, b))
            offset += b
    results = run_batches(model, batches, functools.partial(_ranks_in_trace, view), extras=extras,
                          remote=remote, results_path=results_path, progress=progress)
    out = [torch.zeros(len(conditions), sum(len(c.rows) for c in chunks), dtype=torch.long)
           for chunks, conditions in tasks]
    for (t, group, offset, b), ranks in zip(places, results):
        out[t][group, offset : offset + b] = ranks.view(len(group), b)
    return out


def _groups(conditions: list[dict], per: int) -> list[list[int]]:
    """Indices of conditions that can share a trace: same edits apart from ``block``, at most ``per``."""
    groups: list[list[int]] = []
    keys: list[Any] = []
    for c, edits in enumerate(conditions):
        key = sorted((layer, sorted((k, v) for k, v in options.items() if k != "block"))
                     for layer, options in edits.items() if set(options) - {"block"})
        mode = {options.get("mode", "zero") for options in edits.values() if "block" in options}
        key = (repr(key), tuple(sorted(mode)))
        if keys and keys[-1] == key and len(groups[-1]) < per:
            groups[-1].append(c)
        else:
            groups.append([c])
            keys.append(key)
    return groups


def _stack(conditions: list[dict], b: int, layout: Any) -> dict:
    """One edit dict for stacked conditions: blocked experts as a per-row mask [g * b, E] (condition-major)."""
    layers = sorted({layer for edits in conditions for layer in edits})
    stacked = {}
    for layer in layers:
        options = next(edits[layer] for edits in conditions if layer in edits)
        options = {k: v for k, v in options.items() if k != "block"}
        if any("block" in edits.get(layer, {}) for edits in conditions):
            mask = torch.zeros(len(conditions), layout.layer(layer).n_experts, dtype=torch.bool)
            for c, edits in enumerate(conditions):
                for expert in edits.get(layer, {}).get("block", []):
                    mask[c, expert] = True
            modes = {edits[layer].get("mode", "zero") for edits in conditions if "block" in edits.get(layer, {})}
            options["mode"] = modes.pop()
            options["block"] = mask.repeat_interleave(b, dim=0)
        stacked[layer] = options
    return stacked


def _ranks_in_trace(view: Any, model: Any, batch: dict, extra: dict) -> Tensor:
    """Target ranks [rows] under ``extra["edits"]``; runs inside ``model.trace`` (on the server)."""
    for layer in sorted(extra["edits"]):
        view.layer(layer, want=("topk_weights",), **extra["edits"][layer])
    last, targets = extra["last"], extra["targets"]
    picked = model.output.logits[torch.arange(last.shape[0]), last].float()
    return (picked > picked.gather(1, targets[:, None])).sum(-1) + 1


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
