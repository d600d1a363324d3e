"""nnsight-moe: first-class Mixture-of-Experts interpretability for TransformerLens and nnsight.

    import nnsight_moe
    handle = nnsight_moe.attach(model)          # router / expert / shared-expert hook points
    print(handle.layout)                        # where the MoE parts live
    with nnsight_moe.block_experts(model, {3: [0, 5]}, mode="zero"):
        logits = model(input_ids).logits

``import nnsight_moe`` is cheap: the public names below are imported from their modules on first use
(PEP 562), so the ``nnsight-moe`` command line answers ``--help`` without loading torch. The
TransformerLens and nnsight frontends of :func:`attach` are registered by the first ``attach`` call.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: Public name -> the module defining it; imported when the name is first used.
_API = {
    "detect": "nnsight_moe.adapters",
    "supported_families": "nnsight_moe.adapters",
    "AttachHandle": "nnsight_moe.attach",
    "attach": "nnsight_moe.attach",
    "attached": "nnsight_moe.attach",
    "check_routing": "nnsight_moe.check",
    "handle_of": "nnsight_moe.attach",
    "hf_model": "nnsight_moe.attach",
    "BLOCK_MODES": "nnsight_moe.interventions",
    "ablate_shared": "nnsight_moe.interventions",
    "block_experts": "nnsight_moe.interventions",
    "restrict_experts": "nnsight_moe.interventions",
    "HOOK_NAMES": "nnsight_moe.layout",
    "LayerLayout": "nnsight_moe.layout",
    "MoELayout": "nnsight_moe.layout",
    "UnsupportedModelError": "nnsight_moe.layout",
}

#: Subpackages / modules reachable as attributes (``nnsight_moe.tl.boot``, ``nnsight_moe.demo.load``).
_SUBMODULES = frozenset({
    "adapters", "attach", "check", "cli", "coverage", "data", "demo", "hooks", "interventions", "job", "layout",
    "models", "nnsight_frontend", "precision", "progress", "recipes", "remote", "report", "routing", "steering", "testing",
    "threads", "tl",
})

#: Public functions named like a submodule: ``nnsight_moe.attach`` / ``nnsight_moe.layout`` stay the
#: functions even after ``nnsight_moe/attach.py`` / ``layout.py`` are imported.
_SHADOWED = frozenset({"attach", "layout"})

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these come from __getattr__
    from nnsight_moe.adapters import detect, supported_families
    from nnsight_moe.attach import AttachHandle, attach, attached, handle_of, hf_model
    from nnsight_moe.interventions import BLOCK_MODES, ablate_shared, block_experts, restrict_experts
    from nnsight_moe.layout import HOOK_NAMES, LayerLayout, MoELayout, UnsupportedModelError


def layout(model) -> MoELayout:
    """The :class:`MoELayout` of ``model`` (HF model, TransformerBridge or nnsight model)."""
    from nnsight_moe.adapters import detect
    from nnsight_moe.attach import handle_of, hf_model

    handle = handle_of(model)
    return handle.layout if handle is not None else detect(hf_model(model))


def detach(model) -> None:
    """Detach ``model`` if it is attached (same as ``handle.detach()``)."""
    from nnsight_moe.attach import handle_of

    handle = handle_of(model)
    if handle is not None:
        handle.detach()


def __getattr__(name: str):
    """Import a public name (or a submodule) on first use."""
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API) | _SUBMODULES)


class _Package(types.ModuleType):
    """The package module: importing ``nnsight_moe.attach`` / ``.layout`` must not replace the functions."""

    def __setattr__(self, name, value):
        if name in _SHADOWED and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return  # the import system binding the submodule; `from nnsight_moe.attach import ...` still works
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "BLOCK_MODES",
    "HOOK_NAMES",
    "AttachHandle",
    "LayerLayout",
    "MoELayout",
    "UnsupportedModelError",
    "ablate_shared",
    "attach",
    "attached",
    "block_experts",
    "check_routing",
    "detach",
    "handle_of",
    "hf_model",
    "layout",
    "restrict_experts",
    "supported_families",
]
