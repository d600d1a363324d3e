"""Relation data in the LRE format, and the rule that turns a fact into a (prompt, target token) pair.

The format is the one of Hernandez et al., "Linearity of Relation Decoding in Transformer Language
Models" (public repository ``evandez/relations``): one JSON object per relation with

* ``name`` (str),
* ``prompt_templates`` (list of str, each with exactly one ``{}`` for the subject),
* ``prompt_templates_zs`` (optional, zero-shot templates; loaded but not used by :meth:`Relation.facts`),
* ``properties`` (optional dict: ``relation_type``, ``domain_name``, ``range_name``, ...),
* ``samples`` (list of ``{"subject": ..., "object": ...}``).

::

    from nnsight_moe.data import bundled, encode_facts
    relations = bundled()                                   # the package's own small relations
    enc = encode_facts(tokenizer, [f for r in relations for f in r.facts()])
    enc.prompts[0], enc.targets[0]                          # prompt string, target token id

Target rule (see :func:`target_token`): the target of a fact is the first token the tokenizer produces for
the object IN CONTEXT: encode ``prompt + " " + object`` and take the first token after the prompt's tokens.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = [
    "AmbiguousTargetWarning",
    "EncodedFacts",
    "Fact",
    "NEUTRAL_PROMPT",
    "Relation",
    "RelationFormatError",
    "SKIP_REASONS",
    "TargetTokenWarning",
    "UnknownTargetWarning",
    "bundled",
    "bundled_dir",
    "bundled_names",
    "encode_facts",
    "evenly_spaced",
    "load_relation",
    "load_relations",
    "target_token",
]

_BUNDLED_DIR = Path(__file__).resolve().parent / "relations"
_ESCAPED_UNICODE = re.compile(r"\\u([0-9a-fA-F]{4})")


class RelationFormatError(ValueError):
    """A file is not LRE relation JSON; the message names the file and the missing or bad key."""


class TargetTokenWarning(UserWarning):
    """Base class of the warnings :func:`encode_facts` issues about target tokens."""


class UnknownTargetWarning(TargetTokenWarning):
    """Some facts were skipped because their object has no usable target token (see ``SKIP_REASONS``)."""


class AmbiguousTargetWarning(TargetTokenWarning):
    """Two different objects of one relation share the same target (first) token."""


@dataclass(frozen=True)
class Fact:
    """One (subject, object) sample of a relation rendered with one prompt template."""

    relation: str
    subject: str
    object: str
    template: str

    @property
    def prompt(self) -> str:
        """The template with the subject filled in (``template.format(subject)``)."""
        return self.template.format(self.subject)


@dataclass
class Relation:
    """A relation: its prompt templates and (subject, object) samples.

    ``source`` is the file it was read from (None when built in code). ``prompt_templates_zs`` holds the
    optional zero-shot templates of the file; :meth:`facts` uses ``prompt_templates`` only.
    """

    name: str
    prompt_templates: list[str]
    samples: list[tuple[str, str]]
    properties: dict = field(default_factory=dict)
    source: str | None = None
    prompt_templates_zs: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        """Number of (subject, object) samples."""
        return len(self.samples)

    def facts(self, templates: str | int | Sequence[int] = "all") -> list[Fact]:
        """Facts of this relation, template-major (all samples of template 0, then of template 1, ...).

        ``templates``: ``"all"`` (every prompt template), an int (one template index) or a list of
        template indices.
        """
        if isinstance(templates, str):
            if templates != "all":
                raise ValueError(f"templates must be 'all', an int or a list of ints, got {templates!r}")
            chosen = list(self.prompt_templates)
        else:
            indices = [templates] if isinstance(templates, int) else list(templates)
            n = len(self.prompt_templates)
            bad = [i for i in indices if not isinstance(i, int) or not -n <= i < n]
            if bad:
                raise ValueError(f"relation {self.name!r} has {n} prompt templates; bad template index {bad}")
            chosen = [self.prompt_templates[i] for i in indices]
        return [Fact(self.name, s, o, t) for t in chosen for s, o in self.samples]


@dataclass
class EncodedFacts:
    """Facts turned into prompts and target token ids by :func:`encode_facts`.

    ``facts``/``prompts``/``targets`` are aligned and hold the kept facts only; ``skipped`` lists
    ``(fact, reason)`` for the others; ``ambiguous`` lists ``(relation, token_id, objects)`` for every
    target token shared by different objects of one relation.
    """

    facts: list[Fact]
    prompts: list[str]
    targets: list[int]
    skipped: list[tuple[Fact, str]] = field(default_factory=list)
    ambiguous: list[tuple[str, int, list[str]]] = field(default_factory=list)

    def __len__(self) -> int:
        """Number of kept facts."""
        return len(self.facts)

    def skipped_per_relation(self) -> dict[str, dict[str, int]]:
        """``{relation: {reason kind: count}}`` of the skipped facts (kinds: keys of ``SKIP_REASONS``)."""
        out: dict[str, dict[str, int]] = {}
        for fact, reason in self.skipped:
            kind = reason.split(":", 1)[0]
            per = out.setdefault(fact.relation, {})
            per[kind] = per.get(kind, 0) + 1
        return out

    def subset(self, indices: Sequence[int], targets: Sequence[int] | None = None) -> "EncodedFacts":
        """The kept facts at ``indices`` (optionally with new ``targets``); ``skipped`` is carried over."""
        indices = list(indices)
        chosen = [self.targets[i] for i in indices] if targets is None else [int(t) for t in targets]
        if len(chosen) != len(indices):
            raise ValueError(f"got {len(indices)} indices but {len(chosen)} targets")
        return EncodedFacts([self.facts[i] for i in indices], [self.prompts[i] for i in indices], chosen,
                            list(self.skipped), [a for a in self.ambiguous])


# --------------------------------------------------------------------------------------------- loading


def _unescape(text: str) -> str:
    # Some upstream LRE files store non-ASCII letters doubly escaped ("Bras\\u00edlia" in the JSON,
    # i.e. a literal backslash-u in the decoded string); turn those back into the letter.
    if "\\u" not in text:
        return text
    text = _ESCAPED_UNICODE.sub(lambda m: chr(int(m.group(1), 16)), text)
    try:  # a doubly escaped surrogate pair ("\\ud83c\\udf0d") is one character
        return text.encode("utf-16", "surrogatepass").decode("utf-16")
    except UnicodeDecodeError:
        return text  # a lone surrogate: load_relation names it


def _check_templates(label: str, key: str, value: Any, *, required: bool) -> list[str]:
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        raise RelationFormatError(f"{label} is not LRE relation JSON: key {key!r} must be a non-empty list of strings")
    for template in value:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise RelationFormatError(
                f"{label} is not LRE relation JSON: key {key!r} has {template!r}, "
                "but every template must be a string with exactly one '{}' for the subject"
            )
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError) as err:
            raise RelationFormatError(
                f"{label} is not LRE relation JSON: key {key!r} has {template!r}, which str.format rejects ({err})"
            ) from None
    return list(value)


def _relation_from_dict(data: Any, label: str, source: str | None) -> Relation:
    if not isinstance(data, dict):
        raise RelationFormatError(f"{label} is not LRE relation JSON: expected an object, got {type(data).__name__}")
    for key in ("name", "prompt_templates", "samples"):
        if key not in data:
            raise RelationFormatError(f"{label} is not LRE relation JSON: missing key {key!r}")
    name = data["name"]
    if not isinstance(name, str) or not name.strip():
        raise RelationFormatError(f"{label} is not LRE relation JSON: key 'name' must be a non-empty string")
    templates = _check_templates(label, "prompt_templates", data["prompt_templates"], required=True)
    templates_zs = _check_templates(label, "prompt_templates_zs", data.get("prompt_templates_zs"), required=False)
    properties = data.get("properties") or {}
    if not isinstance(properties, dict):
        raise RelationFormatError(f"{label} is not LRE relation JSON: key 'properties' must be an object")
    raw = data["samples"]
    if not isinstance(raw, list):
        raise RelationFormatError(f"{label} is not LRE relation JSON: key 'samples' must be a list")
    samples = []
    for i, sample in enumerate(raw):
        if not isinstance(sample, dict):
            raise RelationFormatError(f"{label} is not LRE relation JSON: samples[{i}] must be an object")
        for key in ("subject", "object"):
            if key not in sample:
                raise RelationFormatError(f"{label} is not LRE relation JSON: missing key {key!r} in samples[{i}]")
            if not isinstance(sample[key], str) or not sample[key].strip():
                raise RelationFormatError(
                    f"{label} is not LRE relation JSON: samples[{i}][{key!r}] must be a non-empty string"
                )
        samples.append((_unescape(sample["subject"].strip()), _unescape(sample["object"].strip())))
    return Relation(
        name=name.strip(),
        prompt_templates=templates,
        samples=samples,
        properties=dict(properties),
        source=source,
        prompt_templates_zs=templates_zs,
    )


def _lone_surrogate(relation: "Relation") -> str | None:
    """Which field of ``relation`` (e.g. ``samples[3] object``) holds a lone UTF-16 surrogate, else None."""
    fields = [("name", relation.name)]
    fields += [(f"prompt_templates[{i}]", t) for i, t in enumerate(relation.prompt_templates)]
    fields += [(f"prompt_templates_zs[{i}]", t) for i, t in enumerate(relation.prompt_templates_zs)]
    fields += [(f"samples[{i}] {part}", text) for i, pair in enumerate(relation.samples)
               for part, text in zip(("subject", "object"), pair)]
    for where, text in fields:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return where
    return None


def load_relation(path: str | Path) -> Relation:
    """Read one LRE relation JSON file.

    Raises :class:`RelationFormatError` (a ValueError) naming the file and the missing or bad key when
    the file is not LRE relation JSON (or not JSON at all), FileNotFoundError when it does not exist.
    Literal ``\\uXXXX`` escapes left in subjects/objects by double encoding are decoded.
    """
    path = Path(path)
    label = repr(path.name)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RelationFormatError(f"{label} is not LRE relation JSON: not UTF-8 text ({err}) [{path}]") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RelationFormatError(f"{label} is not LRE relation JSON: invalid JSON ({err}) [{path}]") from None
    except RecursionError:
        raise RelationFormatError(f"{label} is not LRE relation JSON: nested too deeply to parse [{path}]") from None
    try:
        relation = _relation_from_dict(data, label, str(path))
    except RelationFormatError as err:
        raise RelationFormatError(f"{err} [{path}]") from None
    bad = _lone_surrogate(relation)
    if bad is not None:
        raise RelationFormatError(
            f"{label} is not LRE relation JSON: {bad} holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape "
            f"without its pair), which is not text [{path}]")
    return relation


def load_relations(path_or_dir: str | Path) -> list[Relation]:
    """Read a relation file, or every ``*.json`` under a directory (recursively), sorted by name.

    Any file that is not LRE relation JSON raises :class:`RelationFormatError`; an empty directory
    gives an empty list.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        relations = [load_relation(p) for p in sorted(path.rglob("*.json")) if p.is_file()]
    elif path.exists():
        relations = [load_relation(path)]
    else:
        raise FileNotFoundError(f"no relation file or directory at {path}")
    return sorted(relations, key=lambda r: (r.name, r.source or ""))


