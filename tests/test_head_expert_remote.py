"""head_expert.causal(remote=...): stacked suppression / router patching inside one trace on the unmodified
model, equal to the local hooks path; failure and resume through run_batches; input checks."""

from __future__ import annotations

import types

import nnsight
import numpy as np
import pandas as pd
import pytest
import torch
from nnsight.intervention.backends.local import LocalSimulationBackend
from nnsight.schema.request import RequestModel

import nnsight_moe
from nnsight_moe.recipes import head_expert
from nnsight_moe.remote import RemoteBatchError
from nnsight_moe.testing import tiny_model

from helpers import language_model, word_tokenizer

#: Heads in the first (dense for deepseek_v3) and last layers, and two in one layer.
HEADS = [(0, 1), (2, 3), (2, 0)]


def _prompts(n=7, seed=3):
    """Token-id prompts of 3..7 tokens (left-padded in a batch) and target ids."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 128, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    return prompts, torch.randint(3, 128, (n,), generator=g).tolist()


def _correlation(hf, heads=HEADS) -> head_expert.HeadExpertResult:
    """A correlation result naming ``heads`` as the top heads, with significant pairs to two experts."""
    layout = nnsight_moe.layout(hf)
    first, last = layout.moe_layers[0], layout.moe_layers[-1]
    pairs = pd.DataFrame({"head_layer": [heads[0][0], heads[1][0], 1], "head": [heads[0][1], heads[1][1], 2],
                          "expert_layer": [first, last, last], "expert": [3, 5, 0],
                          "r": [0.9, -0.8, 0.95], "p": [1e-4, 1e-3, 1e-5], "q": [1e-3, 1e-2, 1e-4]})
    return head_expert.HeadExpertResult(pairs, 0.5, 0.01, list(heads), [(first, 1), (last, 2)], "attribution", 7)


def _frame(model, correlation, **kwargs):
    prompts, targets = _prompts()
    options = dict(correlation=correlation, k_heads=3, seeds=1, batch_size=3, seed=1)
    return head_expert.causal(model, (prompts, targets), **(options | kwargs)).to_frame()


def _assert_same(remote: pd.DataFrame, local: pd.DataFrame):
    assert list(remote.columns) == list(local.columns)
    assert list(remote["condition"]) == list(local["condition"]) and list(remote["seed"]) == list(local["seed"])
    for column in ("mrr_clean", "mrr_suppressed", "mrr_drop", "mrr_patched"):
        np.testing.assert_allclose(remote[column], local[column], rtol=0, atol=1e-12, err_msg=column)
    np.testing.assert_allclose(remote["recovered_pct"], local["recovered_pct"], rtol=1e-9, atol=1e-9, equal_nan=True)
    for column in ("d_prob_correlated", "d_prob_selected"):
        np.testing.assert_allclose(remote[column], local[column], rtol=0, atol=1e-5, err_msg=column)


class _Flaky(LocalSimulationBackend):
    """nnsight's local simulation, failing on chosen calls; records what each serialised request names."""

    def __init__(self, model, fail_on, calls):
        LocalSimulationBackend.__init__(self, model)
        self.fail_on, self.calls = fail_on, calls

    def __call__(self, tracer):
        self.calls.append(RequestModel.serialize(tracer))
        if len(self.calls) - 1 in self.fail_on:
            raise ConnectionError("simulated NDIF outage")
        return LocalSimulationBackend.__call__(self, tracer)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "inkling_text", "zaya", "dbrx", "deepseek_v4", "llama4"])
def test_causal_remote_local_equals_local(family):
    """Also: DBRX (selection patched at the experts' input), Gemma-4 (logits from router.proj), DeepSeek-V4 (grouped
    o_a_proj input, a hash-routed layer), Llama 4 (dense sigmoid scores patched)."""
    hf = tiny_model(family)
    corr = _correlation(hf)
    local = _frame(hf, corr)
    remote = _frame(language_model(hf), corr, remote="local", progress=False)
    _assert_same(remote, local)
    # not vacuous: suppression moves the router and patching changes the suppressed output
    assert (remote["d_prob_selected"].abs() > 1e-4).all()
    assert (remote["mrr_patched"] != remote["mrr_suppressed"]).any() or (remote["mrr_drop"] != 0).any()
    assert list(remote["condition"]) == ["top-K heads", "random heads"]
    assert nnsight_moe.handle_of(hf) is None, "the remote path attaches nothing"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in hf.modules())


