"""Expert blocking recipe: metrics, blocking and configurations against brute force on model copies."""

import copy
import json
import warnings

import matplotlib
import pytest
import torch

import nnsight_moe
from nnsight_moe.recipes import blocking
from nnsight_moe.recipes.metrics import hit_at_k, mrr, target_ranks
from nnsight_moe.testing import tiny_model
from tests.helpers import zero_expert_

matplotlib.use("Agg")


def _dataset(model, n=12, seed=0):
    """Token-id prompts of varied length; half the targets are the model's own top token (rank 1)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n,), generator=g).tolist()
    prompts = [torch.randint(3, 128, (length,), generator=g).tolist() for length in lengths]
    targets = torch.randint(3, 128, (n,), generator=g)
    with torch.no_grad():
        for i in range(0, n, 2):
            targets[i] = model(torch.tensor([prompts[i]])).logits[0, -1].argmax()
    relations = ["r1"] * (n // 2) + ["r2"] * (n - n // 2)
    return prompts, targets, relations


@torch.no_grad()
def _copy_ranks(model, prompts, targets, blocked=None, edit=None):
    """Ranks from a deep copy with the blocked experts' down_proj zeroed (or ``edit(copy)``), one prompt at a time."""
    clone = copy.deepcopy(model)
    if blocked:
        by_layer = {}
        for layer, expert in blocked:
            by_layer.setdefault(layer, []).append(expert)
        zero_expert_(clone, nnsight_moe.layout(model), by_layer)
    if edit is not None:
        edit(clone)
    logits = torch.stack([clone(torch.tensor([p])).logits[0, -1] for p in prompts])
    return target_ranks(logits, targets)


def _metrics(ranks):
    return float((1 / ranks.double()).mean()), float((ranks <= 10).double().mean())


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_metrics_equal_direct_computation(side):
    """Original MRR / HIT@10 equal mrr/hit_at_k of last-position logits computed directly, either padding side."""
    model = tiny_model("qwen2_moe")
    prompts, targets, relations = _dataset(model)
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        span = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, span], mask[i, span] = torch.tensor(p), 1
    full = model(input_ids=ids, attention_mask=mask).logits
    last = torch.tensor([width - 1 if side == "left" else len(p) - 1 for p in prompts])
    direct = full[torch.arange(len(prompts)), last]
    ranks = blocking.evaluate(model, (prompts, targets), [[]], padding_side=side, batch_size=len(prompts), progress=False)
    assert torch.equal(ranks[0], target_ranks(direct, targets))
    result = blocking.sweep(model, (prompts, targets, relations), ranking=[(1, 0)], top_n=(1,), seeds=1,
                            padding_side=side, batch_size=len(prompts), progress=False)
    for rel, idx in (("r1", slice(0, 6)), ("r2", slice(6, 12)), ("all", slice(None))):
        assert result.original[rel]["mrr"] == pytest.approx(mrr(direct[idx], targets[idx]), abs=1e-12)
        assert result.original[rel]["hit_at_k"] == pytest.approx(hit_at_k(direct[idx], targets[idx], 10), abs=1e-12)
    if side == "right":  # right padding: the last real token sees exactly the unpadded prompt
        assert torch.equal(ranks[0], _copy_ranks(model, prompts, targets))


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe", "inkling_text", "zaya"])  # + router gammas, a skip expert
def test_zero_sweep_equals_zeroed_copies(family):
    """Every top and random condition of a `zero` sweep equals a copy with those down_projs zeroed."""
    model = tiny_model(family)
    prompts, targets, relations = _dataset(model)
    ranking = blocking.rank_experts(model, (prompts, targets, relations), by="gate", progress=False)
    result = blocking.sweep(model, (prompts, targets, relations), ranking=ranking, top_n=(1, 4), seeds=2,
                            batch_size=5, max_rows=16, progress=False)
    frame = result.to_frame()
    assert set(frame["kind"]) == {"top", "uniform", "matched"} and len(frame) == 3 * 2 * 5
    groups = {"r1": list(range(6)), "r2": list(range(6, 12))}
    for _, row in frame[frame["relation"] != "all"].iterrows():
        idx = groups[row["relation"]]
        expected = _copy_ranks(model, [prompts[i] for i in idx], targets[idx], row["experts"])
        assert (row["mrr"], row["hit_at_k"]) == pytest.approx(_metrics(expected), abs=1e-12), row.to_dict()
        if row["kind"] == "top":
            assert sorted(map(tuple, row["experts"])) == sorted(ranking.per_relation[row["relation"]][: row["n"]])
        if row["kind"] == "matched":
            top = frame[(frame.relation == row.relation) & (frame.kind == "top") & (frame.n == row.n)].iloc[0]
            assert sorted(l for l, _ in row["experts"]) == sorted(l for l, _ in top["experts"])
    assert (frame[frame.kind == "top"]["mrr_drop"] != 0).any(), "blocking changed nothing: the oracle is vacuous"
    pooled = frame[(frame.relation == "all") & (frame.kind == "top") & (frame.n == 4)].iloc[0]
    parts = frame[(frame.relation != "all") & (frame.kind == "top") & (frame.n == 4)]
    assert pooled["mrr"] == pytest.approx(parts["mrr"].mean())


