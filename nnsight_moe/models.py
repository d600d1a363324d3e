"""Open a model by name: ``demo-moe`` / ``demo-dense``, a local directory, or a Hugging Face hub name."""

from __future__ import annotations

import functools
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["DTYPES", "check_device", "check_model_name", "dense_models", "load_model", "load_traced"]

#: ``--dtype`` names (torch is imported only when a model is loaded, so name checks stay instant).
DTYPES = ("float32", "bfloat16", "float16")


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``dtype`` as a torch dtype; a ValueError names the accepted ones (see :mod:`nnsight_moe.precision`)."""
    from nnsight_moe.precision import resolve_dtype

    return resolve_dtype(dtype)


EXAMPLE_HUB_MODEL = "allenai/OLMoE-1B-7B-0924"


def _accepted(name: str) -> str:
    """What ``--model`` accepts, with the demo name closest to ``name`` first when there is one."""
    import difflib

    from nnsight_moe import demo

    close = difflib.get_close_matches(name.lower(), demo.names(), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return (f"{hint}use {' or '.join(demo.names())} (bundled, offline), a local model directory (with "
            f"config.json), or a hub name like {EXAMPLE_HUB_MODEL!r}")


def check_model_name(name: str) -> str:
    """Where ``name`` comes from, checked without loading anything heavy (no torch, one hub request at most).

    Returns ``"demo"`` (a bundled demo), ``"local"`` (a directory with config.json), ``"hub"`` or
    ``"cache"`` (a hub name, from the local cache when the hub cannot be reached). Raises a ValueError
    naming what is accepted (and the closest demo name) otherwise; see :func:`load_model`.
    """
    from nnsight_moe import demo

    if name in demo.names():
        return "demo"
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        if not (path / "config.json").is_file():
            raise ValueError(f"model {name!r}: no such model directory (a directory with config.json is expected); "
                             f"{_accepted(name)}")
        return "local"
    return "cache" if _hub_cached_only(name) else "hub"


@functools.lru_cache(maxsize=32)
def _hub_cached_only(name: str) -> bool:
    """Check a hub name before loading it; True: load it from the local cache only (hub unreachable).

    Fails fast (one request, no retries) with a ValueError naming what is accepted when the hub is
    offline (``HF_HUB_OFFLINE=1`` or no network) and the model is not in the local cache, when the
    repository does not exist, or when it is gated.
    """
    from huggingface_hub import is_offline_mode, model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except HFValidationError as err:
        raise ValueError(f"model {name!r} is not a valid hub repo id ({err}); {_accepted(name)}") from err
    if is_offline_mode():
        if cached:
            return True
        raise ValueError(f"model {name!r} is not in the local Hugging Face cache and the hub is off "
                         f"(HF_HUB_OFFLINE=1); {_accepted(name)}")
    try:
        model_info(name, timeout=10)
    except GatedRepoError as err:
        raise ValueError(f"model {name!r} is gated on the hub: accept its license on huggingface.co and log in "
                         f"(`hf auth login`); or {_accepted(name)}") from err
    except RepositoryNotFoundError as err:
        raise ValueError(f"model {name!r}: no such model on the Hugging Face hub (or it is private: log in with "
                         f"`hf auth login`); {_accepted(name)}") from err
    except Exception as err:  # no network, DNS, proxy, timeout: anything that is not an answer from the hub
        if cached:
            return True
        raise ValueError(f"model {name!r}: the Hugging Face hub cannot be reached ({type(err).__name__}: {err}) "
                         f"and the model is not in the local cache; {_accepted(name)}") from err
    return False


def dense_models(model: str, dense: str | Sequence[str] | None) -> list[str]:
    """The dense comparison models of a job on ``model``, as a list (empty: no comparison).

    ``dense``: None (the default of a bundled demo, :data:`nnsight_moe.demo.DEFAULT_DENSE`, else none),
    ``"none"`` (no comparison), a name or directory, a comma-separated string of them, or a sequence of
    them. The order is kept (the first is the one the single-ratio summaries use) and repeats dropped.
    """
    from nnsight_moe import demo

    if dense is None:
        return list(demo.DEFAULT_DENSE.get(model, ()))
    items = [dense] if isinstance(dense, str) else list(dense)
    names = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"dense models must be names or directories (str), got {item!r}")
        names += [part.strip() for part in item.split(",") if part.strip()]
    if any(n.lower() == "none" for n in names):
        if len(names) > 1:
            raise ValueError(f"dense: 'none' (no comparison) cannot be combined with models, got {names}")
        return []
    return list(dict.fromkeys(names))


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device``, after checking this machine has it; ``ValueError`` naming it otherwise.

    E.g. ``"cuda"`` without a CUDA GPU, ``"cuda:3"`` on a machine with two GPUs or ``"mps"`` off Apple
    silicon fail here, before any model is loaded.
    """
    if device is None:
        return None
    import torch

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

    Raises ``ValueError`` naming the accepted forms when ``name`` is none of them, for an unknown
    ``dtype``, naming ``device`` when this machine does not have it (:func:`check_device`), and before
    loading anything when ``device`` cannot run ``dtype``.
    """
    from nnsight_moe import demo

    source = check_model_name(name)  # before torch is imported: a bad name fails at once
    from nnsight_moe.precision import check_dtype_runs

    dtype = _dtype(dtype)
    check_dtype_runs(dtype, device)  # checks the device too
    if source == "demo":
        return demo.load(name, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local_only = source in ("local", "cache")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or "auto", local_files_only=local_only)
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
    check_model_name(name)  # fail fast when the hub cannot serve the config
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
