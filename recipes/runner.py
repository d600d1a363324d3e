"""The recipe runner: batch and pad prompts, run a per-batch function locally or in a trace, resumably.

Every recipe needs the same plumbing around its maths; this module is the only place that has it::

    from nnsight_moe.recipes import runner

    def last_logits(model, batch):                  # local: runs the forward itself
        out = model(**runner.inputs(batch), logits_to_keep=batch["last"][:, None])
        return out.logits[:, -1].float()

    def last_logits_traced(model, batch):           # in a trace: reads envoys (shipped by source)
        rows = torch.arange(batch["last"].shape[0])
        return model.output.logits[rows, batch["last"]].float()

    results = runner.run(hf, prompts, last_logits, tokenizer=tok, batch_size=8)       # HF / bridge
    results = runner.run(lm, prompts, last_logits_traced, remote="local")           # nnsight, NDIF

**Batches** (:func:`make_batches`) are plain dicts, so that they travel in a remote request:
``index`` (batch number), ``rows`` (indices of its prompts in the input), ``input_ids`` and
``attention_mask`` [b, p] (left or right padding), ``last`` [b] (each row's last non-pad position) and
one entry per ``per_prompt`` item (that item's values for the batch's rows, e.g. target ids).
:func:`inputs` gives the model inputs of a batch, :func:`repeat` stacks a batch n times along the batch
dimension (condition-major, for stacked interventions).

**Running** (:func:`run_batches`, :func:`run`): ``fn(model, batch) -> result`` once per batch, where

* ``remote=None``: called directly (``model`` as given: an HF model, with or without our hooks
  attached, a TransformerBridge, or an nnsight model); ``fn`` runs the forward itself;
* ``remote=False`` / ``"local"`` / ``True`` / a host URL: called inside
  ``model.trace(inputs(batch), remote=remote)`` on an nnsight model (``False``: a plain local trace;
  ``"local"``: nnsight's serialise-and-run-here simulation; ``True``: NDIF). ``fn`` then reads and
  edits envoys; it is shipped by source (functions of ``nnsight_moe`` modules are registered for
  by-value shipping), so it may use torch and plain functions only, and should return small tensors.

Results come back one per batch, in batch order, tensors on the CPU. A progress bar (prompts/s) is
drawn on terminals and notebooks (:mod:`nnsight_moe.progress`). With ``results_path`` the results so
far are written after every batch (the safetensors + JSON results file of
:func:`nnsight_moe.remote.run_batches`, atomically); a rerun with the same batches, model, function and
``key`` skips the finished ones, and a file written for other work is refused naming what differs.

**Padding.** Padding positions are masked in attention, and each batch's ``last`` points at the last
real token, so a padded prompt gives what it gives alone (to float rounding; left padding shifts the
absolute positions, which rotary position embeddings do not see). Statistics over positions must mask
the padding with ``attention_mask``.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["BATCH_KEYS", "choose_batch_size", "inputs", "make_batches", "repeat", "run", "run_batches"]

#: The keys every batch has (``per_prompt`` items add their own).
BATCH_KEYS = ("index", "rows", "input_ids", "attention_mask", "last")

#: Batch size :func:`choose_batch_size` returns when it knows no memory bound.
DEFAULT_BATCH_SIZE = 16


# ------------------------------------------------------------------------------------ batch size
def choose_batch_size(model: Any, n_prompts: int, seq_len: int, kind: str = "forward",
                      max_memory: int | str | None = None) -> int:
    """The batch size for ``batch_size="auto"``: prompts per forward for work ``kind`` on ``model``.

    Args:
        model: the model the batches run on (HF, TransformerBridge or nnsight model).
        n_prompts: how many prompts there are (the result is at most this).
        seq_len: the longest prompt in tokens (padded width).
        kind: what each batch computes: one of :data:`nnsight_moe.memory.KINDS` (``"forward"``,
            ``"blocking"``, ``"neuron-exact"``, ...), an attribution level (``"neuron"``: exact), or any other
            name (``"capture"``, ...), sized as a plain ``"forward"``.
        max_memory: working memory the batch may use, bytes or a size string (``"8GiB"``); None: the
            device's free memory minus a margin.

    The memory planner (:func:`nnsight_moe.memory.plan`) estimates the peak from the model's shapes and
    returns the largest batch that fits (at most 16 on CPU, 64 on CUDA, and ``n_prompts``); a budget that
    cannot hold one prompt raises :class:`nnsight_moe.memory.MemoryBudgetError`. Models whose weights are
    not here (meta device: NDIF) get :data:`DEFAULT_BATCH_SIZE` (the server's memory is not known).
    """
    from nnsight_moe import memory

    if not isinstance(kind, str):
        raise TypeError(f"kind must be a string naming the work (e.g. 'forward'), got {type(kind).__name__}")
    for name, value in (("n_prompts", n_prompts), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if max_memory is not None and not isinstance(max_memory, str) and (
            isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 1):
        raise ValueError(f"max_memory must be a positive number of bytes, a size string or None, got {max_memory!r}")
    if _on_meta(model):
        return min(DEFAULT_BATCH_SIZE, n_prompts)
    levels = ("layer", "head", "expert", "shared", "neuron")
    planned = kind if kind in memory.KINDS or kind in levels else "forward"
    return memory.plan(model, planned, n_prompts, seq_len, max_memory).batch_size


def _on_meta(model: Any) -> bool:
    from nnsight_moe.attach import hf_model

    try:
        return next(hf_model(model).parameters()).device.type == "meta"
    except Exception:  # noqa: BLE001 - no parameters to look at
        return True


def _batch_size(batch_size: Any, model: Any, n_prompts: int, seq_len: int, kind: str,
                max_memory: int | None) -> int:
    if model is not None:
        _refuse_family(model)  # before planning memory for a family the recipes refuse
    if batch_size == "auto":
        return choose_batch_size(model, n_prompts, max(1, seq_len), kind, max_memory)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    return batch_size


# ------------------------------------------------------------------------------------ batches
def make_batches(prompts: Sequence, *, tokenizer: Any = None, batch_size: int | str = 16,
                 padding_side: str | None = None, pad_id: int | None = None, per_prompt: Mapping | None = None,
                 device: Any = "cpu", vocab: int | None = None, model: Any = None, kind: str = "forward",
                 max_memory: int | None = None, rows: Sequence[int] | None = None) -> list[dict]:
    """Tokenize and pad ``prompts`` into batches (dicts, see the module docstring), in input order.

    Args:
        prompts: strings (needs ``tokenizer``) or lists / 1-D tensors of token ids; all of one kind.
        tokenizer: for string prompts: their special tokens before the text (BOS) are kept, tokens
            appended after it (EOS, [SEP]) left out, so ``last`` is the prompt's own last token.
        batch_size: prompts per batch, or ``"auto"`` (:func:`choose_batch_size`, needs ``model``).
        padding_side: ``"left"`` or ``"right"``; None pads strings on the tokenizer's side and token ids
            on the left.
        pad_id: the id padding token-id prompts (default 0; padding is masked). Strings use the
            tokenizer's pad token.
        per_prompt: ``{name: values}``, one value per prompt (a tensor, or a list); each batch gets
            ``batch[name]`` = the values of its rows (a tensor for tensors, else a list).
        device: where the batch tensors live. vocab: the model's vocabulary size; every token id is
            checked against it (a tokenizer of another model is named in the error).
        model, kind, max_memory: for ``batch_size="auto"`` (:func:`choose_batch_size`).
        rows: batch only the prompts at these indices, in this order (default all); ``batch["rows"]``
            and the ``per_prompt`` values then refer to the full ``prompts``.
    """
    from nnsight_moe.recipes.prompts import check_vocab, encode_prompts, last_positions

    prompts = _check_prompts(prompts, tokenizer)
    per_prompt = _check_per_prompt(per_prompt, len(prompts))
    order = _check_rows(rows, len(prompts))
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side must be 'left', 'right' or None, got {padding_side!r}")
    strings = isinstance(prompts[0], str)
    if strings:
        lengths = ([len(ids) for ids in tokenizer([prompts[i] for i in order])["input_ids"]]
                   if batch_size == "auto" else [1])
    else:
        lengths = [len(prompts[i]) for i in order]
        empty = [i for i in order if len(prompts[i]) == 0]
        if empty:
            raise ValueError(f"prompts {empty[:10]} of this batch are empty (no tokens); every prompt needs at "
                             "least one token id")
    size = _batch_size(batch_size, model, len(order), max(lengths), kind, max_memory)
    out = []
    for index, start in enumerate(range(0, len(order), size)):
        rows = order[start : start + size]
        encoded = encode_prompts(tokenizer, [prompts[i] for i in rows], "cpu", padding_side=padding_side,
                                 pad_id=pad_id)
        mask = encoded["attention_mask"]
        empty = (mask.sum(-1) == 0).nonzero().reshape(-1).tolist()
        if empty:
            raise ValueError(f"prompts {[rows[i] for i in empty]} of this batch are empty (no tokens after "
                             "tokenization); every prompt needs at least one token")
        if vocab is not None:
            check_vocab(encoded["input_ids"][mask.bool()], vocab, "the prompts", tokenizer)
        batch = {"index": index, "rows": rows, "input_ids": encoded["input_ids"].to(device),
                 "attention_mask": mask.to(device), "last": last_positions(mask).to(device)}
        for name, values in per_prompt.items():
            batch[name] = values[rows] if isinstance(values, torch.Tensor) else [values[i] for i in rows]
        out.append(batch)
    return out


def _check_prompts(prompts: Any, tokenizer: Any) -> list:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) and not isinstance(prompts, torch.Tensor):
        raise TypeError("prompts must be a list of strings or of token-id lists, got "
                        + (f"one string {prompts[:40]!r}" if isinstance(prompts, str) else type(prompts).__name__))
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts: give at least one string or token-id list")
    strings = [isinstance(p, str) for p in prompts]
    if any(strings) and not all(strings):
        first = strings.index(not strings[0])
        raise TypeError(f"prompts mix strings and token-id lists (prompt 0 is a {type(prompts[0]).__name__}, prompt "
                        f"{first} a {type(prompts[first]).__name__}); give one kind")
    if strings[0]:
        if tokenizer is None:
            raise ValueError("string prompts need tokenizer= (or a model that carries one); or pass token-id lists")
        return prompts
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            if p.dim() != 1 or p.is_floating_point() or p.dtype == torch.bool:
                raise TypeError(f"prompt {i}: a token-id tensor must be 1-D and integer, "
                                f"got {p.dtype} {tuple(p.shape)}")
            out.append(p.tolist())
        else:
            try:
                if isinstance(p, (bytes, Mapping)) or not hasattr(p, "__len__"):
                    raise TypeError
                if any(isinstance(t, (bool, str)) for t in p):
                    raise TypeError
                out.append([operator.index(t) for t in p])
            except TypeError:
                raise TypeError(f"prompt {i} is neither a string nor a list of integer token ids: "
                                f"{str(p)[:60]!r}") from None
    return out


def _check_rows(rows: Sequence[int] | None, n: int) -> list[int]:
    if rows is None:
        return list(range(n))
    try:
        order = [operator.index(i) for i in (rows.tolist() if isinstance(rows, torch.Tensor) else rows)]
    except TypeError:
        raise TypeError(f"rows must be prompt indices (integers), got {str(rows)[:60]!r}") from None
    bad = [i for i in order if not 0 <= i < n]
    if bad:
        raise IndexError(f"rows {bad[:5]} are out of range for {n} prompts (valid: 0..{n - 1})")
    if not order:
        raise ValueError("rows is empty: give at least one prompt index")
    return order


def _check_per_prompt(per_prompt: Mapping | None, n: int) -> dict:
    if per_prompt is None:
        return {}
    if not isinstance(per_prompt, Mapping):
        raise TypeError(f"per_prompt must be a dict {{name: one value per prompt}}, got {type(per_prompt).__name__}")
    out = {}
    for name, values in per_prompt.items():
        if name in BATCH_KEYS:
            raise ValueError(f"per_prompt name {name!r} clashes with a batch key {BATCH_KEYS}; rename it")
        values = values if isinstance(values, torch.Tensor) else list(values)
        if len(values) != n:
            raise ValueError(f"per_prompt[{name!r}] has {len(values)} values for {n} prompts (one per prompt)")
        out[name] = values
    return out


def inputs(batch: Mapping) -> dict:
    """The model inputs of ``batch``: ``{"input_ids", "attention_mask"}``."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def repeat(batch: Mapping, n: int, **extra: Any) -> dict:
    """``batch`` stacked ``n`` times along the batch dimension (row ``c * b + i`` is copy c of row i).

    Tensors with the batch's rows as first dimension (ids, mask, ``last``, per-prompt tensors) are
    repeated, lists of per-row values too; ``extra`` items are added as they are (e.g. per-row edits).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    b = len(batch["rows"])
    out = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == b:
            out[name] = value.repeat(n, *([1] * (value.dim() - 1)))
        elif isinstance(value, list) and len(value) == b:
            out[name] = value * n
        else:
            out[name] = value
    out.update(extra)
    return out


# ------------------------------------------------------------------------------------ running
def run_batches(model: Any, batches: Sequence[Mapping], fn: Callable[[Any, dict], Any], *, remote: Any = None,
                results_path: Any = None, key: Any = None, progress: bool = True, desc: str = "batches",
                trace_kwargs: dict | None = None, no_grad: bool = True) -> list:
    """``fn(model, batch)`` for every batch, locally or in a trace; per-batch results in order.

    Args:
        model: an HF model, TransformerBridge or nnsight model (``remote=None``); an nnsight model
            (any other ``remote``).
        batches: batch dicts (:func:`make_batches`, possibly :func:`repeat` -ed or with added keys).
        fn: ``fn(model, batch) -> result`` (tensors, dicts, lists, numbers; small). See the module
            docstring for where it runs under each ``remote``.
        remote: None (call ``fn`` directly), or ``False`` / ``"local"`` / ``True`` / a host URL (inside
            ``model.trace(inputs(batch), remote=remote, **trace_kwargs)``).
        results_path: file for the results so far (resume); None keeps nothing. Results must then be
            storable: tensors, dicts, lists, tuples, str, int, float, bool, None.
        key: plain data describing ``fn``'s settings, part of the resume fingerprint (with ``fn``'s name,
            the arguments a ``functools.partial`` binds, the model and every batch's content).
        progress: draw a progress bar (prompts/s; terminals and notebooks only); remote runs also print
            one line per batch. desc: the bar's text.
        no_grad: run local batches under ``torch.no_grad()``.

    Errors: a failing remote batch raises :class:`nnsight_moe.remote.RemoteBatchError` naming it (the
    finished batches are kept in ``results_path``); a failing local batch raises its own error, with a
    note saying where the finished batches are kept.
    """
    from nnsight_moe.files import call_identity, model_identity
    from nnsight_moe.progress import bar
    from nnsight_moe.remote import (RemoteBatchError, _check_remote, _fingerprint, _keep_results, _load_results,
                                    _ship_by_value, _to_cpu, _warn_unsaved)

    if not callable(fn):
        raise TypeError(f"fn must be a callable fn(model, batch), got {type(fn).__name__}")
    _refuse_family(model)
    traced = remote is not None
    if traced:
        _check_remote(remote)
        if not hasattr(model, "trace"):
            raise TypeError(f"remote={remote!r} needs an nnsight model (e.g. nnsight.LanguageModel), "
                            f"got {type(model).__name__}")
    batches = list(batches)
    bad = [i for i, b in enumerate(batches) if not isinstance(b, Mapping) or any(k not in b for k in BATCH_KEYS)]
    if bad:
        raise TypeError(f"batches {bad[:5]} are not batch dicts with keys {BATCH_KEYS} (see runner.make_batches)")
    n = len(batches)
    fingerprints = [_fingerprint(dict(b)) for b in batches]
    identity = {**model_identity(model), **call_identity(fn, key)} if results_path is not None else None
    done = _load_results(results_path, fingerprints, identity)
    if traced:
        _ship_by_value(fn)
    trace_kwargs = dict(trace_kwargs or {})
    if progress and done:
        print(f"[nnsight_moe] resuming from {results_path}: {len(done)}/{n} batches already done", flush=True)
    total = sum(len(b["rows"]) for b in batches)
    shown = bar(None, desc, total=total, unit="prompt", disable=not progress)
    shown.update(sum(len(batches[i]["rows"]) for i in done))
    unsaved = False
    try:
        for index, batch in enumerate(batches):
            if index in done:
                continue
            started = time.perf_counter()
            shown.set_postfix_str(f"batch {index + 1}/{n}")
            try:
                result = (_traced(model, dict(batch), fn, remote, trace_kwargs) if traced
                          else _local(model, dict(batch), fn, no_grad))
            except Exception as error:
                where = (f"; {len(done)} finished batches are kept in {results_path}, rerun to resume"
                         if results_path is not None else "")
                if traced:
                    raise RemoteBatchError(f"batch {index} of {n} failed ({type(error).__name__}: {error}){where}",
                                           index, results_path, sorted(done)) from error
                if where:
                    error.add_note(f"runner: batch {index} of {n} failed{where}")
                raise
            done[index] = _to_cpu(result)
            unsaved = _keep_results(results_path, fingerprints, done, identity, index)
            shown.update(len(batch["rows"]))
            if progress and traced:
                print(f"[nnsight_moe] batch {index + 1}/{n} done in {time.perf_counter() - started:.1f}s", flush=True)
    finally:
        shown.close()
    if unsaved:
        _warn_unsaved(results_path)
    return [done[index] for index in range(n)]


def _refuse_family(model: Any) -> None:
    """Refuse a MoE family the recipes cannot drive (its adapter's ``recipes`` says why: DiffusionGemma)."""
    from nnsight_moe.adapters import adapter_for
    from nnsight_moe.attach import hf_model
    from nnsight_moe.layout import UnsupportedModelError

    try:
        adapter = adapter_for(hf_model(model))
    except (TypeError, UnsupportedModelError):  # not an HF model behind it, or not a MoE family: not ours to refuse
        return
    if adapter.recipes:
        raise UnsupportedModelError(f"the recipes do not run on {adapter.name} models: {adapter.recipes}")


def _local(model: Any, batch: dict, fn: Callable, no_grad: bool) -> Any:
    if no_grad:
        with torch.no_grad():
            return fn(model, batch)
    return fn(model, batch)


def _traced(model: Any, batch: dict, fn: Callable, remote: Any, trace_kwargs: dict) -> Any:
    """``fn(model, batch)`` inside one trace. The block reads only ``fn``, ``model`` and ``batch``: that is
    all a remote request carries (besides ``fn``'s source and the globals it reads)."""
    import nnsight

    with model.trace(inputs(batch), **({"remote": remote} if remote else {}), **trace_kwargs):
        result = nnsight.save(fn(model, batch))
    return result


def model_device(model: Any) -> torch.device:
    """Where ``model``'s inputs go: the device of its first parameter (the CPU for meta / remote weights)."""
    from nnsight_moe.attach import hf_model

    try:
        device = next(hf_model(model).parameters()).device
    except (StopIteration, TypeError, ValueError, AttributeError):
        return torch.device("cpu")
    return torch.device("cpu") if device.type == "meta" else device


def run(model: Any, prompts: Sequence, fn: Callable[[Any, dict], Any], *, tokenizer: Any = None,
        batch_size: int | str = 16, padding_side: str | None = None, pad_id: int | None = None,
        per_prompt: Mapping | None = None, remote: Any = None, results_path: Any = None, key: Any = None,
        progress: bool = True, desc: str | None = None, kind: str = "forward", max_memory: int | None = None,
        check_vocab: bool = True, trace_kwargs: dict | None = None, no_grad: bool = True) -> list:
    """:func:`make_batches` then :func:`run_batches`: ``fn(model, batch)`` per batch of ``prompts``.

    ``tokenizer`` None uses the one the model carries (nnsight ``LanguageModel``, TransformerBridge).
    Batches live on the model's device locally, on the CPU for traces (nnsight moves them). With
    ``check_vocab`` every token id is checked against the model's vocabulary first. The other
    arguments are those of :func:`make_batches` and :func:`run_batches`. Returns the per-batch results.
    """
    from nnsight_moe.recipes.prompts import model_tokenizer, vocab_size

    tokenizer = model_tokenizer(model, tokenizer)
    vocab = vocab_size(model) if check_vocab else None
    device = model_device(model) if remote is None else torch.device("cpu")
    batches = make_batches(prompts, tokenizer=tokenizer, batch_size=batch_size, padding_side=padding_side,
                           pad_id=pad_id, per_prompt=per_prompt, device=device, vocab=vocab, model=model,
                           kind=kind, max_memory=max_memory)
    return run_batches(model, batches, fn, remote=remote, results_path=results_path, key=key, progress=progress,
                       desc=desc or f"{len(batches)} batches of {len(list(prompts))} prompts",
                       trace_kwargs=trace_kwargs, no_grad=no_grad)
