"""Wall time of ``nnsight-moe`` invocations that must answer at once (target: < 1 s each).

    python benchmarks/cli_latency.py [--repeats 5]

Runs, as separate processes (the console script, so interpreter start-up is included): ``--help``,
``--version``, a usage error (``runn``), ``run --help``, and ``inspect --model demo_moe`` offline (an
unknown model name: it must fail with the demo names, without the hub's retries). Prints the median
and the worst time of each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "--help": ["--help"],
    "--version": ["--version"],
    "usage error (runn)": ["runn"],
    "run --help": ["run", "--help"],
    "unknown model, offline": ["inspect", "--model", "demo_moe"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    # the script installed with this interpreter (a PATH lookup may find another install)
    script = Path(sys.executable).with_name("nnsight-moe")
    script = str(script) if script.exists() else shutil.which("nnsight-moe")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    print(f"{'invocation':28s} {'median s':>9s} {'max s':>7s}")
    for label, argv in CASES.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run([script, *argv], capture_output=True, env=env, check=False)
            times.append(time.perf_counter() - start)
        flag = "" if max(times) < 1 else "  (over 1 s)"
        print(f"{label:28s} {statistics.median(times):9.3f} {max(times):7.3f}{flag}")


if __name__ == "__main__":
    main()
