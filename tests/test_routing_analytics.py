"""Routing statistics, specialisation, fidelity and the token view against plain-loop oracles on tiny models."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import subprocess

import pytest
import torch

import nnsight_moe
from nnsight_moe.recipes import fidelity, specialisation
from nnsight_moe.recipes.routing_stats import RoutingStats, collect_routing, generation_routing, routing_stats
from nnsight_moe.recipes.token_view import page, token_view
from nnsight_moe.report import json_value
from nnsight_moe.testing import tiny_model

from helpers import capture_hooks, language_model
from test_report_json import strict_loads

FAMILIES = ["qwen2_moe", "deepseek_v3"]  # softmax top-k with a shared expert; sigmoid + bias, grouped, dense layer 0


def _prompts(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (int(length),), generator=g).tolist() for length in torch.randint(2, 9, (n,), generator=g)]


def _padded(prompts, side):
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        span = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[r, span], mask[r, span] = torch.tensor(p), 1
    return ids, mask


def _oracle(hf, prompts, side):
    """Hook values of one padded forward of an attached copy, and the mask (independent of the recipe)."""
    ref = copy.deepcopy(hf)
    handle = nnsight_moe.attach(ref)
    ids, mask = _padded(prompts, side)
    with torch.no_grad():
        values = capture_hooks(handle, lambda: ref(input_ids=ids, attention_mask=mask))
    return handle.layout, values, mask


def _loop_stats(layout, parts):
    """Every statistic by plain Python loops over the captured hook_topk_indices / weights / scores of the
    batches ``parts`` ([(hook values, mask)]), non-pad tokens only."""
    E, k = layout.n_experts, layout.top_k
    tokens = [(values, r, c) for values, mask in parts for r in range(mask.shape[0]) for c in range(mask.shape[1])
              if mask[r, c]]
    get = lambda values, i, name: values[f"{layout.layer(i).path}.{name}"]  # noqa: E731
    out = {"counts": [], "co": [], "entropy": [], "mass": [], "top1": [], "gate_sum": []}
    for i in layout.moe_layers:
        counts, co = [0] * E, [[0] * E for _ in range(E)]
        ent, mass, top1, gates = [], [], [], []
        for values, r, c in tokens:
            chosen = [int(e) for e in get(values, i, "hook_topk_indices")[r, c]]
            w = get(values, i, "hook_topk_weights")[r, c]
            for a in chosen:
                counts[a] += 1
                for b in chosen:
                    co[a][b] += 1
            p = [float(v) for v in get(values, i, "hook_router_scores")[r, c]]
            if min(p) < 0:
                z = [math.exp(v) for v in get(values, i, "hook_router_logits")[r, c].tolist()]
                p = [v / sum(z) for v in z]
            else:
                p = [v / sum(p) for v in p]
            ent.append(-sum(v * math.log(v) for v in p if v > 0))
            mass.append(sum(p[e] for e in chosen))
            top1.append(chosen[max(range(k), key=lambda j: (float(w[j]), -j))])
            gates.append(sum(float(v) for v in w))
        out["counts"].append(counts), out["co"].append(co), out["entropy"].append(sum(ent) / len(ent))
        out["mass"].append(sum(mass) / len(mass)), out["top1"].append(top1), out["gate_sum"].append(sum(gates) / len(gates))
    out["transitions"] = []
    for a, b in zip(out["top1"], out["top1"][1:]):
        t = [[0] * E for _ in range(E)]
        for x, y in zip(a, b):
            t[x][y] += 1
        out["transitions"].append(t)
    out["n"] = len(tokens)
    return out


@pytest.mark.parametrize("family", FAMILIES + ["inkling2_loop_text"])  # + a looped model: one row per pass
@pytest.mark.parametrize("side", ["left", "right"])
def test_stats_equal_plain_loops(family, side):
    hf = tiny_model(family)
    prompts = _prompts()
    stats = routing_stats(collect_routing(hf, prompts, batch_size=2, padding_side=side))
    batches = [_oracle(hf, prompts[s : s + 2], side) for s in range(0, len(prompts), 2)]  # the same padded batches
    layout = batches[0][0]
    loop = _loop_stats(layout, [(values, mask) for _, values, mask in batches])
    E, k, n = layout.n_experts, layout.top_k, loop["n"]
    assert stats.n_tokens == n == sum(map(len, prompts))  # pads never counted
    assert stats.counts.tolist() == loop["counts"]
    assert stats.coactivation.tolist() == loop["co"]
    assert stats.transitions.tolist() == loop["transitions"]
    for row, counts in enumerate(loop["counts"]):
        load = [c / (n * k) for c in counts]
        assert stats.load[row].tolist() == pytest.approx(load, abs=1e-6)
        assert float(stats.load_entropy[row]) == pytest.approx(-sum(x * math.log(x) for x in load if x) / math.log(E), abs=1e-5)
        assert float(stats.imbalance[row]) == pytest.approx(max(load) / (sum(load) / E), abs=1e-5)
        assert stats.dead[row] == [e for e in range(E) if counts[e] == 0]
        assert stats.cold[row] == [e for e in range(E) if load[e] < 0.1 / E]
        for a in range(E):
            for b in range(E):
                pa, pb = counts[a] / n, counts[b] / n
                lift = stats.lift[row, a, b]
                if pa and pb:
                    assert float(lift) == pytest.approx(loop["co"][row][a][b] / n / (pa * pb), rel=1e-5)
                else:
                    assert math.isnan(float(lift))
    assert stats.router_entropy.tolist() == pytest.approx(loop["entropy"], abs=1e-5)
    assert stats.topk_mass.tolist() == pytest.approx(loop["mass"], abs=1e-5)
    assert stats.gate_sum.tolist() == pytest.approx(loop["gate_sum"], abs=1e-5)


def test_right_padding_equals_unpadded_prompts():
    """A right-padded batch routes its real tokens exactly as each prompt alone (causal model, same positions)."""
    hf = tiny_model("qwen2_moe")
    prompts = _prompts(seed=3)
    batched = collect_routing(hf, prompts, batch_size=len(prompts), padding_side="right")
    alone = [collect_routing(hf, [p], batch_size=1) for p in prompts]
    assert torch.equal(batched.indices, torch.cat([a.indices for a in alone], 1))
    torch.testing.assert_close(batched.weights, torch.cat([a.weights for a in alone], 1), atol=1e-6, rtol=0)
    assert batched.tokens.tolist() == [t for p in prompts for t in p]
    assert batched.position.tolist() == [i for p in prompts for i in range(len(p))]


def test_remote_local_equals_local():
    hf = tiny_model("qwen2_moe")
    prompts = _prompts(seed=5)
    local = collect_routing(hf, prompts, batch_size=2, padding_side="left")
    lm = language_model(copy.deepcopy(hf))
    remote = collect_routing(lm, prompts, batch_size=2, padding_side="left", remote="local")
    assert torch.equal(local.indices, remote.indices)
    assert torch.equal(local.tokens, remote.tokens) and torch.equal(local.prompt, remote.prompt)
    for name in ("weights", "entropy", "mass"):
        torch.testing.assert_close(getattr(local, name), getattr(remote, name), atol=1e-5, rtol=0, msg=name)
    through_nnsight = collect_routing(lm, prompts, batch_size=2, padding_side="left")  # nnsight model, no trace
    assert torch.equal(local.indices, through_nnsight.indices)


def test_generation_routing_equals_a_forward_over_the_produced_tokens():
    hf = tiny_model("qwen2_moe")
    prompts = _prompts(seed=7, n=3)
    trace, produced = generation_routing(hf, prompts, max_new_tokens=5, batch_size=3)
    with torch.no_grad():
        out = hf.generate(*_padded(prompts, "left")[:1], attention_mask=_padded(prompts, "left")[1], max_new_tokens=5,
                          do_sample=False, pad_token_id=0)
    width = max(map(len, prompts))
    assert produced == out[:, width:].tolist()  # no EOS in these rows: every produced token kept
    # independent: one forward over prompt + produced tokens; routing at the produced positions (all but the last)
    layout, values, _ = _oracle(hf, [p + g for p, g in zip(prompts, produced)], "right")
    expected = [[] for _ in layout.moe_layers]
    for r, (p, g) in enumerate(zip(prompts, produced)):
        for pos in range(len(p), len(p) + len(g) - 1):
            for row, i in enumerate(layout.moe_layers):
                expected[row].append(sorted(values[f"{layout.layer(i).path}.hook_topk_indices"][r, pos].tolist()))
    assert trace.n_tokens == sum(len(g) - 1 for g in produced)
    got = [[sorted(t) for t in layer] for layer in trace.indices.tolist()]
    agree = sum(a == b for x, y in zip(got, expected) for a, b in zip(x, y)) / (len(got) * trace.n_tokens)
    assert agree == 1.0, f"cached decoding and a full forward route alike ({agree:.3f})"


def test_stats_round_trip_through_results_json(tmp_path):
    stats = routing_stats(collect_routing(tiny_model("qwen2_moe"), _prompts()))
    text = json.dumps(json_value(stats.to_json()), allow_nan=False)
    back = RoutingStats.from_json(strict_loads(text))
    for name in RoutingStats._TENSORS:
        torch.testing.assert_close(getattr(back, name), getattr(stats, name), equal_nan=True, msg=name)
    back.plot_load(), back.plot_coactivation(), back.plot_transitions()  # re-plots from the JSON alone


def test_bad_inputs_are_named():
    hf = tiny_model("qwen2_moe")
    with pytest.raises(ValueError, match="padding_side"):
        collect_routing(hf, _prompts(), padding_side="middle")
    with pytest.raises(ValueError, match="prompts is empty"):
        collect_routing(hf, [])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        collect_routing(hf, [[1, 5000]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generation_routing(hf, _prompts(), max_new_tokens=1)


# ------------------------------------------------------------------------------------ specialisation
def _hypergeom_tail(x, n_total, k, n):
    return sum(math.comb(k, i) * math.comb(n_total - k, n - i) for i in range(x, min(k, n) + 1)) / math.comb(n_total, n)


def test_enrichment_equals_plain_counts_and_exact_tails():
    hf = tiny_model("qwen2_moe")
    prompts = _prompts(seed=11, n=8)
    trace = collect_routing(hf, prompts, padding_side="right")
    prompt_labels = ["a" if i % 3 else "b" for i in range(len(prompts))]
    result = specialisation.enrichment(trace, prompt_labels=prompt_labels, min_support=1)
    frame = result.frame
    labels = [prompt_labels[p] for p in trace.prompt.tolist()]
    n_total = trace.n_tokens
    pvals = []
    for row, layer in enumerate(trace.layers):
        for e in range(trace.n_experts):
            sel = [e in trace.indices[row, t].tolist() for t in range(n_total)]
            if not any(sel):
                assert frame[(frame.layer == layer) & (frame.expert == e)].empty  # never selected: not tested
                continue
            for c in ("a", "b"):
                k = labels.count(c)
                x = sum(s and lab == c for s, lab in zip(sel, labels))
                got = frame[(frame.layer == layer) & (frame.expert == e) & (frame.label == c)].iloc[0]
                assert (got.both, got.n_label, got.n_expert) == (x, k, sum(sel))
                assert got.p == pytest.approx(_hypergeom_tail(x, n_total, k, sum(sel)), rel=1e-6, abs=1e-12)
                joint = x / n_total
                expect = -1.0 if x == 0 else (math.log(joint / (sum(sel) / n_total * k / n_total)) / -math.log(joint)
                                              if joint < 1 else 1.0)
                assert got.npmi == pytest.approx(expect, abs=1e-5)
                pvals.append((got.p, got.q))
    # Benjamini-Hochberg by loops
    m = len(pvals)
    order = sorted(range(m), key=lambda i: pvals[i][0])
    for rank, i in enumerate(order, 1):
        q = min(min(pvals[j][0] * m / r for r, j in enumerate(order, 1) if r >= rank), 1.0)
        assert pvals[i][1] == pytest.approx(q, rel=1e-9)


def test_planted_specialisation_is_found_and_replicates():
    """A synthetic trace where expert 7 of the first layer takes every 'A' token (and only those)."""
    from nnsight_moe.recipes.routing_stats import RoutingTrace

    g = torch.Generator().manual_seed(0)
    n_prompts, per = 40, 6
    n = n_prompts * per
    prompt = torch.arange(n_prompts).repeat_interleave(per)
    label = ["A" if p % 3 == 0 else "B" for p in prompt.tolist()]  # A prompts in both halves (even, odd)
    indices = torch.stack([torch.randperm(7, generator=g)[:2] for _ in range(n)])  # experts 0..6
    indices = torch.stack([indices, indices.clone()])
    for t, lab in enumerate(label):
        if lab == "A":
            indices[0, t, 0] = 7  # expert 7 only ever sees A
    trace = RoutingTrace([1, 2], 8, indices, torch.ones(2, n, 2), torch.zeros(2, n), torch.ones(2, n),
                         torch.zeros(n, dtype=torch.long), prompt, torch.arange(n) % per)
    result = specialisation.enrichment(trace, label, what="label")
    top = result.table(top=1).iloc[0]
    assert (top.layer, top.expert, top.label, top.replicated) == (1, 7, "A", True)
    assert top.npmi == pytest.approx(1.0)
    assert not ((result.frame.layer == 2) & (result.frame.expert == 7)).any()  # never selected at layer 2
    summary = result.summary()
    assert summary["replicated"] >= 1 and summary["significant"] >= 1
    back = specialisation.Enrichment.from_json(strict_loads(json.dumps(json_value(result.to_json()), allow_nan=False)))
    assert back.summary()["tested"] == summary["tested"]


def test_bh_matches_a_known_example():
    p = torch.tensor([0.01, 0.04, 0.03, 0.20])
    # sorted 0.01, 0.03, 0.04, 0.20 -> p m / rank 0.04, 0.06, 0.0533, 0.20 -> running minimum from the top
    assert specialisation.benjamini_hochberg(p).tolist() == pytest.approx([0.04, 0.05333333, 0.05333333, 0.2])


# ------------------------------------------------------------------------------------ fidelity
def test_fidelity_equals_plain_set_comparison():
    hf = tiny_model("qwen2_moe")
    prompts = _prompts(seed=13, n=6)
    result = fidelity.routing_fidelity(hf, prompts, dtypes=("bfloat16",), implementations=("eager", "batched_mm"),
                                       padding_side="right")
    layout = nnsight_moe.layout(hf)
    ids, mask = _padded(prompts, "right")

    def router_sets(model):
        seen = {}
        handles = [model.get_submodule(layout.layer(i).router).register_forward_hook(
            lambda m, a, o, i=i: seen.__setitem__(i, o[2].reshape(ids.shape[0], ids.shape[1], -1)))
            for i in layout.moe_layers]
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        for h in handles:
            h.remove()
        return {i: [[set(v[r, c].tolist()) for c in range(ids.shape[1])] for r in range(ids.shape[0])] for i, v in seen.items()}

    base, half = router_sets(hf), router_sets(copy.deepcopy(hf).to(torch.bfloat16))
    frame = result.to_frame()
    real = [(r, c) for r in range(ids.shape[0]) for c in range(ids.shape[1]) if mask[r, c]]
    any_changed = set()
    for i in layout.moe_layers:
        changed = [(r, c) for r, c in real if base[i][r][c] != half[i][r][c]]
        any_changed |= set(changed)
        row = frame[(frame.comparison == "bfloat16") & (frame.layer == i)].iloc[0]
        assert (row.changed, row.tokens) == (len(changed), len(real))
    row = frame[(frame.comparison == "bfloat16") & (frame.layer == "any")].iloc[0]
    assert row.changed == len(any_changed)
    assert (frame[frame.comparison == "eager"].changed == 0).all()  # the same maths: no flips on CPU float32
    assert set(frame.comparison) == {"bfloat16", "eager", "batched_mm"} - {result.reference["implementation"]}
    assert fidelity.FidelityResult.from_json(json.loads(json.dumps(result.to_json()))).rows == result.rows


def test_check_flips_ignore_padding():
    from nnsight_moe.check import flip_share

    a = torch.tensor([[[0, 1], [2, 3]]])
    b = torch.tensor([[[1, 0], [2, 4]]])
    assert flip_share(a, b) == 0.5
    assert flip_share(a, b, torch.tensor([[1, 0]])) == 0.0  # the changed token is padding
    assert math.isnan(flip_share(a, b, torch.tensor([[0, 0]])))


# ------------------------------------------------------------------------------------ token view
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_token_view_renders_offline_in_headless_chromium(tmp_path):
    trace = collect_routing(tiny_model("qwen2_moe"), _prompts())
    file = tmp_path / "view.html"
    file.write_text(page(token_view(trace, None)))
    proc = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=3000", "--dump-dom", file.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not [line for line in proc.stderr.splitlines() if "CONSOLE" in line and "rror" in line]
    match = re.search(r'data-token-view-rendered="(\d+)"', proc.stdout)
    assert match and int(match.group(1)) == trace.n_tokens
    got = [(int(e), int(l)) for e, l in re.findall(r'data-expert="(\d+)" data-layer="(\d+)"', proc.stdout)]
    top1 = trace.top1()
    expected = [(int(top1[row, t]), layer) for p in trace.prompt.unique().tolist()
                for row, layer in enumerate(trace.layers) for t in (trace.prompt == p).nonzero().reshape(-1).tolist()]
    assert got == expected  # every MoE layer a row of each prompt, each token coloured by its top-1 expert there


@pytest.mark.parametrize("family", nnsight_moe.supported_families())
def test_every_family_counts_equal_plain_loops(family):
    """Load and co-activation counts of every supported family against loops over its hook_topk_indices."""
    hf = tiny_model(family)
    prompts = [[5, 6, 7, 8], [9, 10]]
    if nnsight_moe.adapters.adapter_for(hf).recipes:  # a family the recipes refuse, saying why (DiffusionGemma)
        with pytest.raises(nnsight_moe.UnsupportedModelError, match=f"do not run on {family} models: .+"):
            collect_routing(hf, prompts, padding_side="right")
        return
    stats = routing_stats(collect_routing(hf, prompts, padding_side="right"))
    layout, values, mask = _oracle(hf, prompts, "right")
    loop = _loop_stats(layout, [(values, mask)])
    assert stats.counts.tolist() == loop["counts"] and stats.coactivation.tolist() == loop["co"]
    assert stats.transitions.tolist() == loop["transitions"]


def test_permutation_test_shuffles_whole_prompts_and_agrees_on_a_planted_expert():
    from nnsight_moe.recipes.routing_stats import RoutingTrace

    g = torch.Generator().manual_seed(1)
    n_prompts, per = 30, 5
    n = n_prompts * per
    prompt = torch.arange(n_prompts).repeat_interleave(per)
    labels = ["A" if p % 3 == 0 else "B" for p in range(n_prompts)]
    indices = torch.stack([torch.randperm(7, generator=g)[:2] for _ in range(n)])[None]
    for t in range(n):
        if labels[int(prompt[t])] == "A":
            indices[0, t, 0] = 7
    trace = RoutingTrace([0], 8, indices, torch.ones(1, n, 2), torch.zeros(1, n), torch.ones(1, n),
                         torch.zeros(n, dtype=torch.long), prompt, torch.arange(n) % per)
    perm = specialisation.enrichment(trace, prompt_labels=labels, method="permutation", permutations=200, min_support=1)
    hyper = specialisation.enrichment(trace, prompt_labels=labels, min_support=1)
    row = perm.frame[(perm.frame.expert == 7) & (perm.frame.label == "A")].iloc[0]
    assert row.p == pytest.approx(1 / 201)  # no shuffle of whole prompts puts as many A tokens on expert 7
    assert row.q < 0.05 and perm.table(top=1).iloc[0].expert == 7
    # a p-value by brute force: shuffle the 30 prompt labels, count shuffles with >= the observed co-occurrences
    unit_counts = [[sum(int(e) == 3 for e in indices[0, t]) for t in range(n) if int(prompt[t]) == u] for u in range(n_prompts)]
    per_prompt = [sum(c) for c in unit_counts]
    observed = sum(c for c, lab in zip(per_prompt, labels) if lab == "A")
    got = perm.frame[(perm.frame.expert == 3) & (perm.frame.label == "A")].iloc[0].p
    rng = torch.Generator().manual_seed(5)
    shuffles = [torch.randperm(n_prompts, generator=rng).tolist() for _ in range(2000)]
    brute = (1 + sum(sum(per_prompt[u] for u, v in zip(order, labels) if v == "A") >= observed for order in shuffles)) / 2001
    assert got == pytest.approx(brute, abs=0.08)  # two Monte Carlo estimates of the same p (200 vs 2000 shuffles)
    assert set(hyper.frame.columns) == set(perm.frame.columns)
    with pytest.raises(ValueError, match="method"):
        specialisation.enrichment(trace, prompt_labels=labels, method="bootstrap")


def test_generation_routing_numbers_prompts_and_stops_at_eos():
    hf = tiny_model("qwen2_moe")
    prompts = _prompts(seed=7, n=3)
    free, produced = generation_routing(hf, prompts, max_new_tokens=4, batch_size=2)
    eos = produced[1][1]  # make the second prompt's second produced token the end-of-sequence token
    hf.generation_config.eos_token_id = eos
    trace, cut = generation_routing(hf, prompts, max_new_tokens=4, batch_size=2)
    assert cut[1] == produced[1][:2]  # kept up to and including EOS
    counts = [int((trace.prompt == p).sum()) for p in range(3)]
    # each row's produced tokens are read back except the last one (never fed) or its EOS (not counted)
    assert counts == [len(c) - 1 for c in cut] and counts[1] == 1
    assert trace.prompt.tolist() == sorted(trace.prompt.tolist())  # prompt numbers are the inputs' (batches of 2)
    first = free.select(free.prompt == 1)
    assert torch.equal(trace.select(trace.prompt == 1).indices, first.indices[:, :1])
