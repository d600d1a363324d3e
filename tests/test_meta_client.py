"""The NDIF situation end to end: the client's model has META weights (built from a config, as
``nnsight.LanguageModel(repo_id)`` does), the "server" holds the real weights. A backend serialises each
request on the client, deserialises it against the server model's modules, runs it there and sends back
only the values the request saved, as NDIF does. Every recipe must give the local numbers."""

from __future__ import annotations

import linecache
import warnings

import nnsight
import pytest
import torch
from nnsight.schema.request import RequestModel
from nnsight.tracing.backend import Backend
from nnsight.tracing.util import push

import nnsight_moe
from nnsight_moe.recipes import attribution, blocking, head_expert
from nnsight_moe.testing import tiny_model

from helpers import word_tokenizer


class _Server(Backend):
    """Run the client's request on another model (the server's), return only what the request saved."""

    def __init__(self, server):
        self.server, self.calls = server, 0

    def __call__(self, tracer):
        self.calls += 1
        blob = RequestModel.serialize(tracer, compress=False)
        # as nnsight's LocalSimulationBackend: give back the linecache entry that deserialisation overwrites
        # with the block's source (else later requests from that file ship a wrong source)
        filename = tracer.info.frame.f_code.co_filename
        saved_lines = linecache.cache.get(filename)
        try:
            restored = RequestModel.deserialize(blob, self.server._remoteable_persistent_objects(), compress=False)
        finally:
            if saved_lines is not None:
                linecache.cache[filename] = saved_lines
            else:
                linecache.cache.pop(filename, None)
        before = dict(restored.info.frame.f_locals)
        restored.execute(restored.info.code)  # pushes only nnsight.save()-marked values into its frame
        after = restored.info.frame.f_locals
        push(tracer.info.frame, {k: v for k, v in after.items() if k not in before or before[k] is not v})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf = tiny_model("qwen2_moe")
    tokenizer = word_tokenizer("left")
    folder = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        client = nnsight.LanguageModel(str(folder), tokenizer=tokenizer)  # config only: meta weights
        server = nnsight.LanguageModel(hf, tokenizer=tokenizer)
    assert next(nnsight_moe.hf_model(client).parameters()).is_meta
    backend = _Server(server)
    client._remote_backend = lambda *args, **kwargs: backend
    g = torch.Generator().manual_seed(3)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(4, 128, (int(n),), generator=g))
               for n in torch.randint(3, 7, (6,), generator=g)]
    with torch.no_grad():
        targets = [int(hf(**tokenizer([p], return_tensors="pt")).logits[0, -1].argmax()) for p in prompts]
    return hf, client, backend, tokenizer, prompts, targets


def test_attribution_every_level(setup):
    hf, client, backend, tokenizer, prompts, targets = setup
    options = dict(tokenizer=tokenizer, neurons="fast", fast_top=5, batch_size=4, progress=False)
    local = attribution.attribute(hf, prompts, targets, **options).to_frame()
    calls = backend.calls
    remote = attribution.attribute(client, prompts, targets, remote=True, **options).to_frame()
    assert backend.calls - calls == 2, "both batches ran on the server"
    assert remote.drop(columns="score").equals(local.drop(columns="score"))
    assert (remote["score"] - local["score"]).abs().max() < 1e-5


def test_blocking_sweep_and_configurations(setup):
    hf, client, _, tokenizer, prompts, targets = setup
    data = (prompts, targets, ["a"] * 3 + ["b"] * 3)
    options = dict(tokenizer=tokenizer, top_n=(1, 4), seeds=1, baselines=("matched",), by="frequency",
                   batch_size=3, progress=False)
    local = blocking.sweep(hf, data, **options)
    remote = blocking.sweep(client, data, remote=True, **options)
    assert remote.rows == local.rows and remote.original == local.original
    local_c = blocking.configurations(hf, data, tokenizer=tokenizer, batch_size=3, progress=False)
    remote_c = blocking.configurations(client, data, tokenizer=tokenizer, batch_size=3, remote=True, progress=False)
    assert remote_c.rows == local_c.rows


def test_head_expert_correlate_and_causal(setup):
    hf, client, _, tokenizer, prompts, targets = setup
    local = head_expert.correlate(hf, (prompts, targets), tokenizer=tokenizer, top_k=2, permutations=10)
    remote = head_expert.correlate(client, (prompts, targets), tokenizer=tokenizer, top_k=2, permutations=10,
                                   remote=True)
    assert remote.top_heads == local.top_heads
    effects_local = head_expert.causal(hf, (prompts, targets), tokenizer=tokenizer, correlation=local, k_heads=2,
                                       seeds=1, batch_size=3)
    effects_remote = head_expert.causal(client, (prompts, targets), tokenizer=tokenizer, correlation=local, k_heads=2,
                                        seeds=1, batch_size=3, remote=True, progress=False)
    a, b = effects_local.to_frame(), effects_remote.to_frame()
    assert list(a["mrr_suppressed"]) == pytest.approx(list(b["mrr_suppressed"]), abs=1e-9)
    assert list(a["d_prob_selected"]) == pytest.approx(list(b["d_prob_selected"]), abs=1e-5)


def test_main_job_on_a_meta_client(tmp_path, monkeypatch):
    """``nnsight-moe run --remote ndif --model <repo>``: every section runs on the server's weights."""
    import json

    from nnsight_moe import demo, models
    from nnsight_moe.job import run_job
    from nnsight_moe.report import validate

    model, tokenizer = demo.load("demo-moe")
    model.save_pretrained(tmp_path / "repo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        client = nnsight.LanguageModel(str(tmp_path / "repo"), tokenizer=tokenizer)  # what load_traced builds
        server = nnsight.LanguageModel(model, tokenizer=tokenizer)
    backend = _Server(server)
    client._remote_backend = lambda *args, **kwargs: backend
    opened = []
    monkeypatch.setattr(models, "load_traced", lambda name, remote, **kw: opened.append((name, remote)) or (client, tokenizer))
    run_job("some-org/demo-moe", out=tmp_path / "out", remote=True, quick=True)
    assert opened == [("some-org/demo-moe", True)]
    assert next(nnsight_moe.hf_model(client).parameters()).is_meta, "the client never held weights"
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    validate(results)
    sections = results["sections"]
    assert sections["baseline"]["metrics"][-1]["MRR"] == 1.0
    assert sections["attribution"]["models"][0]["summary"]["MRR"] == 1.0
    assert sections["blocking"]["sweep"]["original"]["all"]["mrr"] == 1.0
    assert "causal" in sections["head_expert"]
    assert backend.calls > 20 and nnsight_moe.handle_of(model) is None
