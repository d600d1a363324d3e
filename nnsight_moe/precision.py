"""Precision: the dtypes a model can run in, and self-check tolerances that follow the model's dtype.

Activations stay in the model's dtype (bf16 on most real checkpoints); recipes compute readouts, LPI,
ranks and statistics in float32 from them. A self-check that recomputes in float32 something the model
computed in its own dtype cannot be tighter than that dtype's rounding: the bounds here are first-order
worst cases built from the dtype's machine epsilon and the magnitudes of the operands, so they hold
however the rounding errors line up, and they stay small enough that a real modelling mismatch (a
missing norm, a logit soft-cap, a scaled residual) is still caught.

    tol = residual_bound(torch.bfloat16, h, attn, mlp)      # elementwise, [L, P, D]
    tol = readout_bound(torch.bfloat16, unembed, normed, logits)   # per prompt, [P]
"""

from __future__ import annotations

import sys

import cloudpickle
import torch
from torch import Tensor

__all__ = ["DTYPES", "activation_dtype", "check_dtype_runs", "eps", "readout_bound", "residual_bound", "resolve_dtype"]

#: the dtypes the CLI and the recipes accept, by name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``dtype`` as a torch dtype (None stays None); a ValueError names the accepted ones otherwise."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
        return dtype
    if not isinstance(dtype, str) or dtype.removeprefix("torch.") not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype.removeprefix("torch.")]


def check_dtype_runs(dtype: torch.dtype | None, device: str | torch.device | None = None) -> None:
    """Raise a ValueError when this machine has no ``device`` (:func:`nnsight_moe.models.check_device`) or
    ``device`` cannot run the ops of a forward pass in ``dtype``.

    Runs a tiny matmul, softmax and RMS norm in ``dtype`` on ``device`` (what a decoder layer needs):
    some accelerators lack bf16 (CUDA before compute capability 8.0 emulates it, MPS before macOS 14
    refuses it), and this says so before a checkpoint is loaded rather than deep inside a recipe.
    """
    from nnsight_moe.models import check_device  # the one check that this machine has ``device``

    device = check_device(device) or torch.device("cpu")
    if dtype is None:
        return
    try:
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
        y = (x @ x.T).softmax(-1) @ x
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
        if not torch.isfinite(y.float()).all():
            raise RuntimeError("non-finite results")
        if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise RuntimeError(f"{torch.cuda.get_device_name(device)} has no native bfloat16 (compute capability < 8.0)")
    except (RuntimeError, TypeError, AssertionError) as err:
        ok = [name for name, d in DTYPES.items() if d != dtype]
        raise ValueError(
            f"dtype {str(dtype).replace('torch.', '')} cannot run on device {device} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else err!r}); try {' or '.join(ok)}"
        ) from err


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of ``dtype`` (the gap between 1 and the next number): 2^-7 for bf16, 2^-10 for fp16."""
    return float(torch.finfo(dtype).eps)


def activation_dtype(*modules: torch.nn.Module) -> torch.dtype:
    """The lowest-precision floating dtype among the parameters of ``modules``: the dtype activations are
    rounded to (a bf16 model keeping its norms or router in float32 still rounds every matmul output)."""
    dtypes = {p.dtype for m in modules for p in m.parameters() if p.is_floating_point()}
    return max(dtypes, key=eps, default=torch.float32)


def residual_bound(dtype: torch.dtype, h: Tensor, attn: Tensor, mlp: Tensor) -> Tensor:
    """Elementwise bound on ``|h + attn + mlp - h_next|`` when the model adds its residual in ``dtype``.

    ``h_next = round(round(h + attn) + mlp)``: two roundings, each at most eps/2 of its result, and
    each result at most ``|h| + |attn| + |mlp|``; plus float32's own rounding of the check's sum.
    """
    magnitude = h.abs() + attn.abs() + mlp.abs()
    return (eps(dtype) + 4 * eps(torch.float32)) * magnitude


def readout_bound(dtype: torch.dtype, unembed: Tensor, normed: Tensor, logits: Tensor) -> Tensor:
    """Per-prompt bound [P] on ``|log p(w) recomputed in float32 - log p(w) from the model's logits|``.

    The model rounds the normed final residual ``normed`` [P, D] (up to twice: the normalised state,
    then its product with the norm weight) before the unembedding ``unembed`` [V, D], and rounds the
    logits [P, V] it returns: logit v is off by at most ``eps * (|W_U| |n|)_v + eps/2 * |logit_v|``. A
    log-probability moves by at most twice the largest logit error (its own logit, plus the
    log-sum-exp). Costs one [P, D] x [D, V] product.
    """
    e = eps(dtype) + 4 * eps(torch.float32)
    per_logit = e * (normed.abs() @ unembed.abs().T) + e / 2 * logits.abs()
    return 2 * per_logit.max(dim=-1).values


# The bounds run inside traces too (remote attribution): ship this module by value, as nnsight_moe.routing.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
