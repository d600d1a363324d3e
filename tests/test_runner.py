"""The recipe runner (nnsight_moe.recipes.runner): padding, ordering, local vs traced, resume, bad input.

Oracles: each prompt run alone, unpadded, on the unmodified HF model; expert counts by plain loops
over ``hook_topk_indices`` of single-prompt runs.
"""

from __future__ import annotations

import functools
import sys

import nnsight
import pytest
import torch

import nnsight_moe
from nnsight_moe import memory
from nnsight_moe.recipes import runner
from nnsight_moe.remote import MoEView, RemoteBatchError
from nnsight_moe.testing import tiny_model

from helpers import language_model, word_tokenizer

# different lengths, so every batch of 3 is padded
PROMPTS = [[5, 9, 14, 3, 7], [11, 4], [6, 8, 10, 12], [20, 21, 22], [9], [30, 31, 32, 33, 34, 35]]
ATOL = 1e-5


def _last_logits(model, batch):
    """Local per-batch function: the logits at each row's last non-pad position."""
    logits = model(**runner.inputs(batch)).logits
    return logits[torch.arange(len(batch["rows"])), batch["last"]].float()


def _last_logits_traced(model, batch):
    """The same inside a trace (reads the output envoy)."""
    rows = torch.arange(batch["last"].shape[0])
    return model.output.logits[rows, batch["last"]].float()


def _alone(hf, prompts):
    """Oracle: each prompt alone, no padding."""
    with torch.no_grad():
        return torch.stack([hf(torch.tensor([p])).logits[0, -1].float() for p in prompts])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_either_side_equals_unpadded_single_prompts(side):
    hf = tiny_model("qwen2_moe")
    expected = _alone(hf, PROMPTS)
    results = runner.run(hf, PROMPTS, _last_logits, batch_size=3, padding_side=side, progress=False)
    assert len(results) == 2 and all(r.shape == (3, expected.shape[1]) for r in results)
    got = torch.cat(results)
    assert (got - expected).abs().max() < ATOL
    batches = runner.make_batches(PROMPTS, batch_size=3, padding_side=side)
    first = batches[0]["attention_mask"][1]  # prompt 1 (2 tokens) padded to 5
    assert first.tolist() == ([0, 0, 0, 1, 1] if side == "left" else [1, 1, 0, 0, 0])
    assert batches[0]["last"].tolist() == ([4, 4, 4] if side == "left" else [4, 1, 3])


def test_string_prompts_both_sides_and_per_prompt_values():
    hf = tiny_model("olmoe")
    tok = word_tokenizer()
    texts = [" ".join(f"w{i}" for i in p) for p in PROMPTS]
    expected = _alone(hf, tok(texts)["input_ids"])
    targets = torch.arange(len(PROMPTS)) + 40
    for side in ("left", "right"):
        batches = runner.make_batches(texts, tokenizer=tok, batch_size=4, padding_side=side,
                                      per_prompt={"target": targets, "name": list("abcdef")})
        assert [b["rows"] for b in batches] == [[0, 1, 2, 3], [4, 5]]
        assert batches[1]["target"].tolist() == [44, 45] and batches[1]["name"] == ["e", "f"]
        got = torch.cat(runner.run_batches(hf, batches, _last_logits, progress=False))
        assert (got - expected).abs().max() < ATOL


def test_transformer_bridge_batches_equal_unpadded_single_prompts(tmp_path):
    from nnsight_moe import tl

    word_tokenizer().save_pretrained(tmp_path)
    bridge = tl.boot(tiny_model("olmoe"), tokenizer=tmp_path)  # attached: our hooks are in the forward

    def last_logits(model, batch):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        return logits[torch.arange(len(batch["rows"])), batch["last"]].float()

    expected = _alone(tiny_model("olmoe"), PROMPTS)
    try:
        for side in ("left", "right"):
            got = torch.cat(runner.run(bridge, PROMPTS, last_logits, batch_size=4, padding_side=side, progress=False))
            assert (got - expected).abs().max() < ATOL
    finally:
        nnsight_moe.detach(bridge)


def test_results_come_back_in_batch_order():
    hf = tiny_model("olmoe")
    out = runner.run(hf, PROMPTS, lambda model, batch: {"index": batch["index"], "rows": batch["rows"]},
                     batch_size=4, progress=False)
    assert out == [{"index": 0, "rows": [0, 1, 2, 3]}, {"index": 1, "rows": [4, 5]}]


