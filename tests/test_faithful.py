"""The bundled faithful demo trio (nnsight_moe.demo.faithful): depth, size, metrics recomputed from the weights,
not saturated, a shared expert with a role, deterministic training, and the multi-model --dense path."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from nnsight_moe import demo  # noqa: E402
from nnsight_moe.data import bundled, encode_facts  # noqa: E402
from nnsight_moe.demo import faithful  # noqa: E402

NAMES = ("faithful-moe", "faithful-dense", "faithful-dense-12")
#: thresholds the trio is built to meet (stated in docs/recipes/faithful.md)
MAX_TRIO_BYTES = 12 * 1000 * 1000
MAX_FINAL_P = 0.9          # not saturated: mean p(target) of the real output
MIN_SHARED_DROP = 0.05     # shared-expert ablation lowers the pooled MRR by at least this
MIN_MRR = 0.9              # the models know the facts (training templates)
MAX_ROUTED_OFF_MRR = 0.5   # every routed expert off (shared only): the facts are mostly gone


@pytest.fixture(scope="module")
def trio():
    return {name: demo.load(name) for name in NAMES}


@pytest.fixture(scope="module")
def measured(trio):
    """:func:`faithful.measure` recomputed from the bundled weights (metrics.json is not trusted)."""
    return {name: faithful.measure(model, tok) for name, (model, tok) in trio.items()}


def _metrics(name):
    return json.loads((demo.path(name) / "metrics.json").read_text())


def test_names_depth_and_size(trio):
    from transformers import LlamaForCausalLM, Qwen2MoeForCausalLM

    assert set(NAMES) <= set(demo.names())
    moe, tok = trio["faithful-moe"]
    assert isinstance(moe, Qwen2MoeForCausalLM) and moe.config.num_hidden_layers == 8
    assert moe.config.num_experts == 8 and moe.config.num_experts_per_tok == 2
    assert moe.config.shared_expert_intermediate_size > 0
    assert all(layer.mlp.shared_expert is not None for layer in moe.model.layers)
    for name, layers in (("faithful-dense", 8), ("faithful-dense-12", 12)):
        model, dense_tok = trio[name]
        assert isinstance(model, LlamaForCausalLM) and model.config.num_hidden_layers == layers
        assert model.config.hidden_size == moe.config.hidden_size
        assert dense_tok.get_vocab() == tok.get_vocab()  # one tokenizer: the comparison runs on the same tokens
    sizes = {name: (demo.path(name) / "model.safetensors").stat().st_size for name in NAMES}
    assert sum(sizes.values()) <= MAX_TRIO_BYTES, sizes
    for name in NAMES:
        assert _metrics(name)["weights_bytes"] == sizes[name]
        assert _metrics(name)["layers"] == trio[name][0].config.num_hidden_layers


def test_metrics_json_is_recomputed_from_the_weights(measured):
    """Every figure metrics.json states is what faithful.measure gives on the bundled weights (to 1e-3)."""
    for name in NAMES:
        stored, fresh = _metrics(name), measured[name]
        for key in ("eval", "held_out_template", "p_by_layer_mean", "chance", "ablation"):
            assert (key in stored) == (key in fresh), (name, key)
            if key in fresh:
                assert _close(stored[key], fresh[key]), (name, key, stored[key], fresh[key])


def _close(a, b, tol=1e-3):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= tol
    return a == b


def test_know_the_facts_but_not_saturated(measured):
    """MRR high on the training templates; mean p(target) well below 1 at the output and by layer."""
    for name in NAMES:
        m = measured[name]
        assert m["eval"]["overall"]["mrr"] >= MIN_MRR, (name, m["eval"]["overall"])
        assert m["eval"]["overall"]["p_target_mean"] <= MAX_FINAL_P, (name, m["eval"]["overall"])
        p = m["p_by_layer_mean"]
        assert len(p) == _metrics(name)["layers"] + 1 and max(p) <= MAX_FINAL_P, (name, p)


def test_shared_expert_has_a_role_and_facts_sit_in_the_routed_experts(trio, measured):
    """Shared ablation lowers the pooled MRR by >= MIN_SHARED_DROP; every routed expert off (shared only)
    drops it by >= MAX_ROUTED_OFF_MRR (towards the range prior, not to it: see docs/recipes/faithful.md);
    the shared ablation once more by zeroing weights (not through nnsight_moe's hooks)."""
    m = measured["faithful-moe"]
    full, ablation = m["eval"]["overall"]["mrr"], m["ablation"]
    assert full - ablation["shared_off_mrr"] >= MIN_SHARED_DROP, m
    assert ablation["routed_off_mrr"] <= MAX_ROUTED_OFF_MRR, m
    assert m["chance"]["uniform_mrr"] < m["chance"]["range_prior_mrr"] < ablation["routed_off_mrr"], m
    # the same shared ablation by zeroing the shared experts' down_proj (not through nnsight_moe's hooks)
    model, tok = trio["faithful-moe"]
    enc = encode_facts(tok, [f for r in bundled() for f in r.facts()])
    saved = [layer.mlp.shared_expert.down_proj.weight.detach().clone() for layer in model.model.layers]
    try:
        for layer in model.model.layers:
            layer.mlp.shared_expert.down_proj.weight.data.zero_()
        batch = tok(enc.prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**batch).logits[:, -1]
        t = torch.tensor(enc.targets)
        ranks = (logits > logits.gather(1, t[:, None])).sum(1) + 1
        assert float((1 / ranks.double()).mean()) == pytest.approx(ablation["shared_off_mrr"], abs=1e-3)
    finally:
        for layer, w in zip(model.model.layers, saved):
            layer.mlp.shared_expert.down_proj.weight.data.copy_(w)


def test_training_is_deterministic():
    """Two 3-step trainings of the MoE (routed dropout on) give identical bytes; another seed does not."""
    from nnsight_moe.demo import train as base

    relations = bundled()
    tok = base.wrap_tokenizer(base.build_tokenizer(relations))
    assert tok.get_vocab() == demo.load_tokenizer("faithful-moe").get_vocab()
    cfg = dict(faithful.TRAIN, steps=3, batch_size=16)
    states = []
    torch.use_deterministic_algorithms(True, warn_only=True)
    for seed in (cfg["seed"], cfg["seed"], cfg["seed"] + 1):
        model, _ = faithful.train_one("faithful-moe", tok, relations, dict(cfg, seed=seed))
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_routed_dropout_zeroes_the_routed_sum():
    """The training hook: kept rows are unchanged, dropped rows lose exactly the routed sum."""
    model, tok = demo.load("faithful-moe")
    block = model.model.layers[3].mlp
    x = torch.randn(2, 5, model.config.hidden_size)
    hook = faithful._RoutedDropout()
    handle = block.experts.register_forward_hook(hook)
    try:
        with torch.no_grad():
            plain = block(x)
            hook.keep = torch.tensor([1.0, 0.0])[:, None].expand(2, 5).reshape(-1, 1)
            mixed = block(x)
            flat = x.view(-1, x.shape[-1])
            shared = torch.sigmoid(block.shared_expert_gate(flat)) * block.shared_expert(flat)
    finally:
        handle.remove()
    assert torch.equal(mixed[0], plain[0])
    torch.testing.assert_close(mixed[1], shared.view(2, 5, -1)[1])


def test_range_prior_is_a_distribution_over_the_relation_targets():
    tok = demo.load_tokenizer("faithful-moe")
    rel = bundled()[0]
    prior = faithful.range_prior(rel, tok)
    targets = set(encode_facts(tok, rel.facts(0)).targets)
    assert prior.sum().item() == pytest.approx(1.0) and set(prior.nonzero().flatten().tolist()) == targets


def test_dense_models_parsing():
    """--dense: None -> the demo default; names, comma lists and repeats; 'none' -> no comparison."""
    from nnsight_moe.models import dense_models

    assert dense_models("faithful-moe", None) == ["faithful-dense", "faithful-dense-12"]
    assert dense_models("demo-moe", None) == ["demo-dense"]
    assert dense_models("some/model", None) == []
    assert dense_models("x", "a") == ["a"]
    assert dense_models("x", "a, b") == ["a", "b"]
    assert dense_models("x", ["a", "b,a"]) == ["a", "b"]
    assert dense_models("faithful-moe", "none") == []
    with pytest.raises(ValueError, match="none"):
        dense_models("x", ["none", "a"])


def test_attribution_section_compares_against_every_dense_model():
    """The job's attribution section with two dense models: one result per model, ratios per dense model
    equal to the ratio of their honest summaries, and the claims row lists both."""
    from nnsight_moe.job import Job
    from nnsight_moe.recipes import attribution, claims

    model, tok = demo.load("faithful-moe")
    relations = bundled()[:2]
    encoded = encode_facts(tok, [f for r in relations for f in r.facts()])
    job = Job("faithful-moe", model, tok, relations, encoded, max_per_relation=2, batch_size=8)
    assert job.dense == ["faithful-dense", "faithful-dense-12"]
    section = attribution.section(job)
    models = section.data["models"]
    assert [m["name"] for m in models] == ["faithful-moe", "faithful-dense", "faithful-dense-12"]
    ratios = section.data["efficiency"]["ratios"]
    by_dense = ratios["by dense model"]
    assert list(by_dense) == ["faithful-dense", "faithful-dense-12"]
    honest = {row["model"]: row for row in section.data["efficiency"]["honest"]}
    for name, layers in (("faithful-dense", 8), ("faithful-dense-12", 12)):
        entry = by_dense[name]
        assert entry["depth ratio (L_dense / L_moe)"] == layers / 8
        assert entry["FFN share"] == pytest.approx(honest["faithful-moe"]["FFN share"] / honest[name]["FFN share"])
        assert entry["FFN gain / L"] == pytest.approx(honest["faithful-moe"]["FFN gain / L"] / honest[name]["FFN gain / L"])
    assert ratios["FFN share"] == by_dense["faithful-dense"]["FFN share"]  # the single ratio: vs the first
    per_dense = section.tables["MoE / dense ratio of each efficiency form, per dense model"]
    assert per_dense.index.tolist() == ["faithful-dense", "faithful-dense-12"]
    assert per_dense.loc["faithful-dense-12", "FFN share"] == pytest.approx(by_dense["faithful-dense-12"]["FFN share"])
    matched = section.tables["FFN gain by relative depth, as a share of each model's total gain (depth-matched)"]
    assert matched.columns.tolist() == ["faithful-moe", "faithful-dense", "faithful-dense-12"]
    assert {"dense_gains", "dense_gains_2"} <= set(section.figures)
    row = claims.assess({"attribution": section.data})[0]
    assert "vs faithful-dense:" in row["measured"] and "vs faithful-dense-12:" in row["measured"]


def test_cli_dense_accepts_several_and_checks_each(tmp_path):
    """`--dense A --dense B,C`: each name is checked before any compute; a bad one is named."""
    from click.testing import CliRunner

    from nnsight_moe.cli import main

    result = CliRunner().invoke(main, ["run", "--model", "demo-moe", "--out", str(tmp_path), "--dense", "demo-dense",
                                       "--dense", "faithful-dense,/nonexistent/dense-model"])
    assert result.exit_code == 1 and "/nonexistent/dense-model" in result.output, result.output
    result = CliRunner().invoke(main, ["run", "--out", str(tmp_path), "--dense", "none", "--dense", "demo-dense"])
    assert result.exit_code == 1 and "'none'" in result.output, result.output
