"""nnsight_moe.data: LRE loader, bundled relations, target-token rule and its warnings."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from nnsight_moe.data import (
    AmbiguousTargetWarning,
    EncodedFacts,
    Fact,
    Relation,
    RelationFormatError,
    UnknownTargetWarning,
    bundled,
    bundled_names,
    encode_facts,
    load_relation,
    load_relations,
    target_token,
)

LRE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "lre"
needs_lre = pytest.mark.skipif(
    not LRE_DIR.is_dir(), reason=f"LRE relation files not found at {LRE_DIR} (../shared/data/lre from the repo root)"
)

EXPECTED_BUNDLED = {
    "country_capital_city",
    "country_currency",
    "country_language",
    "fruit_inside_color",
    "landmark_in_country",
    "object_superclass",
    "person_birthplace",
}


def word_tokenizer(words):
    """A small word-level PreTrainedTokenizerFast (Whitespace pre-tokenizer, [UNK]) over ``words``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *dict.fromkeys(words)])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def demo_tokenizer():
    """The demo models' word-level tokenizer, rebuilt from the bundled relations (no files needed)."""
    from nnsight_moe.demo.train import build_tokenizer, wrap_tokenizer

    return wrap_tokenizer(build_tokenizer(bundled()))


# ------------------------------------------------------------------------------------ LRE files


@needs_lre
def test_loads_every_lre_file():
    files = sorted(LRE_DIR.rglob("*.json"))
    assert files, f"no *.json under {LRE_DIR}"
    relations = load_relations(LRE_DIR)
    assert len(relations) == len(files)
    assert [r.name for r in relations] == sorted(r.name for r in relations)
    for path in files:
        raw = json.loads(path.read_text(encoding="utf-8"))
        rel = load_relation(path)
        assert rel.source == str(path)
        assert rel.name == raw["name"]
        assert rel.prompt_templates == raw["prompt_templates"]
        assert len(rel) == len(raw["samples"]) > 0
        assert rel.properties == raw.get("properties", {})
        facts = rel.facts()
        assert len(facts) == len(rel) * len(rel.prompt_templates)
        assert all(f.relation == rel.name and f.subject in f.prompt for f in facts)
        assert all(f.prompt == f.template.format(f.subject) for f in facts[:5])


@needs_lre
def test_lre_doubly_escaped_letters_are_decoded():
    rel = load_relation(LRE_DIR / "factual" / "country_capital_city.json")
    objects = dict(rel.samples)
    assert objects["Brazil"] == "Brasília"
    assert not any("\\u" in s or "\\u" in o for s, o in rel.samples)


@needs_lre
def test_lre_facts_with_a_small_vocabulary_are_skipped_and_counted(demo_tokenizer):
    facts = [f for rel in load_relations(LRE_DIR) for f in rel.facts(0)]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        enc = encode_facts(demo_tokenizer, facts)
    unknown = [w for w in record if issubclass(w.category, UnknownTargetWarning)]
    assert len(unknown) == 1 and f"skipped {len(enc.skipped)} of {len(facts)} facts" in str(unknown[0].message)
    # real LRE objects such as 'The Beatles' / 'The Doors' share a first word: warned, and kept
    ambiguous = {str(w.message).split("'")[1] for w in record if issubclass(w.category, AmbiguousTargetWarning)}
    assert "person lead singer of band" in ambiguous
    assert any(rel == "person lead singer of band" and "The Beatles" in objs for rel, _, objs in enc.ambiguous)
    assert len(enc) + len(enc.skipped) == len(facts)
    assert 0 < len(enc) < len(facts)
    assert all(demo_tokenizer.unk_token_id != t for t in enc.targets)
    assert all("unknown target token" in reason for _, reason in enc.skipped)
    kept = {(f.relation, f.object) for f in enc.facts}
    assert ("country capital city", "Paris") in kept


@needs_lre
def test_load_relations_single_file():
    path = LRE_DIR / "commonsense" / "fruit_inside_color.json"
    [rel] = load_relations(path)
    assert rel.name == "fruit inside color"


# ---------------------------------------------------------------------------------- bundled data


def test_bundled_relations():
    names = bundled_names()
    assert EXPECTED_BUNDLED <= set(names)
    relations = bundled()
    assert [r.name for r in relations] == sorted(names)
    for rel in relations:
        assert isinstance(rel, Relation)
        assert len(rel.facts(0)) >= 40, rel.name
        assert len(rel) >= 40, rel.name
        assert len(rel.prompt_templates) >= 2, rel.name
        assert Path(rel.source).stem == rel.name
        subjects = [s for s, _ in rel.samples]
        assert len(subjects) == len(set(subjects)), f"duplicate subjects in {rel.name}"
        assert all(t.count("{}") == 1 for t in rel.prompt_templates)
        assert rel.properties.get("relation_type") in {"factual", "commonsense", "linguistic", "bias"}


def test_bundled_by_name_and_unknown_name():
    [rel] = bundled("country_capital_city")
    assert ("France", "Paris") in rel.samples
    assert [r.name for r in bundled(["object superclass", "country_language"])] == [
        "country_language",
        "object_superclass",
    ]
    with pytest.raises(ValueError, match="available: .*country_capital_city"):
        bundled(["country_capital_city", "no_such_relation"])