def test_stacked_equals_naive_and_reroute_avoids_blocked():
    """Stacked conditions give the per-condition loop's ranks in every mode; reroute never picks a blocked expert."""
    model = tiny_model("qwen2_moe")
    prompts, targets, _ = _dataset(model)
    conditions = [[], [(0, 1)], [(0, 1), (1, 3), (2, 5)], [(1, e) for e in range(6)], [(2, 0), (2, 7)]]
    handle = nnsight_moe.attach(model)
    checked = []

    def check(indices, hook):
        layer = int(hook.name.split(".")[2])
        exclude = handle.states[layer].exclude
        if exclude is not None:
            exclude = exclude.expand(indices.shape[0], -1) if exclude.ndim == 1 else exclude
            assert exclude.shape[0] == indices.shape[0]
            assert not exclude[:, None, :].expand(-1, indices.shape[1], -1).gather(-1, indices).any()
            checked.append(int(exclude.sum()))

    for layer in handle.layout.moe_layers:
        handle.block(layer).hook_topk_indices.add_hook(check)
    try:
        for mode in ("zero", "renorm", "reroute"):
            stacked = blocking.evaluate(model, (prompts, targets), conditions, mode=mode, batch_size=5, max_rows=12,
                                        progress=False)
            naive = blocking.evaluate(model, (prompts, targets), conditions, mode=mode, batch_size=5, stacked=False,
                                      progress=False)
            assert torch.equal(stacked, naive), mode
            assert not torch.equal(stacked[0], stacked[3]), f"{mode}: blocking changed nothing"
    finally:
        for layer in handle.layout.moe_layers:
            handle.block(layer).hook_topk_indices.remove_hooks()
    assert checked and sum(checked) > 0
    assert all(s.exclude is None and s.zero is None and not s.renorm for s in handle.states.values())
    handle.detach()
    direct = [_copy_ranks(model, prompts, targets, c) for c in conditions]
    assert torch.equal(torch.stack(direct), blocking.evaluate(model, (prompts, targets), conditions, progress=False))


def test_sweep_stacked_equals_naive_all_modes():
    """The whole sweep (top + both baselines, three modes) is the same stacked and per condition."""
    model = tiny_model("olmoe")
    data = _dataset(model)
    kwargs = dict(ranking=[(l, e) for l in (0, 1, 2) for e in range(8)], top_n=(2, 5), seeds=2,
                  modes=("zero", "renorm", "reroute"), batch_size=6, progress=False)
    stacked = blocking.sweep(model, data, max_rows=30, **kwargs)
    naive = blocking.sweep(model, data, stacked=False, **kwargs)
    assert stacked.to_json() == naive.to_json()


