"""Speed and memory at the TRUE widths, experts, top-k and vocabulary of OLMoE-1B-7B, Qwen1.5-MoE-A2.7B, Mixtral-8x7B.

    python benchmarks/real_shapes.py [--quick] [--device cuda] [--models olmoe,qwen,mixtral] [--dtypes bf16,fp32]

Random-weight models (transformers' own init) with the real configs but only a few decoder layers (2;
Mixtral fp32 on a CPU: 1, its 2 layers would be 11.3 GiB), then, measured in ONE run (the machine is
shared: ratios are taken within the run, ``torch.set_num_threads(1)``, the load average is printed):

* forward time, unattached (transformers' ``grouped_mm`` experts) vs attached with no hooks set;
* ``run_with_cache`` of every hook on a TransformerBridge: TransformerLens' own hooks (not attached) vs
  TransformerLens' plus ours (attached);
* attribution per prompt at each level (layer, head, expert, shared, neuron fast, neuron exact): seconds and
  peak working memory (peak RSS growth on CPU, ``torch.cuda.max_memory_allocated`` growth on CUDA) against
  the memory planner's estimate (:mod:`nnsight_moe.memory`). Exact neurons at real vocabulary cost one
  [V x D] product per neuron (minutes per prompt at full depth on a CPU), so they are ESTIMATED: the fast
  run plus the exact LPI of the neurons it skips at the measured seconds per row of the exact path's
  chunks (``lpi`` on 256 rows at this V and D); the estimate is checked against a full exact run of one
  prompt on OLMoE bf16 at 1 layer (8,192 neurons);
* one blocking sweep condition: stacked (4 conditions x P prompts per forward) vs a per-condition loop that
  batches its P prompts, and forward time vs rows ``t = a + b * rows`` (the fixed cost ``a`` is what
  stacking saves: on a GPU, where ``a`` dominates, the projection follows);
* full depth: each time ``t(L) = t0 + L * t_layer`` fitted on the model's runs at 1 and 2 layers (the
  2-layer model with its last layer dropped), checked on OLMoE with 1, 2, 3 layers; peak memory grows by
  the planner's per-layer terms (KV cache, neuron rows);
* fast-neuron agreement with exact on demo-moe (trained weights): top-100 overlap and Spearman;
* the planner's chosen batch sizes at full depth for 8 GiB and 64 GiB of working memory.

``--quick`` (the default) keeps every step short: 2 prompts x 16 tokens for attribution, 2 x 32 for the
forward timings. Expect ~10 minutes on 2 loaded CPU cores, well under one on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import sys
import time
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # glibc: big tensors mmapped and unmapped on free, so that the
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 17)  # peak RSS growth is the peak working memory
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import nnsight_moe  # noqa: E402
from nnsight_moe import memory  # noqa: E402
from nnsight_moe.recipes import blocking  # noqa: E402
from nnsight_moe.recipes.attribution import attribute  # noqa: E402

SPECS = {
    "olmoe": dict(name="OLMoE-1B-7B", family="olmoe", depth=16, config=dict(
        hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=50304, norm_topk_prob=False)),
    "qwen": dict(name="Qwen1.5-MoE-A2.7B", family="qwen2_moe", depth=24, config=dict(
        hidden_size=2048, moe_intermediate_size=1408, shared_expert_intermediate_size=5632, intermediate_size=5632,
        num_experts=60, num_experts_per_tok=4, num_attention_heads=16, num_key_value_heads=16, vocab_size=151936,
        norm_topk_prob=False)),
    "mixtral": dict(name="Mixtral-8x7B", family="mixtral", depth=32, config=dict(
        hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000)),
}
#: not in the default run: a small OLMoE-shaped config that smoke-tests this script in seconds
SPECS["small"] = dict(name="small OLMoE-shaped", family="olmoe", depth=4, config=dict(
    hidden_size=128, intermediate_size=64, num_experts=8, num_experts_per_tok=2, num_attention_heads=4,
    num_key_value_heads=4, vocab_size=1024, norm_topk_prob=False))
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LEVELS = ["layer", "head", "expert", "shared", "neuron-fast", "neuron-exact"]
MiB = 1 << 20


# ------------------------------------------------------------------------------------ measuring
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


@contextmanager
def peak(device, out: dict):
    """``out["bytes"]`` = peak working memory of the block: CUDA allocator peak growth, or peak RSS growth
    (VmHWM reset through /proc/self/clear_refs) on CPU."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS")
    start = time.perf_counter()
    yield
    sync(device)
    out["s"] = time.perf_counter() - start
    out["bytes"] = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status("VmHWM")) - base