def test_statistics_mask_padding_like_single_prompt_counts():
    """Expert counts over non-pad tokens, left and right padded, equal plain loops over single prompts."""
    hf = tiny_model("olmoe")
    layout = nnsight_moe.layout(hf)
    E = layout.n_experts

    def counts(model, batch):
        seen = {}
        handle = nnsight_moe.handle_of(model)
        with nnsight_moe.hooks.TemporaryHooks() as added:
            for i in layout.moe_layers:
                added.add(handle.block(i).hook_topk_indices, lambda t, hook, i=i: seen.__setitem__(i, t))
            model(**runner.inputs(batch))
        keep = batch["attention_mask"].bool()
        return torch.stack([torch.bincount(seen[i][keep].reshape(-1), minlength=E) for i in layout.moe_layers])

    expected = torch.zeros(len(layout.moe_layers), E, dtype=torch.long)
    with nnsight_moe.attached(hf) as handle:
        for p in PROMPTS:
            seen = {}
            with nnsight_moe.hooks.TemporaryHooks() as added:
                for i in layout.moe_layers:
                    added.add(handle.block(i).hook_topk_indices, lambda t, hook, i=i: seen.__setitem__(i, t))
                hf(torch.tensor([p]))
            for row, i in enumerate(layout.moe_layers):
                for e in seen[i].reshape(-1).tolist():
                    expected[row, e] += 1
        for side in ("left", "right"):
            got = sum(runner.run(hf, PROMPTS, counts, batch_size=4, padding_side=side, progress=False))
            assert torch.equal(got, expected)


def test_traced_local_and_remote_local_equal_the_local_path():
    nnsight.register(sys.modules[__name__])  # the trace function ships by value, as a user's module would
    hf = tiny_model("deepseek_v3")
    lm = language_model(hf)
    local = torch.cat(runner.run(hf, PROMPTS, _last_logits, batch_size=4, progress=False))
    for remote in (False, "local"):
        traced = torch.cat(runner.run(lm, PROMPTS, _last_logits_traced, batch_size=4, remote=remote, progress=False))
        assert (traced - local).abs().max() < ATOL
    # through the MoE view: router scores at the last position equal the attached hooks
    view = MoEView(lm)
    fn = functools.partial(_scores_traced, view)
    remote = torch.cat(runner.run(lm, PROMPTS, fn, batch_size=4, remote="local", progress=False))
    with nnsight_moe.attached(hf):
        mine = torch.cat(runner.run(hf, PROMPTS, functools.partial(_scores_local, view.moe_layers), batch_size=4,
                                    progress=False))
    assert (remote - mine).abs().max() < ATOL
    assert nnsight_moe.handle_of(hf) is None


def _scores_traced(view, model, batch):
    rows = torch.arange(batch["last"].shape[0])
    return torch.stack([view.layer(i, want=("router_scores",))["router_scores"][rows, batch["last"]]
                        for i in view.moe_layers], dim=1)


def _scores_local(layers, model, batch):
    seen = {}
    handle = nnsight_moe.handle_of(model)
    with nnsight_moe.hooks.TemporaryHooks() as added:
        for i in layers:
            added.add(handle.block(i).hook_router_scores, lambda t, hook, i=i: seen.__setitem__(i, t))
        model(**runner.inputs(batch))
    rows = torch.arange(len(batch["rows"]))
    return torch.stack([seen[i][rows, batch["last"]] for i in layers], dim=1)


class _FailOnce:
    """Per-batch function that counts its calls and fails on batch ``fail`` while ``armed``."""

    def __init__(self, fail: int):
        self.fail, self.armed, self.calls = fail, True, []

    def __call__(self, model, batch):
        self.calls.append(batch["index"])
        if self.armed and batch["index"] == self.fail:
            raise ConnectionError("simulated outage")
        return _last_logits(model, batch)