@torch.no_grad()
def test_configurations_match_zeroed_copies():
    """'shared only' = copy with every routed down_proj zeroed; shared ablation = copy with the shared expert zeroed."""
    model = tiny_model("qwen2_moe")
    prompts, targets, relations = _dataset(model)
    result = blocking.configurations(model, (prompts, targets, relations), batch_size=5, progress=False)
    layout = nnsight_moe.layout(model)
    assert result.meta["configurations"] == ["routed top-1 only", "shared only", "shared + top-1",
                                             "shared + top-2 (default)", "shared ablation (routed top-2 only)"]
    table = result.table("mrr")
    hits = result.table("hit_at_k")

    def zero_shared(clone):
        for i in layout.moe_layers:
            shared = clone.get_submodule(layout.layer(i).shared)
            shared.down_proj.weight.zero_()

    everything = [(i, e) for i in layout.moe_layers for e in range(8)]
    for name, oracle in (("shared only", dict(blocked=everything)), ("shared ablation (routed top-2 only)",
                         dict(edit=zero_shared)), ("shared + top-2 (default)", {})):
        ranks = _copy_ranks(model, prompts, targets, **oracle)
        assert (table.loc["all", name], hits.loc["all", name]) == pytest.approx(_metrics(ranks), abs=1e-12), name
        assert table.loc["r1", name] == pytest.approx(_metrics(ranks[:6])[0], abs=1e-12)
    assert table.loc["all", "shared only"] != table.loc["all", "shared + top-2 (default)"]
    no_shared = blocking.configurations(tiny_model("mixtral"), (prompts, targets), progress=False)
    assert no_shared.meta["configurations"] == ["routed top-1 only", "routed top-2 (default)"]
    assert list(no_shared.original) == ["all"]


def test_results_roundtrip_frame_and_plots(tmp_path):
    """to_json is JSON-serialisable, save/load round-trips, tables and plots have the documented layout."""
    model = tiny_model("qwen2_moe")
    data = _dataset(model)
    result = blocking.sweep(model, data, ranking=[(l, e) for l in (0, 1, 2) for e in range(8)], top_n=(1, 3),
                            seeds=2, modes=("zero", "reroute"), progress=False)
    loaded = blocking.BlockingResult.load(result.save(tmp_path / "sweep.json"))
    assert loaded.to_json() == json.loads(json.dumps(result.to_json()))
    assert list(result.table().columns) == ["original", "top-1", "top-3"]
    assert list(result.table().index) == ["r1", "r2", "all"]
    assert list(result.mode_table().columns) == ["zero", "reroute"]
    summary = result.summary().reset_index()
    uniform = summary[(summary.kind == "uniform") & (summary.relation == "r1") & (summary["mode"] == "zero")]
    assert set(uniform["count"]) == {2}
    assert "r1: " in result.text() and " -> " in result.text()
    assert isinstance(result.plot(), matplotlib.figure.Figure)
    configs = blocking.configurations(model, data, progress=False)
    again = blocking.ConfigurationResult.load(configs.save(tmp_path / "configs.json"))
    assert again.table().equals(configs.table())
    assert isinstance(configs.plot(), matplotlib.figure.Figure)
    with pytest.raises(ValueError, match="blocking_sweep"):
        blocking.ConfigurationResult.load(tmp_path / "sweep.json")


def test_nnsight_frontend_gives_identical_numbers():
    """An nnsight-wrapped model is unwrapped to the same HF model: identical sweep."""
    import nnsight

    model = tiny_model("qwen2_moe")
    data = _dataset(model)
    kwargs = dict(ranking=[(1, 2), (0, 3), (2, 6)], top_n=(1, 3), seeds=1, progress=False)
    assert blocking.sweep(nnsight.NNsight(model), data, **kwargs).to_json() == blocking.sweep(model, data, **kwargs).to_json()


def test_bad_inputs():
    model = tiny_model("qwen2_moe")
    data = _dataset(model)
    with pytest.raises(ValueError, match=r"top_n=25 .* 1\.\.24, the number of routed experts"):
        blocking.sweep(model, data, ranking=[(0, 0)], top_n=(25,), progress=False)
    with pytest.raises(ValueError, match="ranking for 'r1' lists only 1"):
        blocking.sweep(model, data, ranking=[(0, 0)], top_n=(2,), progress=False)
    deepseek = tiny_model("deepseek_v3")
    with pytest.raises(ValueError, match=r"names \(0, 1\).*dense layer"):
        blocking.sweep(deepseek, data, ranking=[(0, 1), (1, 1)], top_n=(1,), progress=False)
    with pytest.raises(IndexError, match="expert 9 is out of range"):
        blocking.evaluate(model, data, [[(1, 9)]], progress=False)
    for empty in ([], ([], [])):
        with pytest.raises(ValueError, match="dataset is empty"):
            blocking.sweep(model, empty, ranking=[(0, 0)], top_n=(1,), progress=False)
    with pytest.raises(TypeError, match="needs an nnsight model"):
        blocking.rank_experts(model, data, by="frequency", remote="local", progress=False)
    with pytest.raises(TypeError, match="needs an nnsight model"):
        blocking.evaluate(model, data, [[(0, 1)]], remote="local", progress=False)
    with pytest.raises(TypeError, match="needs an nnsight model"):
        blocking.configurations(model, data, remote="local", progress=False)
    with pytest.raises(ValueError, match="modes must be"):
        blocking.sweep(model, data, ranking=[(0, 0)], top_n=(1,), modes=("drop",), progress=False)
    with pytest.raises(ValueError, match="by must be one of"):
        blocking.rank_experts(model, data, by="magic")
    with pytest.raises(ValueError, match="cannot reroute around 7 of 8 experts in layer 1"):
        blocking.evaluate(model, data, [[(1, e) for e in range(7)]], mode="reroute", progress=False)
    with pytest.raises(ValueError, match="needs tokenizer"):
        blocking.sweep(model, nnsight_moe.data.bundled()[:1], top_n=(1,), progress=False)
    with pytest.raises(ValueError, match="same length"):
        blocking.evaluate(model, (data[0], data[1][:3]), [[]])


