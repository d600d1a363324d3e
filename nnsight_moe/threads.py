"""CPU thread count for nnsight-moe's forwards: fast when the machine is shared, overridable.

torch starts one intra-op thread per core. On a small machine that is shared (a 2-core laptop or
CI runner with any other busy process), every parallel region then waits for a thread the OS has
descheduled: a forward of the demo model becomes 20-140x slower than with one thread, while small
models gain nothing from a second thread when the machine is quiet. So:

* ``configure(threads)`` / ``nnsight-moe run --threads N`` / ``NNSIGHT_MOE_THREADS=N`` set ``N``
  threads (in that order of precedence);
* otherwise, a count chosen with ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` is left as it is;
* otherwise, a small model (under :data:`SMALL_MODEL_PARAMS` parameters, e.g. the demo models) runs
  on 1 thread and a larger one keeps torch's default.

The main job and :func:`nnsight_moe.demo.load` call :func:`configure`; the library leaves torch's
setting alone everywhere else.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["ENV", "SMALL_MODEL_PARAMS", "configure", "requested"]

#: Environment variable with the thread count nnsight-moe uses (a positive integer).
ENV = "NNSIGHT_MOE_THREADS"

#: Models with fewer parameters run on one thread unless a count is requested.
SMALL_MODEL_PARAMS = 50_000_000


def requested(threads: int | str | None = None) -> int | None:
    """The thread count asked for: ``threads``, else ``$NNSIGHT_MOE_THREADS``, else None.

    Raises a ValueError naming the bad value when it is not a positive integer.
    """
    source, value = ("threads", threads) if threads is not None else (ENV, os.environ.get(ENV) or None)
    if value is None:
        return None
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if count < 1 or str(value).strip() != str(count):
        raise ValueError(f"{source}={value!r}: expected a positive integer number of CPU threads, e.g. 1")
    return count


def configure(threads: int | str | None = None, *, model: Any = None) -> int:
    """Set torch's intra-op thread count by the rules of this module; returns the count in effect.

    ``threads``: an explicit count (overrides the environment). ``model``: the model about to run;
    when nothing is requested, one with fewer than :data:`SMALL_MODEL_PARAMS` parameters gets 1 thread.
    """
    import torch

    count = requested(threads)
    if count is None and not (os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS")):
        if model is not None and _n_params(model) < SMALL_MODEL_PARAMS:
            count = 1
    if count is not None and count != torch.get_num_threads():
        torch.set_num_threads(count)
    return torch.get_num_threads()


def _n_params(model: Any) -> int:
    parameters = getattr(model, "parameters", None)
    if parameters is None:
        return SMALL_MODEL_PARAMS
    return sum(p.numel() for p in parameters())
