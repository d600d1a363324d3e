"""Muse-Spark: sigmoid scores of scaled float32 logits, selection bias, renorm (eps 1e-15) and scale; a latent MoE (experts run in ``moe_hidden_size``, each followed by a norm).

The block projects its input down (``pre_expert_proj``, then ``pre_expert_norm``): ``hook_latent_in`` is the
experts' input and ``hook_expert_out`` / ``hook_routed_out`` are latent (width ``moe_hidden_size``, each
expert's output after its ``post_expert_norm``). ``post_expert_proj`` (no bias) maps the routed sum back:
``hook_moe_out = hook_latent_out = post_expert_proj(hook_routed_out)``. No shared expert.
"""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.routing import Routing


def muse_spark_routing(block, router, config) -> Routing:
    """``topk(sigmoid(logits) + bias)`` (unsorted; the router returns the logits times its output_multiplier);
    weights renormalised with eps 1e-15 and scaled, float32."""
    return Routing(
        n_experts=router.num_experts,
        top_k=router.top_k,
        scoring="sigmoid",
        normalize=True,
        norm_eps=float(router.norm_topk_prob_eps),
        scale=float(router.routed_scaling_factor),
        bias=router.e_score_correction_bias,
        sorted=False,
    )


MUSE_SPARK = Adapter(name="muse_spark", model_types=("muse_spark", "muse_spark_text"), routing=muse_spark_routing,
                     latent_out="post_expert_proj")
