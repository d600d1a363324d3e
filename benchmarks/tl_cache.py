"""run_with_cache cost of the MoE hook points on a TransformerBridge (medium OLMoE-shaped config).

    python benchmarks/tl_cache.py [--repeats 7] [--threads 2]

Measured in one run on one bridge, alternating the conditions so that load from other processes
falls on both alike (median of ``--repeats`` timed calls each, after a warm-up):

* ``tl``: the bridge NOT attached, ``run_with_cache`` of every TransformerLens hook (the baseline);
* ``all``: the bridge attached, ``run_with_cache`` of every hook, TransformerLens' and ours;
* ``ours``: the bridge attached, ``run_with_cache`` of our hook points only (names_filter).

The target (issue 3) is ``all / tl <= 1.3``. The script also checks that the cached
``hook_expert_out`` is the sparse [b, p, k, d_model] tensor, never [b, p, E, d_model].
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import nnsight_moe  # noqa: E402
from nnsight_moe import tl  # noqa: E402
from nnsight_moe.testing import MEDIUM, medium_model  # noqa: E402



def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pos", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = medium_model("olmoe")
    bridge = tl.boot(model)  # attached
    handle = nnsight_moe.handle_of(bridge)
    ours = {tl.tl_hook_name(i, n) for i in handle.layout.moe_layers for n in handle.layout.layer(i).hook_names}
    ids = torch.randint(0, MEDIUM["vocab_size"], (args.batch, args.pos), generator=torch.Generator().manual_seed(0))

    def run(names_filter=None):
        _, cache = bridge.run_with_cache(ids, names_filter=names_filter)
        return cache

    with torch.no_grad():
        cache = run()
        b, p = ids.shape
        shape = tuple(cache["blocks.0.mlp.hook_expert_out"].shape)
        assert shape == (b, p, MEDIUM["num_experts_per_tok"], MEDIUM["hidden_size"]), shape
        n_all = len(cache)
        handle.detach()
        n_tl = len(run())
        times: dict[str, list[float]] = {"tl": [], "all": [], "ours": []}
        for _ in range(args.repeats):
            times["tl"].append(_time(run))
            handle = nnsight_moe.attach(bridge)
            times["all"].append(_time(run))
            times["ours"].append(_time(lambda: run(lambda name: name in ours)))
            handle.detach()

    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"medium OLMoE-shaped bridge, batch {b}x{p}, {args.threads} threads, median of {args.repeats}")
    print(f"  tl   (not attached, {n_tl} TL hooks cached):          {median['tl'] * 1e3:8.1f} ms")
    print(f"  all  (attached, {n_all} hooks cached, {len(ours)} ours):   {median['all'] * 1e3:8.1f} ms")
    print(f"  ours (attached, only our {len(ours)} hooks cached):      {median['ours'] * 1e3:8.1f} ms")
    print(f"  hook_expert_out cached as {list(shape)} (sparse [b, p, k, d_model])")
    print(f"ratio all / tl = {median['all'] / median['tl']:.3f} (target <= 1.3)")


if __name__ == "__main__":
    main()
