"""recipes.stats (splits, bootstrap, sign-flip test), Table-2 renormalisation and recipes.efficiency on tiny models."""

import copy
import math
import warnings

import numpy as np
import pytest
import torch

import nnsight_moe
from nnsight_moe.recipes import blocking, efficiency, stats
from nnsight_moe.recipes.metrics import target_ranks
from nnsight_moe.testing import tiny_model
from tests.test_blocking import _dataset


# ----------------------------------------------------------------------------------------- statistics
def test_bootstrap_matches_plain_loop():
    """bootstrap_ci = the percentile interval of a plain loop over the documented resample indices."""
    rng = np.random.default_rng(7)
    values = rng.random((5, 13))  # 5 random draws x 13 prompts
    lo, hi = stats.bootstrap_ci(values, n_boot=300, level=0.9, seed=3)
    index = np.random.default_rng(3).integers(0, 13, size=(300, 13))
    means = []
    for b in range(300):
        total = 0.0
        for s in range(5):
            for j in index[b]:
                total += values[s, j]
        means.append(total / (5 * 13))
    assert lo == pytest.approx(np.quantile(means, 0.05), abs=1e-12)
    assert hi == pytest.approx(np.quantile(means, 0.95), abs=1e-12)
    assert lo <= values.mean() <= hi
    one = stats.bootstrap_ci(values[0], n_boot=50, seed=1)  # [P] works as [1, P]
    assert one == stats.bootstrap_ci(values[:1], n_boot=50, seed=1)
    with pytest.raises(ValueError, match="level"):
        stats.bootstrap_ci(values, level=1.5)
    with pytest.raises(ValueError, match="shape"):
        stats.bootstrap_ci(np.zeros((2, 0)))


def test_sign_flip_matches_plain_loop():
    """sign_flip_test = a plain loop over the documented random signs; separated samples give small p."""
    rng = np.random.default_rng(0)
    top = rng.random(11)
    draws = rng.random((4, 11))
    p = stats.sign_flip_test(top, draws, n_perm=500, seed=5)
    d = draws.mean(axis=0) - top
    signs = 2 * np.random.default_rng(5).integers(0, 2, size=(500, 11)) - 1
    count = 0
    for b in range(500):
        flipped = sum(signs[b, j] * d[j] for j in range(11)) / 11
        count += flipped >= d.mean() - 1e-12
    assert p == pytest.approx((1 + count) / 501)
    assert stats.sign_flip_test(np.zeros(20), np.ones((3, 20)), n_perm=999) == pytest.approx(1 / 1000)
    assert stats.sign_flip_test(np.ones(5), np.ones(5)) == 1.0  # no difference at all
    with pytest.raises(ValueError, match="prompts"):
        stats.sign_flip_test(np.ones(5), np.ones(6))