def test_demo_top10_lowers_mrr_more_than_matched_random():
    """demo-moe, bundled relations: blocking each relation's top-10 experts beats the matched random baseline.

    Experts are ranked by attribution when that recipe is installed, otherwise by gated-weight
    (``"gate"``) routing at the last position. 24 evenly spaced facts per relation keep this fast.
    """
    from nnsight_moe import data, demo

    model, tokenizer = demo.load("demo-moe")
    relations = data.bundled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import nnsight_moe.recipes.attribution  # noqa: F401

            by = "attribution"
        except ImportError:
            by = "gate"
        result = blocking.sweep(model, relations, tokenizer=tokenizer, by=by, top_n=(10,), seeds=5,
                                max_per_relation=24, progress=False)
    summary = result.summary()
    top = summary.loc[("all", "zero", "top", 10), "mrr"]
    matched = summary.loc[("all", "zero", "matched", 10), "mrr"]
    original = result.original["all"]["mrr"]
    assert original > 0.9
    assert original - top > original - matched, (by, original, top, matched)
    assert summary.loc[("all", "zero", "matched", 10), "count"] == 5


def test_random_pairs():
    """Matched draws keep the per-layer counts; uniform draws respect the reroute cap; seeds reproduce."""
    model = tiny_model("deepseek_v3")  # layer 0 dense: draws only from MoE layers 1, 2
    top = [(1, 0), (1, 3), (2, 5)]
    matched = blocking.random_pairs(model, top, "matched", seed=3)
    assert sorted(layer for layer, _ in matched) == [1, 1, 2] and len(set(matched)) == 3
    assert matched == blocking.random_pairs(model, top, "matched", seed=3)
    draws = {tuple(blocking.random_pairs(model, [(i, e) for i in (1, 2) for e in range(6)], "uniform", seed=s,
                                                reroute=True))
             for s in range(20)}
    assert len(draws) > 1
    for draw in draws:
        assert {layer for layer, _ in draw} <= {1, 2} and len(set(draw)) == 12
        assert max(sum(layer == i for layer, _ in draw) for i in (1, 2)) <= 6  # E - k = 8 - 2
    with pytest.raises(ValueError, match="kind must be one of"):
        blocking.random_pairs(model, top, "gaussian")


