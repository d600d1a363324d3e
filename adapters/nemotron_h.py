"""Nemotron-H MoE layers: DeepSeek-V3 routing (sigmoid, bias, grouped top-2-sum, renorm, scale), relu2 experts."""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.deepseek_v3 import deepseek_v3_routing
from nnsight_moe.layout import UnsupportedModelError
from torch import nn


def nemotron_h_routing(block, router, config):
    """DeepSeek-V3 routing; latent MoE (``moe_latent_size``) projects around the experts and is not supported."""
    if not (isinstance(block.fc1_latent_proj, nn.Identity) and isinstance(block.fc2_latent_proj, nn.Identity)):
        raise UnsupportedModelError(
            f"nemotron_h with moe_latent_size={config.moe_latent_size} projects expert inputs/outputs through "
            "latent projections, which the hook contract cannot express; accepted: moe_latent_size=None"
        )
    return deepseek_v3_routing(block, router, config)


NEMOTRON_H = Adapter(
    name="nemotron_h", model_types=("nemotron_h",), routing=nemotron_h_routing, shared="shared_experts"
)
