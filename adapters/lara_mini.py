"""Lara-Mini: softmax over float32 logits, top-k, optional renormalisation (``norm_topk_prob``), ungated shared expert."""

from nnsight_moe.adapters.base import Adapter, softmax_routing

LARA_MINI = Adapter(name="lara_mini", model_types=("lara_mini",), routing=softmax_routing, shared="shared_expert")