def test_causal_remote_failure_keeps_batches_and_resumes(tmp_path, monkeypatch):
    hf = tiny_model("olmoe")
    lm = language_model(hf)
    corr = _correlation(hf)
    expected = _frame(lm, corr, remote=False, progress=False)  # plain nnsight trace, same stacked runs
    path = tmp_path / "causal.pt"
    calls: list = []
    fail_on = {1}
    monkeypatch.setattr(lm, "_remote_backend", lambda *a, **k: _Flaky(lm, fail_on, calls))
    with pytest.raises(RemoteBatchError, match="batch 1 of 3") as info:
        _frame(lm, corr, remote="local", results_path=path, progress=False)
    assert info.value.completed == [0] and isinstance(info.value.__cause__, ConnectionError)
    # the request carries source and plain data only: no reference to nnsight_moe, no hooks
    blob = calls[0]
    for source in (b"remote", b"routing", b"input_gated", b"block_routed", b"dispatch_experts", b"identity_experts",
                   b"shared_gammas", b"recipes/head_expert"):
        blob = blob.replace(b"nnsight_moe/" + source + b".py", b"")  # source filenames of the functions shipped by value
    assert b"nnsight_moe" not in blob and b"def _causal_in_trace" in calls[0]
    assert b"HookPoint" not in calls[0]

    calls.clear()
    fail_on.clear()
    resumed = _frame(lm, corr, remote="local", results_path=path, progress=False)
    assert len(calls) == 2, "only the unfinished batches ran again"
    _assert_same(resumed, expected)
    with pytest.raises(ValueError, match="settings differ"):  # other heads: the file is refused
        _frame(lm, _correlation(hf, [(1, 0), (0, 0), (2, 1)]), remote="local", results_path=path, progress=False)
    assert len(calls) == 2


def test_causal_remote_rejects_bad_input(monkeypatch):
    hf = tiny_model("olmoe")
    lm = language_model(hf)
    with pytest.raises(ValueError, match="remote must be False, True"):
        _frame(lm, _correlation(hf), remote="ndif")
    with pytest.raises(TypeError, match="needs an nnsight model"):
        _frame(hf, _correlation(hf), remote="local")
    with pytest.raises(IndexError, match=r"valid heads are 0\.\.3"):
        _frame(lm, _correlation(hf, [(1, 9), (0, 0), (2, 1)]), remote="local")
    with pytest.raises(IndexError, match=r"valid layers are 0\.\.2"):
        _frame(lm, _correlation(hf, [(5, 0), (0, 0), (2, 1)]), remote="local")
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        _frame(lm, _correlation(hf), remote="local", seeds=0)

    seen = {}

    def fake_correlate(model, dataset, **kwargs):
        seen.update(kwargs)
        return _correlation(hf)

    monkeypatch.setattr(head_expert, "correlate", fake_correlate)
    _frame(lm, None, remote=False, progress=False)
    assert seen["remote"] is False, "correlate runs with the same remote"


def test_section_runs_causal_remotely(monkeypatch):
    """The main job's section under --remote: causal runs remotely on the job's LanguageModel."""
    hf = tiny_model("qwen2_moe")
    prompts, targets = _prompts(n=6)
    tok = word_tokenizer("left")
    text = [" ".join(f"w{i}" for i in p) for p in prompts]
    calls = {}
    real_causal = head_expert.causal

    def spy(model, dataset, **kwargs):
        calls.update(kwargs, model=model)
        return real_causal(model, dataset, **kwargs)

    monkeypatch.setattr(head_expert, "correlate", lambda model, data, **kwargs: _correlation(hf))
    monkeypatch.setattr(head_expert, "causal", spy)
    lm = nnsight.LanguageModel(hf, tokenizer=tok)  # with --remote the job's model is an nnsight model
    job = types.SimpleNamespace(is_moe=True, model=lm, tokenizer=tok, remote="local", quick=True, batch_size=4,
                                sample=lambda: types.SimpleNamespace(prompts=text, targets=targets))
    section = head_expert.section(job)
    assert calls["remote"] == "local" and isinstance(calls["model"], nnsight.LanguageModel)
    assert section.data["causal"]["rows"] and "remote='local'" in section.text
    assert nnsight_moe.handle_of(hf) is None
