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

Target rule (see :func:`target_token`): the target of a fact is the FIRST token of ``" " + object``.
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
    "Relation",
    "RelationFormatError",
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
    """Some facts were skipped because their target token is the tokenizer's unknown token."""


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


# --------------------------------------------------------------------------------------------- loading


def _unescape(text: str) -> str:
    # Some upstream LRE files store non-ASCII letters doubly escaped ("Bras\\u00edlia" in the JSON,
    # i.e. a literal backslash-u in the decoded string); turn those back into the letter.
    return _ESCAPED_UNICODE.sub(lambda m: chr(int(m.group(1), 16)), text) if "\\u" in text else text


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
    try:
        return _relation_from_dict(data, label, str(path))
    except RelationFormatError as err:
        raise RelationFormatError(f"{err} [{path}]") from None


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


def target_token(tokenizer, obj: str) -> int | None:
    """The target token id of an object: the FIRST token of ``" " + obj``.

    Computed as ``tokenizer(" " + obj, add_special_tokens=False).input_ids[0]``: the leading space makes
    the token the one a model predicts right after a prompt that ends in a word (``"... is" -> " Paris"``
    for byte-level BPE tokenizers such as GPT-2/Qwen). Returns None when the encoding is empty or the
    token is the tokenizer's unknown token (``tokenizer.unk_token_id``).

    Caveats: only the first token is scored, so different objects sharing a first token
    (``" United States"``/``" United Kingdom"``) are indistinguishable (see :func:`encode_facts`);
    SentencePiece tokenizers may encode the space as a token of its own, which then becomes the target.
    """
    ids = tokenizer(" " + obj, add_special_tokens=False)["input_ids"]
    if ids and isinstance(ids[0], list):  # a batched answer
        ids = ids[0]
    if not ids:
        return None
    first = int(ids[0])
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and first == unk:
        return None
    return first


def _token_text(tokenizer, token_id: int) -> str:
    try:
        return str(tokenizer.convert_ids_to_tokens(token_id))
    except Exception:  # noqa: BLE001 - only used in a warning message
        return str(token_id)


def encode_facts(tokenizer, facts: Iterable[Fact]) -> EncodedFacts:
    """Prompts and target token ids (:func:`target_token`) of ``facts``, skipping unusable ones.

    Facts whose object has no usable target token (unknown token or empty encoding) are left out and
    recorded in ``skipped`` with the reason, with one :class:`UnknownTargetWarning` per call (never an
    error). When two DIFFERENT objects of the same relation share a target token, an
    :class:`AmbiguousTargetWarning` names them (the facts are kept; see ``ambiguous``).
    """
    kept, prompts, targets, skipped = [], [], [], []
    for fact in facts:
        try:
            target = target_token(tokenizer, fact.object)
        except Exception as err:  # noqa: BLE001 - a tokenizer failure on one object skips that object
            skipped.append((fact, f"tokenizer failed on {fact.object!r}: {err}"))
            continue
        if target is None:
            skipped.append((fact, f"unknown target token for object {fact.object!r}"))
            continue
        kept.append(fact)
        prompts.append(fact.prompt)
        targets.append(target)
    if skipped:
        examples = sorted({f.object for f, _ in skipped})
        shown = ", ".join(repr(o) for o in examples[:8]) + (", ..." if len(examples) > 8 else "")
        warnings.warn(
            f"skipped {len(skipped)} of {len(skipped) + len(kept)} facts whose target token is unknown "
            f"to the tokenizer ({len(examples)} objects: {shown})",
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
    return EncodedFacts(kept, prompts, targets, skipped, ambiguous)