def bundled_dir() -> Path:
    """The directory of the package's bundled relation files."""
    return _BUNDLED_DIR


def bundled_names() -> list[str]:
    """Names of the bundled relations (sorted), e.g. ``country_capital_city``."""
    return sorted(p.stem for p in _BUNDLED_DIR.glob("*.json"))


def evenly_spaced(items: Sequence, n: int | None) -> list:
    """At most ``n`` of ``items``, evenly spread over them and in order (all of them when n is None).

    Used to sample facts per relation deterministically, so every template and subject range is covered.
    """
    items = list(items)
    if n is None or len(items) <= n:
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def bundled(names: str | Iterable[str] | None = None) -> list[Relation]:
    """The package's own small relations (written for nnsight-moe), sorted by name.

    ``names``: None for all, or a name / list of names from :func:`bundled_names` (spaces are accepted
    for underscores). Unknown names raise a ValueError listing the available ones.
    """
    available = bundled_names()
    if names is None:
        wanted = available
    else:
        wanted = [names] if isinstance(names, str) else list(names)
        wanted = [n.strip().replace(" ", "_") for n in wanted]
        unknown = [n for n in wanted if n not in available]
        if unknown:
            raise ValueError(f"unknown bundled relation(s) {unknown}; available: {', '.join(available)}")
        wanted = list(dict.fromkeys(wanted))
    return sorted((load_relation(_BUNDLED_DIR / f"{n}.json") for n in wanted), key=lambda r: r.name)


