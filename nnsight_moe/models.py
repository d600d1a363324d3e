"""Open a model by name: ``demo-moe`` / ``demo-dense``, a local directory, or a Hugging Face hub name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["DTYPES", "check_device", "load_model"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device``, after checking this machine has it; ``ValueError`` naming it otherwise.

    E.g. ``"cuda"`` without a CUDA GPU, ``"cuda:3"`` on a machine with two GPUs or ``"mps"`` off Apple
    silicon fail here, before any model is loaded.
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps): {err}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is available on this machine "
                             "(torch.cuda.is_available() is False); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r}: Apple MPS is not available on this machine; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "meta") and not hasattr(torch, dev.type):
        raise ValueError(f"device {device!r}: unknown device type {dev.type!r}")
    return dev


def load_model(name: str, *, device: str | None = None, dtype: str | torch.dtype | None = None):
    """(model, tokenizer) for a demo name, a local model directory or a hub name; eval mode.

    Raises ``ValueError`` naming the accepted forms when ``name`` is none of them, and naming
    ``device`` when this machine does not have it (:func:`check_device`).
    """
    from nnsight_moe import demo

    dtype = _dtype(dtype)
    check_device(device)
    if name in demo.names():
        model, tokenizer = demo.load(name, dtype=dtype, device=device)
        return model, tokenizer
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise ValueError(
            f"model {name!r}: no such model directory (a directory with config.json is expected); "
            f"use {' or '.join(demo.names())}, a local model directory, or a hub name like 'allenai/OLMoE-1B-7B-0924'"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or "auto")
    except OSError as err:
        raise ValueError(
            f"model {name!r} is neither {' nor '.join(demo.names())}, nor a local model directory, nor a hub "
            f"model that could be loaded ({err.__class__.__name__}: {str(err).splitlines()[0]})"
        ) from err
    if device is not None:
        model = model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.eval()
    return model, tokenizer


def load_traced(name: str, remote: Any, *, device: str | None = None, dtype: str | torch.dtype | None = None):
    """(nnsight ``LanguageModel``, tokenizer) for running recipes with ``remote=`` (see :func:`load_model`).

    ``remote="local"`` (nnsight's local simulation) wraps the locally loaded model. ``remote=True``
    (NDIF) or a host URL needs a hub repo id the server hosts: the model is built on the meta device
    from its config (no weights are downloaded) and every forward runs on the server.
    """
    from nnsight import LanguageModel

    from nnsight_moe import demo

    if remote == "local":
        model, tokenizer = load_model(name, device=device, dtype=dtype)
        return LanguageModel(model, tokenizer=tokenizer), tokenizer
    if name in demo.names() or Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        raise ValueError(
            f"remote={remote!r} runs on models the NDIF server hosts, named by hub repo id (see "
            f"nnsight.ndif.status()); {name!r} exists only on this machine: use --remote local to simulate"
        )
    try:
        lm = LanguageModel(name, dtype=_dtype(dtype) or "auto")
    except OSError as err:
        raise ValueError(f"model {name!r}: cannot read its config/tokenizer from the hub ({err})") from err
    tokenizer = lm.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return lm, tokenizer


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter."""
    return next(model.parameters()).device