def timed(fn, device, repeats: int = 1) -> float:
    """Median seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------------------------ models
def build(key: str, layers: int, dtype, device):
    """A random-weight model of ``key``'s true shapes with ``layers`` decoder layers (transformers' own init)."""
    spec = SPECS[key]
    config = AutoConfig.for_model(spec["family"], num_hidden_layers=layers, max_position_embeddings=4096,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, **spec["config"])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def drop_last_layer(model):
    """The same model with its last decoder layer removed (in place): the 1-layer point of the depth fit."""
    config = model.config
    model.model.layers = model.model.layers[:-1]
    config.num_hidden_layers -= 1
    for key in ("layer_types", "mlp_only_layers"):
        value = getattr(config, key, None)
        if isinstance(value, list) and key == "layer_types":
            setattr(config, key, value[: config.num_hidden_layers])
    return model


def prompts_of(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


# ------------------------------------------------------------------------------------ rows
def forward_rows(model, device, args) -> dict:
    """Unattached vs attached forward (no hooks), interleaved; seconds."""
    vocab = model.config.vocab_size
    ids = torch.tensor(prompts_of(vocab, args.batch, args.pos, seed=1), device=device)
    keep = {"logits_to_keep": 1}
    run = lambda: model(ids, **keep)  # noqa: E731
    with torch.no_grad():
        run()
        with nnsight_moe.attached(model):
            run()
        plain, hooked = [], []
        for _ in range(args.repeats):
            plain.append(timed(run, device))
            with nnsight_moe.attached(model):
                hooked.append(timed(run, device))
    return {"plain": statistics.median(plain), "attached": statistics.median(hooked)}


def rows_scaling(model, device, args) -> tuple[float, float]:
    """Forward time vs batch rows at the blocking prompt length: (a, b) of t = a + b * rows, from 1 and P*4 rows."""
    vocab = model.config.vocab_size
    out = {}
    with torch.no_grad(), nnsight_moe.attached(model):
        for rows in (1, args.prompts * 4):
            ids = torch.tensor(prompts_of(vocab, rows, args.length, seed=2), device=device)
            model(ids, logits_to_keep=1)
            out[rows] = timed(lambda: model(ids, logits_to_keep=1), device, repeats=2)
    big = args.prompts * 4
    b = (out[big] - out[1]) / (big - 1)
    return out[1] - b, b


def attribution_rows(model, device, args, exact_full: bool) -> dict:
    """Per level: seconds per prompt, peak working memory, the planner's estimate for that batch.

    Exact neurons (``neuron-exact``): estimated as the fast run plus the exact LPI of the neurons it skips,
    at the measured cost of one row of the exact path's chunks (:func:`exact_row_seconds`); with
    ``exact_full`` also run in full on one prompt (``neuron-exact-measured``), which checks the estimate.
    """
    prompts = prompts_of(model.config.vocab_size, args.prompts, args.length)
    shapes = memory.ModelShapes.of(model)
    result = {}
    opts = dict(progress=False)
    attribute(model, prompts[:1], "predicted", levels=("layer",), batch_size=1, **opts)  # warm-up
    for level in LEVELS:
        if level == "shared" and not shapes.d_shared or level == "neuron-exact" and not exact_full:
            continue
        got = {}
        kw = dict(levels=("neuron",), neurons=level.split("-")[1]) if level.startswith("neuron") else dict(levels=(level,))
        batch = prompts[:1] if level == "neuron-exact" else prompts
        with peak(device, got):
            attribute(model, batch, "predicted", batch_size=len(batch), **kw, **opts)
        est = memory.estimate(shapes, level, args.length).peak(len(batch))
        result[level + ("-measured" if level == "neuron-exact" else "")] = {
            "s": got["s"] / len(batch), "bytes": got["bytes"], "est": est}
    units = shapes.n_moe_layers * (2 if shapes.d_shared else 1) + shapes.n_dense_layers
    kept = min(shapes.n_neurons, 100 * units)  # fast mode's exact rows per prompt (fast_top=100)
    seconds = result["neuron-fast"]["s"] + (shapes.n_neurons - kept) * exact_row_seconds(model, device, len(prompts))
    result["neuron-exact"] = {"s": seconds, "bytes": float("nan"),
                              "est": memory.estimate(shapes, "neuron-exact", args.length).peak(len(prompts))}
    return result


def exact_row_seconds(model, device, n_prompts: int, rows: int = 256) -> float:
    """Seconds per contribution row of exact LPI at this vocabulary and width: one chunk through
    :func:`nnsight_moe.recipes.attribution.lpi` (a [rows, D] x [D, V] product and a log-softmax)."""
    from nnsight_moe.recipes.attribution import Readout, lpi

    unembed = model.get_output_embeddings().weight.float()
    vocab, width = unembed.shape
    g = torch.Generator(device=device).manual_seed(6)
    ro = Readout(unembed, torch.ones(width, device=device), torch.ones(n_prompts, 1, device=device), None,
                 torch.zeros(n_prompts, dtype=torch.long, device=device))
    base = torch.randn(n_prompts, width, device=device, generator=g)
    contrib = torch.randn(rows, width, device=device, generator=g)
    which = torch.arange(rows, device=device) % n_prompts
    with torch.no_grad():
        lpi(ro, base, contrib[:8], which[:8])  # warm-up
        return timed(lambda: lpi(ro, base, contrib, which), device) / rows


def cache_rows(model, device, args) -> dict:
    """run_with_cache of every hook: TL's own (bridge not attached) vs TL's + ours (attached); seconds."""
    from nnsight_moe import tl

    bridge = tl.boot(model)
    handle = nnsight_moe.handle_of(bridge)
    ids = torch.tensor(prompts_of(model.config.vocab_size, args.batch, args.pos, seed=3), device=device)
    run = lambda: bridge.run_with_cache(ids)  # noqa: E731
    with torch.no_grad():
        n_all = len(run()[1])
        handle.detach()
        n_tl = len(run()[1])
        tl_times, all_times = [], []
        for _ in range(args.repeats):
            tl_times.append(timed(run, device))
            handle = nnsight_moe.attach(bridge)
            all_times.append(timed(run, device))
            handle.detach()
    return {"tl": statistics.median(tl_times), "all": statistics.median(all_times), "n_tl": n_tl, "n_all": n_all}


def blocking_rows(model, device, args) -> dict:
    """One sweep of 4 conditions (one expert per MoE layer each) on P prompts: stacked vs per condition.

    Targets are the unblocked model's own predictions (rank 1 unblocked), so ranks are small numbers and
    their agreement between the two executions means something in bf16.
    """
    layout = nnsight_moe.layout(model)
    g = torch.Generator().manual_seed(4)
    conds = [[(i, int(torch.randint(0, layout.layer(i).n_experts, (1,), generator=g))) for i in layout.moe_layers]
             for _ in range(4)]
    prompts = prompts_of(model.config.vocab_size, args.prompts, args.length, seed=5)
    with torch.no_grad():
        targets = model(torch.tensor(prompts, device=device), logits_to_keep=1).logits[:, -1].argmax(-1).cpu()
    data = (prompts, targets)
    opts = dict(batch_size=args.prompts, progress=False)
    blocking.evaluate(model, data, conds[:1], **opts)  # warm-up
    out, ranks = {}, {}
    for name, extra in (("stacked", dict(max_rows=4 * args.prompts)), ("loop", dict(stacked=False))):
        sync(device)
        start = time.perf_counter()
        ranks[name] = blocking.evaluate(model, data, conds, **opts, **extra)
        sync(device)
        out[name] = time.perf_counter() - start
    # the same ranks up to the rounding of a different batch composition
    out["same_ranks"] = float((ranks["stacked"] == ranks["loop"]).float().mean())
    out["per_condition_prompt"] = out["stacked"] / (4 * args.prompts)
    return out


def stacking_gain(a: float, b: float, prompts: int, conditions: int) -> float:
    """Per-condition loop time / stacked time for t = a + b * rows: C (a + b P) / (a + b C P)."""
    return conditions * (a + b * prompts) / (a + b * conditions * prompts)


# ------------------------------------------------------------------------------------ depth fit
def fit(t1: float, t2: float) -> tuple[float, float]:
    """(t0, t_layer) of t(L) = t0 + L * t_layer through the 1- and 2-layer points, both kept >= 0 (on a
    loaded machine a 1-layer run can come out slower than the 2-layer one: then t(L) = t(2) * L / 2)."""
    per = t2 - t1
    if per <= 0:
        return 0.0, t2 / 2
    return max(0.0, t1 - per), per if t1 >= per else t2 / 2


def at_depth(t1: float, t2: float, depth: int) -> float:
    t0, per = fit(t1, t2)
    return t0 + depth * per


# ------------------------------------------------------------------------------------ one model
def run_model(key, dtype_name, device, args, free_gib) -> dict:
    dtype = DTYPES[dtype_name]
    layers = 2
    if key == "mixtral" and dtype_name == "fp32" and device.type == "cpu" and free_gib < 32:
        layers = 1  # 2 fp32 Mixtral layers are 11.3 GiB of weights: too much for a shared 24 GiB machine
    clock = [time.perf_counter()]

    def step(name):
        now = time.perf_counter()
        print(f"    {name}: {now - clock[0]:.0f} s", flush=True)
        clock[0] = now

    model = build(key, layers, dtype, device)
    res = {"layers": layers, "build_s": time.perf_counter() - clock[0],
           "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
           "shapes": memory.ModelShapes.of(model)}
    step(f"built {layers} layers")
    res["forward"] = {layers: forward_rows(model, device, args)}
    step("forward")
    res["attr"] = {layers: attribution_rows(model, device, args, exact_full=False)}
    step("attribution")
    res["blocking"] = blocking_rows(model, device, args)
    res["rows_ab"] = rows_scaling(model, device, args)
    step("blocking")
    if layers == 2:  # the 1-layer point of the depth fit, from the same weights
        drop_last_layer(model)
        res["forward"][1] = forward_rows(model, device, args)
        # 1 OLMoE layer x 8192 neurons x 50k vocabulary: a full exact run on one prompt checks the estimate
        res["attr"][1] = attribution_rows(model, device, args, exact_full=key == "olmoe" and dtype_name == "bf16")
        step("1-layer forward and attribution")
    res["cache"] = cache_rows(model, device, args)  # last: booting the bridge wraps the model in place
    step("run_with_cache")
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def set_depth(model, layers, full, layer_types):
    """Run ``model`` with its first ``layers`` decoder layers of ``full`` (the same weights)."""
    model.model.layers = torch.nn.ModuleList(full[:layers])
    model.config.num_hidden_layers = layers
    if isinstance(layer_types, list):
        model.config.layer_types = layer_types[:layers]


def depth_check(device, args, key: str = "olmoe", rounds: int = 3) -> dict:
    """OLMoE bf16 with 1, 2, 3 layers (the same weights), depths interleaved round by round so that load
    drift hits all alike: the fit through 1 and 2 predicts 3 (attached forward, fast-neuron attribution)."""
    model = build(key, 3, torch.bfloat16, device)
    full, layer_types = model.model.layers, getattr(model.config, "layer_types", None)
    prompts = prompts_of(model.config.vocab_size, args.prompts, args.length)
    ids = torch.tensor(prompts_of(model.config.vocab_size, args.batch, args.pos, seed=1), device=device)
    times = {L: ([], []) for L in (1, 2, 3)}
    for _ in range(rounds):
        for layers in (1, 2, 3):
            set_depth(model, layers, full, layer_types)
            with torch.no_grad(), nnsight_moe.attached(model):
                model(ids, logits_to_keep=1)
                times[layers][0].append(timed(lambda: model(ids, logits_to_keep=1), device))
            start = time.perf_counter()
            attribute(model, prompts, "predicted", levels=("layer", "expert", "neuron"), neurons="fast",
                      batch_size=len(prompts), progress=False)
            sync(device)
            times[layers][1].append((time.perf_counter() - start) / len(prompts))
    del model
    gc.collect()
    return {L: (statistics.median(f), statistics.median(a)) for L, (f, a) in times.items()}


def demo_agreement(top: int = 100) -> tuple[float, float, float]:
    """Fast vs exact neurons on demo-moe (trained weights): overlap, Spearman, exact / fast time."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from attribution_neurons import _agreement

    from nnsight_moe import data, demo

    model, tokenizer = demo.load("demo-moe")
    facts = [f for r in data.bundled() for f in r.facts()][::7][:16]
    encoded = data.encode_facts(tokenizer, facts)
    opts = dict(tokenizer=tokenizer, levels=("neuron",), progress=False)
    start = time.perf_counter()
    exact = attribute(model, encoded.prompts, encoded.targets, **opts).to_frame()
    t_exact = time.perf_counter() - start
    start = time.perf_counter()
    fast = attribute(model, encoded.prompts, encoded.targets, neurons="fast", fast_top=top, **opts).to_frame()
    t_fast = time.perf_counter() - start
    overlap, rho = _agreement(exact, fast, top=100)
    return overlap, rho, t_exact / t_fast


