"""Benchmark: blocking conditions stacked along the batch vs naive per-condition loops (CPU or GPU).

    python benchmarks/blocking_sweep.py [--prompts 64] [--threads 2] [--repeats 2] [--skip-single]

Model: a randomly initialised OLMoE-shaped "medium" config (d_model 512, 32 experts, top-8, 4 layers,
expert width 256, vocab 1024; ``nnsight_moe.testing.medium_model("olmoe", ...)``) on ``--prompts`` random
prompts of 8-16 tokens. Sweep: 3 modes (zero, renorm, reroute) x 13 conditions (top-1/5/10 of a
gate-weight ranking + 5 uniform and 5 per-layer-matched random draws of 10 experts) = 39 conditions.

Executions timed (each computes the same target ranks; equality is asserted):

* ``stacked``: :func:`nnsight_moe.recipes.blocking.evaluate` defaults, 16 prompts per tokenized batch,
  conditions stacked along the batch up to 64 rows per forward;
* ``per-condition, 16 prompts per forward``: the same batches, one condition at a time
  (``stacked=False``, :func:`nnsight_moe.block_experts` per condition);
* ``per-condition, all prompts per forward``: one forward per condition over every prompt;
* ``per-condition x per-prompt``: C x P single-prompt forwards (the naive loop the recipe replaces).
"""

from __future__ import annotations

import argparse
import time

import torch

from nnsight_moe.recipes import blocking
from nnsight_moe.testing import medium_model

MODES = ("zero", "renorm", "reroute")


def conditions(model, ranking) -> list[list[tuple[int, int]]]:
    """top-1, top-5, top-10, then 5 uniform and 5 matched random draws of the top-10's size."""
    top = [sorted(ranking.overall[:n]) for n in (1, 5, 10)]
    randoms = [blocking.random_pairs(model, top[-1], kind, seed=s, reroute=True)
               for kind in blocking.BASELINES for s in range(5)]
    return top + randoms


def main() -> None:
    """Build the medium model and prompts, time every execution of the same 39 conditions, print ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64, help="number of prompts (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--skip-single", action="store_true", help="skip the C x P single-prompt loop (slow)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds over all executions, interleaved; the fastest round counts (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = medium_model("olmoe", intermediate_size=256, vocab_size=1024).to(device)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 17, (args.prompts,), generator=g).tolist()
    data = ([torch.randint(3, 1024, (n,), generator=g).tolist() for n in lengths],
            torch.randint(3, 1024, (args.prompts,), generator=g))
    ranking = blocking.rank_experts(model, data, by="gate", progress=False)
    conds = conditions(model, ranking)
    runs = {
        "stacked (16 prompts x 4 conditions = 64 rows per forward)": dict(),
        "per-condition, 16 prompts per forward": dict(stacked=False),
        f"per-condition, {args.prompts} prompts per forward": dict(stacked=False, batch_size=args.prompts),
    }
    if not args.skip_single:
        runs["per-condition x per-prompt (C x P single forwards)"] = dict(stacked=False, batch_size=1)
    timings, ranks = {name: float("inf") for name in runs}, {}
    for _ in range(args.repeats):  # interleaved rounds: a burst of load on a shared machine hits one round
        for name, options in runs.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            ranks[name] = [blocking.evaluate(model, data, conds, mode=mode, progress=False, **options) for mode in MODES]
            if device == "cuda":
                torch.cuda.synchronize()
            timings[name] = min(timings[name], time.perf_counter() - start)
    first = next(iter(ranks.values()))
    for name, found in ranks.items():
        assert all(torch.equal(a, b) for a, b in zip(first, found)), f"{name} disagrees with stacked"
    print(f"medium OLMoE-shaped model on {device} ({args.threads} threads): d_model 512, 32 experts top-8, 4 layers; "
          f"{args.prompts} prompts; {len(MODES)} modes x {len(conds)} conditions = {len(MODES) * len(conds)}; "
          f"best of {args.repeats} interleaved rounds")
    stacked = next(iter(timings.values()))
    for name, seconds in timings.items():
        print(f"  {name:<62} {seconds:7.2f} s   {seconds / stacked:5.2f}x the stacked time")


if __name__ == "__main__":
    main()
