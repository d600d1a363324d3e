"""Mellum: softmax top-k, optional renormalisation (``norm_topk_prob``), no shared expert."""

from nnsight_moe.adapters.base import Adapter, softmax_routing

MELLUM = Adapter(name="mellum", model_types=("mellum",), routing=softmax_routing)
