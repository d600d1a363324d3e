"""Nemotron-H MoE layers: DeepSeek-V3 routing (sigmoid, bias, grouped top-2-sum, renorm, scale), relu2 experts; LatentMoE with ``moe_latent_size``.

With ``moe_latent_size`` the block projects its input into the latent space (``fc1_latent_proj``) and the
routed sum back (``fc2_latent_proj``, with the config's ``mlp_bias``): ``hook_latent_in`` is the experts'
input, ``hook_expert_out`` / ``hook_routed_out`` are latent, and
``hook_moe_out = hook_latent_out + hook_shared_out`` with ``hook_latent_out = fc2_latent_proj(hook_routed_out)``.
"""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.deepseek_v3 import deepseek_v3_routing

NEMOTRON_H = Adapter(
    name="nemotron_h", model_types=("nemotron_h",), routing=deepseek_v3_routing, shared="shared_experts",
    latent_out="fc2_latent_proj",
)