def test_main_job_section(tmp_path):
    """blocking.section(job) on demo-moe (--quick): report.write accepts it; results.json has the documented keys."""
    import time

    from nnsight_moe import data, demo
    from nnsight_moe.job import Job
    from nnsight_moe.report import validate, write

    model, tokenizer = demo.load("demo-moe")
    relations = data.bundled()[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoded = data.encode_facts(tokenizer, [f for r in relations for f in r.facts()])
    job = Job("demo-moe", model, tokenizer, relations, encoded, quick=True)
    section = blocking.section(job)
    header = {"model": {key: 0 for key in ("name", "family", "model_type", "n_layers", "moe_layers", "n_experts",
                                           "top_k", "has_shared")},
              "data": {"source": "bundled", "n_facts": len(encoded), "relations": [], "skipped": []}}
    results = write(tmp_path, header, [section], time.time())
    validate(results)
    saved = json.loads((tmp_path / "results.json").read_text())["sections"]["blocking"]
    assert set(saved) == {"title", "sweep", "configurations", "split", "n_rank_facts", "n_eval_facts", "significance"}
    assert saved["split"] and saved["n_rank_facts"] + saved["n_eval_facts"] == len(encoded)  # held out by default
    assert all(row["top_ci"][0] <= row["top"] <= row["top_ci"][1] for row in saved["significance"])
    assert any(name.endswith("(renormalised)") for name in saved["configurations"]["meta"]["configurations"])
    assert saved["sweep"]["type"] == "blocking_sweep" and saved["sweep"]["meta"]["seeds"] == 5
    assert {r["kind"] for r in saved["sweep"]["rows"]} == {"top", "uniform", "matched"}
    assert set(saved["sweep"]["original"]) == {relations[0].name, relations[1].name, "all"}
    assert saved["sweep"]["original"][relations[0].name]["n_prompts"] == job.max_per_relation
    assert saved["configurations"]["meta"]["configurations"][1] == "shared only"
    assert {p["name"] for p in results["plots"]} == {"blocking_mrr", "blocking_configurations"}


def test_rank_by_attribution_and_frequency():
    """Attribution ranking = experts sorted by mean expert-level score of attribute(); frequency = selection counts."""
    model = tiny_model("qwen2_moe")
    prompts, targets, relations = _dataset(model)
    ranking = blocking.rank_experts(model, (prompts, targets, relations), by="frequency", progress=False)
    handle = nnsight_moe.attach(model)
    counts = torch.zeros(3, 8)
    for p in prompts:
        seen = {}
        for layer in (0, 1, 2):
            handle.block(layer).hook_topk_indices.add_hook(lambda t, hook, layer=layer: seen.__setitem__(layer, t))
        with torch.no_grad():
            model(torch.tensor([p]))
        for layer in (0, 1, 2):
            handle.block(layer).hook_topk_indices.remove_hooks()
            counts[layer] += torch.bincount(seen[layer][0, -1], minlength=8)
    handle.detach()
    assert [s[2] for s in ranking.scores["all"]] == pytest.approx(sorted((counts / 12).flatten().tolist(), reverse=True))
    assert [counts[l, e] for l, e in ranking.overall] == sorted(counts.flatten().tolist(), reverse=True)
    assert len(ranking.overall) == 24 and set(ranking.per_relation) == {"r1", "r2"}
    attribution = pytest.importorskip("nnsight_moe.recipes.attribution")
    ranked = blocking.rank_experts(model, (prompts, targets, relations), by="attribution", progress=False)
    frame = attribution.attribute(model, prompts[:6], targets[:6].tolist(), levels=("expert",), progress=False).to_frame()
    mean = frame[frame.level == "expert"].groupby(["layer", "expert"])["score"].sum() / 6
    best = mean.sort_values(ascending=False)
    assert ranked.per_relation["r1"][0] == tuple(int(v) for v in best.index[0])
    assert ranked.scores["r1"][0][2] == pytest.approx(best.iloc[0])


@pytest.mark.parametrize("mode", ["zero", "renorm", "reroute"])
def test_remote_local_equals_local(mode):
    """evaluate(remote="local") on the unmodified model (MoEView, serialised request) = the local path."""
    import nnsight

    from helpers import word_tokenizer

    tokenizer = word_tokenizer(padding_side="left")
    model = tiny_model("qwen2_moe")
    g = torch.Generator().manual_seed(5)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(4, 128, (int(n),), generator=g))
               for n in torch.randint(3, 7, (6,), generator=g)]
    targets = torch.randint(4, 128, (6,), generator=g).tolist()
    conditions = [[], [(0, 1), (2, 3)], [(1, 0), (1, 5), (1, 6)]]
    local = blocking.evaluate(model, (prompts, targets), conditions, mode=mode, tokenizer=tokenizer,
                              batch_size=4, progress=False)
    lm = nnsight.LanguageModel(model, tokenizer=tokenizer)
    remote = blocking.evaluate(lm, (prompts, targets), conditions, mode=mode, tokenizer=tokenizer,
                               batch_size=4, remote="local", progress=False)
    assert torch.equal(remote, local)
    assert nnsight_moe.handle_of(model) is None, "the remote path attaches nothing"


