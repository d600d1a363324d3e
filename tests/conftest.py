"""Shared test setup: offline, deterministic, one CPU thread (NNSIGHT_MOE_THREADS=N for more).

Tiny test models gain nothing from more threads, and on a shared machine a second thread stalls every
forward whenever another process is busy (see nnsight_moe/threads.py).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("NNSIGHT_MOE_THREADS") or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
