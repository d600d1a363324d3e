"""Safe files: atomic writes, and the results-file format that loads without running any code.

* :func:`atomic_write` writes a file through a uniquely named temporary file in the same directory and
  ``os.replace``: a crash or a full disk mid-write leaves the previous file intact, and concurrent
  writers never tear each other's files (the last complete write wins).
* :func:`save_results` / :func:`load_results` store nested results (dicts, lists, tuples, tensors,
  str / int / float / bool / None) as one safetensors file: the tensors as safetensors tensors, the
  structure as JSON in the safetensors metadata, plus a SHA-256 of everything. Nothing is unpickled, so
  a crafted file cannot run code; a file that is not ours, is truncated or was edited is refused with a
  :class:`ResultsFileError` naming the file and what is wrong.
* :func:`model_identity` and :func:`call_identity` describe what produced results (the model's class,
  config, dtype, a weights digest or hub name/revision; the function and its settings), so that a
  resume is refused when any of them differ.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import types
from pathlib import Path
from typing import Any

import torch

__all__ = ["ResultsFileError", "atomic_write", "call_identity", "digest", "load_results", "model_identity",
           "save_results"]


class ResultsFileError(ValueError):
    """A results file that cannot be used: not ours, corrupt, tampered with, or written for other work."""


def atomic_write(path: str | os.PathLike, data: bytes | str, *, encoding: str = "utf-8") -> None:
    """Write ``data`` to ``path`` atomically (unique temporary file in the same directory, then ``os.replace``).

    On any failure (e.g. ``OSError`` for a full disk) the temporary file is removed, ``path`` keeps
    its previous content and an ``OSError`` naming ``path`` is raised.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode(encoding)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(error, OSError):
            raise OSError(error.errno, f"could not write {str(path)!r} ({error.strerror or error}); "
                                       "its previous content is unchanged") from error
        raise


# ------------------------------------------------------------------ fingerprints
def digest(value: Any) -> str:
    """A stable content hash (SHA-1 hex) of plain data, tensors, functions and partials.

    Stable across processes: functions count by ``module:qualname``, modules and other objects whose
    ``repr`` is an address by their class only (the model itself is described by :func:`model_identity`).
    """
    h = hashlib.sha1()
    _feed(h, value, set())
    return h.hexdigest()


def _name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', None)}:{getattr(obj, '__qualname__', None) or type(obj).__qualname__}"


def _feed(h: Any, value: Any, seen: set) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.is_meta:
            return
        t = t.cpu().contiguous().reshape(-1)
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return
    if isinstance(value, (str, bytes, int, float, bool, type(None))):
        h.update(f"{type(value).__name__}:{value!r};".encode())
        return
    if id(value) in seen:
        h.update(b"<cycle>")
        return
    seen = seen | {id(value)}
    if isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            _feed(h, key, seen)
            _feed(h, value[key], seen)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__[0]}{len(value)}".encode())
        for item in value:
            _feed(h, item, seen)
    elif isinstance(value, functools.partial):
        h.update(b"P")
        _feed(h, value.func, seen)
        _feed(h, list(value.args), seen)
        _feed(h, dict(value.keywords), seen)
    elif isinstance(value, types.SimpleNamespace):
        h.update(b"N")
        _feed(h, vars(value), seen)
    elif isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)):
        h.update(f"F{_name(value)};".encode())
    elif isinstance(value, torch.nn.Module) or " at 0x" in repr(value):
        h.update(f"O{type(value).__module__}:{type(value).__qualname__};".encode())
    else:
        h.update(f"R{type(value).__qualname__}:{value!r};".encode())


def model_identity(model: Any, *, sample: int = 1024) -> dict:
    """What identifies ``model`` for a resume: class, config, dtype, weights digest, hub name and revision.

    ``model`` is an HF model or anything :func:`nnsight_moe.hf_model` unwraps (nnsight model,
    TransformerBridge). ``weights`` is a digest of every parameter's and buffer's name, shape, dtype
    and ``sample`` evenly spaced values (cheap on large models; it tells checkpoints apart, not every
    single edited weight); it is None when the weights are on the meta device (a remote model that
    was never dispatched), where the hub ``name`` and ``revision`` identify the model instead.
    """
    from nnsight_moe.attach import hf_model

    try:
        hf = hf_model(model)
    except Exception:  # not an HF model: its class is all we know
        hf = model
    config = getattr(hf, "config", None)
    settings = {}
    if config is not None and hasattr(config, "to_dict"):
        settings = {k: v for k, v in config.to_dict().items()
                    if k not in ("_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype")}
    dtype, weights = None, hashlib.sha1()
    tensors = [*hf.named_parameters(), *hf.named_buffers()] if isinstance(hf, torch.nn.Module) else []
    meta = not tensors or any(t.is_meta for _, t in tensors)
    for name, t in tensors:
        if dtype is None and t.is_floating_point():
            dtype = str(t.dtype)
        weights.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        if not meta and t.numel():
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // sample)
            values = flat[::step][:sample].cpu().contiguous()
            weights.update(values.view(torch.uint8).numpy().tobytes())
    return {
        "architecture": f"{type(hf).__module__}.{type(hf).__qualname__}",
        "config": digest(settings),
        "dtype": dtype,
        "weights": None if meta else weights.hexdigest(),
        "name": getattr(config, "_name_or_path", None) or None,
        "revision": getattr(config, "_commit_hash", None) or None,
    }


