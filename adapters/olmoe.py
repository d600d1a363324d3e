"""OLMoE: softmax top-8 of 64, no renormalisation (``norm_topk_prob=False``), no shared expert."""

from nnsight_moe.adapters.base import Adapter, softmax_routing

OLMOE = Adapter(name="olmoe", model_types=("olmoe",), routing=softmax_routing)
