"""nnsight_moe.threads: one thread for small models unless a count is requested; clear errors."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from nnsight_moe import threads
from nnsight_moe.cli import main


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", threads.ENV):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(before)


def test_precedence(clean_env):
    small = torch.nn.Linear(4, 4)
    torch.set_num_threads(2)
    assert threads.configure(model=small) == 1                 # small model, nothing requested
    assert threads.configure(3, model=small) == 3              # explicit count wins
    clean_env.setenv(threads.ENV, "2")
    assert threads.configure(model=small) == 2                 # then the environment variable
    assert threads.configure(1) == 1
    clean_env.delenv(threads.ENV)
    clean_env.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    assert threads.configure(model=small) == 2                 # a count chosen through OMP is left alone


def test_large_models_keep_torchs_default(clean_env, monkeypatch):
    monkeypatch.setattr(threads, "SMALL_MODEL_PARAMS", 10)
    torch.set_num_threads(2)
    assert threads.configure(model=torch.nn.Linear(4, 4)) == 2


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_counts_name_the_value(clean_env, value):
    clean_env.setenv(threads.ENV, value)
    with pytest.raises(ValueError, match=rf"NNSIGHT_MOE_THREADS='{value}'.*positive integer"):
        threads.requested()
    with pytest.raises(ValueError, match="threads=0"):
        threads.requested(0)


def test_cli_threads_option():
    result = CliRunner().invoke(main, ["run", "--threads", "0"])
    assert result.exit_code == 2 and "--threads" in result.output
    assert "NNSIGHT_MOE_THREADS" in CliRunner().invoke(main, ["run", "--help"]).output


def test_demo_load_uses_one_thread(clean_env):
    from nnsight_moe import demo

    torch.set_num_threads(2)
    demo.load("demo-moe")
    assert torch.get_num_threads() == 1
