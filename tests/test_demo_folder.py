"""The demo folders are plain Hugging Face model folders: AutoTokenizer / AutoModelForCausalLM,
TransformerBridge and nnsight load them by path and agree with ``demo.load`` token for token."""

from __future__ import annotations

import shutil

import pytest
import torch

from nnsight_moe import demo

PROMPTS = ["The capital of France is", "Paris is located in the country of", "The capital of Japan is"]


def _ids(tokenizer):
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


# the demo pair and the faithful MoE (the faithful dense models are LlamaForCausalLM folders like demo-dense)
@pytest.fixture(scope="module", params=["demo-moe", "demo-dense", "faithful-moe"])
def reference(request):
    model, tokenizer = demo.load(request.param)
    ids, mask = _ids(tokenizer)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return request.param, tokenizer, ids, mask, logits


def test_auto_classes_match_demo_load(reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, ref_tok, ids, mask, logits = reference
    tokenizer = AutoTokenizer.from_pretrained(demo.path(name))
    assert tokenizer.convert_ids_to_tokens(tokenizer("The capital of France is")["input_ids"]) == [
        "[BOS]", "The", "capital", "of", "France", "is"]
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "padding_side", "model_max_length"):
        assert getattr(tokenizer, attr) == getattr(ref_tok, attr), attr
    auto_ids, auto_mask = _ids(tokenizer)
    assert torch.equal(auto_ids, ids) and torch.equal(auto_mask, mask)
    model = AutoModelForCausalLM.from_pretrained(demo.path(name)).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=auto_ids, attention_mask=auto_mask).logits, logits)


def test_a_copied_folder_is_a_local_model(reference, tmp_path):
    """`--model ./copy-of-demo`: the copy loads as a local directory and encodes every bundled fact."""
    from nnsight_moe.data import bundled, encode_facts
    from nnsight_moe.models import check_model_name, load_model

    name, ref_tok, ids, mask, logits = reference
    copy = tmp_path / "copy-of-demo"
    shutil.copytree(demo.path(name), copy)
    assert check_model_name(str(copy)) == "local"
    model, tokenizer = load_model(str(copy))
    assert torch.equal(_ids(tokenizer)[0], ids)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits)
    facts = [fact for relation in bundled() for fact in relation.facts()]
    mine, theirs = encode_facts(tokenizer, facts), encode_facts(ref_tok, facts)
    assert mine.prompts == theirs.prompts and mine.targets == theirs.targets and not mine.skipped


def test_transformer_bridge_boots_the_folder(reference):
    from transformer_lens.model_bridge import TransformerBridge

    name, _, ids, mask, logits = reference
    bridge = TransformerBridge.boot_transformers(str(demo.path(name)), device="cpu", dtype=torch.float32)
    assert torch.equal(bridge.tokenizer(PROMPTS, return_tensors="pt", padding=True)["input_ids"], ids)
    row = mask[0].bool()  # one prompt without its padding: the bridge's forward takes no mask here
    with torch.no_grad():
        out = bridge(ids[:1, row], return_type="logits")
    torch.testing.assert_close(out[0], logits[0, row], atol=1e-4, rtol=1e-4)


def test_nnsight_loads_the_folder(reference):
    from nnsight import TransformersModel

    name, _, ids, mask, logits = reference
    lm = TransformersModel(str(demo.path(name)), task="text-generation", dispatch=True)
    assert torch.equal(lm.tokenizer(PROMPTS, return_tensors="pt", padding=True)["input_ids"], ids)
    with lm.trace({"input_ids": ids, "attention_mask": mask}):
        out = lm.output.logits.save()
    torch.testing.assert_close(out, logits, atol=1e-5, rtol=1e-5)


def test_train_out_writes_a_loadable_folder(tmp_path):
    """`python -m nnsight_moe.demo.train --out DIR` writes the same kind of folder (1 step, dense only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nnsight_moe.demo import train

    train.main(["--out", str(tmp_path), "--steps", "1", "--only", "dense"])
    folder = tmp_path / "demo-dense"
    assert all((folder / file).is_file() for file in demo.FILES)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert torch.equal(_ids(tokenizer)[0], _ids(demo.load_tokenizer())[0])
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.vocab_size == len(tokenizer)
