"""DeepSeek-V4: sqrt(softplus) scores in the model's dtype, selection-only bias, top-k, renormalised and scaled; the first layers are hash-routed (experts looked up from the token ids); a shared expert.

Hash-routed layers (``mlp_layer_types == "hash_moe"``) choose their experts by a fixed table of the token
ids (``gate.tid2eid[input_ids]``): their ``hook_topk_indices`` are the model's own lookup (editable: the
weights are re-derived from the scores), and ``block_experts(..., mode="reroute")`` is refused there (it has
no meaning for a selection that does not depend on scores); ``zero`` and ``renorm`` work as everywhere.
The router scores and renormalises in the logits' dtype (bf16 on a bf16 model): ``precision="scores"``.
"""

from nnsight_moe.adapters.base import Adapter
from nnsight_moe.layout import UnsupportedModelError
from nnsight_moe.routing import HashRouting, Routing


def deepseek_v4_routing(block, router, config) -> Routing:
    """``sqrtsoftplus`` scores (or ``sigmoid``/``softmax``) in the logits' dtype; ``topk(scores + bias, sorted=False)``
    (or the hash table); weights ``w / (sum + 1e-20) * routed_scaling_factor``."""
    scoring = config.scoring_func
    if scoring not in ("sqrtsoftplus", "sigmoid", "softmax"):
        raise UnsupportedModelError(f"deepseek_v4 with scoring_func={scoring!r} is not supported; accepted: "
                                    "'sqrtsoftplus', 'sigmoid', 'softmax'")
    hashed = getattr(block, "is_hash", False)
    return (HashRouting if hashed else Routing)(
        n_experts=router.num_experts,
        top_k=router.top_k,
        scoring=scoring,
        normalize=True,
        norm_eps=1e-20,
        scale=float(router.routed_scaling_factor),
        bias=None if hashed else router.e_score_correction_bias,
        sorted=False,
        precision="scores",
    )


DEEPSEEK_V4 = Adapter(
    name="deepseek_v4",
    model_types=("deepseek_v4",),
    routing=deepseek_v4_routing,
    shared="shared_experts",
)