def test_resume_after_an_interruption_skips_finished_batches(tmp_path, capsys):
    hf = tiny_model("olmoe")
    expected = torch.cat(runner.run(hf, PROMPTS, _last_logits, batch_size=2, progress=False))
    path = tmp_path / "partial.safetensors"
    fn = _FailOnce(fail=2)
    with pytest.raises(ConnectionError, match="simulated outage") as info:
        runner.run(hf, PROMPTS, fn, batch_size=2, results_path=path, progress=False)
    assert any("2 finished batches are kept" in note for note in info.value.__notes__)
    assert fn.calls == [0, 1, 2] and path.exists()
    fn.armed, fn.calls = False, []
    got = runner.run(hf, PROMPTS, fn, batch_size=2, results_path=path)
    assert fn.calls == [2], "only the unfinished batch ran again"
    assert "resuming" in capsys.readouterr().out
    assert (torch.cat(got) - expected).abs().max() < ATOL
    # other settings, other prompts, another model: the file is refused, naming what differs
    with pytest.raises(ValueError, match="settings differ"):
        runner.run(hf, PROMPTS, fn, batch_size=2, results_path=path, key={"levels": "other"}, progress=False)
    with pytest.raises(ValueError, match="different batches"):
        runner.run(hf, PROMPTS[::-1], fn, batch_size=2, results_path=path, progress=False)
    with pytest.raises(ValueError, match="model weights"):
        runner.run(tiny_model("olmoe", seed=1), PROMPTS, fn, batch_size=2, results_path=path, progress=False)


def test_remote_failure_names_the_batch_and_resumes(tmp_path, monkeypatch):
    from nnsight.intervention.backends.local import LocalSimulationBackend

    nnsight.register(sys.modules[__name__])
    hf = tiny_model("olmoe")
    lm = language_model(hf)
    calls = []

    class Flaky(LocalSimulationBackend):
        def __call__(self, tracer):
            calls.append(len(calls))
            if len(calls) == 2:
                raise ConnectionError("simulated NDIF outage")
            return LocalSimulationBackend.__call__(self, tracer)

    expected = torch.cat(runner.run(lm, PROMPTS, _last_logits_traced, batch_size=2, remote=False, progress=False))
    monkeypatch.setattr(lm, "_remote_backend", lambda *a, **k: Flaky(lm))
    path = tmp_path / "remote.safetensors"
    with pytest.raises(RemoteBatchError, match="batch 1 of 3") as info:
        runner.run(lm, PROMPTS, _last_logits_traced, batch_size=2, remote="local", results_path=path, progress=False)
    assert info.value.completed == [0]
    got = runner.run(lm, PROMPTS, _last_logits_traced, batch_size=2, remote="local", results_path=path,
                     progress=False)
    assert len(calls) == 4, "batches 1 and 2 ran again, batch 0 came from the file"
    assert (torch.cat(got) - expected).abs().max() < ATOL


def test_batch_size_auto_and_choose_batch_size():
    hf = tiny_model("olmoe")
    assert runner.choose_batch_size(hf, 100, 12) == runner.DEFAULT_BATCH_SIZE
    assert runner.choose_batch_size(hf, 3, 12) == 3
    forward = memory.estimate(memory.ModelShapes.of(hf), "forward", 12)  # the memory planner's estimate
    assert runner.choose_batch_size(hf, 100, 12, "capture", max_memory=forward.peak(5)) == 5
    neurons = memory.estimate(memory.ModelShapes.of(hf), "neuron-exact", 12, chunk_bytes=16 * 128)
    assert runner.choose_batch_size(hf, 100, 12, "neuron", max_memory=neurons.peak(3)) == 3
    with pytest.raises(memory.MemoryBudgetError, match="forward: one prompt of 12 tokens needs"):
        runner.choose_batch_size(hf, 100, 12, max_memory=1)
    batches = runner.make_batches(PROMPTS, batch_size="auto", model=hf)
    assert [b["rows"] for b in batches] == [list(range(6))]
    got = torch.cat(runner.run(hf, PROMPTS, _last_logits, batch_size="auto", progress=False))
    assert (got - _alone(hf, PROMPTS)).abs().max() < ATOL


def test_repeat_stacks_condition_major():
    batch = runner.make_batches(PROMPTS[:2], per_prompt={"target": torch.tensor([7, 8])})[0]
    stacked = runner.repeat(batch, 3, edits={"x": 1})
    assert stacked["input_ids"].shape == (6, 5) and stacked["target"].tolist() == [7, 8] * 3
    assert stacked["last"].tolist() == [4, 4] * 3 and stacked["rows"] == [0, 1] * 3 and stacked["edits"] == {"x": 1}
    assert stacked["index"] == 0


