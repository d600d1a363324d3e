"""Qwen3-Omni-MoE (thinker text stack): softmax top-k, optional renormalisation, weights cast to the logits' dtype; no shared expert.

Qwen3-Omni-MoE has two MoE decoder stacks: the *thinker* (``thinker.model.layers``: the multimodal LM that
reads the prompt and writes the text answer) and the *talker* (``talker.model.layers``: a speech-codec LM
with a sigmoid-gated shared expert, run only by ``generate(return_audio=True)`` on the thinker's hidden
states). The layout, the hook points and every recipe index the **thinker's** layers: on the full model
(``Qwen3OmniMoeForConditionalGeneration``, which has no forward of its own) and on the thinker alone
(``Qwen3OmniMoeThinkerForConditionalGeneration``) layer ``L`` is ``thinker.model.layers.L.mlp`` resp.
``model.layers.L.mlp`` (the layout's paths are relative to the model attached). The talker's MoE layers get
no hook points.
"""

from nnsight_moe.adapters.base import Adapter, softmax_routing

QWEN3_OMNI_MOE = Adapter(
    name="qwen3_omni_moe",
    model_types=("qwen3_omni_moe_text", "qwen3_omni_moe_thinker", "qwen3_omni_moe"),
    routing=softmax_routing,
)
