"""A.X-K1: DeepSeek-V3 routing (sigmoid, bias, grouped top-2-sum, renorm, scale) and shared experts; the block RMS-normalises its sum (``post_mlp_layernorm``).

``hook_moe_sum = hook_routed_out + hook_shared_out`` is the input of the post-MoE norm and
``hook_moe_out = post_mlp_layernorm(hook_moe_sum)`` the block output. The norm divides by one per-token
scalar, so with that scalar frozen the block output is still the sum of its parts:
``hook_moe_out = w * (hook_routed_out + hook_shared_out) / rms(hook_moe_sum)``.
"""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.adapters.deepseek_v3 import deepseek_v3_routing

AXK1 = Adapter(name="axk1", model_types=("axk1",), routing=deepseek_v3_routing, shared="shared_experts",
               post="post_mlp_layernorm")
