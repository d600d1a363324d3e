"""Memory planner: peak working memory of a recipe from the model's shapes, and batch / chunk sizes under a budget.

    plan = nnsight_moe.memory.plan(model, "neuron-fast", n_prompts=200, seq_len=24, max_memory="8GiB")
    plan.batch_size, plan.chunk_bytes          # prompts per forward, the [chunk, vocab] logits budget

The estimate is arithmetic on the shapes (d_model, layers, experts, top-k, expert / shared / dense widths,
heads, vocabulary, dtype), never a trial forward. For one batch of ``b`` prompts padded to ``T`` tokens,

    peak = fixed + b * per_prompt(T) + chunk(b)       (every term x SAFETY = 1.25)

* ``fixed``: what a batch allocates whatever its size: the float32 copy of the unembedding the readout
  makes for a bf16/fp16 model (V x D x 4), the float32 W_O of a layer (head level), the float32 shared /
  dense down projection (neuron level);
* ``per_prompt``: the forward's working set (KV cache of every layer, the largest layer's transient:
  attention scores, the hooked experts' per-slot gate_up / acts / outputs, router, shared or dense MLP;
  the last position's logits) plus what the level scores per prompt (the float32 W_down rows of every
  selected expert for neurons, per-head contributions, the result rows of the batch);
* ``chunk``: the [chunk, V] float32 logits of one chunk of contributions: as many rows as the batch's
  largest scoring call has (prompts x heads, x selected experts, x neurons of the selected experts), at most
  what ``chunk_bytes`` allows (attribution's ``budget_bytes`` rule); at least the readout's |W_U| check.

``max_memory`` is the WORKING memory a recipe may use on top of the loaded model (its weights are
already resident). Default: what the model's device has free now (``torch.cuda.mem_get_info`` on CUDA,
``MemAvailable`` of ``/proc/meminfo`` / psutil on CPU) minus a margin (10 % and 256 MiB). A budget that
cannot hold even one prompt raises :class:`MemoryBudgetError` before any compute, naming the level and
the bytes one prompt needs. The estimates are calibrated against measured peaks by
``benchmarks/real_shapes.py`` (peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA): at the true
OLMoE / Qwen1.5-MoE widths and vocabularies the measured peak is 0.74-0.80 of the estimate.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

__all__ = ["KINDS", "MemoryBudgetError", "ModelShapes", "Plan", "budget", "choose_batch_size", "estimate",
           "format_bytes", "free_bytes", "limit", "max_length", "parse_size", "plan"]

#: What the planner sizes: attribution levels (neurons in either mode), a blocking sweep's stacked rows,
#: or a plain capture forward (routing statistics, target ranks).
KINDS = ("layer", "head", "expert", "shared", "neuron-exact", "neuron-fast", "blocking", "forward")
#: Largest batch "auto" chooses: bigger CPU batches gain nothing; a GPU gains up to a few hundred rows.
CAPS = {"cpu": 16, "cuda": 64}
BLOCKING_ROWS_CAP = {"cpu": 64, "cuda": 1024}
DEFAULT_CHUNK = 2 << 30  # attribution's default [chunk, vocab] logits budget (budget_bytes)
MARGIN_FRACTION, MARGIN_BYTES = 0.10, 256 << 20
#: measured peaks / estimates stay below 1 with this factor (benchmarks/real_shapes.py calibrates it)
SAFETY = 1.25


class MemoryBudgetError(ValueError, MemoryError):
    """The memory budget cannot hold even one prompt of this recipe (raised before any compute).

    A ``ValueError`` (a bad setting: the CLI prints it as a one-line error) and a ``MemoryError``."""


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: Any) -> int:
    """Bytes of a size: an int, or a string like ``"8GiB"``, ``"512MB"``, ``"1.5G"`` (K/M/G/T = powers of
    1000, KiB/MiB/GiB/TiB = powers of 1024)."""
    if isinstance(value, bool):
        raise ValueError(f"a memory size must be a number of bytes or a string like '8GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"a memory size must be positive, got {value!r}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"cannot read the memory size {value!r}: give a positive number with an optional unit "
                         f"({', '.join(u for u in ('KB', 'MB', 'GB', 'TB', 'KiB', 'MiB', 'GiB', 'TiB'))}), e.g. '8GiB'")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, e.g. ``"1.50 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def free_bytes(device: Any = "cpu") -> int:
    """Memory free now on ``device``: ``torch.cuda.mem_get_info`` on CUDA, available RAM on CPU."""
    import torch  # here, not at import: the CLI parses --max-memory without torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil ships with the test environment
        text = open("/proc/meminfo").read()
        return int(re.search(r"MemAvailable:\s+(\d+)", text).group(1)) * 1024


_LIMIT: contextvars.ContextVar[int | None] = contextvars.ContextVar("nnsight_moe_max_memory", default=None)


@contextlib.contextmanager
def limit(max_memory: Any) -> Iterator[None]:
    """Recipes planned inside the ``with`` block (``batch_size="auto"``, ``max_memory=None``) use
    ``max_memory`` (bytes or a string like ``"8GiB"``; None: the device's free memory). The main job sets it."""
    token = _LIMIT.set(None if max_memory is None else parse_size(max_memory))
    try:
        yield
    finally:
        _LIMIT.reset(token)


def budget(max_memory: Any = None, device: Any = "cpu") -> int:
    """The working-memory budget in bytes: ``max_memory`` if given, else the one :func:`limit` set, else
    the free memory of ``device`` minus the margin (10 % and 256 MiB)."""
    if max_memory is not None:
        return parse_size(max_memory)
    if _LIMIT.get() is not None:
        return _LIMIT.get()
    free = free_bytes(device)
    return max(0, int(free * (1 - MARGIN_FRACTION)) - MARGIN_BYTES)


# ------------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class ModelShapes:
    """The sizes the estimates need. Widths are per layer maxima (layers run one after another)."""

    d_model: int
    n_layers: int
    vocab: int
    n_heads: int
    d_attn: int  # heads x head_dim (the o_proj input)
    d_kv: int  # kv heads x head_dim (one of K, V per token per layer)
    n_experts: int = 0
    top_k: int = 0
    d_expert: int = 0
    d_shared: int = 0
    d_dense: int = 0  # dense MLP width (dense layers / dense models)
    n_moe_layers: int = 0
    n_dense_layers: int = 0
    dtype_bytes: int = 4
    device: str = "cpu"

    @classmethod
    def of(cls, model: Any) -> "ModelShapes":
        """Read the shapes off an HF model, TransformerBridge or nnsight model (config and MoE layout)."""
        import nnsight_moe

        hf = nnsight_moe.hf_model(model)
        config = hf.config.get_text_config()
        d_model = int(config.hidden_size)
        n_heads = int(getattr(config, "num_attention_heads", 0) or 0)
        head_dim = int(_largest(config, "head_dim") or (d_model // n_heads if n_heads else 0))
        n_kv = int(_largest(config, "num_key_value_heads") or n_heads)
        try:
            layers = nnsight_moe.layout(hf).layers
        except nnsight_moe.UnsupportedModelError:
            layers = ()
        moe = [l for l in layers if l.is_moe]
        param = next(hf.parameters())
        d_dense = int(getattr(config, "intermediate_size", 0) or 0)
        n_layers = int(config.num_hidden_layers)
        return cls(
            d_model=d_model, n_layers=n_layers, vocab=int(config.vocab_size), n_heads=n_heads,
            d_attn=n_heads * head_dim, d_kv=n_kv * head_dim,
            n_experts=max((l.n_experts for l in moe), default=0), top_k=max((l.top_k for l in moe), default=0),
            d_expert=max((l.d_expert for l in moe), default=0), d_shared=max((l.d_shared for l in moe), default=0),
            d_dense=d_dense if len(moe) < n_layers else 0, n_moe_layers=len(moe), n_dense_layers=n_layers - len(moe),
            dtype_bytes=param.element_size(),
            device="cpu" if param.device.type in ("cpu", "meta") else param.device.type,
        )

    @property
    def n_neurons(self) -> int:
        """Neurons scored per prompt at the exact neuron level (selected routed + shared + dense)."""
        return self.n_moe_layers * (self.top_k * self.d_expert + self.d_shared) + self.n_dense_layers * self.d_dense


# ------------------------------------------------------------------------------------------ estimates
@dataclass(frozen=True)
class Estimate:
    """Bytes of one kind of work on ``rows`` prompts (or stacked rows):
    ``fixed + rows * per_row + chunk_row * min(chunk_rows, rows * chunk_rows_per_row)``."""

    kind: str
    fixed: int
    per_row: int
    chunk_row: int  # bytes of one contribution row of a logits chunk ([V] logits, log-softmax, state)
    chunk_rows: int  # most rows one chunk holds (the chunk budget's rule)
    chunk_rows_per_row: int  # contributions one prompt adds to the largest single scoring call
    seq_len: int
    readout: int = 0  # the readout's transient before scoring (|W_U| of its self-check), not at once with a chunk

    def chunk(self, rows: int = 1) -> int:
        """Bytes of the largest logits chunk for a batch of ``rows`` (or of the readout's transient)."""
        return max(self.readout, self.chunk_row * min(self.chunk_rows, rows * self.chunk_rows_per_row))

    def peak(self, rows: int) -> int:
        """Estimated peak working memory of a batch of ``rows``."""
        return self.fixed + rows * self.per_row + self.chunk(rows)

    def most_rows(self, total: int, cap: int) -> int:
        """The largest batch (at most ``cap``) whose peak fits ``total`` bytes; 0 if not even one fits."""
        lo, hi = 0, cap
        while lo < hi:  # peak is increasing in rows
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.peak(mid) <= total else (lo, mid - 1)
        return lo


def _forward_per_prompt(s: ModelShapes, seq_len: int) -> int:
    """One prompt's forward working set: KV cache, the largest layer's transient, residuals, last logits."""
    a, f, t = s.dtype_bytes, 4, seq_len
    kv = s.n_layers * 2 * s.d_kv * a * t
    attn = t * (4 * s.d_attn * a + 3 * s.n_heads * t * f)  # q, k, v, output; scores + softmax (sdpa math path)
    moe = t * (s.top_k * (3 * s.d_model + 4 * s.d_expert) * a + 3 * s.n_experts * f + 4 * s.d_shared * a)
    dense = t * 4 * s.d_dense * a
    resid = t * 8 * s.d_model * a
    logits = s.vocab * (a + 3 * f)  # the last position only (logits_to_keep), float copy, log-softmax
    return kv + max(attn, moe, dense) + resid + logits


def _row_bytes(n_rows: int) -> int:
    """A result table of ``n_rows`` rows (7 int64 / object columns, built via Python lists: x2 while built)."""
    return n_rows * 7 * 8 * 2


def estimate(shapes: ModelShapes, kind: str, seq_len: int, *, chunk_bytes: int = DEFAULT_CHUNK,
             fast_top: int = 100) -> Estimate:
    """Bytes of ``kind`` (one of :data:`KINDS`) on prompts of ``seq_len`` tokens (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    s, f = shapes, 4
    forward = _forward_per_prompt(s, seq_len)
    captured = s.n_layers * (5 * s.d_model + s.d_attn) * f + s.n_moe_layers * (
        s.top_k * (s.d_expert + s.d_model) + 2 * s.d_shared + 2 * s.n_experts) * s.dtype_bytes
    unembed_copy = s.vocab * s.d_model * f if s.dtype_bytes != f else 0
    rows_per_chunk = max(1, chunk_bytes // (16 * s.vocab))  # attribution.lpi's chunk rule
    chunk_row = (2 * s.vocab + 3 * s.d_model) * f  # logits and log-softmax [V], states [D] of one contribution
    if kind in ("forward", "blocking"):
        # blocking rows: one stacked copy of a prompt each; only last-position logits are kept
        return Estimate(kind, 0, int(SAFETY * forward), 0, 1, 0, seq_len)
    per = forward + captured + 2 * s.vocab * f  # + the readout check / gradient's [V] rows
    fixed = unembed_copy
    layers = s.n_moe_layers + s.n_dense_layers
    if kind == "layer":
        per += _row_bytes(2 * s.n_layers)
        calls = 1
    elif kind == "head":
        per += 2 * s.n_heads * s.d_model * f + _row_bytes(s.n_heads * s.n_layers)
        fixed += s.d_model * s.d_attn * f  # float32 W_O of one layer
        calls = s.n_heads
    elif kind == "expert":
        per += 2 * s.top_k * s.d_model * f + _row_bytes(s.top_k * s.n_moe_layers)
        calls = s.top_k
    elif kind == "shared":
        per += 2 * s.d_model * f + _row_bytes(s.n_moe_layers)
        calls = 1
    else:  # neurons: float32 W_down rows of the selected experts (two layers' worth at a handover)
        per += 2 * s.top_k * s.d_expert * s.d_model * f + 2 * s.top_k * s.d_expert * f
        fixed += max(s.d_shared, s.d_dense) * s.d_model * f
        kept = s.n_neurons if kind == "neuron-exact" else min(s.n_neurons, 2 * fast_top * max(layers, 1))
        per += _row_bytes(kept) + (s.n_neurons * 3 * f if kind == "neuron-fast" else 0)
        widest = max(s.top_k * s.d_expert, s.d_shared, s.d_dense)
        calls = widest if kind == "neuron-exact" else min(widest, fast_top)
    # the readout's self-check takes |W_U| (V x D float32) once per batch, before any chunk: at least that
    return Estimate(kind, int(SAFETY * fixed), int(SAFETY * per), int(SAFETY * chunk_row), rows_per_chunk, calls,
                    seq_len, int(SAFETY * s.vocab * s.d_model * f))


# ------------------------------------------------------------------------------------------ planning
@dataclass(frozen=True)
class Plan:
    """What the planner chose: prompts per forward (``batch_size``), stacked rows per forward for
    blocking (``max_rows``), the [chunk, vocab] logits budget (``chunk_bytes``, attribution's
    ``budget_bytes``), the estimated ``peak`` and the ``budget`` it had."""

    kind: str
    batch_size: int
    max_rows: int
    chunk_bytes: int
    peak: int
    budget: int
    estimate: Estimate

    def __str__(self) -> str:
        return (f"{self.kind}: batch {self.batch_size}" + (f", {self.max_rows} rows" if self.kind == "blocking" else "")
                + f", chunk {format_bytes(self.chunk_bytes)}; estimated peak {format_bytes(self.peak)} "
                f"of {format_bytes(self.budget)}")


def _kind(kind: Any, neurons: str = "exact") -> str:
    """The heaviest :data:`KINDS` entry of ``kind``: a kind, a level, ``"attribution"`` or a list of levels."""
    if isinstance(kind, str) and kind in KINDS:
        return kind
    levels = ("layer", "head", "expert", "shared", "neuron") if kind == "attribution" else \
        (kind,) if isinstance(kind, str) else tuple(kind)
    order = ["layer", "shared", "expert", "head", f"neuron-{neurons}"]
    known = {"layer", "head", "expert", "shared", "neuron"}
    bad = [level for level in levels if level not in known]
    if bad or not levels:
        raise ValueError(f"unknown kind {kind!r}: give one of {KINDS}, 'attribution', or attribution levels "
                         f"{sorted(known)}")
    named = [f"neuron-{neurons}" if level == "neuron" else level for level in levels]
    return max(named, key=order.index)


def plan(model: Any, kind: Any, n_prompts: int, seq_len: int, max_memory: Any = None, *, neurons: str = "exact",
         fast_top: int = 100, shapes: ModelShapes | None = None) -> Plan:
    """Batch and chunk sizes for ``kind`` on ``n_prompts`` prompts of up to ``seq_len`` tokens under ``max_memory``.

    ``kind``: one of :data:`KINDS`, an attribution level or list of levels (the heaviest one is planned;
    ``neurons`` picks exact or fast), or ``"attribution"`` (every level). ``max_memory``: bytes or a size
    string; None: :func:`budget` (the :func:`limit` in effect, else the device's free memory minus a margin).
    Raises :class:`MemoryBudgetError` when even one prompt (one row) does not fit.
    """
    shapes = shapes or ModelShapes.of(model)
    kind = _kind(kind, neurons)
    total = budget(max_memory, shapes.device)
    n_prompts = max(1, int(n_prompts))
    device = "cuda" if shapes.device == "cuda" else "cpu"
    # the logits chunk: the largest of (2 GiB or a quarter of the budget, 64 vocabulary rows, one row) that
    # allows the largest batch; a chunk below one row of the vocabulary cannot be made
    one_row = 16 * shapes.vocab
    options = sorted({max(one_row, min(DEFAULT_CHUNK, total // 4)), min(64 * one_row, DEFAULT_CHUNK), one_row},
                     reverse=True)
    candidates = [(c, estimate(shapes, kind, seq_len, chunk_bytes=c, fast_top=fast_top)) for c in options]
    most = BLOCKING_ROWS_CAP[device] if kind == "blocking" else min(n_prompts, CAPS[device])
    fitting = {c: e.most_rows(total, most) for c, e in candidates}
    chunk_bytes, est = max(candidates, key=lambda ce: (fitting[ce[0]], ce[0]))
    if est.peak(1) > total:
        what = "one stacked row" if kind == "blocking" else "one prompt"
        raise MemoryBudgetError(
            f"{kind}: {what} of {seq_len} tokens needs about {format_bytes(est.peak(1))} of working memory "
            f"({format_bytes(est.fixed)} fixed + {format_bytes(est.per_row)} per prompt + {format_bytes(est.chunk(1))} "
            f"for one logits chunk) but the budget is {format_bytes(total)}; raise max_memory (--max-memory), "
            "shorten the prompts, or use a cheaper level (e.g. neurons='fast')")
    fits = fitting[chunk_bytes]
    rows = fits
    batch = min(rows, n_prompts, CAPS[device])
    return Plan(kind, int(batch), int(rows), int(chunk_bytes), est.peak(rows), total, est)


def choose_batch_size(model: Any, n_prompts: int, seq_len: int, kind: Any, max_memory: Any = None) -> int:
    """Prompts per forward for ``kind`` under ``max_memory`` (:func:`plan`'s ``batch_size``); the recipe
    runner's ``batch_size="auto"``."""
    return plan(model, kind, n_prompts, seq_len, max_memory).batch_size


def max_length(prompts: Sequence, tokenizer: Any = None) -> int:
    """The longest prompt in tokens (strings through ``tokenizer``; token-id lists as they are), at least 1."""
    if not len(prompts):
        return 1
    if isinstance(prompts[0], str):
        if tokenizer is None:
            raise ValueError("string prompts need a tokenizer= to plan memory; or pass lists of token ids")
        return max(1, max(len(ids) for ids in tokenizer(list(prompts))["input_ids"]))
    return max(1, max(len(p) for p in prompts))


def _largest(config: Any, name: str) -> Any:
    """``config.<name>``; for a per-layer attribute of a heterogeneous config (Gemma-4's ``head_dim``, which
    refuses a global read) the largest per-layer value, which bounds the memory of every layer."""
    try:
        return getattr(config, name, None)
    except Exception:  # transformers' AmbiguousGlobalPerLayerAttributeError
        per_layer = getattr(config, "per_layer_config")
        return max(getattr(per_layer[i], name) for i in range(int(config.num_hidden_layers)))
