"""Memory planner: sizes from the model's shapes, batch_size="auto" under a budget, and the up-front error."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from nnsight_moe import memory
from nnsight_moe.recipes import blocking
from nnsight_moe.recipes.attribution import attribute
from nnsight_moe.testing import tiny_model

PROMPTS = [[5, 9, 17, 33, 2], [7, 8, 9], [11, 12, 13, 14, 15, 16], [20, 21], [30, 31, 32, 33]]
TARGETS = [3, 40, 77, 90, 12]
KEY = ["prompt", "layer", "level", "head", "expert", "neuron"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2_moe")  # routed + shared experts: every level has rows


def _forward_counter(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle


def test_parse_size():
    assert memory.parse_size("8GiB") == 8 << 30
    assert memory.parse_size("500MB") == 500 * 10**6
    assert memory.parse_size("1.5G") == 1_500_000_000
    assert memory.parse_size(" 64 kib ") == 64 << 10
    assert memory.parse_size(123) == 123
    for bad in ("8 parsecs", "", "-1GB", "0", True, -5):
        with pytest.raises(ValueError, match="memory size"):
            memory.parse_size(bad)


def test_shapes_and_estimates_follow_the_model(model):
    shapes = memory.ModelShapes.of(model)
    assert (shapes.d_model, shapes.n_layers, shapes.vocab) == (64, 3, 128)
    assert (shapes.n_experts, shapes.top_k, shapes.d_expert, shapes.d_shared) == (8, 2, 32, 48)
    assert shapes.n_neurons == 3 * (2 * 32 + 48)
    per = {kind: memory.estimate(shapes, kind, 8).per_row for kind in memory.KINDS}
    assert per["neuron-exact"] > per["layer"] > per["forward"]  # neurons keep float32 W_down rows per prompt
    assert memory.estimate(shapes, "layer", 64).per_row > per["layer"]  # longer prompts cost more
    wide = memory.ModelShapes(**{**shapes.__dict__, "vocab": 50_000})
    assert memory.estimate(wide, "layer", 8).per_row > per["layer"] + 50_000 * 4  # last-position logits
    with pytest.raises(ValueError, match="unknown kind"):
        memory.estimate(shapes, "neuron-slow", 8)


def test_heterogeneous_config_uses_the_widest_layer():
    """Gemma 4's global layers have a wider head_dim (a per-layer attribute transformers refuses to read
    globally): the shapes take the widest layer's, read off the attention projections here."""
    gemma = tiny_model("gemma4_text")
    shapes = memory.ModelShapes.of(gemma)
    widest_q = max(layer.self_attn.q_proj.out_features for layer in gemma.model.layers)
    widest_kv = max(layer.self_attn.k_proj.out_features for layer in gemma.model.layers)
    assert min(layer.self_attn.q_proj.out_features for layer in gemma.model.layers) < widest_q  # really mixed
    assert (shapes.d_attn, shapes.d_kv) == (widest_q, widest_kv)


def test_plan_grows_with_the_budget_and_caps(model):
    one = memory.estimate(memory.ModelShapes.of(model), "neuron-exact", 6, chunk_bytes=16 * 128)
    small = memory.plan(model, ["layer", "neuron"], 50, 6, max_memory=one.peak(2) + 1)
    assert small.batch_size == 2 and small.peak <= small.budget
    big = memory.plan(model, ["layer", "neuron"], 50, 6, max_memory="4GiB")
    assert big.batch_size == memory.CAPS["cpu"]
    assert memory.plan(model, "layer", 3, 6, max_memory="4GiB").batch_size == 3  # never more than the prompts
    rows = memory.plan(model, "blocking", 50, 6, max_memory="4GiB")
    assert rows.max_rows == memory.BLOCKING_ROWS_CAP["cpu"] and rows.batch_size == memory.CAPS["cpu"]
    with memory.limit("1KiB"):  # the job's budget reaches recipes planned inside it
        with pytest.raises(memory.MemoryBudgetError):
            memory.plan(model, "layer", 5, 6)


def test_auto_under_a_small_budget_equals_batch_size_one(model):
    shapes = memory.ModelShapes.of(model)
    length = max(map(len, PROMPTS))
    one = memory.estimate(shapes, "neuron-exact", length, chunk_bytes=16 * shapes.vocab)
    budget = one.peak(2) + one.per_row // 2  # room for two prompts, not three
    chosen = memory.plan(model, ("layer", "head", "expert", "shared", "neuron"), len(PROMPTS), length, budget)
    assert chosen.batch_size == 2
    calls, handle = _forward_counter(model)
    try:
        auto = attribute(model, PROMPTS, TARGETS, batch_size="auto", max_memory=budget, progress=False).to_frame()
        n_auto = len(calls)
        single = attribute(model, PROMPTS, TARGETS, batch_size=1, progress=False).to_frame()
    finally:
        handle.remove()
    assert n_auto == 3  # ceil(5 / 2) forwards: the budget really batched
    merged = auto.merge(single, on=KEY, suffixes=("_auto", "_one"))
    assert len(merged) == len(auto) == len(single) > 0
    torch.testing.assert_close(torch.tensor(merged["score_auto"].to_numpy()),
                               torch.tensor(merged["score_one"].to_numpy()), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("levels", [("neuron",), ("layer", "head")])
def test_impossible_budget_fails_before_any_forward(model, levels):
    calls, handle = _forward_counter(model)
    try:
        with pytest.raises(memory.MemoryBudgetError) as err:
            attribute(model, PROMPTS, TARGETS, levels=levels, max_memory="4KiB", progress=False)
    finally:
        handle.remove()
    assert calls == []
    text = str(err.value)
    level = "neuron-exact" if "neuron" in levels else "head"
    assert text.startswith(f"{level}: one prompt of 6 tokens needs about ") and "budget is 4.00 KiB" in text
    assert isinstance(err.value, ValueError)  # the CLI prints it as a one-line error


def test_blocking_auto_equals_explicit_batches(model):
    data = (PROMPTS, torch.tensor(TARGETS))
    conditions = [[], [(0, 1)], [(1, 2), (2, 3)]]
    auto = blocking.evaluate(model, data, conditions, progress=False)
    explicit = blocking.evaluate(model, data, conditions, batch_size=1, stacked=False, progress=False)
    assert torch.equal(auto, explicit)
    calls, handle = _forward_counter(model)
    try:
        with memory.limit("2KiB"), pytest.raises(memory.MemoryBudgetError, match="blocking: one stacked row"):
            blocking.evaluate(model, data, conditions, progress=False)
    finally:
        handle.remove()
    assert calls == []


def test_cli_reads_sizes_and_auto():
    from click.testing import CliRunner

    from nnsight_moe.cli import main

    result = CliRunner().invoke(main, ["run", "--max-memory", "lots", "--out", "/nonexistent/x"])
    assert result.exit_code == 2 and "cannot read the memory size 'lots'" in result.output
    result = CliRunner().invoke(main, ["run", "--batch-size", "some"])
    assert result.exit_code == 2 and "neither a positive integer nor 'auto'" in result.output


def test_job_plans_before_compute(tmp_path, monkeypatch):
    from nnsight_moe.job import run_job

    with pytest.raises(memory.MemoryBudgetError, match="^neuron-fast: one prompt"):
        run_job("demo-moe", out=tmp_path, quick=True, max_memory="1KiB")
    assert not (tmp_path / "results.json").exists()