def test_bad_input_gives_clear_errors():
    hf = tiny_model("olmoe")
    tok = word_tokenizer()
    fn = _last_logits
    with pytest.raises(ValueError, match="batch_size must be a positive integer or 'auto', got 0"):
        runner.run(hf, PROMPTS, fn, batch_size=0)
    with pytest.raises(ValueError, match="got 'big'"):
        runner.run(hf, PROMPTS, fn, batch_size="big")
    with pytest.raises(ValueError, match="padding_side must be 'left', 'right'"):
        runner.run(hf, PROMPTS, fn, padding_side="middle")
    with pytest.raises(ValueError, match="no prompts"):
        runner.run(hf, [], fn)
    with pytest.raises(TypeError, match="one string"):
        runner.run(hf, "w5 w6", fn, tokenizer=tok)
    with pytest.raises(TypeError, match="mix strings and token-id lists"):
        runner.run(hf, ["w5 w6", [5, 6]], fn, tokenizer=tok)
    with pytest.raises(ValueError, match=r"prompts \[1\] of this batch are empty \(no tokens\)"):
        runner.run(hf, [[5], []], fn)
    with pytest.raises(TypeError, match="prompt 1 is neither"):
        runner.run(hf, [[5], [1.5, 2.0]], fn)
    with pytest.raises(ValueError, match="string prompts need tokenizer"):
        runner.make_batches(["w5 w6"])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        runner.run(hf, [[5, 100000]], fn)
    with pytest.raises(ValueError, match=r"per_prompt\['target'\] has 2 values for 6 prompts"):
        runner.run(hf, PROMPTS, fn, per_prompt={"target": [1, 2]})
    with pytest.raises(ValueError, match="clashes with a batch key"):
        runner.run(hf, PROMPTS, fn, per_prompt={"last": list(range(6))})
    with pytest.raises(TypeError, match="fn must be a callable"):
        runner.run(hf, PROMPTS, "scores")
    with pytest.raises(ValueError, match="remote must be False, True"):
        runner.run(language_model(hf), PROMPTS, fn, remote="ndif")
    with pytest.raises(TypeError, match="needs an nnsight model"):
        runner.run(hf, PROMPTS, fn, remote="local")
    with pytest.raises(TypeError, match="not batch dicts"):
        runner.run_batches(hf, [{"input_ids": torch.ones(1, 2)}], fn)
    with pytest.raises(ValueError, match="max_memory must be a positive number"):
        runner.choose_batch_size(hf, 4, 4, max_memory=-5)


def test_rows_batch_a_subset_and_keep_input_indices():
    batches = runner.make_batches(PROMPTS, batch_size=2, rows=[5, 1, 3], per_prompt={"target": torch.arange(6) * 10})
    assert [b["rows"] for b in batches] == [[5, 1], [3]]
    assert batches[0]["target"].tolist() == [50, 10] and batches[1]["input_ids"].tolist() == [PROMPTS[3]]
    with pytest.raises(IndexError, match=r"rows \[6\] are out of range for 6 prompts"):
        runner.make_batches(PROMPTS, rows=[0, 6])
    with pytest.raises(ValueError, match="rows is empty"):
        runner.make_batches(PROMPTS, rows=[])


def test_recipes_take_batch_size_auto_with_the_same_numbers():
    """batch_size="auto" reaches choose_batch_size through the runner in every recipe; numbers do not depend
    on the batch size."""
    from nnsight_moe.recipes import blocking, head_expert
    from nnsight_moe.recipes.attribution import attribute

    hf = tiny_model("olmoe")
    targets = [40, 41, 42, 43, 44, 45]
    keys = ["prompt", "layer", "level", "expert"]
    a, b = (attribute(hf, PROMPTS, targets, levels=("layer", "expert"), batch_size=size, progress=False).to_frame()
            .sort_values(keys, kind="stable").reset_index(drop=True) for size in (2, "auto"))
    assert a[keys].equals(b[keys]) and (a["score"] - b["score"]).abs().max() < ATOL
    conditions = [[], [(0, 1)], [(1, 2), (0, 3)]]
    small = blocking.evaluate(hf, (PROMPTS, targets), conditions, batch_size=2, max_rows=4, progress=False)
    auto = blocking.evaluate(hf, (PROMPTS, targets), conditions, batch_size="auto", progress=False)
    assert torch.equal(small, auto)
    probs = head_expert._router_probs(hf, PROMPTS, None, 2)
    assert abs(probs - head_expert._router_probs(hf, PROMPTS, None, "auto")).max() < ATOL
