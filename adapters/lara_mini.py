"""Lara-Mini: softmax over float32 logits, top-k, optional renormalisation (``norm_topk_prob``), weights cast to the
input dtype, ungated shared expert."""

from nnsight_moe.adapters.base import Adapter, softmax_routing

LARA_MINI = Adapter(name="lara_mini", model_types=("lara_mini",), routing=lambda block, router, config: softmax_routing(block, router, config, cast_weights="input"), shared="shared_expert")
