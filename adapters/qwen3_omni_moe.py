"""Qwen3-Omni-MoE (two decoder stacks): softmax top-k, optional renormalisation, weights cast to the logits' dtype; the thinker's blocks have no shared expert, the talker's a sigmoid-gated one.

Qwen3-Omni-MoE has two MoE decoder stacks: the *thinker* (``thinker.model.layers``: the multimodal LM that
reads the prompt and writes the text answer) and the *talker* (``talker.model.layers``: a speech-codec LM
with a sigmoid-gated shared expert, run only by ``generate(return_audio=True)`` on the thinker's hidden
states). A layout indexes one stack, the one of the model it is found on:

* the full model (``Qwen3OmniMoeForConditionalGeneration``, which has no forward of its own) and the thinker
  alone (``Qwen3OmniMoeThinkerForConditionalGeneration``): the **thinker's** layers, ``L`` is
  ``thinker.model.language_model.layers.L.mlp`` resp. ``model.language_model.layers.L.mlp``; every recipe
  runs on this stack (it makes the text logits);
* the talker (``full.talker``, a ``Qwen3OmniMoeTalkerForConditionalGeneration``, attached on its own:
  ``nnsight_moe.attach(full.talker)``): the **talker's** layers, ``model.layers.L.mlp`` relative to it, so
  seen from the full model its hook points are ``talker.model.layers.L.mlp.hook_*`` (the path names the
  stack), with ``hook_shared_*`` for its gated shared expert. Both stacks can be attached at once (two
  handles on disjoint modules). The recipes do not run the talker (its inputs are the thinker's hidden
  states and codec ids, made inside ``generate``): its hooks serve hand-written analyses of audio generation.

The layout's paths are relative to the model attached.
"""

from nnsight_moe.adapters.base import Adapter, softmax_routing

QWEN3_OMNI_MOE = Adapter(
    name="qwen3_omni_moe",
    model_types=("qwen3_omni_moe_text", "qwen3_omni_moe_thinker", "qwen3_omni_moe", "qwen3_omni_moe_talker_text"),
    routing=softmax_routing,
    shared="shared_expert",  # the talker's blocks only (a block without one gets no hook_shared_*)
    shared_gate="shared_expert_gate",
)
