"""Coverage: every MoE family of the installed transformers, and whether nnsight-moe supports it.

A *family* here is a model package ``transformers.models.<package>``. A package is a MoE family when
its modeling structure contains a MoE block, found from the installed sources alone (no model is
built, no modeling module imported):

1. its ``modeling_<package>.py`` defines a fused experts module (a class decorated with
   ``@use_experts_implementation``) or a class whose name contains ``Experts``, ``MoE`` or ``Moe``
   (expert collections, routers and sparse blocks of families that predate the experts interface:
   DBRX, JetMoE, Llama 4, Switch Transformers, ...); or
2. it has no MoE classes of its own but runs a MoE package's modeling: one of its model types maps
   (in transformers' auto classes) to a class defined by a MoE package (Sarvam-MLA *is*
   ``DeepseekV3ForCausalLM``), or its ``text_config`` is a MoE package's model type (Kimi-K2.5's text
   model is DeepSeek-V3, Nemotron-3.5-Transcribe's is Nemotron-H).

Each MoE package is then exactly one of: **supported** (an adapter serves one of its model types, its
text model type, or the modeling classes it runs; every supported family passes the core equivalence
tests), **excluded** (:data:`EXCLUDED`: not a causal-LM MoE, or never an MoE model; it takes precedence) or **not yet supported**
(:data:`NOT_YET`, with what it needs). ``tests/test_coverage.py`` fails when a transformers release
brings a MoE package that is in none of them.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache

__all__ = ["EXCLUDED", "NOT_YET", "coverage", "moe_packages"]

#: MoE packages outside a causal-LM MoE, with why.
EXCLUDED: dict[str, str] = {
    "switch_transformers": "encoder-decoder (T5) with capacity-limited top-1 routing and token dropping; not a causal LM",
    "nllb_moe": "encoder-decoder translation model with capacity-limited top-2 routing; not a causal LM",
    "doge": "its CDMoE is product-key retrieval over ~16k single-neuron experts (embedding rows, no fused "
            "experts) whose router mixes logits across tokens in a full forward; not a top-k expert MoE",
    "gemma4_assistant": "Gemma-4's speculative-decoding assistant: its text model is gemma4_text, but its config "
                        "refuses enable_moe_block=True (validate_architecture), so it never has an MoE layer",
    "vitpose_backbone": "a vision backbone (pose estimation) whose 'experts' are dataset-indexed MLP heads chosen "
                        "by an input index, not a learned router; not a language model",
}

#: MoE packages not supported yet, with what they need (issue #14's groups).
NOT_YET: dict[str, str] = {
}

_MOE_CLASS = re.compile(r"^class (\w*(?:Experts|MoE|Moe)\w*)\(", re.M)
_CLASS = re.compile(r"^class (\w+)\(", re.M)
_TEXT_SUB_CONFIG = re.compile(r"\"text_config\"\s*:\s*SubConfigSpec\(\s*config_class=AutoConfig,\s*model_type=\"(\w+)\"")


def _models_dir() -> str:
    import transformers.models

    return os.path.dirname(transformers.models.__file__)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


@lru_cache(maxsize=1)
def _model_types() -> dict[str, list[str]]:
    """{package: its config model types}, from transformers' auto config mapping."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    out: dict[str, list[str]] = {}
    for model_type in CONFIG_MAPPING_NAMES:
        out.setdefault(model_type_to_module_name(model_type), []).append(model_type)
    return out


@lru_cache(maxsize=1)
def moe_packages() -> dict[str, str]:
    """{package: why it is a MoE family} for the installed transformers (rules in the module docstring)."""
    from transformers.models.auto import modeling_auto

    root = _models_dir()
    packages = sorted(p for p in os.listdir(root) if os.path.isdir(os.path.join(root, p)) and not p.startswith("_"))
    found, defined_by = {}, {}
    for package in packages:
        source = _read(os.path.join(root, package, f"modeling_{package}.py"))
        names = _MOE_CLASS.findall(source)
        if "@use_experts_implementation" in source or names:
            found[package] = "defines " + ", ".join(names[:3] or ["a fused experts module"])
            for name in _CLASS.findall(source):
                defined_by[name] = package
    types = _model_types()
    type_package = {t: p for p, ts in types.items() for t in ts}
    mappings = [m for n, m in vars(modeling_auto).items() if n.endswith("_MAPPING_NAMES") and isinstance(m, dict)]
    for package in packages:
        if package in found:
            continue
        for model_type in types.get(package, []):
            classes = {c for m in mappings for c in _as_list(m.get(model_type))}
            runs = sorted(c for c in classes if c in defined_by)
            if runs:
                found[package] = f"{model_type} runs {runs[0]} ({defined_by[runs[0]]})"
                break
        else:
            config_source = _read(os.path.join(root, package, f"configuration_{package}.py"))
            text = [t for t in _TEXT_SUB_CONFIG.findall(config_source) if type_package.get(t) in found]
            if text:
                found[package] = f"its text model is {text[0]} ({type_package[text[0]]})"
    return dict(sorted(found.items()))


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _served_by(package: str, why: str) -> str | None:
    """The adapter (family name) serving ``package``, or None."""
    from nnsight_moe.adapters import _REGISTRY

    candidates = list(_model_types().get(package, []))
    match = re.search(r"its text model is (\w+)", why)
    if match:
        candidates.append(match.group(1))
    match = re.search(r"runs \w+ \((\w+)\)", why)
    if match:
        candidates += _model_types().get(match.group(1), [])
    return next((_REGISTRY[t].name for t in candidates if t in _REGISTRY), None)


def coverage() -> list[tuple[str, str, str]]:
    """(package, status, detail) for every MoE package: status ``supported`` (detail: the family that
    serves it), ``excluded`` or ``not yet`` (detail: the reason), or ``unlisted`` (a new MoE package
    in none of the tables: the coverage test fails on it)."""
    rows = []
    for package, why in moe_packages().items():
        family = _served_by(package, why)
        if package in EXCLUDED:  # first: a dense package whose text model type has an adapter (gemma4_assistant)
            rows.append((package, "excluded", EXCLUDED[package]))
        elif family is not None:
            rows.append((package, "supported", family))
        elif package in NOT_YET:
            rows.append((package, "not yet", NOT_YET[package]))
        else:
            rows.append((package, "unlisted", why))
    return rows
