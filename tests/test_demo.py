"""nnsight_moe.demo: the embedded demo models load offline and know the bundled facts."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from nnsight_moe import demo  # noqa: E402
from nnsight_moe.data import bundled, encode_facts  # noqa: E402

MAX_WEIGHT_BYTES = 8 * 1000 * 1000


#: the demo pair these tests are about (the faithful trio: tests/test_faithful.py)
PAIR = ("demo-moe", "demo-dense")


@pytest.fixture(scope="module")
def models():
    return {name: demo.load(name) for name in PAIR}


def last_position_ranks(model, tokenizer, prompts, targets):
    """1-based rank of each target among the last-position logits (independent of the training script)."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"][:, -1] == 1).all(), "left padding: the last position is a real token"
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1]
    target_logits = logits[torch.arange(len(targets)), torch.tensor(targets)]
    return 1 + (logits > target_logits[:, None]).sum(dim=1)


def test_names_and_paths():
    assert demo.names() == ["demo-moe", "demo-dense", "faithful-moe", "faithful-dense", "faithful-dense-12"]
    for name in demo.names():
        folder = demo.path(name)
        for file in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json"):
            assert (folder / file).is_file(), f"{name}: missing {file}"
    with pytest.raises(ValueError, match="demo-moe.*demo-dense"):
        demo.load("demo-huge")
    with pytest.raises(ValueError, match="demo-moe, demo-dense"):
        demo.path("nope")


def test_weights_fit_the_budget():
    sizes = {name: (demo.path(name) / "model.safetensors").stat().st_size for name in PAIR}
    assert sum(sizes.values()) <= MAX_WEIGHT_BYTES, sizes


def test_architectures(models):
    from transformers import LlamaForCausalLM, Qwen2MoeForCausalLM
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    moe, _ = models["demo-moe"]
    dense, _ = models["demo-dense"]
    assert isinstance(moe, Qwen2MoeForCausalLM) and not moe.training
    assert isinstance(dense, LlamaForCausalLM) and not dense.training
    cfg = moe.config
    assert cfg.num_experts >= 4 and cfg.num_experts_per_tok >= 2 and cfg.norm_topk_prob is False
    assert cfg.shared_expert_intermediate_size > 0 and cfg.tie_word_embeddings is False
    for layer in moe.model.layers:  # every layer sparse, each with a gated shared expert
        assert isinstance(layer.mlp, Qwen2MoeSparseMoeBlock)
        assert layer.mlp.shared_expert.down_proj.weight.shape[1] == cfg.shared_expert_intermediate_size
        assert layer.mlp.shared_expert_gate.weight.shape == (1, cfg.hidden_size)
    assert dense.config.num_hidden_layers == cfg.num_hidden_layers
    assert dense.config.hidden_size == cfg.hidden_size
    assert moe.config.vocab_size == dense.config.vocab_size


def test_tokenizer(models):
    _, tok = models["demo-moe"]
    assert tok.padding_side == "left"
    assert tok.pad_token == "[PAD]" and tok.unk_token == "[UNK]" and tok.bos_token == "[BOS]"
    ids = tok("The capital of France is")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok(" Paris", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("Paris")]
    assert tok("zzyzx")["input_ids"][-1] == tok.unk_token_id


@pytest.mark.parametrize("name", ["demo-moe", "demo-dense"])
def test_models_know_the_bundled_facts(models, name):
    model, tok = models[name]
    all_ranks = []
    for rel in bundled():
        enc = encode_facts(tok, rel.facts())
        assert not enc.skipped, rel.name
        ranks = last_position_ranks(model, tok, enc.prompts, enc.targets)
        rel_mrr = float((1.0 / ranks.double()).mean())
        assert rel_mrr >= 0.8, f"{name} {rel.name}: MRR {rel_mrr:.3f}"
        all_ranks.append(ranks)
    ranks = torch.cat(all_ranks)
    mrr = float((1.0 / ranks.double()).mean())
    assert mrr >= 0.9, f"{name}: MRR {mrr:.3f}"
    metrics = json.loads((demo.path(name) / "metrics.json").read_text())
    assert metrics["eval"]["overall"]["mrr"] == pytest.approx(mrr, abs=0.01)
    assert metrics["eval"]["overall"]["prompts"] == len(ranks)


def test_left_padding_matches_unpadded(models):
    model, tok = models["demo-moe"]
    prompts = ["The capital of France is", "Wolfgang Amadeus Mozart was born in the city of"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        padded = model(**batch).logits[:, -1]
        alone = model(**tok(prompts[0], return_tensors="pt")).logits[:, -1]
    torch.testing.assert_close(padded[0:1], alone, atol=1e-4, rtol=1e-4)
    assert padded.argmax(-1).tolist() == tok.convert_tokens_to_ids(["Paris", "Salzburg"])


def test_load_dtype():
    model, _ = demo.load("demo-dense", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