# ------------------------------------------------------------------------------------ printing
def fmt_s(s: float) -> str:
    if s != s:
        return "-"
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.1f} s"


def fmt_mib(b: float) -> str:
    return "-" if b != b else f"{b / MiB:.0f}"


def full_shapes(key, r) -> memory.ModelShapes:
    depth = SPECS[key]["depth"]
    return memory.ModelShapes(**{**r["shapes"].__dict__, "n_layers": depth, "n_moe_layers": depth})


def extrapolate(key, by_dtype, d, get):
    """``get(r, L)`` at full depth: the fit through this dtype's 1- and 2-layer runs; a dtype built with one
    layer takes the other dtype's fixed share t0 / t(1) for the same row."""
    r, depth = by_dtype[d], SPECS[key]["depth"]
    try:
        if r["layers"] == 2:
            return at_depth(get(r, 1), get(r, 2), depth)
        other = next(o for o in by_dtype.values() if o["layers"] == 2)
        share = max(0.0, fit(get(other, 1), get(other, 2))[0] / get(other, 1))
        return get(r, 1) * (share + (1 - share) * depth)
    except (KeyError, StopIteration):
        return float("nan")


def report(results: dict, check, agreement, device, args, load_start) -> None:
    print()
    print(f"machine: {device} ({torch.get_num_threads()} torch thread(s), {os.cpu_count()} cores visible), torch "
          f"{torch.__version__}; load average (1 min) at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f}")
    print(f"batches: forward / run_with_cache {args.batch} x {args.pos} tokens, median of {args.repeats} interleaved; "
          f"attribution and blocking {args.prompts} prompts x {args.length} tokens")
    print("columns: measured on the layers built | extrapolated to full depth (t0 + L * t_layer; memory: "
          "measured + the planner's per-layer growth)")
    for key, by_dtype in results.items():
        spec, c = SPECS[key], SPECS[key]["config"]
        print(f"\n== {spec['name']} ({spec['family']}): d_model {c['hidden_size']}, "
              f"{c.get('num_experts', c.get('num_local_experts'))} experts top-{c['num_experts_per_tok']}, expert width "
              f"{c.get('moe_intermediate_size', c['intermediate_size'])}"
              + (f", shared {c['shared_expert_intermediate_size']}" if "shared_expert_intermediate_size" in c else "")
              + f", vocab {c['vocab_size']}; full depth {spec['depth']} layers")
        dts = list(by_dtype)
        print(f"{'':46}" + "".join(f"{d + ' ' + str(by_dtype[d]['layers']) + 'L':>18}{d + ' ' + str(spec['depth']) + 'L':>12}"
                                   for d in dts))

        def row(label, cells):
            print(f"{label:46}" + "".join(f"{a:>18}{b:>12}" for a, b in cells))

        def timed_row(label, get, fmt=fmt_s):
            row(label, [(fmt(get(by_dtype[d], by_dtype[d]["layers"])), fmt(extrapolate(key, by_dtype, d, get)))
                        for d in dts])

        top = lambda r: r["layers"]  # noqa: E731
        row("weights built / build time", [(f"{r['weights_gib']:.1f} GiB / {r['build_s']:.0f} s", "") for r in by_dtype.values()])
        timed_row("forward, unattached (grouped_mm)", lambda r, L: r["forward"][L]["plain"])
        timed_row("forward, attached, no hooks set", lambda r, L: r["forward"][L]["attached"])
        row("  ratio attached / unattached (<= 1.10)",
            [(f"{r['forward'][top(r)]['attached'] / r['forward'][top(r)]['plain']:.3f}x", "") for r in by_dtype.values()])
        row("run_with_cache, TL hooks (bridge not attached)", [(f"{fmt_s(r['cache']['tl'])} ({r['cache']['n_tl']})", "")
                                                               for r in by_dtype.values()])
        row("run_with_cache, TL + ours (attached)", [(f"{fmt_s(r['cache']['all'])} ({r['cache']['n_all']})", "")
                                                     for r in by_dtype.values()])
        row("  ratio all / TL (<= 1.3)", [(f"{r['cache']['all'] / r['cache']['tl']:.3f}x", "") for r in by_dtype.values()])
        for level in LEVELS:
            if not all(level in r["attr"][top(r)] for r in by_dtype.values()):
                continue
            extra = " (estimated)" if level == "neuron-exact" else ""
            timed_row(f"attribution {level}, s / prompt{extra}", lambda r, L, level=level: r["attr"][L][level]["s"])
            if level != "neuron-exact":
                row("  peak MiB: measured / planner estimate", [(
                    f"{fmt_mib(r['attr'][top(r)][level]['bytes'])} / {fmt_mib(r['attr'][top(r)][level]['est'])}",
                    fmt_mib(r["attr"][top(r)][level]["bytes"] + memory.estimate(full_shapes(key, r), level, args.length)
                            .peak(args.prompts) - memory.estimate(r["shapes"], level, args.length).peak(args.prompts)))
                    for r in by_dtype.values()])
            else:
                row("  peak MiB: planner estimate", [(fmt_mib(r["attr"][top(r)][level]["est"]), fmt_mib(
                    memory.estimate(full_shapes(key, r), level, args.length).peak(args.prompts))) for r in by_dtype.values()])

        def speedup(r, L):
            return r["attr"][L]["neuron-exact"]["s"] / r["attr"][L]["neuron-fast"]["s"]

        def full_speedup(d):
            exact = extrapolate(key, by_dtype, d, lambda r, L: r["attr"][L]["neuron-exact"]["s"])
            return exact / extrapolate(key, by_dtype, d, lambda r, L: r["attr"][L]["neuron-fast"]["s"])

        row("fast vs exact neurons, end to end (>= 10x)",
            [(f"{speedup(by_dtype[d], top(by_dtype[d])):.0f}x", f"{full_speedup(d):.0f}x") for d in dts])
        for d in dts:
            one = by_dtype[d]["attr"].get(1, {})
            if "neuron-exact-measured" in one:
                got = one["neuron-exact-measured"]
                print(f"  check ({d}, 1 layer, 1 prompt): exact neurons measured {fmt_s(got['s'])} / prompt vs estimated "
                      f"{fmt_s(one['neuron-exact']['s'])}; peak {fmt_mib(got['bytes'])} MiB vs estimate "
                      f"{fmt_mib(got['est'])}; measured exact / fast {got['s'] / one['neuron-fast']['s']:.0f}x")
        row("blocking: 1 condition x 1 prompt (stacked)", [(fmt_s(r["blocking"]["per_condition_prompt"]), "")
                                                            for r in by_dtype.values()])
        row("  4 conditions: per-condition loop / stacked", [(f"{r['blocking']['loop'] / r['blocking']['stacked']:.2f}x", "")
                                                             for r in by_dtype.values()])
        row("  share of ranks equal, stacked vs loop", [(f"{r['blocking']['same_ranks']:.3f}", "") for r in by_dtype.values()])
        row("  forward t = a + b * rows: a / b", [(f"{fmt_s(r['rows_ab'][0])} / {fmt_s(r['rows_ab'][1])}", "")
                                                  for r in by_dtype.values()])
        row("  a + b*rows model, 16 prompts: 4 / 64 cond.", [(
            f"{stacking_gain(*r['rows_ab'], 16, 4):.2f}x / {stacking_gain(*r['rows_ab'], 16, 64):.2f}x", "")
            for r in by_dtype.values()])
        for d, r in by_dtype.items():
            for budget in ("8GiB", "64GiB"):
                plans = []
                for kind in ("layer", "neuron-fast", "neuron-exact", "blocking"):
                    try:
                        p = memory.plan(None, kind, 10_000, 16, budget, shapes=full_shapes(key, r))
                        fits = p.estimate.most_rows(p.budget, 1 << 20)
                        plans.append(f"{kind} {p.max_rows if kind == 'blocking' else p.batch_size} (fits {fits})")
                    except memory.MemoryBudgetError:
                        plans.append(f"{kind} does not fit")
                print(f"planner, {spec['depth']}L {d}, {budget} working memory, 16-token prompts: " + ", ".join(plans))
    if check:
        print("\n== depth rule t(L) = t0 + L * t_layer, fitted on OLMoE bf16 at 1 and 2 layers, predicting 3 layers "
              "(depths interleaved, median of 3 rounds)")
        for i, name in enumerate(("forward attached", "attribution layer+expert+neuron-fast, per prompt")):
            t1, t2, t3 = (check[L][i] for L in (1, 2, 3))
            pred = at_depth(t1, t2, 3)
            print(f"  {name:50} 1L {fmt_s(t1)}, 2L {fmt_s(t2)}, 3L measured {fmt_s(t3)}, predicted {fmt_s(pred)} "
                  f"({100 * (pred - t3) / t3:+.0f}%)")
    if agreement:
        overlap, rho, speed = agreement
        print(f"\n== demo-moe (trained weights), fast (top 100 per prompt and layer) vs exact neurons: exact top-100 "
              f"overlap {overlap:.3f}, Spearman {rho:.3f} (targets >= 0.9); exact / fast time {speed:.1f}x at demo size")