def test_bundled_targets_are_known_and_unambiguous(demo_tokenizer):
    facts = [f for rel in bundled() for f in rel.facts()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither unknown nor ambiguous targets
        enc = encode_facts(demo_tokenizer, facts)
    assert len(enc) == len(facts) and not enc.skipped and not enc.ambiguous


def test_facts_template_selection():
    rel = bundled("country_capital_city")[0]
    n, t = len(rel), len(rel.prompt_templates)
    assert len(rel.facts()) == len(rel.facts("all")) == n * t
    assert {f.template for f in rel.facts(1)} == {rel.prompt_templates[1]}
    assert len(rel.facts([0, 1])) == 2 * n
    fact = rel.facts(0)[0]
    assert isinstance(fact, Fact)
    assert fact.prompt == rel.prompt_templates[0].format(fact.subject)
    with pytest.raises(ValueError, match="template"):
        rel.facts(t)
    with pytest.raises(ValueError):
        rel.facts("first")


# --------------------------------------------------------------------------------- format errors


def test_non_lre_json_names_file_and_missing_key(tmp_path):
    path = tmp_path / "foo.json"
    path.write_text(json.dumps({"name": "foo", "prompt_templates": ["{} is"]}))
    with pytest.raises(RelationFormatError, match=r"'foo\.json' is not LRE relation JSON: missing key 'samples'"):
        load_relation(path)
    with pytest.raises(RelationFormatError, match="foo.json"):
        load_relations(tmp_path)
    assert issubclass(RelationFormatError, ValueError)


@pytest.mark.parametrize(
    ("payload", "key"),
    [
        ({"prompt_templates": ["{} is"], "samples": []}, "missing key 'name'"),
        ({"name": "x", "samples": []}, "missing key 'prompt_templates'"),
        ({"name": "x", "prompt_templates": ["no slot"], "samples": []}, "'prompt_templates'"),
        ({"name": "x", "prompt_templates": ["{} is"], "samples": [{"subject": "a"}]}, "missing key 'object'"),
        ({"name": "x", "prompt_templates": ["{} is"], "samples": "oops"}, "'samples' must be a list"),
        ([1, 2, 3], "expected an object"),
    ],
)
def test_bad_relation_json(tmp_path, payload, key):
    path = tmp_path / "bar.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(RelationFormatError, match="'bar.json'") as err:
        load_relation(path)
    assert key in str(err.value)


def test_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(RelationFormatError, match="'broken.json' is not LRE relation JSON: invalid JSON"):
        load_relation(path)


# ------------------------------------------------------------------------------------- targets


def test_target_token_rule():
    tok = word_tokenizer(["Paris", "Mexico", "City", "The"])
    assert target_token(tok, "Paris") == tok.convert_tokens_to_ids("Paris")
    assert target_token(tok, "Mexico City") == tok.convert_tokens_to_ids("Mexico")
    assert target_token(tok, "Atlantis") is None  # unknown token
    assert target_token(tok, "") is None  # empty encoding


def test_unknown_targets_are_skipped_with_warning():
    tok = word_tokenizer(["Paris", "Rome", "The", "capital", "of", "is", "France", "Italy", "Narnia"])
    facts = [
        Fact("capital", "France", "Paris", "The capital of {} is"),
        Fact("capital", "Italy", "Rome", "The capital of {} is"),
        Fact("capital", "Narnia", "Cair Paravel", "The capital of {} is"),
    ]
    with pytest.warns(UnknownTargetWarning, match=r"skipped 1 of 3 .*'Cair Paravel'"):
        enc = encode_facts(tok, facts)
    assert isinstance(enc, EncodedFacts)
    assert enc.facts == facts[:2]
    assert enc.prompts == ["The capital of France is", "The capital of Italy is"]
    assert enc.targets == [tok.convert_tokens_to_ids("Paris"), tok.convert_tokens_to_ids("Rome")]
    assert len(enc.skipped) == 1 and enc.skipped[0][0] is facts[2] and "Cair Paravel" in enc.skipped[0][1]


def test_ambiguous_targets_warn_and_name_objects():
    tok = word_tokenizer(["United", "States", "Kingdom", "France", "English"])
    facts = [
        Fact("lang", "United States", "English", "{} speaks"),
        Fact("lang", "United Kingdom", "English", "{} speaks"),  # same object twice: not ambiguous
        Fact("country", "Ohio", "United States", "{} is in"),
        Fact("country", "Kent", "United Kingdom", "{} is in"),
        Fact("country", "Lyon", "France", "{} is in"),
    ]
    with pytest.warns(AmbiguousTargetWarning, match=r"'country'.*'United Kingdom', 'United States'") as record:
        enc = encode_facts(tok, facts)
    assert len([w for w in record if issubclass(w.category, AmbiguousTargetWarning)]) == 1
    assert len(enc) == 5 and not enc.skipped
    assert enc.ambiguous == [("country", tok.convert_tokens_to_ids("United"), ["United Kingdom", "United States"])]


def test_same_first_token_in_different_relations_is_not_ambiguous():
    tok = word_tokenizer(["United", "States", "Kingdom"])
    facts = [Fact("a", "x", "United States", "{} is"), Fact("b", "y", "United Kingdom", "{} is")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc = encode_facts(tok, facts)
    assert not enc.ambiguous
