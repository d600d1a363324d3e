"""recipes/steering.py against plain counting on the unmodified model, one prompt at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import false_discovery_control, fisher_exact

import nnsight_moe
from nnsight_moe import steering
from nnsight_moe.recipes import steering as recipe
from nnsight_moe.testing import tiny_model

from helpers import capture_blocks, capture_routers, language_model, word_tokenizer


def _prompts(seed, n, lo=3, hi=7):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(4, 128, (int(m),), generator=g))
            for m in torch.randint(lo, hi, (n,), generator=g)]


def _targets(seed, n):
    return torch.randint(4, 128, (n,), generator=torch.Generator().manual_seed(seed))


def _ids(tok, prompt):
    return torch.tensor([tok(prompt)["input_ids"]])


def _plain_counts(model, tok, prompts, positions):
    """Per routed pair (layer-major): units where selected, summed gate weight, number of units."""
    layout = nnsight_moe.layout(model)
    n_pairs = sum(layout.layer(i).n_experts for i in layout.moe_layers)
    hits, gates, units = np.zeros(n_pairs), np.zeros(n_pairs), 0
    rows = []
    for prompt in prompts:
        ids = _ids(tok, prompt)
        with torch.no_grad():
            seen = capture_routers(model, layout, lambda: model(ids))
        chosen = [ids.shape[1] - 1] if positions == "last" else range(ids.shape[1])
        for t in chosen:
            row_hit, row_gate = np.zeros(n_pairs), np.zeros(n_pairs)
            col = 0
            for i in layout.moe_layers:
                w, idx = seen[i]
                for slot in range(idx.shape[-1]):
                    e = int(idx[t, slot])
                    row_hit[col + e] = 1
                    row_gate[col + e] += float(w[t, slot])
                col += layout.layer(i).n_experts
            hits += row_hit
            gates += row_gate
            rows.append(row_gate)
            units += 1
    return hits, gates, units, np.array(rows)


@pytest.mark.parametrize("positions", ["last", "all"])
def test_discovery_equals_plain_counting(positions):
    model = tiny_model("qwen2_moe")
    tok = word_tokenizer(padding_side="left")
    a, b = _prompts(1, 7), _prompts(2, 6)
    found = recipe.discover(model, a, b, tokenizer=tok, positions=positions, permutations=50, batch_size=3)
    ha, ga, na, rows_a = _plain_counts(model, tok, a, positions)
    hb, gb, nb, rows_b = _plain_counts(model, tok, b, positions)
    frame = found.to_frame().sort_values(["layer", "expert"]).reset_index(drop=True)
    np.testing.assert_allclose(frame["freq_behaviour"], ha / na, atol=1e-12)
    np.testing.assert_allclose(frame["risk_difference"], ha / na - hb / nb, atol=1e-12)
    np.testing.assert_allclose(frame["gate_difference"], ga / na - gb / nb, atol=1e-6)
    assert found.meta["units_behaviour"] == na and found.meta["units_control"] == nb
    p = [fisher_exact([[int(x), na - int(x)], [int(y), nb - int(y)]])[1] for x, y in zip(ha, hb)]
    np.testing.assert_allclose(frame["p_frequency"], p, rtol=1e-10)
    np.testing.assert_allclose(frame["q_frequency"], false_discovery_control(p), rtol=1e-10)
    # the permutation test by a naive loop with the same permutations (torch.randperm from the seed)
    both = np.concatenate([rows_a, rows_b])
    obs = np.abs(both[:na].mean(0) - both[na:].mean(0))
    g = torch.Generator().manual_seed(0)
    count = np.zeros(both.shape[1])
    for _ in range(50):
        perm = torch.randperm(len(both), generator=g).numpy()
        s = both[perm]
        count += np.abs(s[:na].mean(0) - s[na:].mean(0)) >= obs - 1e-9
    np.testing.assert_allclose(frame["p_gate"], (1 + count) / 51, atol=1e-12)
    top = found.top(3)
    assert top == [tuple(x) for x in found.to_frame()[["layer", "expert"]].head(3).to_numpy().tolist()]
    assert all(found.to_frame().set_index(["layer", "expert"]).loc[t, "risk_difference"] > 0 for t in top)


def test_discovery_attribution_difference_and_remote_local():
    model = tiny_model("qwen2_moe")
    tok = word_tokenizer(padding_side="left")
    a, b = (_prompts(3, 5), _targets(4, 5)), (_prompts(5, 4), _targets(6, 4))
    local = recipe.discover(model, a, b, tokenizer=tok, attribution=True, permutations=20)
    from nnsight_moe.recipes.attribution import attribute

    layout = nnsight_moe.layout(model)
    means = []
    for prompts, targets in (a, b):
        frame = attribute(model, prompts, targets.tolist(), tokenizer=tok, levels=("expert",), progress=False).to_frame()
        frame = frame[frame["level"] == "expert"]
        sums = frame.groupby(["layer", "expert"])["score"].sum() / len(prompts)
        means.append(np.array([sums.get((i, e), 0.0) for i in layout.moe_layers for e in range(8)]))
    frame = local.to_frame().sort_values(["layer", "expert"])
    np.testing.assert_allclose(frame["attribution_difference"], means[0] - means[1], atol=1e-6)
    lm = language_model(model)
    remote = recipe.discover(lm, a, b, tokenizer=tok, attribution=True, permutations=20, remote="local")
    r = remote.to_frame().sort_values(["layer", "expert"])
    for column in ("risk_difference", "p_frequency", "gate_difference", "p_gate", "attribution_difference"):
        np.testing.assert_allclose(r[column], frame[column], atol=1e-5)
    assert nnsight_moe.handle_of(model) is None


def test_bh_qvalues_equal_scipy():
    p = np.random.default_rng(0).uniform(size=40) ** 3
    np.testing.assert_allclose(recipe.bh_qvalues(p), false_discovery_control(p), rtol=1e-12)
    q = recipe.bh_qvalues([0.01, np.nan, 0.04])
    assert np.isnan(q[1]) and q[0] == pytest.approx(0.02) and q[2] == pytest.approx(0.04)


@pytest.mark.parametrize("hook", ["hook_moe_out", "hook_shared_out", "hook_expert_out"])
def test_mean_difference_equals_plain_means(hook):
    model = tiny_model("qwen2_moe")
    tok = word_tokenizer(padding_side="left")
    layout = nnsight_moe.layout(model)
    a, b = _prompts(7, 5), _prompts(8, 4)
    got = recipe.mean_difference(model, a, b, hook=hook, tokenizer=tok, batch_size=2)

    def plain(prompts):
        total, n = {}, {}
        for prompt in prompts:
            ids = _ids(tok, prompt)
            with torch.no_grad(), nnsight_moe.attached(model) as handle:
                seen = {}
                for i in layout.moe_layers:
                    handle.block(i)._modules[hook].add_hook(lambda t, hook, i=i: seen.__setitem__(i, t.clone()))
                model(ids)
                for i in layout.moe_layers:
                    handle.block(i)._modules[hook].remove_hooks()
            for i in layout.moe_layers:
                v = seen[i][0, -1].reshape(-1, 64)
                total[i] = total.get(i, 0) + v.sum(0)
                n[i] = n.get(i, 0) + v.shape[0]
        return {i: total[i] / n[i] for i in total}

    if hook == "hook_moe_out":  # the block outputs of the unattached model, too
        with torch.no_grad():
            seen = capture_blocks(model, layout, lambda: model(_ids(tok, a[0])))
        assert torch.allclose(plain(a[:1])[1], seen[1][1][0, -1], atol=1e-6)
    pa, pb = plain(a), plain(b)
    for i in layout.moe_layers:
        torch.testing.assert_close(got[i], pa[i] - pb[i], atol=1e-5, rtol=1e-5)
    if hook != "hook_expert_out":
        remote = recipe.mean_difference(language_model(model), a, b, hook=hook, tokenizer=tok, remote="local")
        for i in layout.moe_layers:
            torch.testing.assert_close(remote[i], got[i], atol=1e-5, rtol=1e-5)


def test_evaluate_equals_direct_forwards_and_remote_local():
    model = tiny_model("qwen2_moe")
    tok = word_tokenizer(padding_side="left")
    held = (_prompts(9, 6), _targets(10, 6))
    ctrl = (_prompts(11, 4), _targets(12, 4))
    experts = [(1, 2), (1, 5), (2, 0)]
    result = recipe.evaluate(model, held, experts, edit="on", control=ctrl, tokenizer=tok, seeds=2, n_boot=200,
                             batch_size=4)

    def direct(plan, prompts, targets):
        logp, text = [], []
        for prompt, target in zip(prompts, targets):
            ids = _ids(tok, prompt)
            with torch.no_grad(), steering.steer(model, plan):
                lp = model(ids).logits[0].log_softmax(-1)
            logp.append(float(lp[-1, target]))
            text.append(float(lp[:-1].gather(1, ids[0, 1:, None]).mean()))
        return np.array(logp), np.array(text)

    base, base_text = direct(steering.plan(model), *held)[0], direct(steering.plan(model), *ctrl)[1]
    steered = direct(steering.plan(model, on={1: [2, 5], 2: [0]}), *held)[0]
    rows = {r["condition"]: r for r in result.summary}
    assert rows["none"]["logprob"] == pytest.approx(base.mean(), abs=1e-5)
    assert rows["steered"]["delta_logprob"] == pytest.approx((steered - base).mean(), abs=1e-5)
    lo, hi = rows["steered"]["delta_logprob_ci"]
    assert lo <= rows["steered"]["delta_logprob"] <= hi
    randoms = [recipe.random_matched(model, experts, s) for s in range(2)]
    for pairs in randoms:
        assert sorted(l for l, _ in pairs) == [1, 1, 2] and not set(pairs) & set(experts)
    rand = np.mean([direct(recipe._expert_plan(model, p, "on", 0.0, 1.0, None), *held)[0] for p in randoms], axis=0)
    assert rows["random"]["delta_logprob"] == pytest.approx((rand - base).mean(), abs=1e-5)
    assert result.versus_random["logprob"]["mean"] == pytest.approx((steered - rand).mean(), abs=1e-5)
    steered_text = direct(steering.plan(model, on={1: [2, 5], 2: [0]}), *ctrl)[1]
    assert rows["steered"]["delta_text_logprob_control"] == pytest.approx((steered_text - base_text).mean(), abs=1e-5)
    remote = recipe.evaluate(language_model(model), held, experts, edit="on", control=ctrl, tokenizer=tok, seeds=2,
                             n_boot=200, remote="local")
    for a, b in zip(remote.summary, result.summary):
        for key, value in a.items():
            if isinstance(value, float):
                assert value == pytest.approx(b[key], abs=1e-5), key
    path = result.save(__import__("tempfile").mkdtemp() + "/s.json")
    assert recipe.SteeringResult.load(path).summary == result.summary
    assert "steered" in result.text()


def test_recipe_errors():
    model = tiny_model("qwen2_moe")
    tok = word_tokenizer(padding_side="left")
    with pytest.raises(ValueError, match="needs target ids"):
        recipe.discover(model, ["w5 w6"], ["w7 w8"], tokenizer=tok, attribution=True)
    with pytest.raises(ValueError, match="positions"):
        recipe.discover(model, ["w5 w6"], ["w7 w8"], tokenizer=tok, positions="first")
    with pytest.raises(ValueError, match="edit must be one of"):
        recipe.evaluate(model, (["w5 w6"], [3]), [(1, 2)], edit="boost", tokenizer=tok)
    with pytest.raises(ValueError, match="experts is empty"):
        recipe.evaluate(model, (["w5 w6"], [3]), [], tokenizer=tok)
    with pytest.raises(ValueError, match="leave only"):
        recipe.random_matched(model, [(1, e) for e in range(5)], 0)


def test_evaluate_direction_against_random_directions_of_the_same_norm():
    model = tiny_model("qwen2_moe")
    tok = word_tokenizer(padding_side="left")
    held = (_prompts(13, 5), _targets(14, 5))
    directions = recipe.mean_difference(model, _prompts(15, 6), _prompts(16, 6), tokenizer=tok)
    result = recipe.evaluate_direction(model, held, directions, mode="remove", seeds=2, n_boot=100, tokenizer=tok)
    logp = []
    for prompt, target in zip(*held):
        with torch.no_grad(), steering.steer_direction(model, directions, mode="remove"):
            lp = model(_ids(tok, prompt)).logits[0, -1].log_softmax(-1)
        with torch.no_grad():
            base = model(_ids(tok, prompt)).logits[0, -1].log_softmax(-1)
        logp.append(float(lp[target] - base[target]))
    rows = {r["condition"]: r for r in result.summary}
    assert rows["steered"]["delta_logprob"] == pytest.approx(np.mean(logp), abs=1e-5)
    assert "random directions of the same norm" in result.text()
    assert rows["random"]["delta_logprob"] != rows["steered"]["delta_logprob"]


def test_evaluate_with_a_span_and_few_rows_per_forward():
    """A span and max_rows smaller than the conditions (one prompt per forward) give the direct forwards' effect."""
    model = tiny_model("qwen2_moe")
    tok = word_tokenizer(padding_side="left")
    held = (_prompts(17, 4), _targets(18, 4))
    result = recipe.evaluate(model, held, [(2, 1)], edit="scale", factor=4.0, span="generated", seeds=2, n_boot=50,
                             max_rows=2, tokenizer=tok)
    deltas = []
    for prompt, target in zip(*held):
        ids = _ids(tok, prompt)
        with torch.no_grad(), steering.steer_experts(model, scale={2: {1: 4.0}}, span="generated"):
            lp = model(ids).logits[0, -1].log_softmax(-1)
        with torch.no_grad():
            base = model(ids).logits[0, -1].log_softmax(-1)
        deltas.append(float(lp[target] - base[target]))
    assert result.summary[1]["delta_logprob"] == pytest.approx(np.mean(deltas), abs=1e-5)
    with pytest.raises(ValueError, match="max_rows"):
        recipe.evaluate(model, held, [(2, 1)], max_rows=0, tokenizer=tok)