def test_split_is_disjoint_by_subject():
    """split_indices: disjoint, covering, whole units per side, deterministic; split_facts on the bundled data."""
    groups = ["a"] * 6 + ["b"] * 6 + ["c"]
    units = [0, 0, 1, 1, 2, 2, 0, 1, 2, 3, 4, 5, 9]
    rank, held = stats.split_indices(groups, units, seed=1)
    assert set(rank).isdisjoint(held) and sorted(rank + held) == list(range(13))
    side = {}
    for i in range(13):
        side.setdefault((groups[i], units[i]), set()).add(i in rank)
    assert all(len(s) == 1 for s in side.values())  # every subject on one side only
    assert 12 in held  # a one-subject relation is evaluated only
    assert {groups[i] for i in rank} == {"a", "b"} and {groups[i] for i in held} == {"a", "b", "c"}
    assert (rank, held) == stats.split_indices(groups, units, seed=1)
    with pytest.raises(ValueError, match="fraction"):
        stats.split_indices(groups, units, fraction=1.0)

    from nnsight_moe import data, demo

    tok = demo.load_tokenizer("demo-moe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoded = data.encode_facts(tok, [f for r in data.bundled()[:3] for f in r.facts()])
    rank_set, eval_set = stats.split_facts(encoded, seed=0)
    assert len(rank_set) + len(eval_set) == len(encoded)
    for relation in {f.relation for f in encoded.facts}:
        a = {f.subject for f in rank_set.facts if f.relation == relation}
        b = {f.subject for f in eval_set.facts if f.relation == relation}
        assert a and b and a.isdisjoint(b)


def test_blocking_significance_on_a_sweep():
    """Rows carry per-prompt ranks equal to evaluate(); CIs bracket the row metric; top vs random p in (0, 1]."""
    model = tiny_model("qwen2_moe")
    prompts, targets, relations = _dataset(model)
    ranking = blocking.rank_experts(model, (prompts, targets, relations), by="frequency", progress=False)
    result = blocking.sweep(model, (prompts, targets, relations), ranking=ranking, top_n=(1, 3), seeds=3,
                            progress=False)
    top = next(r for r in result.rows if r["relation"] == "r1" and r["kind"] == "top" and r["n"] == 3)
    idx = [i for i, r in enumerate(relations) if r == "r1"]
    direct = blocking.evaluate(model, ([prompts[i] for i in idx], targets[idx]), [[tuple(p) for p in top["experts"]]],
                               progress=False)[0]
    assert top["ranks"] == direct.tolist()
    assert top["mrr"] == pytest.approx(float((1 / direct.double()).mean()))
    table = stats.blocking_significance(result, n_boot=200, n_perm=200)
    assert len(table) == 3 * 2  # (r1, r2, all) x N in (1, 3)
    row = table[(table["relation"] == "r1") & (table["n"] == 3)].iloc[0]
    assert row["top"] == pytest.approx(top["mrr"])
    assert row["top_ci"][0] <= row["top"] <= row["top_ci"][1]
    assert row["uniform_ci"][0] <= row["uniform"] <= row["uniform_ci"][1]
    assert 0 < row["uniform_p_signflip"] <= 1 and 1 / 4 <= row["matched_p_draws"] <= 1
    pooled = table[(table["relation"] == "all") & (table["n"] == 3)].iloc[0]
    assert pooled["n_prompts"] == len(prompts)
    for r in result.rows:
        r.pop("ranks")
    with pytest.raises(ValueError, match="per-prompt ranks"):
        stats.blocking_significance(result)


# ----------------------------------------------------------------------------- Table 2: renormalised
@torch.no_grad()
def test_renormalised_top_n_configuration_matches_brute_force():
    """restrict_experts(1, renorm=True) = a router hook keeping the top slot with weight = the sum of all k."""
    model = tiny_model("qwen2_moe")
    prompts, targets, relations = _dataset(model)
    clone = copy.deepcopy(model)
    layout = nnsight_moe.layout(model)

    def keep_top_sum(module, args, output):
        logits, scores, indices = output
        best = scores.argmax(-1, keepdim=True)
        new = torch.zeros_like(scores).scatter(-1, best, scores.sum(-1, keepdim=True))
        return logits, new, indices

    for i in layout.moe_layers:
        clone.get_submodule(layout.layer(i).router).register_forward_hook(keep_top_sum)
    brute = target_ranks(torch.stack([clone(torch.tensor([p])).logits[0, -1] for p in prompts]), targets)
    result = blocking.configurations(model, (prompts, targets, relations), renorm=True, progress=False)
    got = {r["configuration"]: r for r in result.rows if r["relation"] == "all"}
    assert "shared + top-1 (renormalised)" in result.meta["configurations"]
    row = got["shared + top-1 (renormalised)"]
    assert row["renorm"] and row["mrr"] == pytest.approx(float((1 / brute.double()).mean()))
    plain = got["shared + top-1"]
    assert not plain["renorm"]
    assert len(result.meta["configurations"]) == len(blocking.configurations(
        model, (prompts, targets, relations), progress=False).meta["configurations"]) + 2


# ---------------------------------------------------------------------------------------- efficiency
@pytest.mark.parametrize("model_type", ["qwen2_moe", "llama"])
def test_telescoping_identity_and_saturation(model_type):
    """Σ attn + FFN rows = log p(w|h^L) - log p(w|h^0) per prompt (1e-4 nats); gain <= -log p(w|h^0)."""
    from nnsight_moe.recipes import attribution

    model = tiny_model(model_type) if model_type != "llama" else _tiny_llama()
    prompts, targets, _ = _dataset(model, n=6)
    result = attribution.attribute(model, prompts, targets.tolist(), levels=("layer",), progress=False)
    out = efficiency.telescoping(model, prompts, targets.tolist(), result=result)
    assert out["max identity error"] < 1e-4
    assert out["saturation holds"]
    logp = torch.tensor(out["logp_by_layer"])
    assert logp.shape == (6, model.config.num_hidden_layers + 1)
    real = torch.stack([model(torch.tensor([p])).logits[0, -1].log_softmax(-1)[t] for p, t in zip(prompts, targets)])
    assert torch.allclose(logp[:, -1].float(), real.detach(), atol=1e-4)  # h^L reads out the model's own log p
    summary = efficiency.honest_summary(result)
    assert summary["total gain"] == pytest.approx(out["total gain mean"], abs=1e-5)
    assert summary["FFN share"] == pytest.approx(summary["FFN gain"] / (summary["FFN gain"] + summary["Attn gain"]))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_depth_matched_binning():
    """Layer amounts resampled onto depth bins keep their sum; a 2-layer profile splits evenly into 4 bins."""
    assert efficiency._binned(np.array([1.0, 3.0]), 4).tolist() == pytest.approx([0.5, 0.5, 1.5, 1.5])
    values = np.array([0.4, 0.1, 0.3])
    assert efficiency._binned(values, 4).sum() == pytest.approx(values.sum())
    assert efficiency._binned(values, 3).tolist() == pytest.approx(values.tolist())
    with pytest.raises(ValueError, match="bins"):
        efficiency.depth_matched([], bins=0)
    assert math.isclose(efficiency._binned(np.array([2.0]), 2).sum(), 2.0)


def test_dense_option_names_a_bad_model(tmp_path):
    """run_job(dense=...) checks the dense model's name before any compute, naming it."""
    from nnsight_moe.job import run_job

    with pytest.raises(ValueError, match="/nonexistent/dense-model"):
        run_job("demo-moe", out=tmp_path, dense="/nonexistent/dense-model", quick=True)


def test_claims_verdicts_follow_their_rules():
    """claims.assess: each verdict follows its stated rule; missing sections read 'not measured'."""
    from nnsight_moe.recipes import claims

    data = {
        "attribution": {"efficiency": {"ratios": {"FFN gain / L": 0.99, "FFN share": 0.99,
                                                  "depth ratio (L_dense / L_moe)": 1.0},
                                       "profile": [{"moe / total": v} for v in (0.3, 0.2, 0.05, 0.01, 0.0, 0.0)],
                                       "telescoping": {"p_by_layer_mean": [0.0, 0.2, 0.7, 0.9, 0.95, 0.99, 1.0]}}},
        "blocking": {"split": True,
                     "configurations": {"rows": [{"relation": "all", "configuration": "shared + top-2 (default)", "mrr": 1.0},
                                                 {"relation": "all", "configuration": "shared ablation (routed top-2 only)",
                                                  "mrr": 0.9}]},
                     "significance": [{"relation": "a", "n": 10, "uniform_p_signflip": 0.01},
                                      {"relation": "b", "n": 10, "uniform_p_signflip": 0.5},
                                      {"relation": "all", "n": 10, "uniform_p_signflip": 0.001},
                                      {"relation": "a", "n": 1, "uniform_p_signflip": 0.9}]},
        "head_expert": {"correlation": {"summary_r": -0.6, "summary_p": 0.001}},
    }
    verdicts = [row["verdict"] for row in claims.assess(data)]
    assert verdicts == ["inconclusive (within 5%)", "not reproduced", "reproduced", "not reproduced", "reproduced"]
    assert "p(target) entering the last third 0.950" in claims.assess(data)[1]["measured"]
    assert [row["verdict"] for row in claims.assess({})] == ["not measured"] * 5


def test_dense_model_must_tokenize_like_the_moe():
    """attribution._dense_model loads a dense model by path and refuses one whose tokenizer differs."""
    from types import SimpleNamespace

    from nnsight_moe import demo
    from nnsight_moe.demo import planted
    from nnsight_moe.recipes import attribution

    tok = demo.load_tokenizer("demo-moe")
    sample = SimpleNamespace(prompts=["The capital of France is"])
    model, dense_tok = attribution._dense_model(str(demo.path("demo-dense")), None, tok, sample)
    assert model.config.model_type == "llama" and dense_tok("x")["input_ids"] == tok("x")["input_ids"]
    _, other = planted.load()
    with pytest.raises(ValueError, match="encodes the prompts differently.*prompt 0"):
        attribution._dense_model("demo-dense", None, other, sample)
