"""Progress bars that say where they are: ``[2/4 blocking] relation 3/7 country_language | zero``.

The main job labels each section (``[step/steps name]``) and the recipes label what they loop over
(relation i/n, model, condition) with :func:`label`; every bar made with :func:`bar` starts with the
labels in effect. Bars are transient (``leave=False``) and are not drawn when stderr is neither a
terminal nor a notebook, so a log gets the job's step lines instead of one update per batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterable, Iterator

__all__ = ["bar", "batches", "label", "labels"]

_LABELS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("nnsight_moe_progress", default=())


@contextlib.contextmanager
def label(text: str) -> Iterator[None]:
    """Prefix every bar made inside the ``with`` block with ``text`` (nested labels are joined)."""
    token = _LABELS.set((*_LABELS.get(), text))
    try:
        yield
    finally:
        _LABELS.reset(token)


def labels() -> str:
    """The labels in effect, joined with `` | `` (empty outside any :func:`label`)."""
    return " | ".join(_LABELS.get())


def _interactive() -> bool:
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)()) or "ipykernel" in sys.modules


def bar(iterable: Iterable, desc: str, *, disable: bool = False, **kwargs):
    """A ``tqdm`` bar over ``iterable`` described as ``<labels> | desc`` (see the module docstring)."""
    from tqdm.auto import tqdm

    text = " | ".join((*_LABELS.get(), desc))
    return tqdm(iterable, desc=text, disable=disable or not _interactive(), leave=False, **kwargs)


def batches(n_items: int, batch_size: int, desc: str, *, disable: bool = False, unit: str = "prompt") -> Iterator[int]:
    """Start index of each batch of ``batch_size`` over ``n_items``, with a bar counting items (``prompt/s``).

    The bar advances by the batch's items once the batch is done, so its rate is items (prompts) per
    second, not batches per second.
    """
    with bar(None, desc, disable=disable, total=n_items, unit=unit) as progress:
        for start in range(0, n_items, batch_size):
            yield start
            progress.update(min(batch_size, n_items - start))
