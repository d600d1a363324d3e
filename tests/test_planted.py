"""The planted-ground-truth model: its wiring holds, training is deterministic, and the recipes recover it."""

import hashlib

import pytest
import torch

import nnsight_moe
from nnsight_moe.demo import planted
from nnsight_moe.recipes import recovery


def test_wiring_holds_in_the_stored_weights():
    """Every weight the construction forbids is exactly 0; layer-0 routed experts output exactly 0."""
    model, tok = planted.load()
    masks = planted._masks(model)
    params = dict(model.named_parameters())
    assert len(masks) == 2 + 3 * 6  # embeddings, lm_head; per layer o_proj, shared gate/up/down, experts (2)
    for name, mask in masks.items():
        fixed = planted.prior(params[name].shape) if name == "lm_head.weight" else 0.0  # frozen tie-breaker
        assert float((params[name] * (1 - mask) - fixed).abs().max()) == 0.0, name
    truth = planted.ground_truth()
    assert truth["weights_bytes"] == (planted.path() / "model.safetensors").stat().st_size < 2_000_000
    assert sorted(truth["experts"]) == sorted(planted.RELATIONS)
    for pairs in truth["experts"].values():
        assert len(pairs) == 4 and {layer for layer, _ in pairs} == set(truth["planted_layers"])
    seen = {}
    with nnsight_moe.attached(model) as handle:
        handle.block(0).hook_expert_out.add_hook(lambda v, hook: seen.__setitem__("out", v.detach()))
        model(**tok(["hue of item3"], return_tensors="pt"))
        handle.block(0).hook_expert_out.remove_hooks()
    assert float(seen["out"].abs().max()) == 0.0
    assert planted.routing_agreement(model, tok) >= recovery.THRESHOLDS["routing_agreement"]


def test_training_is_deterministic(tmp_path):
    """Two short trainings from scratch write identical weights."""
    digests = []
    for run in ("a", "b"):
        planted.train(tmp_path / run, steps=2)
        digests.append(hashlib.sha256((tmp_path / run / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_recipes_recover_the_planted_experts():
    """precision@4 >= 0.8; blocking planted experts drops MRR >= 5x random blocking and to the fact-free floor."""
    out = recovery.measure(seeds=5)
    t = recovery.THRESHOLDS
    assert out["precision_at_k"]["attribution"]["mean"] >= t["precision_at_k"]
    assert out["n_rank_facts"] and out["n_eval_facts"]
    for row in out["rows"]:
        assert row["original"] >= 0.95, row
        assert row["planted drop"] >= t["drop_ratio"] * max(row["random drop"], 0.0), row
        assert row["planted blocked"] <= row["floor (routed off)"] + t["floor_margin"], row
        assert row["shared ablated"] <= row["floor (routed off)"] + t["floor_margin"], row
        assert row["planted drop"] >= 0.5, row


def test_specialisation_finds_the_planted_experts():
    """Routing analytics on the planted model (issue #17's acceptance): at each prompt's last token, the four
    experts most enriched for a relation (by nPMI, among those significant at q < 0.05) are its planted ones."""
    from nnsight_moe.recipes.routing_trace import collect_routing
    from nnsight_moe.recipes.specialisation import enrichment

    model, tok = planted.load()
    prompts, labels = [], []
    for rel in planted.relations():
        for template in rel.prompt_templates:
            for subject, _ in rel.samples:
                prompts.append(template.format(subject))
                labels.append(rel.name)
    trace = collect_routing(model, prompts, tokenizer=tok, batch_size=16)
    last = torch.zeros(len(prompts), dtype=torch.long).scatter_reduce(0, trace.prompt, trace.position, "amax")
    found = enrichment(trace.select(trace.position == last[trace.prompt]), prompt_labels=labels, min_support=5)
    significant = found.significant()
    truth = planted.ground_truth()["experts"]
    for rel, pairs in truth.items():
        rows = significant[significant.label == rel].sort_values("npmi", ascending=False).head(len(pairs))
        assert sorted(zip(rows.layer.tolist(), rows.expert.tolist())) == sorted(map(tuple, pairs)), rel