def _remote_setup(family="qwen2_moe", n=8):
    import nnsight

    from helpers import word_tokenizer

    tokenizer = word_tokenizer(padding_side="left")
    model = tiny_model(family)
    g = torch.Generator().manual_seed(7)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(4, 128, (int(k),), generator=g))
               for k in torch.randint(3, 7, (n,), generator=g)]
    targets = torch.randint(4, 128, (n,), generator=g)
    with torch.no_grad():  # half the targets are the model's own top token, so blocking can move MRR
        for i in range(0, n, 2):
            targets[i] = model(**tokenizer([prompts[i]], return_tensors="pt")).logits[0, -1].argmax()
    relations = ["r1"] * (n // 2) + ["r2"] * (n - n // 2)
    return model, nnsight.LanguageModel(model, tokenizer=tokenizer), tokenizer, (prompts, targets, relations)


@pytest.mark.parametrize("by", ["frequency", "gate", "attribution"])
def test_remote_rank_experts_equals_local(by):
    model, lm, tokenizer, data = _remote_setup()
    local = blocking.rank_experts(model, data, tokenizer=tokenizer, by=by, batch_size=3, progress=False)
    remote = blocking.rank_experts(lm, data, tokenizer=tokenizer, by=by, batch_size=3, remote="local", progress=False)
    assert remote.per_relation == local.per_relation and remote.overall == local.overall
    for name in local.scores:
        assert [s[:2] for s in remote.scores[name]] == [s[:2] for s in local.scores[name]]
        assert [s[2] for s in remote.scores[name]] == pytest.approx([s[2] for s in local.scores[name]], abs=1e-5)
    assert nnsight_moe.handle_of(model) is None


def test_remote_sweep_and_configurations_equal_local():
    """A full remote sweep (ranking included, two modes, stacked conditions) and Table 2 = the local path."""
    model, lm, tokenizer, data = _remote_setup()
    options = dict(tokenizer=tokenizer, top_n=(1, 3), modes=("zero", "reroute"), seeds=1, by="frequency",
                   baselines=("matched",), batch_size=4, max_rows=12, progress=False)
    local = blocking.sweep(model, data, **options)
    remote = blocking.sweep(lm, data, remote="local", **options)
    assert remote.meta == local.meta
    assert remote.original == local.original
    assert remote.rows == local.rows
    assert any(row["mrr"] != local.original[row["relation"]]["mrr"] for row in local.rows), "blocking moves MRR"
    local_c = blocking.configurations(model, data, tokenizer=tokenizer, batch_size=4, progress=False)
    remote_c = blocking.configurations(lm, data, tokenizer=tokenizer, batch_size=4, remote="local", progress=False)
    assert remote_c.rows == local_c.rows and remote_c.original == local_c.original
    assert len({row["mrr"] for row in local_c.rows if row["relation"] == "all"}) > 1, "configurations differ"
    assert nnsight_moe.handle_of(model) is None


def test_remote_sweep_resumes_after_a_failed_batch(tmp_path, monkeypatch):
    from nnsight.intervention.backends.local import LocalSimulationBackend

    from nnsight_moe.remote import RemoteBatchError

    model, lm, tokenizer, data = _remote_setup(n=6)
    calls = []

    class Flaky(LocalSimulationBackend):
        def __call__(self, tracer):
            calls.append(len(calls))
            if len(calls) == 3:
                raise ConnectionError("simulated NDIF outage")
            return LocalSimulationBackend.__call__(self, tracer)

    options = dict(tokenizer=tokenizer, ranking=[(0, 1), (1, 2), (2, 3)], top_n=(2,), seeds=1,
                   batch_size=3, max_rows=3, progress=False)
    expected = blocking.sweep(model, data, **options)
    path = tmp_path / "sweep.pt"
    monkeypatch.setattr(lm, "_remote_backend", lambda *a, **k: Flaky(lm))
    with pytest.raises(RemoteBatchError, match="batch 2 of") as failed:
        blocking.sweep(lm, data, remote="local", results_path=path, **options)
    assert failed.value.completed == [0, 1] and path.exists()
    n_batches = len(calls)
    result = blocking.sweep(lm, data, remote="local", results_path=path, **options)
    # 2 relations x 1 chunk x 4 conditions (original, top-2, uniform, matched), one condition per trace
    assert len(calls) - n_batches == 2 * 4 - 2, "only the unfinished batches ran again"
    assert result.rows == expected.rows and result.original == expected.original
