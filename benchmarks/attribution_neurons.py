"""Neuron-level LPI attribution cost on a medium OLMoE-shaped model (CPU), exact vs fast mode.

    python benchmarks/attribution_neurons.py [--prompts 4] [--vocab 8192] [--threads 2]

Model: OLMoE-shaped, random weights: d_model 512, 4 layers, 32 experts, top-8, d_expert 512, so
4 x 8 x 512 = 16,384 routed neurons are scored per prompt, each an exact [vocab x d_model]
log-softmax. Reported:

* the forward + capture alone (``levels=("layer",)``), the fixed cost both modes pay;
* exact mode under the default 2 GiB budget: seconds per prompt, peak RSS growth of the process;
* fast mode (first-order screen of every neuron, exact LPI of the top ``--fast-top`` per prompt and
  layer): seconds per prompt and speed-up over exact (target >= 10x);
* how well fast mode keeps the exact ranking: per prompt, the exact top-100 neurons by |LPI| over all
  layers; overlap = share of them that fast mode returns; Spearman = rank correlation between the exact
  order of those 100 and the order fast mode gives them (neurons fast mode dropped rank last, tied).
  Targets >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from nnsight_moe.recipes.attribution import attribute  # noqa: E402
from nnsight_moe.testing import medium_model  # noqa: E402

KEY = ["layer", "expert", "neuron"]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _agreement(exact: pd.DataFrame, fast: pd.DataFrame, top: int = 100) -> tuple[float, float]:
    """Mean over prompts of (top-``top`` overlap, Spearman of the exact top-``top`` as fast mode ranks it)."""
    overlaps, rhos = [], []
    for p, mine in exact.groupby("prompt"):
        best = mine.assign(a=mine["score"].abs()).nlargest(top, "a")
        theirs = fast[fast["prompt"] == p].set_index(KEY)["score"].abs()
        found = [theirs.get(tuple(k), float("nan")) for k in best[KEY].itertuples(index=False)]
        fast_order = pd.Series(found).fillna(-1.0)  # dropped neurons rank last
        overlaps.append(float(pd.Series(found).notna().mean()))
        rhos.append(float(spearmanr(best["a"].to_numpy(), fast_order.to_numpy()).statistic))
    return sum(overlaps) / len(overlaps), sum(rhos) / len(rhos)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--length", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--fast-top", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = medium_model("olmoe", vocab_size=args.vocab, intermediate_size=512)  # 16,384 neurons per prompt
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, args.vocab, (args.prompts, args.length), generator=g).tolist()
    options = dict(levels=("neuron",), batch_size=args.prompts, progress=False)
    attribute(model, prompts[:1], "predicted", **options, neurons="fast")  # warm-up

    start = time.perf_counter()
    attribute(model, prompts, "predicted", **{**options, "levels": ("layer",)})
    t_forward = (time.perf_counter() - start) / args.prompts

    rss0 = _peak_rss_mib()
    start = time.perf_counter()
    exact = attribute(model, prompts, "predicted", **options).to_frame()
    t_exact = (time.perf_counter() - start) / args.prompts
    rss_exact = _peak_rss_mib() - rss0

    start = time.perf_counter()
    fast = attribute(model, prompts, "predicted", **options, neurons="fast", fast_top=args.fast_top).to_frame()
    t_fast = (time.perf_counter() - start) / args.prompts
    overlap, rho = _agreement(exact, fast)

    n_neurons = len(exact) // args.prompts
    print(f"model: OLMoE-shaped d_model 512, 4 layers, 32 experts top-8, d_expert 512, vocab {args.vocab}; "
          f"{args.prompts} prompts x {args.length} tokens, {args.threads} threads")
    print(f"neurons scored per prompt (exact): {n_neurons}")
    print(f"forward + capture alone (levels=('layer',)): {t_forward:.3f} s/prompt")
    print(f"exact: {t_exact:.2f} s/prompt, peak RSS growth {rss_exact:.0f} MiB (budget 2 GiB)")
    print(f"fast (top {args.fast_top} per prompt and layer): {t_fast:.3f} s/prompt, speed-up {t_exact / t_fast:.1f}x "
          f"end to end, {(t_exact - t_forward) / max(t_fast - t_forward, 1e-9):.1f}x on the neuron scoring "
          "(forward subtracted)")
    print(f"exact top-100 kept by fast mode: overlap {overlap:.3f}, Spearman {rho:.3f}")


if __name__ == "__main__":
    main()
