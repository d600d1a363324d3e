"""FlexOlmo: softmax top-k, optional renormalisation (``norm_topk_prob``), no shared expert."""

from nnsight_moe.adapters.base import Adapter, softmax_routing

FLEX_OLMO = Adapter(name="flex_olmo", model_types=("flex_olmo",), routing=softmax_routing)