def call_identity(fn: Any, key: Any = None) -> dict:
    """The function (``module:qualname``, through ``functools.partial``) and a digest of its settings."""
    func = fn
    while isinstance(func, functools.partial):
        func = func.func
    return {"function": _name(func), "settings": digest((fn if isinstance(fn, functools.partial) else None, key))}


def identity_changes(saved: dict, now: dict) -> list[str]:
    """What differs between two identities (``model_identity | call_identity``), in words."""
    words = {"architecture": "model class", "config": "model config", "dtype": "dtype", "weights": "model weights",
             "name": "model name", "revision": "model revision", "function": "function", "settings": "settings"}
    changes = []
    for key, word in words.items():
        a, b = saved.get(key), now.get(key)
        if key == "weights" and (a is None or b is None):
            continue
        if key == "name" and saved.get("weights") is not None and now.get("weights") is not None:
            continue  # the weights say more than the name (the same model loaded from another folder)
        if key == "revision" and (a is None or b is None):
            continue
        if a != b:
            changes.append(f"{word} ({a} in the file, {b} now)" if key in ("architecture", "dtype", "name", "function")
                           else word)
    return changes


# ------------------------------------------------------------------ results file
def _encode(value: Any, tensors: dict, prefix: str) -> Any:
    """``value`` as a JSON skeleton; tensors go to ``tensors`` under fresh names."""
    if isinstance(value, torch.Tensor):
        name = f"{prefix}{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous().clone()
        return {"t": name}
    if value is None or isinstance(value, (bool, str)):
        return {"v": value}
    if isinstance(value, int):
        return {"i": str(int(value))}
    if isinstance(value, float):
        return {"f": repr(float(value))}
    if isinstance(value, (list, tuple)):
        return {"l" if isinstance(value, list) else "u": [_encode(item, tensors, prefix) for item in value]}
    if isinstance(value, dict):
        return {"d": [[_encode(k, tensors, prefix), _encode(v, tensors, prefix)] for k, v in value.items()]}
    raise TypeError(f"cannot store a {type(value).__name__} in a results file "
                    "(tensors, dicts, lists, tuples, str, int, float, bool and None can be stored)")


def _decode(node: Any, tensors: dict, where: str, depth: int = 0) -> Any:
    if depth > 100:
        raise ResultsFileError(f"{where}: nested more than 100 levels")
    if not isinstance(node, dict) or len(node) != 1:
        raise ResultsFileError(f"{where}: malformed entry {str(node)[:80]!r}")
    (kind, body), = node.items()
    if kind == "t":
        if not isinstance(body, str) or body not in tensors:
            raise ResultsFileError(f"{where}: refers to a tensor {body!r} the file does not hold")
        return tensors[body]
    if kind == "v" and (body is None or isinstance(body, (bool, str))):
        return body
    if kind == "i" and isinstance(body, str):
        return int(body)
    if kind == "f" and isinstance(body, str):
        return float(body)
    if kind in ("l", "u") and isinstance(body, list):
        items = [_decode(item, tensors, where, depth + 1) for item in body]
        return items if kind == "l" else tuple(items)
    if kind == "d" and isinstance(body, list) and all(isinstance(p, list) and len(p) == 2 for p in body):
        out = {}
        for k, v in body:
            k = _decode(k, tensors, where, depth + 1)
            try:
                hash(k)
            except TypeError:
                raise ResultsFileError(f"{where}: a dict key of type {type(k).__name__}") from None
            out[k] = _decode(v, tensors, where, depth + 1)
        return out
    raise ResultsFileError(f"{where}: malformed entry {str(node)[:80]!r}")


def _checksum(header: dict, tensors: dict) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_results(path: str | os.PathLike, format: str, header: dict, results: Any) -> None:
    """Write ``results`` with the JSON-able ``header`` to ``path`` (safetensors, atomic).

    ``format`` names what the file is (checked by :func:`load_results`).
    """
    from safetensors.torch import save

    tensors: dict = {}
    skeleton = _encode(results, tensors, "t")
    body = {"format": format, "header": header, "results": skeleton}
    meta = {"nnsight_moe": json.dumps(body), "sha256": _checksum(body, tensors)}
    atomic_write(path, save(tensors, metadata=meta))


def load_results(path: str | os.PathLike, format: str) -> tuple[dict, Any]:
    """``(header, results)`` of a file written by :func:`save_results` with the same ``format``.

    Raises :class:`ResultsFileError` naming ``path`` when the file is not a safetensors file of that
    format (for instance an old pickle file), is truncated, or its content does not match its checksum.
    """
    from safetensors import SafetensorError, safe_open

    where = str(path)
    try:
        with safe_open(where, framework="pt", device="cpu") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ResultsFileError(
            f"{where} is not a {format} results file: it cannot be read as safetensors ({error}). "
            "Results files are never unpickled; a file from an older nnsight-moe (pickle) must be deleted "
            "or another results path given") from error
    try:
        body = json.loads(meta["nnsight_moe"])
        checksum = meta["sha256"]
    except (KeyError, json.JSONDecodeError, RecursionError) as error:
        raise ResultsFileError(f"{where} is a safetensors file but not a {format} results file "
                               f"(no readable nnsight_moe metadata: {error})") from error
    if not isinstance(body, dict) or body.get("format") != format or not isinstance(body.get("header"), dict):
        found = body.get("format") if isinstance(body, dict) else None
        raise ResultsFileError(f"{where} is not a {format} results file (its format is {found!r})")
    if _checksum(body, tensors) != checksum:
        raise ResultsFileError(f"{where} was modified or corrupted after it was written (checksum mismatch); "
                               "delete it to start over")
    return body["header"], _decode(body["results"], tensors, where)