def main() -> None:
    import psutil

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=True, help="short runs (the default; the only mode)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--models", default="olmoe,qwen,mixtral", help="comma-separated subset of " + ",".join(SPECS))
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=2, help="attribution / blocking prompts")
    parser.add_argument("--length", type=int, default=16, help="attribution / blocking prompt length")
    parser.add_argument("--batch", type=int, default=2, help="forward / run_with_cache batch")
    parser.add_argument("--pos", type=int, default=32, help="forward / run_with_cache positions")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-depth-check", action="store_true")
    parser.add_argument("--no-demo", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_start = os.getloadavg()
    print(f"load average at start: {load_start}", flush=True)
    results = {}
    for key in [k for k in args.models.split(",") if k]:  # --models "" runs only the depth check and demo
        results[key] = {}
        for d in args.dtypes.split(","):
            free_gib = psutil.virtual_memory().available / 2**30
            print(f"[{time.strftime('%H:%M:%S')}] {SPECS[key]['name']} {d} (free RAM {free_gib:.1f} GiB, load "
                  f"{os.getloadavg()[0]:.2f}) ...", flush=True)
            results[key][d] = run_model(key, d, device, args, free_gib)
    check = None
    if not args.no_depth_check:
        print(f"[{time.strftime('%H:%M:%S')}] depth check ...", flush=True)
        check = depth_check(device, args, "small" if args.models == "small" else "olmoe")
    agreement = None
    if not args.no_demo:
        print(f"[{time.strftime('%H:%M:%S')}] demo-moe agreement ...", flush=True)
        agreement = demo_agreement()
    report(results, check, agreement, device, args, load_start)


if __name__ == "__main__":
    main()
