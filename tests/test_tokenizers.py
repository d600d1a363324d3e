"""Target tokens IN CONTEXT for the three tokenizer kinds real checkpoints use, built offline.

* SentencePiece / Metaspace BPE, Llama-2 style (normalizer prepends "▁" and turns spaces into "▁",
  digits split): the stand-alone ``" Paris"`` starts with a bare "▁" piece, in context it is "▁Paris";
* byte-level BPE, GPT-2 / OLMoE / Qwen style ("Ġ"): stand-alone "Paris" differs from in-context "ĠParis";
* WordPiece, BERT style (lower-casing, [CLS] ... [SEP] added around every text).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from nnsight_moe.data import Fact, UnknownTargetWarning, encode_facts, target_token
from nnsight_moe.recipes.prompts import check_vocab, encode_prompts, model_tokenizer

CORPUS = ["The capital of France is Paris", "The capital of Italy is Rome", "Paris is in France",
          "It was founded in 1990", "The word is unlikely", "Rome and Paris", "The capital of Japan is Tokyo"] * 20
PROMPT = "The capital of France is"


def sentencepiece():
    """Llama-2-style: trained with a Metaspace split (no merge across words), used with the legacy
    normalizer (prepend "▁", spaces -> "▁", no pre-tokenizer) and a BOS template."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Digits(individual_digits=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", padding_side="left")


def bytelevel():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   padding_side="left")


def wordpiece():
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200,
                                                              special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", padding_side="right")


def _id(tok, piece):
    tid = tok.convert_tokens_to_ids(piece)
    assert tid is not None and tid != tok.unk_token_id, f"{piece!r} is not in the test vocabulary"
    return tid


def test_sentencepiece_in_context_not_the_bare_space_piece():
    tok = sentencepiece()
    standalone = tok(" Paris", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(standalone[:2]) == ["▁", "▁Paris"], "the old rule's failure mode"
    assert target_token(tok, "Paris", PROMPT) == _id(tok, "▁Paris") != standalone[0]
    assert target_token(tok, "Rome", "The capital of Italy is") == _id(tok, "▁Rome")
    assert target_token(tok, "Paris") == _id(tok, "▁Paris")  # no prompt: after a neutral one
    # digits: in context the first token is a bare "▁" (Llama splits digits): no usable token
    assert target_token(tok, "1990", "It was founded in") is None


def test_bytelevel_in_context_differs_from_standalone():
    tok = bytelevel()
    standalone = tok("Paris", add_special_tokens=False)["input_ids"][0]
    assert tok.convert_ids_to_tokens(standalone) == "Paris"
    assert target_token(tok, "Paris", PROMPT) == _id(tok, "ĠParis") != standalone
    assert target_token(tok, "Tokyo", "The capital of Japan is") == _id(tok, "ĠTokyo")
    # a prompt ending in a space gets no separator; its "Ġ" merges into "ĠParis": no token boundary there
    assert target_token(tok, "Paris", PROMPT + " ") is None
    # a merge across the boundary (no space): "un" + "likely" is one token "Ġunlikely"
    assert tok.convert_ids_to_tokens(tok("The word is unlikely")["input_ids"])[-1] == "Ġunlikely"
    assert target_token(tok, "likely", "The word is un", separator="") is None


def test_wordpiece_ignores_cls_sep_and_lowercases():
    tok = wordpiece()
    assert tok("Paris")["input_ids"][0] == tok.cls_token_id  # the template adds [CLS] ... [SEP]
    assert target_token(tok, "Paris", PROMPT) == _id(tok, "paris")
    assert target_token(tok, "1990", "It was founded in") == _id(tok, "1990")
    assert target_token(tok, "likely", "The word is un", separator="") is None  # "unlikely" is one word piece


@pytest.mark.parametrize("build", [sentencepiece, bytelevel, wordpiece])
def test_encode_facts_reports_unusable_objects_per_relation(build):
    tok = build()
    facts = [Fact("capital", "France", "Paris", "The capital of {} is"),
             Fact("capital", "Japan", "Tokyo", "The capital of {} is"),
             Fact("founded", "It", "1990", "{} was founded in"),
             Fact("founded", "It", "Rome", "{} was founded in")]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        enc = encode_facts(tok, facts)
    expected = {"sentencepiece": ["▁Paris", "▁Tokyo", "▁Rome"], "bytelevel": ["ĠParis", "ĠTokyo", "Ġ1990", "ĠRome"],
                "wordpiece": ["paris", "tokyo", "1990", "rome"]}[build.__name__]
    assert tok.convert_ids_to_tokens(enc.targets) == expected
    assert enc.prompts == [f.prompt for f in enc.facts]
    if build is sentencepiece:
        assert enc.skipped_per_relation() == {"founded": {"whitespace": 1}}
        warned = [w for w in record if issubclass(w.category, UnknownTargetWarning)]
        assert len(warned) == 1 and "'founded': 1 whitespace" in str(warned[0].message)
    else:
        assert not enc.skipped and not enc.skipped_per_relation()


@pytest.mark.parametrize("build", [sentencepiece, bytelevel, wordpiece])
def test_encode_prompts_ends_at_the_prompt(build):
    """BOS / [CLS] stay, EOS / [SEP] appended by the tokenizer are left out: the last non-pad token is the
    prompt's last token, so the prediction scored is the one of the target."""
    from nnsight_moe.recipes.prompts import last_positions

    tok = build()
    prompts = [PROMPT, "The capital of Japan is Tokyo and"]
    batch = encode_prompts(tok, prompts, "cpu")
    last = last_positions(batch["attention_mask"])
    for row, prompt in enumerate(prompts):
        body = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert ids[-len(body):] == body and ids[: len(ids) - len(body)] == tok(prompt)["input_ids"][:len(ids) - len(body)]
        assert batch["input_ids"][row, last[row]] == body[-1]
    if build is wordpiece:
        assert tok.sep_token_id not in batch["input_ids"][batch["attention_mask"].bool()].tolist()
        assert batch["input_ids"][0, 0] == tok.cls_token_id


def test_vocab_check_names_the_bad_id():
    tok = bytelevel()
    with pytest.raises(ValueError, match=r"token id 999 in the prompts is outside the model's vocabulary of 128 ids"):
        check_vocab([5, 999], 128, "the prompts", tok)
    check_vocab([0, 127], 128)
    with pytest.raises(ValueError, match="outside the model's vocabulary of 128 ids"):
        encode_prompts(tok, ["The capital of France is Paris"], "cpu", vocab=128)


def test_model_tokenizer():
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from helpers import language_model

    from nnsight_moe.testing import tiny_model

    model = tiny_model("olmoe")
    assert model_tokenizer(model) is None
    lm = language_model(model)
    assert model_tokenizer(lm) is lm.tokenizer
    other = wordpiece()
    assert model_tokenizer(lm, other) is other
