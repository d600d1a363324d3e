"""Attached vs unattached forward time on a medium CPU MoE config (no hooks set).

    python benchmarks/overhead.py [--repeats 10]

Builds an OLMoE-shaped model (d_model 512, 32 experts, top-8, 4 layers) and times, in one run and
interleaved, the plain HF forward and the forward with ``nnsight_moe.attach`` on a batch of 4 x 128
tokens. Prints the median times and their ratio (target: <= 1.15x).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import nnsight_moe
from nnsight_moe.testing import medium_model


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--family", default="olmoe")
    args = parser.parse_args()
    model = medium_model(args.family)
    ids = torch.randint(0, 4096, (4, 128), generator=torch.Generator().manual_seed(0))
    run = lambda: model(ids)  # noqa: E731
    default_impl = model.config._experts_implementation
    run()  # warm-up, both paths
    with nnsight_moe.attached(model):
        run()
    plain, hooked = [], []
    for _ in range(args.repeats):  # interleaved, so machine noise hits both sides alike
        plain += _time(run, 1)
        with nnsight_moe.attached(model):
            hooked += _time(run, 1)
    p, h = statistics.median(plain), statistics.median(hooked)
    print(f"family={args.family} batch=4x128 d_model=512 E=32 k=8 layers=4 threads={torch.get_num_threads()}")
    print(f"HF forward (experts_implementation={default_impl!r}): {p * 1e3:8.1f} ms")
    print(f"attached forward, no hooks set:          {h * 1e3:8.1f} ms")
    print(f"ratio attached / unattached: {h / p:.3f}x (target <= 1.15x)")


if __name__ == "__main__":
    main()
