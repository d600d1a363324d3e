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


def test_faithful_prototype_trains_three_models(tmp_path):
    """demo.faithful (a prototype, not the bundled demo): three loadable models, depths 8/8/12, held-out template."""
    import json

    from transformers import AutoModelForCausalLM

    from nnsight_moe.data import bundled
    from nnsight_moe.demo import faithful

    train_rel, held_rel = faithful._split_templates(bundled())
    for a, b in zip(train_rel, held_rel):
        assert set(a.prompt_templates).isdisjoint(b.prompt_templates) and len(b.prompt_templates) == 1
    out = faithful.main(["--out", str(tmp_path), "--steps", "2"])
    assert set(out) == {"faithful-moe", "faithful-dense-8", "faithful-dense-12"}
    for name, layers in (("faithful-moe", 8), ("faithful-dense-12", 12)):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name, local_files_only=True)
        assert model.config.num_hidden_layers == layers
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["training"]["label_smoothing"] == faithful.FAITHFUL["label_smoothing"]
        assert metrics["eval_held_out_template"]["prompts"] < metrics["eval_train_templates"]["prompts"]
