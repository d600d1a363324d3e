"""nnsight-moe: first-class Mixture-of-Experts interpretability for TransformerLens and nnsight.

    import nnsight_moe
    handle = nnsight_moe.attach(model)          # router / expert / shared-expert hook points
    print(handle.layout)                        # where the MoE parts live
    with nnsight_moe.block_experts(model, {3: [0, 5]}, mode="zero"):
        logits = model(input_ids).logits
"""

from nnsight_moe.adapters import detect, supported_families
from nnsight_moe.attach import AttachHandle, attach, attached, handle_of, hf_model
from nnsight_moe.interventions import BLOCK_MODES, ablate_shared, block_experts, restrict_experts
from nnsight_moe.layout import HOOK_NAMES, LayerLayout, MoELayout, UnsupportedModelError

__version__ = "0.1.0"


def layout(model) -> MoELayout:
    """The :class:`MoELayout` of ``model`` (HF model, TransformerBridge or nnsight model)."""
    handle = handle_of(model)
    return handle.layout if handle is not None else detect(hf_model(model))


def detach(model) -> None:
    """Detach ``model`` if it is attached (same as ``handle.detach()``)."""
    handle = handle_of(model)
    if handle is not None:
        handle.detach()


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
    "detach",
    "handle_of",
    "hf_model",
    "layout",
    "restrict_experts",
    "supported_families",
]

import nnsight_moe.nnsight_frontend  # noqa: E402,F401  (registers the nnsight frontend of attach)
from nnsight_moe import tl  # noqa: E402,F401  (registers the TransformerLens frontend of attach)
