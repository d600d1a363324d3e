"""ERNIE-4.5-VL-MoE (text experts): ERNIE-4.5's routing (softmax, selection-only bias, top-k, renorm by max(sum, norm_min)) on modality-isolated expert groups, shared experts.

Each MoE layer's block (``mlp``) holds two sparse blocks with their own router and experts, ``text_moe``
and ``vision_moe``, and one shared MLP. The block sends every token whose ``moe_mm_token_type_ids`` is 0
(text) through ``text_moe`` and the others through ``vision_moe``; without vision tokens (a text-only
prompt, every prompt of this plugin) only ``text_moe`` runs. The hook points are the text experts':
``hook_router_*`` / ``hook_topk_*`` / ``hook_expert_*`` / ``hook_routed_out`` are ``text_moe``'s router and
experts (E = its experts), ``hook_shared_*`` the shared MLP, ``hook_moe_out`` the block's output. The vision
experts have no hook points. Only text-only prompts are covered: with vision tokens (image / video
inputs and their ``moe_mm_token_type_ids``) ``text_moe`` sees only the text tokens, so the hook tensors
have one row per text token, the vision tokens' experts are unhooked, and the remote view (which assumes
every token goes through ``text_moe``) does not apply. (Measured, and why the vision experts are not
hooked: docs/hooks.md; their width differs from the text experts', ``moe_intermediate_size = [text, vision]``,
so the contract's one ``hook_expert_acts`` per block cannot hold both.)
"""

from torch import nn

from nnsight_moe.adapters.base import Adapter, _has_fused_experts
from nnsight_moe.adapters.ernie4_5_moe import ernie4_5_moe_routing


class _TextExpertsAdapter(Adapter):
    """The block is the one whose ``text_moe`` sub-block holds the router and the fused experts."""

    def is_block(self, module: nn.Module) -> bool:
        text = getattr(module, "text_moe", None)
        return (isinstance(text, nn.Module) and isinstance(getattr(text, "gate", None), nn.Module)
                and _has_fused_experts(getattr(text, "experts", None)))


ERNIE4_5_VL_MOE = _TextExpertsAdapter(
    name="ernie4_5_vl_moe",
    model_types=("ernie4_5_vl_moe_text", "ernie4_5_vl_moe"),
    routing=ernie4_5_moe_routing,
    router="text_moe.gate",
    experts="text_moe.experts",
    shared="shared_experts",
)