# ---------------------------------------------------------------------------------------- targets

#: Context used by :func:`target_token` when no prompt is given: the object follows a word.
NEUTRAL_PROMPT = "The answer is"

#: Why a fact has no usable target; every ``EncodedFacts.skipped`` reason starts with one of these.
SKIP_REASONS = {
    "empty": "the object has no tokens",
    "unknown": "the first token is the tokenizer's unknown token",
    "whitespace": "the first token in context is a bare separator piece (whitespace only)",
    "boundary": "the object merges with the end of the prompt (no token boundary there)",
    "error": "the tokenizer failed on the text",
}


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts`` without special tokens (one batched call)."""
    out = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(map(int, ids)) for ids in out]


def _separator(prompt: str, separator: str | None) -> str:
    if separator is not None:
        return separator
    return "" if not prompt or prompt[-1].isspace() else " "


def _first_tokens(tokenizer, pairs: list[tuple[str, str]], separator: str | None = None
                  ) -> list[tuple[int | None, str | None]]:
    """``(target id, None)`` or ``(None, reason)`` for each ``(prompt, object)`` pair (batched).

    The target is the first token after the prompt's tokens in ``prompt + separator + object``, both
    encoded without special tokens (so BOS/EOS/[CLS]/[SEP] never take part).
    """
    prompts = [p for p, _ in pairs]
    fulls = [p + _separator(p, separator) + o for p, o in pairs]
    unique = sorted(set(prompts))
    try:
        prompt_ids = dict(zip(unique, _ids(tokenizer, unique)))
        full_ids = _ids(tokenizer, fulls)
    except Exception:  # noqa: BLE001 - fall back to one text at a time to find the failing ones
        prompt_ids, full_ids = {}, []
        for p, full in zip(prompts, fulls):
            try:
                prompt_ids.setdefault(p, _ids(tokenizer, [p])[0])
                full_ids.append(_ids(tokenizer, [full])[0])
            except Exception as err:  # noqa: BLE001
                full_ids.append(err)
    unk = getattr(tokenizer, "unk_token_id", None)
    out = []
    for (prompt, obj), full in zip(pairs, full_ids):
        if isinstance(full, Exception):
            out.append((None, f"error: tokenizer failed on {obj!r}: {full}"))
            continue
        if not obj.strip():
            out.append((None, f"empty: object {obj!r} has no tokens"))
            continue
        before = prompt_ids[prompt]
        n = len(before)
        if full[:n] != before:
            at = next((i for i, (a, b) in enumerate(zip(full, before)) if a != b), min(n, len(full)) - 1)
            out.append((None, f"boundary: object {obj!r} merges with the end of the prompt {prompt[-24:]!r} "
                              f"(token {_token_text(tokenizer, full[at])!r} spans the boundary)"))
            continue
        if len(full) == n:
            out.append((None, f"empty: object {obj!r} has no tokens after the prompt"))
            continue
        first = full[n]
        if unk is not None and first == unk:
            out.append((None, f"unknown: unknown target token for object {obj!r}"))
            continue
        if not tokenizer.decode([first]).strip():
            out.append((None, f"whitespace: the first token of object {obj!r} in context is the bare separator "
                              f"piece {_token_text(tokenizer, first)!r}"))
            continue
        out.append((first, None))
    return out


def target_token(tokenizer, obj: str, prompt: str | None = None, *, separator: str | None = None) -> int | None:
    """The target token id of an object: its FIRST token IN CONTEXT, i.e. after the prompt.

    ``prompt + separator + obj`` and ``prompt`` are encoded without special tokens; the target is the
    first token after the prompt's tokens. ``separator`` defaults to ``" "`` (``""`` when the prompt
    ends in whitespace); without a ``prompt`` the object follows :data:`NEUTRAL_PROMPT`. This is the
    token a model predicts right after the prompt, for every tokenizer kind: byte-level BPE (``"ĠParis"``,
    GPT-2 / OLMoE / Qwen), SentencePiece / Metaspace (``"▁Paris"``, Llama / Mistral, where the
    stand-alone ``" Paris"`` may start with a bare ``"▁"``) and WordPiece (``"paris"``).

    Returns None when the object has no usable token: no tokens, the unknown token, a whitespace-only
    piece (e.g. Llama's ``"▁"`` before digits), or a token that merges across the prompt/object boundary
    (the prompt's tokens are then not a prefix of the full text's). :func:`encode_facts` reports why.
    """
    return _first_tokens(tokenizer, [(NEUTRAL_PROMPT if prompt is None else prompt, obj)], separator)[0][0]


def _token_text(tokenizer, token_id: int) -> str:
    try:
        return str(tokenizer.convert_ids_to_tokens(token_id))
    except Exception:  # noqa: BLE001 - only used in a warning message
        return str(token_id)


def encode_facts(tokenizer, facts: Iterable[Fact], *, separator: str | None = None) -> EncodedFacts:
    """Prompts and target token ids (:func:`target_token`, in each fact's own prompt) of ``facts``.

    Facts whose object has no usable target token (see :data:`SKIP_REASONS`) are left out and recorded
    in ``skipped`` with the reason (``EncodedFacts.skipped_per_relation()`` counts them per relation and
    reason), with one :class:`UnknownTargetWarning` per call that names the counts per relation (never
    an error). When two DIFFERENT objects of the same relation share a target token, an
    :class:`AmbiguousTargetWarning` names them (the facts are kept; see ``ambiguous``).
    """
    facts = list(facts)
    found = _first_tokens(tokenizer, [(f.prompt, f.object) for f in facts], separator) if facts else []
    kept, prompts, targets, skipped = [], [], [], []
    for fact, (target, reason) in zip(facts, found):
        if target is None:
            skipped.append((fact, reason))
            continue
        kept.append(fact)
        prompts.append(fact.prompt)
        targets.append(target)
    encoded = EncodedFacts(kept, prompts, targets, skipped)
    if skipped:
        examples = sorted({f.object for f, _ in skipped})
        shown = ", ".join(repr(o) for o in examples[:8]) + (", ..." if len(examples) > 8 else "")
        per = "; ".join(f"{rel!r}: " + ", ".join(f"{n} {kind}" for kind, n in kinds.items())
                        for rel, kinds in encoded.skipped_per_relation().items())
        warnings.warn(
            f"skipped {len(skipped)} of {len(skipped) + len(kept)} facts whose object has no usable target token "
            f"({per}; {len(examples)} objects: {shown})",
            UnknownTargetWarning,
            stacklevel=2,
        )
    by_token: dict[tuple[str, int], set[str]] = defaultdict(set)
    for fact, target in zip(kept, targets):
        by_token[(fact.relation, target)].add(fact.object)
    ambiguous = [(rel, tok, sorted(objs)) for (rel, tok), objs in by_token.items() if len(objs) > 1]
    ambiguous.sort(key=lambda a: (a[0], a[1]))
    per_relation: dict[str, list[str]] = defaultdict(list)
    for rel, tok, objs in ambiguous:
        names = ", ".join(repr(o) for o in objs[:4]) + (f" (+{len(objs) - 4} more)" if len(objs) > 4 else "")
        per_relation[rel].append(f"{_token_text(tokenizer, tok)!r} <- {names}")
    for rel, parts in per_relation.items():
        shown = "; ".join(parts[:5]) + (f"; ... ({len(parts)} shared tokens in all)" if len(parts) > 5 else "")
        warnings.warn(
            f"relation {rel!r}: different objects share the same target (first) token, so their targets "
            f"are ambiguous: {shown}",
            AmbiguousTargetWarning,
            stacklevel=2,
        )
    encoded.ambiguous = ambiguous
    return encoded
